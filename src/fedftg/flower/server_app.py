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
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.data.sources import load_dataset
from fedftg.engine.run import ON_DIVERGENCE, Diverged, divergence, format_table, plugin_gains
from fedftg.engine.rundir import FLOWER_HINTS, RunDir
from fedftg.engine.server import ServerRunner
from fedftg.engine.setup import initial_state, resolve_device, split_clients
from fedftg.errors import UserError
from fedftg.flower.common import config_from_run_config, report_user_errors, to_record
from fedftg.flower.strategy import FedFTGStrategy

log = logging.getLogger("flwr")

FLOWER_KEYS = {
    "min-replies": 1,
    "round-timeout": 600.0,
    "node-wait": 120.0,
    "resume": False,
    "fresh": False,
    "keep-checkpoint": False,
    "on-divergence": "stop",
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


def build_server_app(cfg: RunConfig, **options: Any) -> ServerApp:
    """A ServerApp bound to ``cfg`` (for Flower's Python simulation API and tests)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, **options)

    return bound


def _log_going_on(message: str) -> None:
    log.warning("%s; going on (on-divergence=continue)", message)


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
        pid = int(reply.content["info"]["partition-id"])
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
    min_replies: int = 1,
    round_timeout: float = 600.0,
    node_wait: float = 120.0,
    resume: bool = False,
    fresh: bool = False,
    keep_checkpoint: bool = False,
    on_divergence: str = "stop",
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
        methods: dict[str, Any] = {}
        stopped: Diverged | None = None
        for display, base, plugin in cfg.methods():
            if run.is_finished(display):
                methods[display] = run.done[display]
                continue
            runner = ServerRunner(cfg, ds, test, init, base, plugin, device)
            saved = run.restore_point(display)
            if saved is not None:
                runner.restore(saved)
                log.info("%s: resumed after round %d", display, runner.state.round)
            strategy = FedFTGStrategy(runner, display, base, node_of, int(min_replies))
            strategy.summary()
            for server_round in range(runner.state.round + 1, cfg.rounds + 1):
                arrays = to_record(runner.state.global_state)
                messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
                replies = grid.send_and_receive(messages, timeout=round_timeout)
                new_arrays, _ = strategy.aggregate_train(server_round, replies)
                if new_arrays is None and runner.diverged:  # no finite upload this round
                    runner.state.round += 1
                    run.append(display, strategy.last_record or {})
                elif new_arrays is None:  # too few valid replies: the round is skipped
                    runner.state.round += 1
                    run.append(
                        display,
                        {
                            "round": server_round,
                            "skipped": True,
                            "test_acc": None,
                            "test_loss": None,
                            "elapsed_s": runner.state.elapsed_s,
                        },
                    )
                else:
                    run.append(display, strategy.last_record or {})
                    log.info("%s round %d: %s", display, server_round, strategy.last_record)
                if runner.diverged:
                    break
                run.end_round(display, runner, {"rejected": strategy.rejected})
            extra = {"rejected": strategy.rejected}
            methods[display] = run.method_finished(
                display, runner, extra, samples=not runner.diverged
            )
            stopped = divergence(display, runner, on_divergence, _log_going_on)
            if stopped is not None:
                break
        summary = run.finish(methods, partition)
        if stopped is not None:
            raise stopped
    log.info("\n%s", format_table(summary["methods"]))
    for line in plugin_gains(cfg, summary["methods"]):
        log.info(line)
    return summary
