"""Datasets as uint8 arrays: the embedded digits, MNIST/Fashion-MNIST, CIFAR, image folders.

Every file is checked before use (IDX headers against sizes, CIFAR pickles against their
published md5 before unpickling), so a truncated or corrupt file is an error that names
the path, never a silently wrong dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedftg.data.download import fetch
from fedftg.errors import UserError

NAMES = ("digits", "mnist", "fmnist", "cifar10", "cifar100", "imagefolder")


@dataclass(frozen=True)
class Dataset:
    """Train and test images (uint8, N x C x H x W), labels and per-channel statistics."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])


def default_data_dir() -> Path:
    env = os.environ.get("FEDFTG_DATA")
    return Path(env) if env else Path.home() / ".cache" / "fedftg" / "data"


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = True
) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` (default `$FEDFTG_DATA`, ~/.cache/fedftg/data)."""
    if name not in NAMES:
        raise UserError(f"dataset: unknown dataset {name!r}; use one of {', '.join(NAMES)}")
    if name == "digits":
        return load_digits()
    if name == "imagefolder":
        if data_dir is None:
            raise UserError("data_dir: the imagefolder dataset needs --data-dir")
        from fedftg.data.imagefolder import load_imagefolder

        return load_imagefolder(Path(data_dir))
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if name in ("mnist", "fmnist"):
        return load_idx_dataset(name, root, download)
    return load_cifar(name, root, download)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale."""
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    mean, std = [], []
    for ch in flat:  # per channel to keep float64 memory small
        v = ch.astype(np.float64) / 255.0
        mean.append(round(float(v.mean()), 4))
        std.append(round(max(float(v.std()), 1e-3), 4))
    return tuple(mean), tuple(std)


# --------------------------------------------------------------------- embedded digits


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 real images), a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(20220319)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: len(idx) // 5]] = True
    mean, std = channel_stats(x[~test])
    return Dataset(
        "digits", x[~test], y[~test], x[test], y[test], tuple(str(c) for c in range(10)), mean, std
    )


# ------------------------------------------------------------------ MNIST and friends

IDX_SOURCES = {
    "mnist": (
        "MNIST",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (0.1307,),
        (0.3081,),
        tuple(str(c) for c in range(10)),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fmnist": (
        "FashionMNIST",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (0.2860,),
        (0.3530,),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}


def load_idx_dataset(name: str, root: Path, download: bool) -> Dataset:
    """MNIST or Fashion-MNIST from torchvision's layout ``<root>/<Name>/raw/``."""
    folder, url, mean, std, classes, files = IDX_SOURCES[name]
    raw = root / folder / "raw"
    arrays = {}
    for fname, md5 in files.items():
        path = _idx_file(raw, fname, url + fname, md5, download)
        arrays[fname.split("-")[0] + "-" + fname.split("-")[1]] = read_idx(path)
    tx, ty = arrays["train-images"], arrays["train-labels"]
    vx, vy = arrays["t10k-images"], arrays["t10k-labels"]
    for images, labels, split in ((tx, ty, "train"), (vx, vy, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{raw}: {split} images and labels do not match")
        if labels.max(initial=0) >= len(classes):
            raise UserError(f"{raw}: {split} labels out of range")
    return Dataset(
        name,
        tx[:, None],
        ty.astype(np.int64),
        vx[:, None],
        vy.astype(np.int64),
        classes,
        mean,
        std,
    )


def _idx_file(raw: Path, fname: str, url: str, md5: str, download: bool) -> Path:
    """The .gz (or already unpacked) IDX file, downloading it when missing and allowed."""
    gz = raw / fname
    if gz.exists():
        return gz
    unpacked = raw / fname[: -len(".gz")]
    if unpacked.exists():
        return unpacked
    if not download:
        raise UserError(f"{gz}: dataset file missing (download disabled)")
    fetch(url, gz, md5)
    return gz


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes, checking its header."""
    try:
        opener: Callable = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (bad magic)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise UserError(
            f"{path}: IDX size mismatch: header says {expected} bytes, file has "
            f"{len(data) - header} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


# ----------------------------------------------------------------------------- CIFAR

CIFAR_SOURCES = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "train": {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        },
        "test": {"test_batch": "40351d587109b95175f43aff81a1287e"},
        "meta": ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888", b"label_names"),
        "label_key": b"labels",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "train": {"train": "16019d7e3df5f24257cddd939b257f8d"},
        "test": {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        "meta": ("meta", "7973b15100ade9c7d40fb424638fde48", b"fine_label_names"),
        "label_key": b"fine_labels",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


def load_cifar(name: str, root: Path, download: bool) -> Dataset:
    """CIFAR-10/100 from the original python release (folder or .tar.gz under ``root``)."""
    src = CIFAR_SOURCES[name]
    folder = root / src["folder"]
    if not folder.is_dir():
        archive_name, archive_md5 = src["archive"]
        archive = root / archive_name
        if not archive.exists():
            if not download:
                raise UserError(f"{folder}: dataset missing (no {archive_name}; download disabled)")
            fetch(src["url"], archive, archive_md5)
        _check_md5(archive, archive_md5)
        _extract_tar(archive, root)
    meta_name, meta_md5, names_key = src["meta"]
    meta = _verified_pickle(folder / meta_name, meta_md5)
    classes = tuple(n.decode() for n in meta[names_key])
    train = [_verified_pickle(folder / f, md5) for f, md5 in src["train"].items()]
    test = [_verified_pickle(folder / f, md5) for f, md5 in src["test"].items()]
    tx, ty = _cifar_arrays(train, src["label_key"])
    vx, vy = _cifar_arrays(test, src["label_key"])
    return Dataset(name, tx, ty, vx, vy, classes, src["mean"], src["std"])


def _cifar_arrays(batches: list[dict], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Stack CIFAR batch dicts into (N, 3, 32, 32) uint8 images and int64 labels."""
    x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return x.reshape(-1, 3, 32, 32), y


def _verified_pickle(path: Path, md5: str) -> dict:
    """Unpickle ``path`` only if its md5 is the published one (never untrusted pickles)."""
    if not path.exists():
        raise UserError(f"{path}: dataset file missing")
    _check_md5(path, md5)
    with path.open("rb") as fh:
        return pickle.load(fh, encoding="bytes")


def _check_md5(path: Path, md5: str) -> None:
    if file_md5(path) != md5:
        raise UserError(f"{path}: checksum mismatch (corrupt or not the original file)")


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract_tar(archive: Path, dest: Path) -> None:
    """Extract regular files only, refusing paths that would leave ``dest``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                target = (dest / m.name).resolve()
                if not target.is_relative_to(dest.resolve()) or not (m.isfile() or m.isdir()):
                    raise UserError(f"{archive}: unsafe entry {m.name!r} in archive")
                members.append(m)
            tar.extractall(dest, members=members)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{archive}: cannot extract ({exc})") from None
