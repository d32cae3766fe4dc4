"""Crash-safe output files: every file is written to a temporary sibling, then renamed."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from fedftg.errors import UserError

TMP_GLOB = ".*.tmp"  # the temporary siblings `atomic_write` writes first


def write_error(path: str | Path, exc: OSError) -> UserError:
    """The `UserError` for a failed write of ``path`` (permissions, disk full, a path
    through a file): one line naming the path."""
    return UserError(f"{path}: cannot write ({exc.strerror or exc})")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; no half-written file is ever left.

    The file gets the user's umask (as `open` would). A failure to write is a `UserError`
    naming ``path``; the temporary file is removed whatever happens (`remove_stale_tmp`
    clears one left by a killed process)."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_tmp(target)
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        write(tmp_path)
        os.replace(tmp_path, target)
    except BaseException as exc:
        with suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(target, exc) from None
        raise
    return target


def _new_tmp(target: Path) -> Path:
    """Create an empty, new temporary sibling of ``target`` (mode 0666 less the umask)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write` left in ``folder``."""
    removed = []
    for p in Path(folder).glob(TMP_GLOB):
        if p.is_file() and not p.is_symlink():
            with suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def make_dirs(path: str | Path) -> list[Path]:
    """Create folder ``path`` and its missing parents; returns the folders this call made
    (outermost first) so that a command that then fails can remove them (`remove_empty_dirs`).
    An `OSError` if one cannot be made (the ones made before it are removed)."""
    missing: list[Path] = []
    p = Path(path)
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not folder.is_dir():
                    raise
                continue  # another process made it just now: not ours to remove
            made.append(folder)
    except OSError:
        remove_empty_dirs(made)
        raise
    return made


def remove_empty_dirs(folders: list[Path]) -> None:
    """Remove the folders `make_dirs` made, innermost first, as far as they are empty."""
    for folder in reversed(folders):
        with suppress(OSError):
            folder.rmdir()


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, strict JSON (non-finite numbers as null)."""
    text = json.dumps(strict(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def json_line(record: dict[str, Any]) -> str:
    """One strict-JSON metrics line; a record that held NaN/Inf gets a ``status`` saying so
    (unless it has one), so a null is never mistaken for "not measured"."""
    clean = strict(record)
    if clean != _plain(record) and "status" not in clean:
        clean["status"] = "non-finite"
    return json.dumps(clean, allow_nan=False) + "\n"


def strict(obj: Any) -> Any:
    """``obj`` with NaN/Inf as None, arrays/tensors as lists and paths as strings: what
    strict JSON parsers (JavaScript's JSON.parse) accept."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return strict(_jsonable(obj))


def _plain(obj: Any) -> Any:
    """``obj`` with the same container and type conversions as `strict`, values kept."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool, float)):
        return obj
    return _plain(_jsonable(obj))


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per line, flushed and synced per record.

    A crash can at worst cut the line being written short; `read_metrics_lines` reports
    such a line, and a run's next start restores the rows its checkpoint holds.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json_line(record)
        with self.path.open("a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def read_metrics_lines(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The complete records of a metrics.jsonl, and the numbers (from 1) of its broken
    lines: cut short by a crash or a full disk, or otherwise not a JSON object."""
    out: list[dict[str, Any]] = []
    broken: list[int] = []
    p = Path(path)
    if not p.exists():
        return out, broken
    for number, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            out.append(record)
        else:
            broken.append(number)
    return out, broken


def line_numbers(numbers: list[int]) -> str:
    """``no line``, ``line 4`` or ``lines 4, 9`` (of `read_metrics_lines`) for a message."""
    if not numbers:
        return "no line"
    return ("line " if len(numbers) == 1 else "lines ") + ", ".join(map(str, numbers))
