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
import json
import os
from pathlib import Path
from typing import Any

import torch

from fedftg.config import unused_settings
from fedftg.errors import UserError
from fedftg.report.files import atomic_write

MAGIC = b"FEDFTGC1"
# settings that may change between a run and its resume without changing the results
RESUMABLE_CHANGES = (
    "out",
    "device",
    "eval_batch_size",
    "eval_ensemble",
    "checkpoint_every",
)

# settings added after run directories were first written, with the value that reproduces
# the earlier behaviour: at that value they are left out of the hash, so a run written
# before the setting existed still resumes (and a finished one is still skipped by sweeps)
ADDED_SETTINGS: dict[str, Any] = {
    "ftg.diversity": "all",
    "df.diversity": "all",
    "scaffold_reference": "sent",
    "scaffold_variate_lr": "round",
    "ftg.bn_stats": "generated",
    "df.bn_stats": "generated",
}
_MISSING = object()


def _without_unused_values(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop settings that no method of the run reads (SCAFFOLD's reference without a
    plug-in), so that adding them leaves the fingerprints of such runs as they were."""
    unused = unused_settings(cfg_dict.get("method", []))
    return {k: v for k, v in cfg_dict.items() if k not in unused}


def setting_value(cfg_dict: dict[str, Any], name: str, default: Any) -> Any:
    """A top-level setting of a saved config; one saved before it existed has its legacy
    value (`ADDED_SETTINGS`), else ``default``."""
    return cfg_dict.get(name, ADDED_SETTINGS.get(name, default))


def _without_legacy_values(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out = dict(cfg_dict)
    for path, legacy in ADDED_SETTINGS.items():
        section, _, name = path.rpartition(".")
        table = out.get(section) if section else out
        if isinstance(table, dict) and table.get(name, _MISSING) == legacy:
            trimmed = {k: v for k, v in table.items() if k != name}
            if section:
                out[section] = trimmed
            else:
                out = trimmed
    return out


def config_fingerprint(cfg_dict: dict[str, Any]) -> str:
    """A hash of the settings that determine a run's numbers."""
    used = _without_unused_values(_without_legacy_values(cfg_dict))
    kept = {k: v for k, v in used.items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically; the file it replaces becomes ``<path>.prev``."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    blob = MAGIC + hashlib.sha256(data).digest() + data
    target = Path(path)
    if target.exists():
        os.replace(target, _prev(target))
    return atomic_write(target, lambda p: p.write_bytes(blob))


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
