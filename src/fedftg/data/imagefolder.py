"""Image-folder datasets: a directory or .zip of `<split>/<class>/<image>`, decoded once.

Splits are `train` and `test`, optionally inside one top-level folder (`cifar10/train/...`);
sorted class names give the label ids. Decoding tens of thousands of images takes seconds,
so the arrays are cached as an .npz keyed by the source's path, size and modification time;
the next load only reads that file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from fedftg.errors import UserError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
CACHE_FORMAT = "imagefolder-v1"  # bump when the decoding or the cache layout changes

# Errors Pillow and zipfile raise on damaged data (some Pillow plugins raise SyntaxError).
DECODE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    zlib.error,
    zipfile.BadZipFile,
    Image.DecompressionBombError,
)

Reader = Callable[[str], bytes]


@dataclass(frozen=True)
class FolderArrays:
    """Decoded image folder: uint8 (N, C, H, W) images, int64 labels, sorted class names."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]


def cache_dir() -> Path:
    """Where decoded arrays are cached: `$FEDFTG_CACHE`, else ~/.cache/fedftg."""
    env = os.environ.get("FEDFTG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedftg"


def load_imagefolder(source: Path) -> FolderArrays:
    """Decoded arrays of ``source`` (a folder or .zip), from the cache when it is current."""
    if not source.exists():
        raise UserError(f"{source}: image folder or .zip not found")
    if not source.is_dir() and not zipfile.is_zipfile(source):
        raise UserError(_not_a_zip(source))
    cache = _cache_path(source)
    arrays = _read_cache(cache)
    if arrays is None:
        arrays = decode_folder(source)
        _write_cache(cache, arrays)
    return arrays


ZIP_MAGIC = b"PK\x03\x04"


def _not_a_zip(source: Path) -> str:
    """Why ``source`` cannot be opened as a zip: damaged (a zip's start or name, but no
    readable table of contents, e.g. a truncated download) or not a zip at all."""
    try:
        with source.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        return f"{source}: cannot read ({exc.strerror or exc})"
    if head == ZIP_MAGIC or source.suffix.lower() == ".zip":
        return (
            f"{source}: the zip archive is damaged (truncated or corrupt: its table of "
            "contents cannot be read); copy or download it again"
        )
    return f"{source}: not a folder or a .zip archive"


def count_classes(source: Path) -> int | None:
    """The number of classes of the image folder or .zip ``source`` from its layout alone
    (no decoding); None when it cannot be read or is not a valid layout.

    A .zip's count is kept per path, size and modification time: resolving a saved run's
    settings counts them, and reading a 60,000-entry archive's listing takes seconds
    (`fedftg report` resolves each run). A folder is listed every time."""
    try:
        key = _zip_key(source)
        if key is not None and key in _ZIP_CLASSES:
            return _ZIP_CLASSES[key]
        with _open_source(source) as (names, _):
            count = len(index_layout(names, source)[0])
    except (UserError, OSError):
        return None
    if key is not None:
        _ZIP_CLASSES[key] = count
    return count


_ZIP_CLASSES: dict[tuple[str, str], int] = {}  # (resolved path, size:mtime) -> class count


def _zip_key(source: Path) -> tuple[str, str] | None:
    """What identifies a .zip file's listing here (None for a folder or a missing path)."""
    if not source.is_file():
        return None
    return str(source.resolve()), _stamp(source)


def decode_folder(source: Path) -> FolderArrays:
    """Decode every image of ``source``; a bad layout or image is a `UserError` naming it."""
    with _open_source(source) as (names, read):
        classes, items = index_layout(names, source)
        decoder = _Decoder(source, read)
        train_x, train_y = decoder.split(items["train"])
        test_x, test_y = decoder.split(items["test"])
    return FolderArrays(train_x, train_y, test_x, test_y, classes)


def index_layout(
    names: Iterable[str], source: Path
) -> tuple[tuple[str, ...], dict[str, list[tuple[int, str]]]]:
    """Sorted class names and, per split, sorted (label, entry name) pairs of the images.

    Hidden files and macOS `__MACOSX` resource forks are skipped, as are folders other
    than the splits (e.g. `val/`); an image at the wrong depth inside a split is an error.
    """
    entries = [(PurePosixPath(n.replace("\\", "/")).parts, n) for n in names if _is_image(n)]
    tops = {parts[0] for parts, _ in entries}
    depth = 0 if tops & set(SPLITS) else 1  # one optional top-level folder
    if depth == 1 and len(tops) > 1:
        raise UserError(
            f"{source}: expected train/ and test/ folders (optionally inside one top-level "
            f"folder), found {', '.join(sorted(tops))}"
        )
    groups: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for parts, name in entries:
        rel = parts[depth:]
        if not rel or rel[0] not in SPLITS:
            continue
        if len(rel) != 3:
            raise UserError(f"{source}: {name} is not at <split>/<class>/<image>")
        groups[rel[0]].setdefault(rel[1], []).append(name)
    for split in SPLITS:
        if not groups[split]:
            raise UserError(f"{source}: no images under {split}/<class>/")
    classes = tuple(sorted(groups["train"]))
    unknown = sorted(set(groups["test"]) - set(classes))
    if unknown:
        raise UserError(f"{source}: test classes {', '.join(unknown)} have no train images")
    items = {
        split: [
            (label, name)
            for label, cls in enumerate(classes)
            for name in sorted(groups[split].get(cls, []))
        ]
        for split in SPLITS
    }
    return classes, items


def _is_image(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return bool(parts) and not hidden and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES


@contextmanager
def _open_source(source: Path) -> Iterator[tuple[list[str], Reader]]:
    """Entry names (relative, '/'-separated) and a reader for a folder or a zip."""
    if source.is_dir():
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        yield names, lambda name: (source / name).read_bytes()
        return
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{source}: cannot read the zip ({exc})") from None
    with archive:
        yield [i.filename for i in archive.infolist() if not i.is_dir()], archive.read


class _Decoder:
    """Decodes images into preallocated arrays, holding every image to the first one's shape."""

    def __init__(self, source: Path, read: Reader) -> None:
        self.source = source
        self.read = read
        self.shape: tuple[int, ...] | None = None

    def split(self, items: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.array([label for label, _ in items], dtype=np.int64)
        first = self.image(items[0][1])
        images = np.empty((len(items), *first.shape), dtype=np.uint8)
        images[0] = first
        for i, (_, name) in enumerate(items[1:], start=1):
            images[i] = self.image(name)
        return images, labels

    def image(self, name: str) -> np.ndarray:
        img = decode_image(self.read, name, self.source)
        if self.shape is None:
            if img.shape[1] != img.shape[2]:
                raise UserError(f"{self.source}: {name} is {_describe(img.shape)}; need square")
            self.shape = img.shape
        elif img.shape != self.shape:
            raise UserError(
                f"{self.source}: {name} is {_describe(img.shape)} but the first image is "
                f"{_describe(self.shape)}; all images must have the same size and channels"
            )
        return img


def decode_image(read: Reader, name: str, source: Path) -> np.ndarray:
    """One image as uint8 (C, H, W): grayscale modes stay 1 channel, all others become RGB."""
    try:
        with Image.open(io.BytesIO(read(name))) as im:
            arr = np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"), dtype=np.uint8)
    except DECODE_ERRORS as exc:
        if isinstance(exc, zipfile.BadZipFile):
            raise UserError(f"{source}: the zip archive is damaged at {name} ({exc})") from None
        raise UserError(f"{source}: cannot decode image {name} ({exc})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[2]}x{shape[1]} with {shape[0]} channel(s)"


# ------------------------------------------------------------------------------ cache


def _cache_path(source: Path) -> Path:
    """`imagefolder-<path hash>-<state hash>.npz`: a changed source gets a new file."""
    resolved = source.resolve()
    where = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    state = hashlib.sha256(_fingerprint(resolved).encode()).hexdigest()[:16]
    return cache_dir() / f"imagefolder-{where}-{state}.npz"


def _fingerprint(source: Path) -> str:
    """The source's format version, size and mtime (every file's, for a folder)."""
    if not source.is_dir():
        return f"{CACHE_FORMAT}\n{_stamp(source)}"
    files = sorted(p for p in source.rglob("*") if p.is_file())
    rows = [f"{p.relative_to(source).as_posix()}:{_stamp(p)}" for p in files]
    return "\n".join([CACHE_FORMAT, *rows])


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _read_cache(path: Path) -> FolderArrays | None:
    """The cached arrays, or None when absent, unreadable or inconsistent (then decode)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {f.name: z[f.name] for f in fields(FolderArrays)}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    arrays["classes"] = tuple(str(c) for c in arrays["classes"])
    cached = FolderArrays(**arrays)
    return cached if _consistent(cached) else None


def _consistent(a: FolderArrays) -> bool:
    pairs = ((a.train_x, a.train_y), (a.test_x, a.test_y))
    return all(
        x.dtype == np.uint8
        and x.ndim == 4
        and y.dtype == np.int64
        and y.shape == (len(x),)
        and x.shape[1:] == a.train_x.shape[1:]
        and (len(y) == 0 or 0 <= y.min() <= y.max() < len(a.classes))
        for x, y in pairs
    )


def _write_cache(path: Path, arrays: FolderArrays) -> None:
    """Write atomically (temp file + rename) and drop this source's older cache files."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                named = {f.name: getattr(arrays, f.name) for f in fields(FolderArrays)}
                np.savez(fh, **{**named, "classes": np.array(arrays.classes)})
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        same_source = path.name.rsplit("-", 1)[0]
        for old in path.parent.glob(f"{same_source}-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # an unwritable cache only costs speed on the next load
