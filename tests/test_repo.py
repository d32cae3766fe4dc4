"""The repository stays light: no tracked file over 1 MB (issue 34: the 6.3 MB legacy
checkpoint became a 4 KB layout; large data belongs outside git)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1_000_000  # bytes


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_is_over_one_megabyte():
    big = {
        str(p.relative_to(ROOT)): p.stat().st_size
        for p in tracked_files()
        if p.is_file() and p.stat().st_size > LIMIT
    }
    assert big == {}
