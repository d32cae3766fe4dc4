"""Datasets as uint8 arrays: the embedded digits, MNIST/Fashion-MNIST, CIFAR, image folders.

Every file is checked before use: IDX headers against the data size, CIFAR pickles against
their published md5 *before* unpickling (so no untrusted pickle ever runs), image folders
image by image. A truncated or corrupt file is a `UserError` naming its path, never a
silently wrong dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fedftg.data.arrays import user_arrays
from fedftg.data.download import fetch, md5sum
from fedftg.data.imagefolder import count_classes, load_imagefolder
from fedftg.errors import UserError
from fedftg.tables import Table, call_user

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


@dataclass(frozen=True)
class Dataset:
    """Train and test images (N x C x H x W), int64 labels and per-channel statistics.

    Images are uint8, or float32 for a user's own data (`fedftg.data.arrays`), kept exact.
    ``mean`` and ``std`` are per channel, for normalisation: on the [0, 1] pixel scale for
    uint8 images, on the images' own scale for float32 ones.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if (
                x.dtype not in IMAGE_DTYPES
                or x.dtype != self.train_x.dtype
                or x.ndim != 4
                or x.shape[1:] != self.train_x.shape[1:]
            ):
                raise ValueError(
                    f"{self.name}: {split}_x is {x.dtype} {x.shape}, not uint8 or float32 NCHW"
                )
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{self.name}: {split}_y is {y.dtype} {y.shape}, not int64 (N,)")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel")

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
    """`$FEDFTG_DATA`, else ~/.cache/fedftg/data."""
    env = os.environ.get("FEDFTG_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedftg" / "data"


# (root, download) -> Dataset; root: --data-dir, else default_data_dir()
DatasetLoader = Callable[[Path, bool], Dataset]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader and what is known of it before loading.

    ``num_classes``, ``channels`` and ``image_size``, where declared, are checked against
    what the loader returns; ``num_classes`` None means the files decide, and
    ``count_classes(data_dir)`` (when given) counts them without loading (None: cannot
    tell). A non-empty ``data_dir`` says the dataset *is* the ``--data-dir`` the user gives
    (required) and what it must be. ``note`` follows the name in the ``--dataset`` help.
    """

    name: str
    load: DatasetLoader
    num_classes: int | None = None
    channels: int | None = None
    image_size: int | None = None
    count_classes: Callable[[Path], int | None] | None = None
    data_dir: str = ""
    note: str = ""

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """(channels, image size, classes) when all three are declared, else None."""
        if self.channels is None or self.image_size is None or self.num_classes is None:
            return None
        return self.channels, self.image_size, self.num_classes


def dataset_from(data: object, name: str, num_classes: int | None = None) -> Dataset:
    """A user's data as a `Dataset` named ``name``: a `Dataset` as it is, any form
    `fedftg.data.arrays.user_arrays` accepts checked and converted (class names "0".."C-1",
    the statistics of its training images)."""
    if isinstance(data, Dataset):
        return data
    a = user_arrays(data, num_classes)
    mean, std = channel_stats(a.train_x)
    classes = tuple(str(c) for c in range(a.num_classes))
    return Dataset(name, a.train_x, a.train_y, a.test_x, a.test_y, classes, mean, std)


def _resolve(path: str, load: object) -> DatasetSpec:
    """The entry of an imported dataset: a function, called without arguments, returning
    the data in a form `dataset_from` takes."""
    if not callable(load):
        raise UserError(
            f"dataset: {path!r} is a {type(load).__name__}, not a function returning the data"
        )
    return DatasetSpec(
        path, lambda root, download: dataset_from(call_user("dataset", path, load), path)
    )


DATASETS: Table[DatasetSpec] = Table("dataset", "dataset", _resolve)


def register_dataset(
    name: str,
    load: DatasetLoader,
    *,
    num_classes: int | None = None,
    channels: int | None = None,
    image_size: int | None = None,
    count_classes: Callable[[Path], int | None] | None = None,
    data_dir: str = "",
    note: str = "",
) -> DatasetSpec:
    """Make dataset ``name`` loadable and a valid ``--dataset`` (see `DatasetSpec`).

    ``load(root, download)`` returns a `Dataset`; ``root`` is the ``--data-dir`` given
    (expanded), else `default_data_dir()`; ``download`` says whether fetching missing
    files is allowed. Declare ``channels`` and ``image_size`` together (then `fedftg bench`
    can mimic the dataset too). A taken name or a malformed declaration is a `UserError`.
    """
    where = f"dataset: cannot register {name!r}"
    if not callable(load):
        raise UserError(f"{where}: its loader {load!r} is not callable")
    for field, value in (
        ("num_classes", num_classes),
        ("channels", channels),
        ("image_size", image_size),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise UserError(f"{where}: {field} must be an integer >= 1, got {value!r}")
    if (channels is None) != (image_size is None):
        raise UserError(f"{where}: declare channels and image_size together, or neither")
    if num_classes is not None and count_classes is not None:
        raise UserError(f"{where}: give num_classes or count_classes, not both")
    spec = DatasetSpec(name, load, num_classes, channels, image_size, count_classes, data_dir, note)
    return DATASETS.add(name, spec)


def dataset_classes(name: str, data_dir: str | Path | None = None) -> int | None:
    """The number of classes of dataset ``name`` without loading it (None if unknown, e.g.
    an image folder that is not there)."""
    if name not in DATASETS:
        return None
    spec = DATASETS.get(name)
    if spec.num_classes is not None or spec.count_classes is None:
        return spec.num_classes
    if not data_dir or not Path(data_dir).expanduser().exists():
        return None
    return spec.count_classes(Path(data_dir).expanduser())


def shaped_datasets() -> dict[str, tuple[int, int, int]]:
    """(channels, image size, classes) of every dataset that declares them (`fedftg bench`)."""
    return {n: s.shape for n, s in DATASETS.entries().items() if s.shape is not None}


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = True
) -> Dataset:
    """Load dataset ``name``; files live under ``data_dir`` (default `default_data_dir()`).

    For a dataset that is its ``data_dir`` (`imagefolder`), that is the folder or .zip
    itself. Missing files are downloaded when ``download`` is true; any problem is a
    `UserError` naming the path.
    """
    spec = DATASETS.get(name)
    if data_dir is not None:
        root = Path(data_dir).expanduser()
    elif spec.data_dir:
        raise UserError(f"data_dir: the {name} dataset needs --data-dir ({spec.data_dir})")
    else:
        root = default_data_dir()
    return _as_declared(spec, spec.load(root, download))


def _as_declared(spec: DatasetSpec, ds: Dataset) -> Dataset:
    """``ds``, checked against what ``spec`` declares of it (a `UserError` if it differs)."""
    if not isinstance(ds, Dataset):
        raise UserError(
            f"dataset: the loader of {spec.name!r} returned a {type(ds).__name__}, not a Dataset"
        )
    for field, declared in (
        ("num_classes", spec.num_classes),
        ("channels", spec.channels),
        ("image_size", spec.image_size),
    ):
        got = getattr(ds, field)
        if declared is not None and got != declared:
            raise UserError(
                f"dataset: {spec.name!r} is registered with {field} {declared}, but its "
                f"loader returned {got}"
            )
    return ds


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] scale
    (float32 images: on their own scale, `float_channel_stats`).

    Works from a 256-bin histogram per channel, in chunks, so even CIFAR-sized arrays
    need no float copy.
    """
    if x.dtype != np.uint8:
        return float_channel_stats(x)
    hist = np.zeros((x.shape[1], 256), dtype=np.int64)
    for start in range(0, len(x), 4096):
        for c, channel in enumerate(x[start : start + 4096].swapaxes(0, 1)):
            hist[c] += np.bincount(channel.ravel(), minlength=256)
    levels = np.arange(256) / 255.0
    n = hist.sum(axis=1)
    mean = hist @ levels / n
    var = hist @ levels**2 / n - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    return (
        tuple(round(float(m), 4) for m in mean),
        tuple(round(max(float(s), 1e-3), 4) for s in std),
    )


def float_channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of float (N, C, H, W) images on their own scale, summed in
    float64; a constant channel gets std 1 (it is only shifted)."""
    flat = x.swapaxes(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    std = flat.std(axis=1, dtype=np.float64)
    return tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std)


def _load_imagefolder(source: Path, download: bool) -> Dataset:
    """An image folder or .zip (`fedftg.data.imagefolder`); nothing to download."""
    arrays = load_imagefolder(source)
    mean, std = channel_stats(arrays.train_x)
    return Dataset(
        "imagefolder",
        arrays.train_x,
        arrays.train_y,
        arrays.test_x,
        arrays.test_y,
        arrays.classes,
        mean,
        std,
    )


# --------------------------------------------------------------------- embedded digits

DIGITS_SPLIT_SEED = 20220319


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 real images, bundled, offline), fixed 80/20 split.

    The split takes n // 5 images of each class for test, drawn with NumPy's legacy
    `RandomState`, whose stream is frozen, so every install gets the same split.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(y == c))
        test[members[: len(members) // 5]] = True
    mean, std = channel_stats(x[~test])
    classes = tuple(str(c) for c in range(10))
    return Dataset("digits", x[~test], y[~test], x[test], y[test], classes, mean, std)


# ------------------------------------------------------------------ MNIST and friends


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX dataset lives (`<root>/<folder>/raw/`), its mirror and its constants."""

    folder: str
    url: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    md5: dict[str, str]  # per .gz file, as published
    raw_md5: dict[str, str]  # per unpacked file: the md5 of what the published .gz holds


IDX_SOURCES = {
    "mnist": IdxSource(
        "MNIST",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        tuple(str(c) for c in range(10)),
        (0.1307,),
        (0.3081,),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        {
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
    ),
    "fmnist": IdxSource(
        "FashionMNIST",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
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
        (0.2860,),
        (0.3530,),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        {
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
    ),
}

GZIP_MAGIC = b"\x1f\x8b"


def load_idx_dataset(name: str, root: Path, download: bool) -> Dataset:
    """MNIST or Fashion-MNIST from torchvision's layout `<root>/<Name>/raw/`."""
    src = IDX_SOURCES[name]
    raw = root / src.folder / "raw"
    train_x, train_y = _idx_split(src, raw, "train", download)
    test_x, test_y = _idx_split(src, raw, "t10k", download)
    return Dataset(name, train_x, train_y, test_x, test_y, src.classes, src.mean, src.std)


def _idx_split(
    src: IdxSource, raw: Path, prefix: str, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) and int64 labels of one split, checked against each other."""
    images_path = _idx_file(src, raw / f"{prefix}-images-idx3-ubyte", download)
    labels_path = _idx_file(src, raw / f"{prefix}-labels-idx1-ubyte", download)
    images = read_idx(images_path, known_md5(src, images_path))
    labels = read_idx(labels_path, known_md5(src, labels_path))
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(f"{images_path}: expected 3-d images and 1-d labels in {labels_path}")
    if len(images) != len(labels):
        raise UserError(f"{images_path}: {len(images)} images but {len(labels)} labels")
    if labels.max(initial=0) >= len(src.classes):
        raise UserError(f"{labels_path}: label {labels.max()} out of range")
    return images[:, None], labels.astype(np.int64)


def _idx_file(src: IdxSource, stem: Path, download: bool) -> Path:
    """`<stem>.gz`, else the unpacked `<stem>`; downloads the .gz when both are missing."""
    gz = stem.with_name(stem.name + ".gz")
    for candidate in (gz, stem):
        if candidate.is_file():
            return candidate
    if not download:
        raise UserError(f"{gz}: dataset file missing (nor is {stem.name} there; download is off)")
    return fetch(src.url + gz.name, gz, src.md5[gz.name])


def known_md5(src: IdxSource, path: Path) -> str:
    """The published md5 of ``path`` (a .gz as released, or the file it unpacks to)."""
    return src.md5.get(path.name) or src.raw_md5[path.name]


def _identify(md5: str) -> str:
    """' (it is <dataset>'s <file>)' when ``md5`` is another known file's, else ''."""
    for name, src in IDX_SOURCES.items():
        for file, known in (*src.md5.items(), *src.raw_md5.items()):
            if known == md5:
                return f" (it is {name}'s {file})"
    return ""


def read_idx(path: Path, md5: str | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes, gzipped or not, checking its header.

    With ``md5``, the file's bytes (hashed as read: no second pass) must have it."""
    try:
        data = path.read_bytes()
        if md5 is not None:
            got = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if got != md5:
                raise UserError(
                    f"{path}: md5 {got} is not the published {md5}{_identify(got)}; a "
                    "different or damaged file: delete it to download the original again"
                )
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read ({exc or type(exc).__name__})") from None
    return parse_idx(data, str(path))


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """Parse IDX bytes: 0x0000, type 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    if len(data) < 4 or data[:2] != b"\0\0":
        raise UserError(f"{where}: not an IDX file (bad magic {data[:4].hex()})")
    if data[2] != 0x08:
        raise UserError(f"{where}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise UserError(f"{where}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise UserError(
            f"{where}: IDX size mismatch: header dims {dims} need {expected} bytes, the file "
            f"has {len(data) - header} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


# ----------------------------------------------------------------------------- CIFAR

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarSource:
    """One CIFAR python release: its folder, archive, per-file md5s and pickle keys."""

    folder: str
    archive: str
    archive_md5: str
    train: dict[str, str]  # file -> md5
    test: dict[str, str]
    meta: tuple[str, str]  # file, md5
    names_key: bytes
    label_key: bytes
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR_SOURCES = {
    "cifar10": CifarSource(
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        },
        {"test_batch": "40351d587109b95175f43aff81a1287e"},
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        b"label_names",
        b"labels",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSource(
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        {"train": "16019d7e3df5f24257cddd939b257f8d"},
        {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        ("meta", "7973b15100ade9c7d40fb424638fde48"),
        b"fine_label_names",
        b"fine_labels",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}


def load_cifar(name: str, root: Path, download: bool) -> Dataset:
    """CIFAR-10/100 from the python release: `<root>/<folder>/`, else the .tar.gz in root."""
    src = CIFAR_SOURCES[name]
    folder = root / src.folder
    if not folder.is_dir():
        extract_cifar(src, _cifar_archive(src, root, download), folder)
    meta_file, meta_md5 = src.meta
    meta = verified_pickle(folder / meta_file, meta_md5)
    classes = tuple(n.decode() for n in meta[src.names_key])
    train_x, train_y = _cifar_split(src, folder, src.train, len(classes))
    test_x, test_y = _cifar_split(src, folder, src.test, len(classes))
    return Dataset(name, train_x, train_y, test_x, test_y, classes, src.mean, src.std)


def _cifar_split(
    src: CifarSource, folder: Path, files: dict[str, str], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    parts = [
        cifar_arrays(verified_pickle(folder / f, md5), src.label_key, num_classes, folder / f)
        for f, md5 in files.items()
    ]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def cifar_arrays(
    batch: dict, label_key: bytes, num_classes: int, where: Path | str
) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled CIFAR batch as (N, 3, 32, 32) uint8 images and int64 labels."""
    data = np.asarray(batch.get(b"data", ()), dtype=np.uint8)
    labels = np.asarray(batch.get(label_key, ()), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise UserError(f"{where}: not a CIFAR batch (data {data.shape}, labels {labels.shape})")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise UserError(f"{where}: labels out of range 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def verified_pickle(path: Path, md5: str) -> dict:
    """Unpickle ``path`` only if its md5 is the published one: no untrusted pickle runs."""
    if not path.is_file():
        raise UserError(f"{path}: dataset file missing")
    got = md5sum(path)
    if got != md5:
        raise UserError(
            f"{path}: md5 {got} is not the published {md5}; refusing to unpickle a file "
            "that is not the original release"
        )
    with path.open("rb") as fh:
        obj = pickle.load(fh, encoding="bytes")
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR pickle")
    return obj


def _cifar_archive(src: CifarSource, root: Path, download: bool) -> Path:
    """The release .tar.gz in ``root``, md5-checked; downloaded when missing and allowed."""
    archive = root / src.archive
    if archive.is_file():
        got = md5sum(archive)
        if got != src.archive_md5:
            raise UserError(f"{archive}: md5 {got} is not the published {src.archive_md5}")
        return archive
    folder = root / src.folder
    if not download:
        raise UserError(f"{folder}: dataset missing, and so is {archive} (download is off)")
    try:
        return fetch(CIFAR_URL + src.archive, archive, src.archive_md5)
    except UserError as exc:
        raise UserError(f"{folder}: dataset missing; {exc}") from None


def extract_cifar(src: CifarSource, archive: Path, folder: Path) -> None:
    """Extract the release's known files into ``folder`` via a temp dir and one rename.

    Only the expected regular files are copied out, by name, so archive paths never
    become file-system paths (no traversal, no links), and an interrupted extraction
    leaves no half-filled folder behind.
    """
    wanted = {f"{src.folder}/{f}": f for f in (*src.train, *src.test, src.meta[0])}
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise UserError(f"{folder}: cannot extract {archive} here ({exc})") from None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                wanted_file = member.isfile() and member.name in wanted  # never a link
                source = tar.extractfile(member) if wanted_file else None
                if source is not None:
                    with (
                        source as fh,
                        (tmp / wanted[member.name]).open("wb") as out,
                    ):
                        shutil.copyfileobj(fh, out)
        missing = sorted(n for n, f in wanted.items() if not (tmp / f).is_file())
        if missing:
            raise UserError(f"{archive}: entries missing: {', '.join(missing)}")
        _move_into_place(tmp, folder)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{archive}: cannot extract ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; a folder another process put there first also counts."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise


# ------------------------------------------------------------------- the built-in datasets

register_dataset(
    "digits", lambda root, download: load_digits(), num_classes=10, channels=1, image_size=8
)
register_dataset(
    "mnist", partial(load_idx_dataset, "mnist"), num_classes=10, channels=1, image_size=28
)
register_dataset(
    "fmnist", partial(load_idx_dataset, "fmnist"), num_classes=10, channels=1, image_size=28
)
register_dataset(
    "cifar10", partial(load_cifar, "cifar10"), num_classes=10, channels=3, image_size=32
)
register_dataset(
    "cifar100", partial(load_cifar, "cifar100"), num_classes=100, channels=3, image_size=32
)
register_dataset(
    "imagefolder", _load_imagefolder, count_classes=count_classes, data_dir="a folder or .zip"
)
