"""Flower ServerApp: fedftg's methods over a Flower federation, with central evaluation.

Settings come from Flower's run config (``[tool.flwr.app.config]`` and ``--run-config``),
mapped onto the same `RunConfig` and validation as `fedftg run`; these keys are
Flower-only: ``min-replies`` (aggregate a round only if at least this many valid replies
arrived, default 1), ``round-timeout`` (seconds to wait for replies, default 600),
``node-wait`` (seconds to wait for a node of each of the ``clients`` partitions, default
120; a partition still without one fails the run), and
``resume``, ``fresh``, ``keep-checkpoint`` (`fedftg run`'s --resume, --fresh and
--keep-checkpoint). The run directory is `fedftg run`'s (`fedftg.engine.rundir`): the
same files and the same rules for a directory that holds a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.data.sources import load_dataset
from fedftg.engine.loop import DEFAULTS, ON_DIVERGENCE, result_lines, run_methods
from fedftg.engine.records import TRAINED, RoundRecord
from fedftg.engine.rundir import FLOWER_HINTS, RunDir
from fedftg.engine.server import ServerRunner
from fedftg.engine.setup import initial_state, resolve_device, split_clients
from fedftg.errors import UserError
from fedftg.flower.common import (
    config_from_run_config,
    int_entry,
    report_user_errors,
    use_run_threads,
)
from fedftg.flower.strategy import MethodStrategy

log = logging.getLogger("flwr")

MIN_REPLIES, ROUND_TIMEOUT, NODE_WAIT = 1, 600.0, 120.0
# the Flower-only keys, then `fedftg run`'s options (`fedftg.engine.loop.RunOptions`)
FLOWER_KEYS: dict[str, Any] = {
    "min-replies": MIN_REPLIES,
    "round-timeout": ROUND_TIMEOUT,
    "node-wait": NODE_WAIT,
    **{name.replace("_", "-"): value for name, value in asdict(DEFAULTS).items()},
}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: read the run config and run every requested method.

    A bad setting (or a refused resume) ends the app with one logged ``error:`` line and
    a failed run (`flwr list --run-id N` shows ``finished:failed``), not a traceback.
    """
    with report_user_errors(log):
        run_config = dict(context.run_config)
        options = {k: _flower_option(k, run_config.pop(k, v)) for k, v in FLOWER_KEYS.items()}
        cfg = config_from_run_config(run_config)
        use_run_threads(cfg)
        run_federation(
            grid,
            cfg,
            min_replies=int(options["min-replies"]),
            round_timeout=float(options["round-timeout"]),
            node_wait=float(options["node-wait"]),
            resume=bool(options["resume"]),
            fresh=bool(options["fresh"]),
            keep_checkpoint=bool(options["keep-checkpoint"]),
            on_divergence=str(options["on-divergence"]),
        )


def _flower_option(key: str, value: Any) -> Any:
    """A Flower-only setting, checked: a bool for the switches, ``stop`` or ``continue`` for
    ``on-divergence``, else a positive number."""
    default = FLOWER_KEYS[key]
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif isinstance(default, str):
        ok, what = value in ON_DIVERGENCE, " or ".join(ON_DIVERGENCE)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        what = "a number > 0"
    if not ok:
        raise UserError(f"run config: {key}: must be {what}, got {value!r}")
    return value


def discover_nodes(grid: Grid, expected: int, wait: float, timeout: float) -> dict[int, int]:
    """Map partition id -> node id by asking every connected node (waits for ``expected``)."""
    deadline = time.time() + wait
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.time() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    messages = [
        Message(content=RecordDict(), message_type="query", dst_node_id=n) for n in node_ids
    ]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("node %s did not say its partition", reply.metadata.src_node_id)
            continue
        pid = int_entry(reply.content.config_records["info"], "partition-id")
        if pid in node_of:
            log.warning("partition %d is held by two nodes; using one", pid)
        node_of[pid] = reply.metadata.src_node_id
    log.info("%d nodes connected, partitions %s", len(node_of), sorted(node_of))
    return node_of


