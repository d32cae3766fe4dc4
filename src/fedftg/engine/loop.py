"""The one run loop both engines drive (`run_methods`): every method of a run in turn,
round by round, into the run directory, with resume, checkpoints, divergence and stop
handling. An engine gives it only how to obtain a method's rounds (`StartMethod`:
in-process clients, or a Flower grid) and how to report them (`Report`: a progress bar
and TensorBoard, or Flower's log).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fedftg.config import RunConfig
from fedftg.data.partition import Partition
from fedftg.engine.records import RoundRecord
from fedftg.engine.rundir import RunDir
from fedftg.engine.server import ServerRunner

ON_DIVERGENCE = ("stop", "continue")


@dataclass(frozen=True)
class RunOptions:
    """How a run treats its directory and a diverging method, the same in both engines;
    its defaults are `fedftg run`'s and the Flower run config's (``FLOWER_KEYS``)."""

    resume: bool = False
    fresh: bool = False
    keep_checkpoint: bool = False
    on_divergence: str = "stop"


DEFAULTS = RunOptions()

# how an engine starts a method (its name, base and plug-in): the method's server half and
# a call that runs its next round and returns the round's record
StartMethod = Callable[[str, str, str | None], tuple[ServerRunner, Callable[[], RoundRecord]]]


class Report(Protocol):
    """How an engine tells what the loop does (progress, TensorBoard, a log)."""

    def finished_before(self, method: str) -> None:
        """``method`` finished before this resume: it is not run again."""

    def start_method(self, method: str, rounds: int, done: int, later: int) -> None:
        """``method`` starts after ``done`` of its ``rounds``; ``later`` rounds follow it."""

    def round(self, method: str, record: RoundRecord) -> None:
        """A round of ``method`` ended (and its row is written)."""

    def end_method(self) -> None:
        """The current method stops (finished, diverged or interrupted)."""

    def going_on(self, message: str) -> None:
        """A method diverged and the run goes on (``on_divergence`` is ``continue``)."""

    def close(self) -> None:
        """The last method ended; the summary is written next."""


class StopFlag:
    """SIGINT/SIGTERM set a flag: the current round finishes, a checkpoint is written, and
    the run stops. A second signal stops at once. ``acknowledge`` is called at the first
    signal, so the user hears at once that it was seen."""

    def __init__(self, acknowledge: Callable[[], None] = lambda: None) -> None:
        self.raised: int | None = None
        self.acknowledge = acknowledge
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised is not None:
            raise StopNow(signum)
        self.raised = signum
        self.acknowledge()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once (the CLI exits 128 + ``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = int(signum)


class Interrupted(Exception):
    """The run was stopped by signal ``signum`` after checkpointing its last completed
    round (the CLI exits 128 + ``signum``: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class Diverged(Exception):
    """A method's model or loss became non-finite and ``on_divergence`` is ``stop``."""


class _NoStop(StopFlag):
    """A stop flag that no signal raises (an engine whose host handles its signals)."""

    def __enter__(self) -> StopFlag:
        return self


def run_methods(
    run: RunDir,
    partition: Partition,
    start_method: StartMethod,
    report: Report,
    on_divergence: str,
    stop: StopFlag | None = None,
) -> dict[str, Any]:
    """Run every method of ``run.cfg`` not finished yet; write rows, checkpoints and the
    summary into ``run`` (started); return the summary.

    Each method continues from its restore point; after each round its row is written
    and a checkpoint when due. A diverged method ends at that round; with
    ``on_divergence="stop"`` the outputs are written and `Diverged` is raised. ``stop``
    (entered here around the rounds) turns a first SIGINT/SIGTERM into a checkpoint after
    the current round and `Interrupted`.
    """
    cfg = run.cfg
    methods: dict[str, Any] = {}
    stopped: Diverged | None = None
    pending = [d for d, _, _ in cfg.methods() if not run.is_finished(d)]
    with stop or _NoStop() as flag:
        for display, base, plugin in cfg.methods():
            if run.is_finished(display):  # finished before the resume: its outputs are written
                methods[display] = run.done[display]
                report.finished_before(display)
                continue
            runner, next_round = start_method(display, base, plugin)
            saved = run.restore_point(display)
            if saved is not None:
                runner.restore(saved)
            after = pending[pending.index(display) + 1 :]
            later = sum(cfg.rounds - run.rounds_done(m) for m in after)
            report.start_method(display, cfg.rounds, runner.state.round, later)
            while runner.state.round < cfg.rounds:
                record = next_round()
                run.append(display, record)
                report.round(display, record)
                if runner.diverged:
                    break
                run.end_round(display, runner, force=flag.raised is not None)
                if flag.raised:
                    report.end_method()
                    raise Interrupted(
                        f"stopped after round {runner.state.round} of {display}; "
                        f"rerun the same command (with --out {run.path}) to continue",
                        flag.raised,
                    )
            report.end_method()
            methods[display] = run.method_finished(display, runner, samples=not runner.diverged)
            stopped = divergence(display, runner, on_divergence, report.going_on)
            if stopped is not None:
                break
    report.close()
    summary = run.finish(methods, partition)
    if stopped is not None:
        raise stopped
    return summary


def divergence(
    display: str, runner: ServerRunner, on_divergence: str, going_on: Callable[[str], None]
) -> Diverged | None:
    """After ``display``'s last round: the `Diverged` that stops the run, or None (it did
    not diverge, or ``on_divergence`` is ``continue``: then ``going_on`` is told why)."""
    if not runner.diverged:
        return None
    message = f"{display} diverged at round {runner.diverged_round}: {runner.diverged}"
    if on_divergence == "stop":
        return Diverged(message)
    going_on(message)
    return None


def result_lines(cfg: RunConfig, methods: dict[str, dict[str, Any]]) -> list[str]:
    """What a finished run reports: the results table, then the plug-in gains."""
    return [format_table(methods), *plugin_gains(cfg, methods)]


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    """A plain-text results table: method, final and best accuracy, wall-clock."""
    lines = [f"{'method':<16} {'final acc':>9} {'best acc':>9} {'rounds':>6} {'wall s':>8}"]
    for name, s in methods.items():
        final = "-" if s["final_acc"] is None else f"{100 * s['final_acc']:.2f}"
        note = f"  diverged at round {s['diverged_round']}" if "diverged_round" in s else ""
        lines.append(
            f"{name:<16} {final:>9} {100 * s['best_acc']:>9.2f} {s['rounds']:>6} "
            f"{s['wall_s']:>8.1f}{note}"
        )
    return "\n".join(lines)


def plugin_gains(cfg: RunConfig, methods: dict[str, dict[str, Any]]) -> list[str]:
    """One line per server plug-in run whose base method ran too: the accuracy difference."""
    by_base = {(b, p): name for name, b, p in cfg.methods()}
    lines = []
    for (base, plugin), name in by_base.items():
        plain = by_base.get((base, None))
        if plugin is None or plain is None:
            continue
        a, b = methods[name], methods[plain]
        if a["final_acc"] is None or b["final_acc"] is None:
            continue
        lines.append(
            f"{name} vs {plain}: {100 * (a['final_acc'] - b['final_acc']):+.2f} points final, "
            f"{100 * (a['best_acc'] - b['best_acc']):+.2f} points best accuracy"
        )
    return lines
