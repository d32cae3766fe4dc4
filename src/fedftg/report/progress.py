"""A one-line progress display for terminals; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows `method  round r/R  acc  s/round  ETA` on one refreshed line."""

    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self.start = time.perf_counter()
        self.done = 0

    def update(self, done: int, acc: float | None = None) -> None:
        self.done = done
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        per = elapsed / max(done, 1)
        eta = per * (self.total - done)
        width = 20
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        acc_text = f"acc {100 * acc:5.1f}%" if acc is not None else ""
        self.stream.write(
            f"\r{self.label:<14} [{bar}] {done}/{self.total} {acc_text}  "
            f"{per:5.2f}s/round  ETA {eta:5.0f}s "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
