"""Dataset loaders on small files made here; the shared offline datasets when present."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedftg.data import download, imagefolder, sources
from fedftg.data.sources import channel_stats, cifar_arrays, load_dataset, parse_idx, read_idx
from fedftg.errors import UserError


def shared_data() -> Path | None:
    """`$FEDFTG_SHARED_DATA`, else `shared/data` next to the repository, if present."""
    env = os.environ.get("FEDFTG_SHARED_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root if root.is_dir() else None


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFTG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDFTG_DATA", str(tmp_path / "data"))


# ----------------------------------------------------------------------------- digits


def test_digits_fixed_stratified_split():
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.dtype == np.uint8 and a.train_x.shape[1:] == (1, 8, 8)
    assert a.train_y.dtype == np.int64
    assert a.num_classes == 10 and a.channels == 1 and a.image_size == 8
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    full = load_digits()
    assert np.bincount(a.test_y).tolist() == [n // 5 for n in np.bincount(full.target)]
    # train + test is exactly the original set, each image once: the splits are disjoint
    scaled = np.rint(full.images * 255 / 16).astype(np.uint8).reshape(len(full.images), -1)
    both = np.concatenate([a.train_x, a.test_x]).reshape(len(scaled), -1)
    labels = np.concatenate([a.train_y, a.test_y])
    key = lambda x, y: sorted(map(bytes, np.column_stack([x, y.astype(np.uint8)])))  # noqa: E731
    assert key(both, labels) == key(scaled, full.target)
    assert a.train_x.max() == 255
    assert a.mean[0] == pytest.approx(a.train_x.mean() / 255, abs=1e-4)
    assert a.std[0] == pytest.approx((a.train_x / 255).std(), abs=1e-4)


def test_channel_stats_are_exact_per_channel():
    x = np.random.default_rng(0).integers(0, 256, (9000, 3, 2, 2), dtype=np.uint8)
    x[:, 1] //= 2
    mean, std = channel_stats(x)
    ref = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=1), atol=6e-5)
    np.testing.assert_allclose(std, ref.std(axis=1), atol=6e-5)


# -------------------------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray) -> bytes:
    dims = b"".join(struct.pack(">I", d) for d in arr.shape)
    return bytes([0, 0, 0x08, arr.ndim]) + dims + arr.astype(np.uint8).tobytes()


def _write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, arr, compress)
    got = read_idx(path)
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable


GOOD = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (gzip.compress(GOOD[:-5]), "size mismatch"),  # truncated data
        (gzip.compress(GOOD + b"\0"), "size mismatch"),  # trailing garbage
        (gzip.compress(GOOD)[:20], "cannot read"),  # truncated gzip stream
        (gzip.compress(GOOD)[:-8] + b"\0" * 8, "cannot read"),  # bad CRC trailer
        (b"\x00\x01\x08\x03" + GOOD[4:], "bad magic"),
        (b"\x00\x00\x0d\x03" + GOOD[4:], "type 0x0d"),
        (GOOD[:10], "truncated IDX header"),
    ],
)
def test_idx_corruption_names_the_path(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_parse_idx_labels():
    assert parse_idx(_idx_bytes(np.array([3, 1, 4])), "x").tolist() == [3, 1, 4]


def trust_idx_files(monkeypatch, raw: Path) -> None:
    """Make the md5 tables of MNIST / Fashion-MNIST accept the made-up files in ``raw``."""
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in raw.iterdir()}
    for name, src in sources.IDX_SOURCES.items():
        tiny = dataclasses.replace(src, md5={**src.md5, **md5}, raw_md5={**src.raw_md5, **md5})
        monkeypatch.setitem(sources.IDX_SOURCES, name, tiny)


def _tiny_idx_tree(
    root: Path, folder: str = "MNIST", compress: bool = True, seed: int = 0, monkeypatch=None
):
    """Made-up IDX files in the torchvision layout; trusted (md5 tables patched) when
    ``monkeypatch`` is given."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    suffix = ".gz" if compress else ""
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(
            raw / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress
        )
        _write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), compress)
    if monkeypatch is not None:
        trust_idx_files(monkeypatch, raw)
    return raw


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_layout_gz_or_unpacked(tmp_path, compress, monkeypatch):
    raw = _tiny_idx_tree(tmp_path, compress=compress, monkeypatch=monkeypatch)
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_y.dtype == np.int64 and ds.mean == (0.1307,)
    labels = raw / f"train-labels-idx1-ubyte{'.gz' if compress else ''}"
    np.testing.assert_array_equal(ds.train_y, read_idx(labels))


