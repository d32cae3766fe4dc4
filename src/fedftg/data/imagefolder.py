"""Image-folder datasets: a directory or .zip of `<split>/<class>/<image>`, decoded once.

Splits are `train` and `test` (optionally under one top-level folder); sorted class names
give the label ids. The decoded arrays are cached as .npz (keyed by the source's path,
size and modification time) so the next run starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedftg.errors import UserError
from fedftg.report.files import atomic_write

SPLITS = ("train", "test")
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def cache_dir() -> Path:
    env = os.environ.get("FEDFTG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedftg" / "cache"


def load_imagefolder(source: Path):
    """Load ``source`` (folder or .zip) as a `Dataset`, through the decoded-array cache."""
    from fedftg.data.sources import Dataset, channel_stats

    if not source.exists():
        raise UserError(f"{source}: image folder or zip not found")
    cache = cache_dir() / f"imagefolder-{_cache_key(source)}.npz"
    arrays = _read_cache(cache)
    if arrays is None:
        arrays = _decode(source)
        try:
            atomic_write(cache, lambda p: _save_npz(p, arrays))
        except OSError:
            pass  # a read-only cache only costs speed
    classes = tuple(str(c) for c in arrays["classes"])
    mean, std = channel_stats(arrays["train_x"])
    return Dataset(
        "imagefolder",
        arrays["train_x"],
        arrays["train_y"],
        arrays["test_x"],
        arrays["test_y"],
        classes,
        mean,
        std,
    )


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _cache_key(source: Path) -> str:
    st = source.stat()
    if source.is_dir():  # a folder's identity: its files' names, sizes and times
        parts = sorted(
            f"{p.relative_to(source)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in source.rglob("*")
            if p.is_file()
        )
        text = "\n".join(parts)
    else:
        text = f"{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(f"{source.resolve()}\n{text}".encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None  # damaged cache: decode again


def _entries(source: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(relative path, bytes) of every file under a folder or inside a zip."""
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            if p.is_file():
                yield PurePosixPath(p.relative_to(source).as_posix()), p.read_bytes()
        return
    try:
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield PurePosixPath(info.filename), zf.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{source}: cannot read zip ({exc})") from None


def _decode(source: Path) -> dict[str, np.ndarray]:
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {s: {} for s in SPLITS}
    for rel, data in _entries(source):
        if rel.suffix.lower() not in IMAGE_EXT:
            continue
        parts = rel.parts
        if len(parts) >= 3 and parts[-3] in SPLITS and len(parts) <= 4:
            files[parts[-3]].setdefault(parts[-2], []).append((str(rel), data))
    if not files["train"] or not files["test"]:
        raise UserError(
            f"{source}: expected train/<class>/<image> and test/<class>/<image> entries"
        )
    classes = sorted(set(files["train"]) | set(files["test"]))
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    shape = None
    for split in SPLITS:
        images, labels = [], []
        for label, cls in enumerate(classes):
            for name, data in sorted(files[split].get(cls, [])):
                img = _decode_image(source, name, data)
                if shape is None:
                    shape = img.shape
                elif img.shape != shape:
                    raise UserError(
                        f"{source}: {name} has shape {img.shape}, expected {shape} like the rest"
                    )
                images.append(img)
                labels.append(label)
        out[f"{split}_x"] = np.stack(images)
        out[f"{split}_y"] = np.asarray(labels, dtype=np.int64)
    return out


def _decode_image(source: Path, name: str, data: bytes) -> np.ndarray:
    """One image as uint8 (C, H, W): grayscale stays 1 channel, everything else RGB."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L") if im.mode in ("L", "1", "I;16", "I") else im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{source}: cannot decode image {name} ({exc})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
