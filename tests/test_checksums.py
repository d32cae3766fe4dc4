"""Dataset files on disk are checked against their published checksums; a damaged zip
says it is damaged. Made-up files only: nothing here needs the shared datasets."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from fedftg.data import sources
from fedftg.data.sources import load_dataset
from fedftg.errors import UserError


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFTG_CACHE", str(tmp_path / "cache"))


def _idx(arr: np.ndarray) -> bytes:
    dims = b"".join(struct.pack(">I", d) for d in arr.shape)
    return bytes([0, 0, 0x08, arr.ndim]) + dims + arr.astype(np.uint8).tobytes()


def _fake_mnist(root, compress: bool) -> None:
    """Well-formed IDX files under MNIST's names, but not the published ones."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for split, n in (("train", 6), ("t10k", 3)):
        for kind, arr in (
            ("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1-ubyte", rng.integers(0, 10, n)),
        ):
            data = _idx(arr)
            (raw / f"{split}-{kind}{suffix}").write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_wrong_checksum_mnist_file_is_refused(tmp_path, compress):
    _fake_mnist(tmp_path, compress)
    with pytest.raises(UserError, match="is not the published") as err:
        load_dataset("mnist", tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(err.value) and str(tmp_path) in str(err.value)


def test_a_file_of_another_dataset_is_named(tmp_path, monkeypatch):
    """A Fashion-MNIST labels file under the MNIST name is refused, and recognised (the
    made-up file stands in for it: the tables are patched so that it is "known")."""
    _fake_mnist(tmp_path, compress=True)
    raw = tmp_path / "MNIST" / "raw"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in raw.iterdir()}
    labels = "train-labels-idx1-ubyte.gz"
    for name, own in (
        ("mnist", {k: v for k, v in md5.items() if k != labels}),
        ("fmnist", {labels: md5[labels]}),
    ):
        src = sources.IDX_SOURCES[name]
        monkeypatch.setitem(
            sources.IDX_SOURCES, name, dataclasses.replace(src, md5={**src.md5, **own})
        )
    with pytest.raises(UserError, match=f"it is fmnist's {labels}") as err:
        load_dataset("mnist", tmp_path, download=False)
    assert str(raw / labels) in str(err.value)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                zf.writestr(f"{split}/{cls}/0.png", _png())
    return path.read_bytes()


def test_truncated_zip_says_damaged(tmp_path):
    whole = _zip(tmp_path / "ok.zip")
    assert load_dataset("imagefolder", tmp_path / "ok.zip").num_classes == 2
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="damaged") as err:
        load_dataset("imagefolder", cut)
    assert str(cut) in str(err.value)


def test_corrupt_zip_entry_says_damaged(tmp_path):
    data = bytearray(_zip(tmp_path / "ok.zip"))
    at = data.index(b"IDAT") + 6  # inside the first image's compressed data
    data[at] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged") as err:
        load_dataset("imagefolder", bad)
    assert str(bad) in str(err.value)


def test_not_a_zip_is_still_not_a_zip(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(UserError, match="not a folder or a .zip archive"):
        load_dataset("imagefolder", other)