def missing_partitions(node_of: dict[int, int], clients: int) -> list[int]:
    """The partitions 0..clients-1 that no node holds."""
    return [k for k in range(clients) if k not in node_of]


def id_ranges(ids: list[int]) -> str:
    """Sorted ids as short ranges: [2, 3, 4, 7] -> "2-4, 7"."""
    spans: list[list[int]] = []
    for k in ids:
        if spans and k == spans[-1][1] + 1:
            spans[-1][1] = k
        else:
            spans.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    min_replies: int = MIN_REPLIES,
    round_timeout: float = ROUND_TIMEOUT,
    node_wait: float = NODE_WAIT,
    resume: bool = DEFAULTS.resume,
    fresh: bool = DEFAULTS.fresh,
    keep_checkpoint: bool = DEFAULTS.keep_checkpoint,
    on_divergence: str = DEFAULTS.on_divergence,
) -> dict[str, Any]:
    """Run every method of ``cfg`` over the nodes of ``grid``; write the run directory.

    The run directory and its rules are those of `fedftg run` (`fedftg.engine.rundir`):
    the same settings continue from the server's checkpoint (global model, method server
    state, generator, round), other settings are refused unless ``fresh``, ``resume`` may
    raise the rounds of a finished run. Client-side method state lives on the nodes (their
    Context) and is not checkpointed. A method that diverges is handled as in `fedftg
    run` (``on_divergence``): ``stop`` writes the outputs and raises `Diverged`.
    """
    with RunDir.open(
        cfg,
        engine="flower",
        fresh=fresh,
        resume=resume,
        keep_checkpoint=keep_checkpoint,
        hints=FLOWER_HINTS,
        warn=log.warning,
    ) as run:
        cfg = run.cfg
        device = resolve_device(cfg.device)
        ds = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
        test = DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std, device)
        init = initial_state(cfg, ds)
        partition = split_clients(cfg, ds)  # as the nodes split it: for the heatmap and summary
        node_of = discover_nodes(grid, cfg.clients, node_wait, round_timeout)
        missing = missing_partitions(node_of, cfg.clients)
        if missing:  # training on part of the data would not be the run asked for
            raise UserError(
                f"clients: no SuperNode holds partition {id_ranges(missing)} of {cfg.clients} "
                f"after waiting node-wait={node_wait:g} s ({len(node_of)} answered); start one "
                "SuperNode per partition or set clients to the number of SuperNodes"
            )
        if len(node_of) < int(min_replies):
            raise UserError(f"min-replies: only {len(node_of)} nodes answered")
        run.start(partition, ds)

        def start_method(
            display: str, base: str, plugin: str | None
        ) -> tuple[ServerRunner, Callable[[], RoundRecord]]:
            runner = ServerRunner(cfg, ds, test, init, base, plugin, device)
            strategy = MethodStrategy(runner, display, base, node_of, int(min_replies))
            strategy.summary()
            return runner, lambda: strategy.run_round(grid, round_timeout)

        summary = run_methods(run, partition, start_method, LogReport(), on_divergence)
    table, *gains = result_lines(cfg, summary["methods"])
    log.info("\n%s", table)
    for line in gains:
        log.info(line)
    return summary


class LogReport:
    """The ServerApp's report of the loop, on Flower's log."""

    def finished_before(self, method: str) -> None:
        pass

    def start_method(self, method: str, rounds: int, done: int, later: int) -> None:
        if done:
            log.info("%s: resumed after round %d", method, done)

    def round(self, method: str, record: RoundRecord) -> None:
        if record.outcome == TRAINED:
            log.info("%s round %d: %s", method, record.round_num, record.to_row())

    def end_method(self) -> None:
        pass

    def going_on(self, message: str) -> None:
        log.warning("%s; going on (on-divergence=continue)", message)

    def close(self) -> None:
        pass
