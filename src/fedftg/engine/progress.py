"""What a run tells the user while it runs, on stderr: a refreshed bar on a terminal, one
line per round otherwise (logs, CI, nohup), nothing with ``--quiet``.

Rates and ETA count only the rounds this process ran, so a resumed run's are right; the ETA
covers the whole run: the current method's remaining rounds and those of the methods after it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Reporter:
    """Per-round progress of the methods of one run.

    ``mode``: ``bar`` (one refreshed line, for a terminal), ``lines`` (one line per round)
    or ``off``. `for_run` picks it from the command's flags and the stream.
    """

    def __init__(self, mode: str, stream: TextIO | None = None) -> None:
        self.mode = mode
        self.stream = stream or sys.stderr
        self.label, self.total, self.first, self.done = "", 0, 0, 0
        self.start = time.perf_counter()
        self.later = 0  # rounds of the methods after the current one
        self.spent, self.ran_before = 0.0, 0  # seconds and rounds of earlier methods
        self._bar_shown = False

    @classmethod
    def for_run(
        cls, progress: bool | None, verbosity: int, stream: TextIO | None = None
    ) -> Reporter:
        """``verbosity`` 0 (--quiet): off; 2 (--verbose): lines, whatever ``progress`` says;
        else a bar on a terminal (or with --progress), lines without one; --no-progress: off."""
        stream = stream or sys.stderr
        if verbosity >= 2:
            return cls("lines", stream)
        if verbosity == 0 or progress is False:
            return cls("off", stream)
        tty = progress if progress is not None else _isatty(stream)
        return cls("bar" if tty else "lines", stream)

    def start_method(self, label: str, total: int, done: int, later: int = 0) -> None:
        """A method starts (or continues after ``done`` rounds from a checkpoint); ``later``
        rounds of other methods follow it in this run (they count in the ETA)."""
        self.label, self.total, self.first, self.done = label, total, done, done
        self.later = later
        self.start = time.perf_counter()
        if done:
            self.note(f"{label}: resumed at round {done + 1} of {total} ({done} done before)")

    def round(self, record: dict[str, Any]) -> None:
        """Report a finished round (a metrics record)."""
        self.done = int(record["round"])
        if self.mode == "off":
            return
        now = time.perf_counter()
        per = (now - self.start) / max(self.done - self.first, 1)
        eta = _clock(
            run_eta(
                self.spent + now - self.start,
                self.ran_before + self.done - self.first,
                self.total - self.done + self.later,
            )
        )
        acc = record.get("test_acc")
        acc_text = "-" if acc is None else f"{100 * acc:.2f}%"
        if self.mode == "lines":
            loss = record.get("train_loss")
            loss_text = "-" if loss is None else f"{loss:.4f}"
            self._write(
                f"{self.label} round {self.done}/{self.total}: test acc {acc_text}, "
                f"train loss {loss_text}, {record['round_s']:.2f}s, ETA {eta}\n"
            )
            return
        width = 20
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self._write(
            f"\r{self.label:<14} [{bar}] {self.done}/{self.total} acc {acc_text:>7} "
            f"{per:6.2f}s/round  ETA {eta} "
        )
        self._bar_shown = True

    def end_method(self) -> None:
        """The current method stops: its time and rounds join the run's rate."""
        self._end_bar()
        now = time.perf_counter()
        self.spent += now - self.start
        self.ran_before += self.done - self.first
        self.start, self.first = now, self.done  # a second call adds nothing

    def note(self, text: str) -> None:
        """One message line (a bar in progress is ended first); shown unless off."""
        if self.mode != "off":
            self._end_bar()
            self._write(text + "\n")

    def stopping(self) -> None:
        """The first Ctrl-C / SIGTERM: say at once what happens (also when quiet)."""
        self._end_bar()
        self._write(
            f"finishing round {self.done + 1} of {self.label}, then saving; "
            "Ctrl-C again to stop now\n"
        )

    def _end_bar(self) -> None:
        if self._bar_shown:
            self._bar_shown = False
            self._write("\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError, RuntimeError):  # closed stream, or re-entered by a signal
            pass


def run_eta(seconds: float, ran: int, left: int) -> float:
    """Seconds left: ``left`` rounds at the mean pace of the ``ran`` rounds this process
    ran (in ``seconds``, all methods so far), so a slower method later in the run is only
    partly foreseen, but no method is left out."""
    return seconds / max(ran, 1) * left


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
