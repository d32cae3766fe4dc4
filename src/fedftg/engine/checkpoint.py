"""Crash-safe checkpoints: checksummed, written atomically, loaded without running pickled code.

File layout: an 8-byte magic, the 32-byte SHA-256 of the payload, then the payload as
written by `torch.save` (plain dicts of tensors, numbers and strings only). Loading checks
the magic and the checksum before `torch.load(weights_only=True)` touches the bytes, so a
truncated or corrupt file is detected and reported. The previous good checkpoint is kept
beside the current one (`.prev`) and used when the current one is damaged.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from fedftg.config import fingerprint, read_saved
from fedftg.errors import UserError
from fedftg.legacy import matches_v0
from fedftg.report.files import atomic_write, write_error

MAGIC = b"FEDFTGC1"


def config_fingerprint(cfg_dict: dict[str, Any]) -> str:
    """The run fingerprint a checkpoint is matched by (`fedftg.config.fingerprint`)."""
    return fingerprint(cfg_dict)


def checkpoint_matches(
    saved: dict[str, Any], cfg_dict: dict[str, Any], saved_config: dict[str, Any] | None = None
) -> bool:
    """Whether checkpoint ``saved`` was written by a run with the settings ``cfg_dict``.

    A checkpoint carries the fingerprint of its run (`fedftg.config.fingerprint`); one
    from before the settings registry carries the hash of that time, recognised through
    the run directory's config.json (``saved_config``) by `fedftg.legacy.matches_v0`.
    """
    stored = saved.get("fingerprint")
    now = fingerprint(cfg_dict)
    if stored == now:
        return True
    then = read_saved(saved_config) if saved_config is not None else None
    same = saved_config is not None and fingerprint(saved_config) == now
    return matches_v0(stored, read_saved(cfg_dict), then, same)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically; the file it replaces becomes ``<path>.prev``."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    blob = MAGIC + hashlib.sha256(data).digest() + data
    target = Path(path)
    if target.exists():
        try:
            os.replace(target, _prev(target))
        except OSError as exc:
            raise write_error(_prev(target), exc) from None
    return atomic_write(target, lambda p: p.write_bytes(blob))


def remove_previous(path: str | Path) -> None:
    """Delete the ``.prev`` checkpoint beside ``path`` (a finished run needs only one)."""
    prev = _prev(Path(path))
    try:
        prev.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(prev, exc) from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and verify one checkpoint file; any damage is a `UserError` naming the path."""
    p = Path(path)
    try:
        blob = p.read_bytes()
    except OSError as exc:
        raise UserError(f"{p}: cannot read checkpoint ({exc.strerror or exc})") from None
    head = len(MAGIC) + 32
    if len(blob) < head or blob[: len(MAGIC)] != MAGIC:
        raise UserError(f"{p}: not a fedftg checkpoint (bad header)")
    data = blob[head:]
    if hashlib.sha256(data).digest() != blob[len(MAGIC) : head]:
        raise UserError(f"{p}: checkpoint is truncated or corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise UserError(f"{p}: checkpoint cannot be loaded ({exc})") from None


def load_latest(path: str | Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest good checkpoint at ``path`` (falling back to ``.prev``), and warnings."""
    warnings: list[str] = []
    for candidate in (Path(path), _prev(Path(path))):
        if not candidate.exists():
            continue
        try:
            return read_checkpoint(candidate), warnings
        except UserError as exc:
            warnings.append(str(exc))
    return None, warnings


def _prev(path: Path) -> Path:
    return path.with_name(path.name + ".prev")
