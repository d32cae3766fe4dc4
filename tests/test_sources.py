"""Dataset loaders on small real files; the shared datasets when present."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedftg.data import imagefolder, sources
from fedftg.data.sources import _cifar_arrays, load_dataset, read_idx
from fedftg.errors import UserError


def shared_data() -> Path | None:
    env = os.environ.get("FEDFTG_SHARED_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root if root.is_dir() else None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFTG_CACHE", str(tmp_path / "cache"))


def test_digits_embedded_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.dtype == np.uint8 and a.train_x.shape[1:] == (1, 8, 8)
    assert a.num_classes == 10 and a.channels == 1 and a.image_size == 8
    assert len(a.train_y) + len(a.test_y) == 1797
    np.testing.assert_array_equal(a.test_y, b.test_y)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert set(np.bincount(a.test_y)) <= {34, 35, 36, 37}  # stratified 20%
    assert 0.2 < a.mean[0] < 0.4 and 0.3 < a.std[0] < 0.5
    assert a.train_x.max() == 255


def _write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_round_trip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte.gz"
    _write_idx(good, arr)
    np.testing.assert_array_equal(read_idx(good), arr)
    truncated = tmp_path / "trunc-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:-5]))
    with pytest.raises(UserError, match="size mismatch") as e:
        read_idx(truncated)
    assert str(truncated) in str(e.value)
    badgz = tmp_path / "bad-idx3-ubyte.gz"
    badgz.write_bytes(good.read_bytes()[:20])
    with pytest.raises(UserError, match=str(badgz)):
        read_idx(badgz)
    magic = tmp_path / "magic-idx3-ubyte"
    magic.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(UserError, match="magic"):
        read_idx(magic)


def test_mnist_layout_from_small_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_y.shape == (5,)


def test_missing_files_offline_name_the_path(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=str(tmp_path)):
        load_dataset("fmnist", tmp_path, download=False)

    def no_network(url, dest, md5, timeout=60.0):
        raise UserError(f"{dest}: dataset file missing and download from {url} failed")

    monkeypatch.setattr(sources, "fetch", no_network)
    with pytest.raises(UserError, match="download") as e:
        load_dataset("cifar10", tmp_path, download=True)
    assert str(tmp_path) in str(e.value)


def test_cifar_pickle_is_refused_without_the_published_checksum(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    with pytest.raises(UserError, match="checksum"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_batch_parsing():
    batch = {b"data": np.arange(2 * 3072) % 256, b"labels": [3, 7]}
    x, y = _cifar_arrays([batch], b"labels")
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == [3, 7]
    assert x[0, 1, 0, 0] == 1024 % 256  # channel-major layout


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _folder_images(rng) -> dict[str, np.ndarray]:
    files = {}
    for split in ("train", "test"):
        for cls in ("zebra", "ant"):
            for i in range(3):
                files[f"{split}/{cls}/{i}.png"] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return files


def test_imagefolder_zip_and_dir_labels_pixels_and_cache(tmp_path, monkeypatch):
    files = _folder_images(np.random.default_rng(0))
    zpath = tmp_path / "tiny.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for name, arr in files.items():
            zf.writestr("root/" + name, _png(arr))
    ds = load_dataset("imagefolder", zpath)
    assert ds.classes == ("ant", "zebra")
    assert ds.train_x.shape == (6, 3, 8, 8) and ds.test_x.shape == (6, 3, 8, 8)
    np.testing.assert_array_equal(ds.train_x[0], files["train/ant/0.png"].transpose(2, 0, 1))
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    calls = []
    monkeypatch.setattr(imagefolder, "_decode", lambda s: calls.append(s))
    again = load_dataset("imagefolder", zpath)
    assert calls == [] and np.array_equal(again.train_x, ds.train_x)  # served from cache

    monkeypatch.undo()
    folder = tmp_path / "tinydir"
    for name, arr in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(arr))
    from_dir = load_dataset("imagefolder", folder)
    np.testing.assert_array_equal(from_dir.test_x, ds.test_x)


def test_imagefolder_corrupt_image_names_it(tmp_path):
    folder = tmp_path / "bad"
    files = _folder_images(np.random.default_rng(1))
    for name, arr in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(arr))
    (folder / "train/ant/1.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="train/ant/1.png"):
        load_dataset("imagefolder", folder)
    with pytest.raises(UserError, match="not found"):
        load_dataset("imagefolder", tmp_path / "nowhere.zip")


def test_unknown_dataset():
    with pytest.raises(UserError, match="dataset"):
        load_dataset("imagenet")


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("mnist", [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
        ("fmnist", [6000] * 10),
    ],
)
def test_shared_mnist_and_fmnist(name, counts):
    root = shared_data()
    if root is None:
        pytest.skip("../shared/data is not present")
    ds = load_dataset(name, root, download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train_y).tolist() == counts


@pytest.mark.slow
def test_shared_cifar10_jpeg_zip():
    root = shared_data()
    if root is None:
        pytest.skip("../shared/data is not present")
    ds = load_dataset("imagefolder", root / "cifar10-jpeg" / "cifar10-jpeg.zip")
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(ds.train_y).tolist() == [5000] * 10
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
