"""`fedftg run`: run every requested method on one setup and write the run directory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from fedftg.config import RunConfig
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.loop import (
    DEFAULTS,
    ON_DIVERGENCE,
    Diverged,
    Interrupted,
    StartMethod,
    StopFlag,
    StopNow,
    result_lines,
    run_methods,
)
from fedftg.engine.progress import Reporter
from fedftg.engine.records import RoundRecord
from fedftg.engine.rundir import CLI_HINTS, Hints, RunDir
from fedftg.engine.server import ServerRunner
from fedftg.engine.setup import Setup, prepare
from fedftg.errors import UserError

# the CLI and the Flower apps catch these where `fedftg run` raises them
__all__ = ["Diverged", "Interrupted", "StopNow", "TensorBoard", "run_experiment"]


def run_experiment(
    cfg: RunConfig,
    *,
    stream: TextIO | None = None,
    progress: bool | None = None,
    resume: bool = DEFAULTS.resume,
    fresh: bool = DEFAULTS.fresh,
    keep_checkpoint: bool = DEFAULTS.keep_checkpoint,
    verbosity: int = 1,
    tensorboard: bool = False,
    on_divergence: str = DEFAULTS.on_divergence,
    hints: Hints = CLI_HINTS,
    opened: Callable[[Path], None] | None = None,
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
    ``hints`` name the caller's options in messages (``--fresh``); ``opened`` is called
    with the run directory once it is open (the Python API reads its files after).
    Returns the summary (per method: final_acc, best_acc, rounds, wall_s).
    """
    stream = stream or sys.stdout
    if on_divergence not in ON_DIVERGENCE:
        raise UserError(f"on_divergence: expected stop or continue, got {on_divergence!r}")
    reporter = Reporter.for_run(progress, verbosity)
    setup = prepare(cfg)  # bad input (data, sizes) is reported before the directory
    with RunDir.open(
        cfg,
        engine="in-process",
        fresh=fresh,
        resume=resume,
        keep_checkpoint=keep_checkpoint,
        hints=hints,
    ) as run:
        if opened is not None:
            opened(run.path)
        cfg = run.cfg
        board = TensorBoard(run.path / "tensorboard") if tensorboard else None
        run.start(setup.partition, setup.dataset)
        summary = run_methods(
            run,
            setup.partition,
            _in_process(setup),
            ConsoleReport(reporter, board),
            on_divergence,
            StopFlag(reporter.stopping),
        )
    if verbosity >= 1:
        for line in result_lines(cfg, summary["methods"]):
            stream.write(line + "\n")
        stream.write(f"results in {run.path}\n")
    return summary


def _in_process(setup: Setup) -> StartMethod:
    """How the in-process engine starts a method: a `MethodRunner`, whose rounds train the
    selected clients here."""

    def start(
        display: str, base: str, plugin: str | None
    ) -> tuple[ServerRunner, Callable[[], RoundRecord]]:
        runner = MethodRunner(setup, base, plugin)
        return runner, runner.run_round

    return start


class ConsoleReport:
    """`fedftg run`'s report of the loop: the progress on stderr, optionally TensorBoard."""

    def __init__(self, reporter: Reporter, board: TensorBoard | None) -> None:
        self.reporter = reporter
        self.board = board

    def finished_before(self, method: str) -> None:
        self.reporter.note(f"{method}: finished before the resume")

    def start_method(self, method: str, rounds: int, done: int, later: int) -> None:
        self.reporter.start_method(method, rounds, done, later)

    def round(self, method: str, record: RoundRecord) -> None:
        row = record.to_row()
        self.reporter.round(row)
        if self.board is not None:
            self.board.add(method, row)

    def end_method(self) -> None:
        self.reporter.end_method()

    def going_on(self, message: str) -> None:
        sys.stderr.write(f"warning: {message}; going on (--on-divergence continue)\n")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


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
