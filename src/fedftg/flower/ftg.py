"""FTG for any Flower app: a strategy that wraps a Flower strategy and fine-tunes its aggregate.

`FTGStrategy(FedAvg(...), model=Net, num_classes=10, input_shape=(1, 28, 28))` behaves as
the wrapped strategy (client selection, its own aggregation and options, federated
evaluation) and, after each round's ``aggregate_train``, runs fedftg's FedFTG (or FedDF)
server step (`fedftg.ServerStep`, of which this is the Flower adapter) on the aggregate: a
conditional generator is trained against the round's client models (the teachers) and
their label histograms, and the aggregate is distilled from the teachers' class-weighted
ensemble on the generated samples. The generator persists across rounds (`state_dict`).
Clients attach their label histograms with `fedftg.flower.mods.label_histogram_mod`.

A reply the step cannot use is rejected with one log line and is not a teacher: a model
that does not fit the global model (keys, shapes, NaN/Inf; such a reply is withheld from
the wrapped strategy too, which could not average it), or a missing or malformed label
histogram (the wrapped strategy still aggregates that reply). With fewer valid teachers
than ``min_teachers`` the step is skipped for the round and the wrapped strategy's
aggregate is kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedftg.errors import UserError
from fedftg.flower.common import to_record
from fedftg.server_step import ServerStep, counts_problem
from fedftg.server_step import plugin_settings as plugin_settings  # its public home before
from fedftg.server_step import step_plugins as step_plugins
from fedftg.settings import Settings

log = logging.getLogger("flwr")

HISTOGRAM_KEY = "label-histogram"  # the reply's ConfigRecord holding ``counts``
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@runtime_checkable
class _KeepsArrays(Protocol):
    """A strategy that keeps the model it returned (FedAvgM, FedAdam, ...)."""

    current_arrays: ArrayRecord | None


def run_config_settings(run_config: Mapping[str, Any], plugin: str = "ftg") -> dict[str, Any]:
    """The plug-in's settings in a Flower run config: keys ``<plugin>-<name>`` or
    ``<plugin>.<name>`` (``ftg-iterations = 5`` in ``[tool.flwr.app.config]``)."""
    return {k: v for k, v in run_config.items() if k.startswith((f"{plugin}-", f"{plugin}."))}


class FTGStrategy(Strategy):
    """A Flower strategy that runs FedFTG's (or FedDF's) server step after another's
    aggregation.

    ``strategy``: any Message-API strategy (`flwr.serverapp.strategy`); it keeps doing
    everything but the step. ``model``: the global model's architecture, a module or a
    factory (its weights are not used). ``input_shape``: one input, (channels, side, side).
    ``settings``: see `plugin_settings`. ``min_teachers``: fewest valid replies to run the
    step. ``evaluate_fn``: Flower's central evaluation signature; when given, its metrics on
    the aggregate before and after the step join the round's train metrics
    (``ftg-before-<name>``, ``ftg-after-<name>``). ``seed`` keys the generator's
    initialisation and each round's random stream, as in `fedftg run`.
    """

    def __init__(
        self,
        strategy: Strategy,
        model: nn.Module | Callable[[], nn.Module],
        num_classes: int,
        input_shape: tuple[int, int, int],
        settings: Settings | Mapping[str, Any] | None = None,
        *,
        plugin: str = "ftg",
        min_teachers: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        seed: int = 0,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise UserError("strategy: expected a flwr.serverapp.strategy.Strategy")
        if not isinstance(min_teachers, int) or min_teachers < 1:
            raise UserError(f"min_teachers: must be an integer >= 1, got {min_teachers!r}")
        self.strategy = strategy
        self.server_step = ServerStep(
            plugin,
            model=model,
            num_classes=num_classes,
            input_shape=input_shape,
            settings=settings,
            seed=seed,
            device=device,
            precision=precision,
        )
        self.plugin_name = plugin
        # the step's parts, under the names they had before it was ServerStep's
        self.settings, self.plugin = self.server_step.settings, self.server_step.plugin
        self.model, self.device = self.server_step.model, self.server_step.device
        self.input_shape, self.seed = self.server_step.input_shape, seed
        self.num_classes = num_classes
        self.min_teachers = min_teachers
        self.evaluate_fn = evaluate_fn
        self.rejected: list[str] = []  # "round r: node n: why", every rejection so far

    # ------------------------------------------------------------- the wrapped strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info(
            "\t├──> %s server step (fedftg) after %s: min teachers %d, settings %s",
            self.plugin_name,
            type(self.strategy).__name__,
            self.min_teachers,
            self.settings,
        )
        self.strategy.summary()

    # ------------------------------------------------------------------- training
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate, fine-tuned by the server step."""
        kept, teachers = self._screen(server_round, list(replies))
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if arrays is None:
            return arrays, metrics
        metrics = MetricRecord() if metrics is None else metrics
        prefix = self.plugin_name
        metrics[f"{prefix}-teachers"] = len(teachers)
        if len(teachers) < self.min_teachers:
            log.warning(
                "round %d: %d valid teachers, fewer than %d: %s step skipped",
                server_round,
                len(teachers),
                self.min_teachers,
                prefix,
            )
            metrics[f"{prefix}-skipped"] = 1
            return arrays, metrics
        tuned = self._step(server_round, arrays, teachers, metrics)
        keeper = self.strategy
        if isinstance(keeper, _KeepsArrays) and keeper.current_arrays is arrays:
            # a strategy that keeps the model it returned (FedAvgM) now keeps the tuned one
            keeper.current_arrays = tuned
        return tuned, metrics

    def _screen(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], list[tuple[int, ArrayRecord, np.ndarray]]]:
        """The replies the wrapped strategy gets and the valid teachers (node, model,
        histogram), ordered by node id so the step does not depend on arrival order."""
        kept: list[Message] = []
        teachers: list[tuple[int, ArrayRecord, np.ndarray]] = []
        for msg in replies:
            if msg.has_error():  # the wrapped strategy logs these
                kept.append(msg)
                continue
            node = msg.metadata.src_node_id
            problem = self.model_problem(msg)
            if problem is None:
                kept.append(msg)
                hist, problem = self.histogram(msg)
            if problem is not None:
                self.rejected.append(f"round {server_round}: node {node}: {problem}")
                log.warning(
                    "round %d: reply from node %d is not a teacher: %s", server_round, node, problem
                )
                continue
            teachers.append((node, next(iter(msg.content.array_records.values())), hist))
        teachers.sort(key=lambda item: item[0])
        return kept, teachers

    def model_problem(self, msg: Message) -> str | None:
        """Why a reply's model cannot be used (None if it can): one ArrayRecord with the
        global model's keys and shapes, finite."""
        records = msg.content.array_records
        if len(records) != 1:
            return f"expected one ArrayRecord, got {len(records)}"
        return self.server_step.state_problem(next(iter(records.values())).to_torch_state_dict())

    def histogram(self, msg: Message) -> tuple[np.ndarray, str | None]:
        """A reply's label histogram and why it cannot be used (None if it can)."""
        record = msg.content.get(HISTOGRAM_KEY)
        counts = record.get("counts") if isinstance(record, ConfigRecord) else None
        if counts is None:
            return np.zeros(0), "no label histogram (use fedftg.flower.mods.label_histogram_mod)"
        if not isinstance(counts, list) or len(counts) != self.num_classes:
            n = len(counts) if isinstance(counts, list) else "no"
            return np.zeros(0), f"label histogram has {n} classes, not {self.num_classes}"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in counts):
            return np.zeros(0), "label histogram holds non-numbers"
        values = np.asarray(counts, dtype=np.float64)
        problem = counts_problem(values)
        return (values, None) if problem is None else (np.zeros(0), f"label histogram {problem}")

    def _step(
        self,
        server_round: int,
        arrays: ArrayRecord,
        teachers: list[tuple[int, ArrayRecord, np.ndarray]],
        metrics: MetricRecord,
    ) -> ArrayRecord:
        """Run the server step on the aggregate ``arrays``; the step's metrics go into
        ``metrics``; returns the fine-tuned arrays."""
        prefix = self.plugin_name
        start = time.perf_counter()
        self._evaluate(server_round, arrays, f"{prefix}-before", metrics)
        state, losses = self.server_step.step(
            arrays.to_torch_state_dict(),
            [rec.to_torch_state_dict() for _, rec, _ in teachers],
            np.stack([h for _, _, h in teachers]),
            round=server_round - 1,
        )
        for name, value in losses.items():
            if math.isfinite(value):
                metrics[f"{prefix}-{name.replace('_', '-')}"] = value
        tuned = to_record(state)
        metrics[f"{prefix}-server-s"] = time.perf_counter() - start
        self._evaluate(server_round, tuned, f"{prefix}-after", metrics)
        return tuned

    def _evaluate(
        self, server_round: int, arrays: ArrayRecord, prefix: str, metrics: MetricRecord
    ) -> None:
        """The metrics of ``evaluate_fn`` (when given) on ``arrays``, under ``prefix``."""
        if self.evaluate_fn is None:
            return
        result = self.evaluate_fn(server_round, arrays)
        for name, value in (result or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"{prefix}-{name}"] = value

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What persists across rounds: the server step's state (FedFTG's generator).
        Save it with ``torch.save``; the wrapped strategy keeps its own state (and Flower
        numbers the rounds)."""
        return self.plugin.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state_dict` output (e.g. after restarting the ServerApp)."""
        self.server_step.load_plugin_state(state)
