"""Dataset downloads: streamed to a temporary sibling, md5-checked, then renamed into place.

Nothing half-downloaded or unverified ever sits at the final path, so a later run never
mistakes a broken download for the dataset, and a failed download removes the folders it
created for the file (no empty ``MNIST/raw`` tree is left).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path

from fedftg.errors import UserError
from fedftg.report.files import make_dirs, remove_empty_dirs

CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in chunks (md5 only identifies releases, it is not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` if its md5 is ``md5``; any failure is a `UserError`.

    The message names ``dest`` (where the file was looked for) and ``url``. On failure the
    folders made for ``dest`` are removed again (as far as they are empty).
    """
    made: list[Path] = []
    try:
        made = make_dirs(dest.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        remove_empty_dirs(made)
        raise UserError(f"{dest}: file missing, and cannot download {url} there ({exc})") from None
    part = Path(tmp)
    try:
        got = _stream(url, fd, timeout)
        if got != md5:
            raise UserError(f"{dest}: the file downloaded from {url} has md5 {got}, expected {md5}")
        os.replace(part, dest)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise UserError(
            f"{dest}: file missing, and the download from {url} failed ({exc})"
        ) from None
    finally:
        part.unlink(missing_ok=True)
        if not dest.exists():
            remove_empty_dirs(made)
    return dest


def _stream(url: str, fd: int, timeout: float) -> str:
    """Copy ``url`` into the open descriptor ``fd`` (closing it); returns the data's md5."""
    digest = hashlib.md5(usedforsecurity=False)
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
        while chunk := resp.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()
