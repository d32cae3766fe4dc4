"""`fedftg run`: run every requested method on one setup and write the run directory."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from fedftg.config import RunConfig
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.progress import Reporter
from fedftg.engine.rundir import RunDir
from fedftg.engine.setup import prepare
from fedftg.errors import UserError


class _StopFlag:
    """SIGINT/SIGTERM set a flag: the current round finishes, a checkpoint is written, and
    the run stops. A second signal stops at once. ``acknowledge`` is called at the first
    signal, so the user hears at once that it was seen."""

    def __init__(self, acknowledge: Callable[[], None] = lambda: None) -> None:
        self.raised: int | None = None
        self.acknowledge = acknowledge
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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


ON_DIVERGENCE = ("stop", "continue")


def run_experiment(
    cfg: RunConfig,
    *,
    stream: TextIO | None = None,
    progress: bool | None = None,
    resume: bool = False,
    fresh: bool = False,
    keep_checkpoint: bool = False,
    verbosity: int = 1,
    tensorboard: bool = False,
    on_divergence: str = "stop",
) -> dict[str, Any]:
    """Run all methods of ``cfg``; write the run directory (`fedftg.engine.rundir`).

    A run directory holding this run (same settings) is continued from its checkpoint;
    one holding another run is refused unless ``fresh`` (which replaces it); ``resume``
    may raise the rounds of a finished run. Nothing is written before the settings, the
    data and ``tensorboard`` have been checked. ``keep_checkpoint`` keeps the full final
    checkpoint (client state included) instead of the small one.
    ``verbosity``: 0 prints nothing, 1 the results table, 2 also one line per round on
    stderr. ``tensorboard`` also writes the round metrics as TensorBoard scalars.
    A method that diverges (NaN/Inf model or loss) gets ``status: diverged`` in the
    summary; ``on_divergence="stop"`` then writes the outputs and raises `Diverged`,
    ``"continue"`` goes on with the other methods.
    Returns the summary (per method: final_acc, best_acc, rounds, wall_s).
    """
    stream = stream or sys.stdout
    if on_divergence not in ON_DIVERGENCE:
        raise UserError(f"on_divergence: expected stop or continue, got {on_divergence!r}")
    reporter = Reporter.for_run(progress, verbosity)
    setup = prepare(cfg)  # bad input (data, sizes) is reported before the directory
    with RunDir.open(
        cfg, engine="in-process", fresh=fresh, resume=resume, keep_checkpoint=keep_checkpoint
    ) as run:
        cfg = run.cfg
        board = TensorBoard(run.path / "tensorboard") if tensorboard else None
        run.start(setup.partition, setup.dataset)
        methods: dict[str, Any] = {}
        stopped: Diverged | None = None
        pending = [d for d, _, _ in cfg.methods() if not run.is_finished(d)]
        with _StopFlag(reporter.stopping) as stop:
            for display, base, plugin in cfg.methods():
                if run.is_finished(display):  # finished before the resume: its outputs are written
                    methods[display] = run.done[display]
                    reporter.note(f"{display}: finished before the resume")
                    continue
                runner = MethodRunner(setup, base, plugin)
                saved = run.restore_point(display)
                if saved is not None:
                    runner.restore(saved)
                later = cfg.rounds * (len(pending) - 1 - pending.index(display))
                reporter.start_method(display, cfg.rounds, runner.state.round, later)
                while runner.state.round < cfg.rounds:
                    record = runner.run_round()
                    run.append(display, record)
                    reporter.round(record)
                    if board is not None:
                        board.add(display, record)
                    if runner.diverged:
                        break
                    run.end_round(display, runner, force=stop.raised is not None)
                    if stop.raised:
                        reporter.end_method()
                        raise Interrupted(
                            f"stopped after round {runner.state.round} of {display}; "
                            f"rerun the same command (with --out {run.path}) to continue",
                            stop.raised,
                        )
                reporter.end_method()
                methods[display] = run.method_finished(display, runner, samples=not runner.diverged)
                stopped = divergence(display, runner, on_divergence, _warn_going_on)
                if stopped is not None:
                    break
        if board is not None:
            board.close()
        summary = run.finish(methods, setup.partition)
        if stopped is not None:
            raise stopped
    if verbosity >= 1:
        stream.write(format_table(summary["methods"]) + "\n")
        for line in plugin_gains(cfg, summary["methods"]):
            stream.write(line + "\n")
        stream.write(f"results in {run.path}\n")
    return summary


def divergence(
    display: str, runner: Any, on_divergence: str, going_on: Callable[[str], None]
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


def _warn_going_on(message: str) -> None:
    sys.stderr.write(f"warning: {message}; going on (--on-divergence continue)\n")


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


class TensorBoard:
    """Round metrics as TensorBoard scalars, one run folder per method (optional extra)."""

    def __init__(self, root: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "tensorboard: the 'tensorboard' package is not installed "
                "(pip install 'fedftg[tensorboard]')"
            ) from None
        self._cls = SummaryWriter
        self.root = root
        self.writers: dict[str, Any] = {}

    def add(self, method: str, record: dict[str, Any]) -> None:
        if method not in self.writers:
            self.writers[method] = self._cls(str(self.root / method.replace("+", "_")))
        w = self.writers[method]
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and value is not None:
                w.add_scalar(key, value, record["round"])

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
