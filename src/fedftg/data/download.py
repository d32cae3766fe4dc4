"""Downloads with checksum verification, written atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from fedftg.errors import UserError


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` if its md5 matches; otherwise a `UserError` naming both."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != md5:
            raise UserError(f"{dest}: downloaded file from {url} fails its md5 check")
        os.replace(tmp, dest)
    except UserError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(
            f"{dest}: dataset file missing and download from {url} failed ({exc})"
        ) from None
    return dest
