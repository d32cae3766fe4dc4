"""Flower ServerApp: fedftg's methods over a Flower federation, with central evaluation.

Settings come from Flower's run config (``[tool.flwr.app.config]`` and ``--run-config``),
mapped onto the same `RunConfig` and validation as `fedftg run`; three keys are
Flower-only: ``min-replies`` (aggregate a round only if at least this many valid replies
arrived, default 1), ``round-timeout`` (seconds to wait for replies, default 600) and
``node-wait`` (seconds to wait for all ``clients`` nodes to connect, default 120). The run
directory gets the same config.json, metrics.jsonl, summary.json and curves.png as
`fedftg run`.
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
from fedftg.engine.checkpoint import checkpoint_matches, config_fingerprint, load_latest
from fedftg.engine.run import (
    environment,
    format_table,
    make_out_dir,
    plugin_gains,
    save_run_checkpoint,
    trim_metrics,
)
from fedftg.engine.simulation import ServerRunner, initial_state, output_paths, resolve_device
from fedftg.errors import UserError
from fedftg.flower.common import config_from_run_config, report_user_errors, to_record
from fedftg.flower.strategy import FedFTGStrategy
from fedftg.report.files import MetricsLog, read_metrics, write_json
from fedftg.report.plots import plot_curves

log = logging.getLogger("flwr")

FLOWER_KEYS = {"min-replies": 1, "round-timeout": 600.0, "node-wait": 120.0, "resume": False}

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
        )


def _flower_option(key: str, value: Any) -> Any:
    """A Flower-only setting, checked: a bool for ``resume``, else a positive number."""
    default = FLOWER_KEYS[key]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not ok:
        what = "true or false" if isinstance(default, bool) else "a number > 0"
        raise UserError(f"run config: {key}: must be {what}, got {value!r}")
    return value


def build_server_app(cfg: RunConfig, **options: Any) -> ServerApp:
    """A ServerApp bound to ``cfg`` (for Flower's Python simulation API and tests)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, **options)

    return bound


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


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    min_replies: int = 1,
    round_timeout: float = 600.0,
    node_wait: float = 120.0,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every method of ``cfg`` over the nodes of ``grid``; write the run directory.

    The server checkpoints after every round (global model, method server state,
    generator, round); with ``resume`` it continues from the checkpoint in ``cfg.out``.
    Client-side method state lives on the nodes (their Context) and is not checkpointed.
    """
    paths = output_paths(cfg.out)
    make_out_dir(paths["dir"])
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    test = DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std, device)
    init = initial_state(cfg, ds)
    write_json(
        paths["config"], {**cfg.to_dict(), "environment": environment(cfg), "engine": "flower"}
    )
    node_of = discover_nodes(grid, cfg.clients, node_wait, round_timeout)
    if len(node_of) < int(min_replies):
        raise UserError(f"min-replies: only {len(node_of)} nodes answered")
    ckpt_path = paths["dir"] / "checkpoint.pt"
    fingerprint = config_fingerprint(cfg.to_dict())
    saved = None
    if resume:
        saved, warnings = load_latest(ckpt_path)
        for w in warnings:
            log.warning(w)
        if saved is not None and not checkpoint_matches(saved, cfg.to_dict()):
            raise UserError(f"{ckpt_path}: checkpoint was written by a run with other settings")
    done: dict[str, Any] = dict(saved["done"]) if saved else {}
    trim_metrics(paths["metrics"], saved)
    metrics_log = MetricsLog(paths["metrics"])
    summary: dict[str, Any] = {"methods": {}, "engine": "flower"}
    for display, base, plugin in cfg.methods():
        if display in done:
            summary["methods"][display] = done[display]
            continue
        runner = ServerRunner(cfg, ds, test, init, base, plugin, device)
        if saved is not None and saved["current"] == display:
            runner.restore(saved["state"])
            log.info("%s: resumed after round %d", display, runner.state.round)
        strategy = FedFTGStrategy(runner, display, base, node_of, int(min_replies))
        strategy.summary()
        for server_round in range(runner.state.round + 1, cfg.rounds + 1):
            arrays = to_record(runner.state.global_state)
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=round_timeout)
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            if new_arrays is None:  # too few valid replies: the round is skipped
                runner.state.round += 1
                metrics_log.append(
                    {
                        "method": display,
                        "round": server_round,
                        "skipped": True,
                        "test_acc": None,
                        "test_loss": None,
                        "elapsed_s": runner.state.elapsed_s,
                    }
                )
            else:
                metrics_log.append({"method": display, **(strategy.last_record or {})})
                log.info("%s round %d: %s", display, server_round, strategy.last_record)
            if server_round == cfg.rounds:
                done[display] = {**runner.summary(), "rejected": strategy.rejected}
            save_run_checkpoint(ckpt_path, fingerprint, done, display, runner.checkpoint_state())
        summary["methods"][display] = {**runner.summary(), "rejected": strategy.rejected}
    summary["config"] = cfg.to_dict()
    write_json(paths["summary"], summary)
    plot_curves(read_metrics(paths["metrics"]), paths["curves"], f"{cfg.dataset} on Flower")
    log.info("\n%s", format_table(summary["methods"]))
    for line in plugin_gains(cfg, summary["methods"]):
        log.info(line)
    return summary
