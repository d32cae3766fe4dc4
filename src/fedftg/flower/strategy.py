"""MethodStrategy: a Flower strategy that runs any fedftg method (a client method and an
optional server plug-in) on a Flower federation.

Each hook is small: `configure_train` selects clients exactly as the in-process simulator
does and sends them the global model, the method's server state and the plug-in's
payload; `round_record` rejects malformed replies, aggregates with the client method's
rule and runs the server plug-in on the teachers that replied, returning the round's
`RoundRecord`; `run_round` is one round over a grid (what the run loop,
`fedftg.engine.loop.run_methods`, calls), and `aggregate_train` the same step as Flower's
`Strategy.start` expects it. The maths is the shared `ServerRunner`, so Flower and the
simulator compute the same numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedftg.engine.records import TRAINED, RoundRecord
from fedftg.engine.server import NONFINITE_PROBLEMS, ServerRunner, upload_problem
from fedftg.fl.client import LocalResult
from fedftg.flower.common import config_to_json, float_entry, from_record, int_entry, to_record

log = logging.getLogger("flwr")


class MethodStrategy(Strategy):
    """Flower strategy around one fedftg method (client method + optional plug-in)."""

    def __init__(
        self,
        runner: ServerRunner,
        method_name: str,
        base: str,
        node_of: dict[int, int],
        min_replies: int = 1,
    ) -> None:
        self.runner = runner
        self.method_name = method_name
        self.base = base
        self.node_of = node_of
        self.min_replies = min_replies
        self._start = 0.0

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Messages for the clients selected for the runner's next round, ``server_round``
        (1-based; the runner's own count is the one used, so that a resumed run goes on)."""
        cfg, round_idx = self.runner.cfg, self.runner.state.round
        self._start = time.perf_counter()
        run_config = ConfigRecord(
            {
                "round": round_idx,
                "run": config_to_json(cfg),
                "base": self.base,
                "method": self.method_name,
            }
        )
        server_state = to_record(self.runner.state.server_state)
        payload = self.runner.client_payload()  # the plug-in's client half's input (FedGen)
        extra = {"plugin": to_record(payload)} if self.runner.client_half is not None else {}
        run_config["plugin"] = self.runner.plugin_name or ""
        messages = []
        for k in self.runner.selected():
            if k not in self.node_of:
                log.warning("round %d: partition %d has no node; skipped", server_round, k)
                continue
            content = RecordDict(
                {"global": arrays, "server": server_state, "config": run_config, **extra}
            )
            messages.append(
                Message(content=content, message_type="train", dst_node_id=self.node_of[k])
            )
        return messages

    def run_round(self, grid: Grid, timeout: float) -> RoundRecord:
        """The runner's next round over ``grid``: send, wait up to ``timeout`` seconds for
        the replies, aggregate; the round's record."""
        round_num = self.runner.state.round + 1
        arrays = to_record(self.runner.state.global_state)
        messages = self.configure_train(round_num, arrays, ConfigRecord(), grid)
        return self.round_record(round_num, grid.send_and_receive(messages, timeout=timeout))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """`round_record` as Flower's `Strategy.start` takes it: the new global model and
        the record's numbers, or (None, None) for a round without an aggregate."""
        record = self.round_record(server_round, replies)
        if record.outcome != TRAINED:
            return None, None
        numeric: dict[str, int | float | list[int] | list[float]] = {
            k: float(v) for k, v in record.items() if isinstance(v, (int, float))
        }
        return to_record(self.runner.state.global_state), MetricRecord(numeric)

    def round_record(self, server_round: int, replies: Iterable[Message]) -> RoundRecord:
        """Validate the replies, aggregate and run the server plug-in: the round's record.
        A round whose every reply held NaN/Inf marks the method diverged (as in-process);
        one with fewer than ``min_replies`` valid replies is skipped (the model kept)."""
        accepted: list[tuple[int, LocalResult, np.ndarray]] = []
        replies = list(replies)
        rejections: list[str] = []
        nonfinite = 0
        for msg in replies:
            problem = self.check_reply(msg)
            if problem is not None:
                rejections.append(f"round {server_round}: {problem}")
                log.warning("round %d: reply rejected: %s", server_round, problem)
                nonfinite += problem in NONFINITE_PROBLEMS
                continue
            accepted.append(self._parse(msg))
        if replies and nonfinite == len(replies):  # as in-process: no finite upload left
            return self.runner.no_finite_upload(rejections, "lr", self._start)
        if len(accepted) < self.min_replies:
            log.warning(
                "round %d: %d valid replies, fewer than %d: global model kept",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return self.runner.skip_round(rejections)
        accepted.sort(key=lambda item: item[0])  # the simulator's order: by partition id
        results = [r for _, r, _ in accepted]
        histograms = [h for _, _, h in accepted]
        return self.runner.server_update(results, histograms, self._start, rejections)

    def check_reply(self, msg: Message) -> str | None:
        """Why a reply cannot be aggregated (None if it can)."""
        if msg.has_error():
            return f"error from node {msg.metadata.src_node_id}: {msg.error.reason}"
        return self.check_content(msg.content)

    def check_content(self, content: RecordDict) -> str | None:
        """Why a reply's content cannot be aggregated: keys, shapes, NaN/Inf, histogram."""
        for key, kind in (
            ("model", ArrayRecord),
            ("metrics", MetricRecord),
            ("upload", ArrayRecord),
        ):
            if key not in content:
                return f"missing '{key}'"
            if not isinstance(content[key], kind):
                return f"'{key}' is not a {kind.__name__}"
        expected = self.runner.state.global_state
        model = content.array_records["model"]
        if set(model.keys()) != set(expected.keys()):
            return "model state has unexpected keys"
        for name, arr in model.items():
            if tuple(arr.shape) != tuple(expected[name].shape):
                return f"model entry {name} has shape {tuple(arr.shape)}"
        metrics = content.metric_records["metrics"]
        loss = metrics.get("loss")
        if not isinstance(loss, float):
            return "loss is not a finite number"
        upload = content.array_records["upload"].to_torch_state_dict()
        state = model.to_torch_state_dict()
        problem = upload_problem(state, upload, loss)
        if problem is not None:
            return problem
        hist = metrics.get("histogram")
        classes = self.runner.dataset.num_classes
        if not isinstance(hist, list) or len(hist) != classes:
            return f"label histogram does not have {classes} classes"
        if any((not isinstance(v, int)) or v < 0 for v in hist):
            return "label histogram has negative or non-integer counts"
        n = metrics.get("num-examples")
        if not isinstance(n, int) or n <= 0:
            return "num-examples is not a positive integer"
        if self.runner.cfg.histogram_epsilon == 0 and sum(hist) != n:
            return "label histogram does not add up to num-examples"
        return None

    def _parse(self, msg: Message) -> tuple[int, LocalResult, np.ndarray]:
        content = msg.content
        metrics = content.metric_records["metrics"]
        device = self.runner.device
        result = LocalResult(
            state=from_record(content.array_records["model"], device),
            num_samples=int_entry(metrics, "num-examples"),
            steps=int_entry(metrics, "steps"),
            loss=float_entry(metrics, "loss"),
            upload=from_record(content.array_records["upload"], device),
            plugin_loss=float_entry(metrics, "plugin-loss") if "plugin-loss" in metrics else None,
        )
        hist = np.asarray(metrics["histogram"], dtype=np.int64)
        return int_entry(metrics, "partition-id"), result, hist

    # ------------------------------------------------------- evaluation: central only
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates on the test set."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        cfg = self.runner.cfg
        log.info(
            "MethodStrategy: method %s, %d clients, participation %s (%s), min replies %d",
            self.method_name,
            cfg.clients,
            cfg.participation,
            cfg.selection,
            self.min_replies,
        )