def test_idx_images_and_labels_must_agree(tmp_path, monkeypatch):
    raw = _tiny_idx_tree(tmp_path)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    trust_idx_files(monkeypatch, raw)
    with pytest.raises(UserError, match="5 images but 4 labels"):
        load_dataset("mnist", tmp_path, download=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.full(5, 10))
    trust_idx_files(monkeypatch, raw)
    with pytest.raises(UserError, match="out of range") as err:
        load_dataset("mnist", tmp_path, download=False)
    assert "t10k-labels" in str(err.value)


# ---------------------------------------------------------------- missing + download


def test_missing_files_offline_name_the_path(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("download attempted with download=False")

    monkeypatch.setattr(sources, "fetch", forbidden)
    for name, expected in [
        ("mnist", tmp_path / "MNIST" / "raw"),
        ("fmnist", tmp_path / "FashionMNIST" / "raw"),
        ("cifar10", tmp_path / "cifar-10-batches-py"),
        ("cifar100", tmp_path / "cifar-100-python"),
    ]:
        with pytest.raises(UserError, match="missing") as err:
            load_dataset(name, tmp_path, download=False)
        assert str(expected) in str(err.value)


def test_default_data_dir_is_fedftg_data(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("mnist", download=False)
    assert str(tmp_path / "data" / "MNIST" / "raw") in str(err.value)


@pytest.mark.parametrize(
    ("name", "url", "looked_in"),
    [
        ("mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST/raw"),
        ("fmnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", "FashionMNIST"),
        ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-"),
        ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-"),
    ],
)
def test_failed_download_names_path_and_url(tmp_path, monkeypatch, name, url, looked_in):
    def offline(url, dest, md5, timeout=60.0):  # the real fetch, without a network
        err = OSError("[Errno -3] Temporary failure in name resolution")
        monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: _raise(err))
        return download.fetch(url, dest, md5)

    monkeypatch.setattr(sources, "fetch", offline)
    with pytest.raises(UserError, match="download from") as err:
        load_dataset(name, tmp_path, download=True)
    message = str(err.value)
    assert url in message and str(tmp_path / looked_in) in message and "missing" in message
    assert not any(tmp_path.iterdir())  # no partial file, nor an empty MNIST/raw tree


def _raise(exc: BaseException):
    raise exc


def test_download_fills_missing_idx_files(tmp_path, monkeypatch):
    mirror = _tiny_idx_tree(tmp_path / "mirror", "FashionMNIST", seed=3, monkeypatch=monkeypatch)
    requested = []

    def fake_fetch(url, dest, md5, timeout=60.0):
        requested.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / dest.name, dest)
        return dest

    monkeypatch.setattr(sources, "fetch", fake_fetch)
    ds = load_dataset("fmnist", tmp_path / "root", download=True)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.classes[-1] == "Ankle boot"
    base = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert sorted(requested) == sorted(base + p.name for p in mirror.iterdir())
    load_dataset("fmnist", tmp_path / "root", download=True)
    assert len(requested) == 4  # second load finds the files


def test_fetch_verifies_md5_and_renames_into_place(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"payload" * 1000)
    url = src.as_uri()
    dest = tmp_path / "deep" / "local.bin"
    with pytest.raises(UserError, match="md5") as err:
        download.fetch(url, dest, "0" * 32)
    assert str(dest) in str(err.value) and not dest.exists()
    assert not dest.parent.exists()  # the .part file, and the folder made for it, are gone
    download.fetch(url, dest, hashlib.md5(src.read_bytes()).hexdigest())
    assert dest.read_bytes() == src.read_bytes() and list(dest.parent.iterdir()) == [dest]
    with pytest.raises(UserError, match="download from") as err:
        download.fetch((tmp_path / "absent").as_uri(), tmp_path / "x", "0" * 32)
    assert str(tmp_path / "x") in str(err.value) and "absent" in str(err.value)


# ------------------------------------------------------------------------------ CIFAR


def _cifar_batch(rng, n: int, num_classes: int) -> dict:
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, num_classes, n).tolist(),
        b"batch_label": b"tiny",
    }


def _tiny_cifar10(tmp_path: Path, monkeypatch, extra_members=()) -> tuple[Path, dict]:
    """A CIFAR-10-format .tar.gz with made-up batches (3 classes); the md5 table and the
    registered class count patched to match."""
    rng = np.random.default_rng(0)
    real = sources.CIFAR_SOURCES["cifar10"]
    files = {name: pickle.dumps(_cifar_batch(rng, 4, 3)) for name in [*real.train, *real.test]}
    files[real.meta[0]] = pickle.dumps({b"label_names": [b"cat", b"dog", b"emu"]})
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    root = tmp_path / "root"
    root.mkdir()
    archive = root / real.archive
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [*((f"{real.folder}/{n}", d) for n, d in files.items()), *extra_members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{real.folder}/evil-link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    tiny = dataclasses.replace(
        real,
        archive_md5=hashlib.md5(archive.read_bytes()).hexdigest(),
        train={n: md5[n] for n in real.train},
        test={n: md5[n] for n in real.test},
        meta=(real.meta[0], md5[real.meta[0]]),
    )
    monkeypatch.setitem(sources.CIFAR_SOURCES, "cifar10", tiny)
    three = dataclasses.replace(sources.DATASETS.get("cifar10"), num_classes=3)
    monkeypatch.setitem(sources.DATASETS._entries, "cifar10", three)  # noqa: SLF001
    return root, {n: pickle.loads(d) for n, d in files.items()}


def test_cifar_from_archive_extracts_only_known_files(tmp_path, monkeypatch):
    outside = tmp_path / "absolute-escape.txt"  # an absolute entry name
    evil = [("../escaped.txt", b"x"), ("../../escaped.txt", b"x"), (str(outside), b"x")]
    root, batches = _tiny_cifar10(tmp_path, monkeypatch, evil)
    ds = load_dataset("cifar10", root, download=False)
    assert ds.classes == ("cat", "dog", "emu") and ds.channels == 3 and ds.image_size == 32
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    first = batches["data_batch_1"]
    np.testing.assert_array_equal(ds.train_x[:4].reshape(4, -1), first[b"data"])
    assert ds.train_y[:4].tolist() == first[b"labels"]
    folder = root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(batches)
    assert not (tmp_path / "escaped.txt").exists() and not outside.exists()
    assert sorted(p.name for p in root.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]


def test_tampered_cifar_pickle_is_refused_before_unpickling(tmp_path, monkeypatch):
    root, _ = _tiny_cifar10(tmp_path, monkeypatch)
    load_dataset("cifar10", root, download=False)  # extracts
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    data = bytearray(batch.read_bytes())
    data[len(data) // 2] ^= 0x01  # one pixel value changed: still a valid pickle
    batch.write_bytes(bytes(data))
    real_load = pickle.load

    def guarded_load(fh, **kwargs):
        assert Path(fh.name) != batch, "the tampered pickle was unpickled"
        return real_load(fh, **kwargs)

    monkeypatch.setattr(sources.pickle, "load", guarded_load)
    with pytest.raises(UserError, match="refusing to unpickle") as err:
        load_dataset("cifar10", root, download=False)
    assert str(batch) in str(err.value)


def test_cifar_unofficial_files_are_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"]}))
    with pytest.raises(UserError, match="7973b15100ade9c7d40fb424638fde48") as err:
        load_dataset("cifar100", tmp_path, download=False)
    assert str(folder / "meta") in str(err.value)
    shutil.rmtree(folder)
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not the release")
    with pytest.raises(UserError, match="eb9058c3a382ffc7106e4002c42a8d85") as err:
        load_dataset("cifar100", tmp_path, download=False)
    assert "cifar-100-python.tar.gz" in str(err.value) and not folder.exists()


def test_cifar_batch_parsing():
    batch = {b"data": (np.arange(2 * 3072) % 256).reshape(2, 3072), b"fine_labels": [3, 7]}
    x, y = cifar_arrays(batch, b"fine_labels", 100, "mem")
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == [3, 7]
    assert x[0, 1, 0, 0] == 1024 % 256  # channel-major rows: R plane, G plane, B plane
    with pytest.raises(UserError, match="mem: labels out of range"):
        cifar_arrays(batch, b"fine_labels", 5, "mem")
    with pytest.raises(UserError, match="not a CIFAR batch"):
        cifar_arrays({b"data": np.zeros((2, 100)), b"labels": [0, 1]}, b"labels", 10, "mem")


# ------------------------------------------------------------------------ imagefolder


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(rng, shape=(8, 8, 3)) -> dict[str, np.ndarray]:
    return {
        f"{split}/{cls}/{i}.png": rng.integers(0, 256, shape, dtype=np.uint8)
        for split in ("train", "test")
        for cls in ("zebra", "ant")
        for i in range(3)
    }


def _write_dir(folder: Path, files: dict[str, np.ndarray]) -> Path:
    for name, arr in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(arr))
    return folder


def _write_zip(path: Path, files: dict[str, np.ndarray], top: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in files.items():
            zf.writestr(top + name, _png(arr))
        zf.writestr(f"__MACOSX/{top}train/ant/._0.png", b"resource fork, not an image")
        zf.writestr(f"{top}README.txt", b"ignored")
    return path


def _chw(arr: np.ndarray) -> np.ndarray:
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@pytest.mark.parametrize("top", ["", "tiny/"])
def test_imagefolder_zip_labels_pixels_and_cache(tmp_path, monkeypatch, top):
    files = _images(np.random.default_rng(0))
    zpath = _write_zip(tmp_path / "tiny.zip", files, top)
    ds = load_dataset("imagefolder", zpath)
    assert ds.classes == ("ant", "zebra") and ds.name == "imagefolder"
    assert ds.train_x.shape == (6, 3, 8, 8) and ds.test_x.shape == (6, 3, 8, 8)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_y.tolist() == [0, 0, 0, 1, 1, 1]
    for i, name in enumerate(f"train/{c}/{k}.png" for c in ("ant", "zebra") for k in range(3)):
        np.testing.assert_array_equal(ds.train_x[i], _chw(files[name]))
    np.testing.assert_array_equal(ds.test_x[5], _chw(files["test/zebra/2.png"]))
    assert ds.mean == channel_stats(ds.train_x)[0] and len(ds.std) == 3

    monkeypatch.setattr(imagefolder, "decode_folder", lambda s: pytest.fail("decoded again"))
    again = load_dataset("imagefolder", zpath)
    np.testing.assert_array_equal(again.train_x, ds.train_x)
    assert again.classes == ds.classes and again.test_y.dtype == np.int64


def test_imagefolder_cache_follows_the_source(tmp_path, monkeypatch):
    files = _images(np.random.default_rng(1))
    zpath = _write_zip(tmp_path / "tiny.zip", files)
    first = load_dataset("imagefolder", zpath)
    files["train/ant/0.png"] = np.zeros((8, 8, 3), dtype=np.uint8)
    _write_zip(zpath, files)
    os.utime(zpath, ns=(1, 1))  # a new size/mtime: the old cache must not be used
    second = load_dataset("imagefolder", zpath)
    assert first.train_x[0].any() and not second.train_x[0].any()
    caches = list((tmp_path / "cache").glob("imagefolder-*.npz"))
    assert len(caches) == 1  # the stale entry was replaced
    caches[0].write_bytes(b"damaged")
    np.testing.assert_array_equal(load_dataset("imagefolder", zpath).train_x, second.train_x)


def test_imagefolder_class_count_of_a_zip_is_listed_once_per_version(tmp_path, monkeypatch):
    files = _images(np.random.default_rng(3))
    zpath = _write_zip(tmp_path / "tiny.zip", files)
    listed: list[Path] = []
    real_open = imagefolder._open_source

    def counting_open(source):
        listed.append(source)
        return real_open(source)

    monkeypatch.setattr(imagefolder, "_open_source", counting_open)
    assert imagefolder.count_classes(zpath) == 2
    assert imagefolder.count_classes(tmp_path / "." / "tiny.zip") == 2
    assert len(listed) == 1  # same file, same size and mtime: listed once
    files.update({f"{s}/bee/0.png": files["train/ant/0.png"] for s in ("train", "test")})
    _write_zip(zpath, files)
    os.utime(zpath, ns=(1, 1))  # a changed archive is listed again
    assert imagefolder.count_classes(zpath) == 3 and len(listed) == 2
    folder = _write_dir(tmp_path / "dir", files)
    assert imagefolder.count_classes(folder) == 3
    assert imagefolder.count_classes(folder) == 3 and len(listed) == 4  # folders: every time
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    assert imagefolder.count_classes(tmp_path / "bad.zip") is None


def test_imagefolder_directory_matches_zip_and_keeps_grayscale(tmp_path):
    files = _images(np.random.default_rng(2), shape=(8, 8))
    from_dir = load_dataset("imagefolder", _write_dir(tmp_path / "gray", files))
    from_zip = load_dataset("imagefolder", _write_zip(tmp_path / "gray.zip", files))
    assert from_dir.channels == 1 and len(from_dir.mean) == 1
    np.testing.assert_array_equal(from_dir.test_x, from_zip.test_x)
    np.testing.assert_array_equal(from_dir.train_x[3, 0], files["train/zebra/0.png"])


def test_imagefolder_bad_images_are_named(tmp_path):
    folder = _write_dir(tmp_path / "bad", _images(np.random.default_rng(3)))
    (folder / "train/ant/1.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="train/ant/1.png"):
        load_dataset("imagefolder", folder)
    (folder / "train/ant/1.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8))[:40])
    with pytest.raises(UserError, match="train/ant/1.png"):
        load_dataset("imagefolder", folder)
    (folder / "train/ant/1.png").write_bytes(_png(np.zeros((9, 9, 3), np.uint8)))
    with pytest.raises(UserError, match="train/ant/1.png is 9x9"):
        load_dataset("imagefolder", folder)
    (folder / "train/ant/1.png").write_bytes(_png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(UserError, match="1 channel"):
        load_dataset("imagefolder", folder)


def test_imagefolder_layout_errors(tmp_path):
    files = _images(np.random.default_rng(4))
    no_test = {k: v for k, v in files.items() if k.startswith("train/")}
    with pytest.raises(UserError, match="no images under test/"):
        load_dataset("imagefolder", _write_dir(tmp_path / "a", no_test))
    with pytest.raises(UserError, match="test classes emu"):
        load_dataset(
            "imagefolder",
            _write_dir(tmp_path / "b", {**files, "test/emu/0.png": files["test/ant/0.png"]}),
        )
    with pytest.raises(UserError, match="train/ant/deep/0.png"):
        load_dataset(
            "imagefolder",
            _write_dir(tmp_path / "c", {**files, "train/ant/deep/0.png": files["test/ant/0.png"]}),
        )
    two_tops = {f"{t}/{k}": v for t in ("x", "y") for k, v in files.items()}
    with pytest.raises(UserError, match="x, y"):
        load_dataset("imagefolder", _write_dir(tmp_path / "d", two_tops))
    with pytest.raises(UserError, match="not found"):
        load_dataset("imagefolder", tmp_path / "nowhere.zip")
    (tmp_path / "junk.zip").write_bytes(b"PK but not really")
    with pytest.raises(UserError, match="junk.zip"):
        load_dataset("imagefolder", tmp_path / "junk.zip")
    with pytest.raises(UserError, match="data_dir"):
        load_dataset("imagefolder")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="imagenet") as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in sources.DATASETS.names())


# ------------------------------------------------------------------ shared datasets


@pytest.mark.parametrize(
    ("name", "counts", "test_counts"),
    [
        (
            "mnist",
            [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
            [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
        ),
        ("fmnist", [6000] * 10, [1000] * 10),
    ],
)
def test_shared_mnist_and_fmnist(name, counts, test_counts):
    root = shared_data()
    if root is None:
        pytest.skip("shared/data is not present")
    ds = load_dataset(name, root, download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train_y).tolist() == counts
    assert np.bincount(ds.test_y).tolist() == test_counts
    assert ds.num_classes == 10 and ds.image_size == 28


@pytest.mark.slow
def test_shared_cifar10_jpeg_zip():
    root = shared_data()
    if root is None:
        pytest.skip("shared/data is not present")
    ds = load_dataset("imagefolder", root / "cifar10-jpeg" / "cifar10-jpeg.zip")
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(ds.train_y).tolist() == [5000] * 10
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    np.testing.assert_allclose(ds.mean, (0.491, 0.482, 0.447), atol=0.01)
