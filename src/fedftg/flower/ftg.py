"""FTG for any Flower app: a strategy that wraps a Flower strategy and fine-tunes its aggregate.

`FTGStrategy(FedAvg(...), model=Net, num_classes=10, input_shape=(1, 28, 28))` behaves as
the wrapped strategy (client selection, its own aggregation and options, federated
evaluation) and, after each round's ``aggregate_train``, runs fedftg's FedFTG (or FedDF)
server step on the aggregate: a conditional generator is trained against the round's client
models (the teachers) and their label histograms, and the aggregate is distilled from the
teachers' class-weighted ensemble on the generated samples. The generator persists across
rounds (`state_dict`). Clients attach their label histograms with
`fedftg.flower.mods.label_histogram_mod`.

A reply the step cannot use is rejected with one log line and is not a teacher: a model
that does not fit the global model (keys, shapes, NaN/Inf; such a reply is withheld from
the wrapped strategy too, which could not average it), or a missing or malformed label
histogram (the wrapped strategy still aggregates that reply). With fewer valid teachers
than ``min_teachers`` the step is skipped for the round and the wrapped strategy's
aggregate is kept.
"""

from __future__ import annotations

import copy
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

from fedftg import registry
from fedftg.config import Source, canonical_key, layered
from fedftg.engine.server import all_finite, plugin_step
from fedftg.engine.setup import resolve_device
from fedftg.errors import UserError
from fedftg.fl.plugin import PluginEnv
from fedftg.flower.common import to_record
from fedftg.models.stacked import StackedModels
from fedftg.settings import Settings, validate_section

log = logging.getLogger("flwr")

HISTOGRAM_KEY = "label-histogram"  # the reply's ConfigRecord holding ``counts``
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@runtime_checkable
class _KeepsArrays(Protocol):
    """A strategy that keeps the model it returned (FedAvgM, FedAdam, ...)."""

    current_arrays: ArrayRecord | None


def step_plugins() -> tuple[str, ...]:
    """The server plug-ins the wrapper can run: those that fine-tune the aggregate and need
    nothing from the clients but their models and label histograms (ftg, df)."""
    return tuple(
        name for name, spec in registry.plugins().items() if spec.fine_tunes and not spec.client
    )


def plugin_settings(
    plugin: str = "ftg", settings: Settings | Mapping[str, Any] | None = None
) -> Settings:
    """Validated settings of server plug-in ``plugin``, as `fedftg run` checks them.

    ``settings`` is the plug-in's settings object (`fedftg.flower.FTGSettings`,
    `fedftg.flower.FedDFSettings`), or a mapping of setting names in any form the CLI
    or a Flower run config accepts (``iterations``, ``ftg-iterations``, ``ftg.gen_lr``),
    or None for the defaults. Unknown names and bad values are `UserError`s.
    """
    if plugin not in step_plugins():
        raise UserError(f"plugin: unknown value {plugin!r}; use one of {', '.join(step_plugins())}")
    if isinstance(settings, Settings):
        expected = registry.plugin(plugin).settings
        if type(settings) is not expected:
            raise UserError(f"settings: expected {expected.__name__} for {plugin}")
        chosen = copy.deepcopy(settings)
    else:
        values = {_section_key(plugin, k): v for k, v in (settings or {}).items()}
        cfg, _ = layered([Source(values, "settings: ")])
        chosen = cfg.sections[plugin]
    validate_section(plugin, chosen)
    return chosen


def run_config_settings(run_config: Mapping[str, Any], plugin: str = "ftg") -> dict[str, Any]:
    """The plug-in's settings in a Flower run config: keys ``<plugin>-<name>`` or
    ``<plugin>.<name>`` (``ftg-iterations = 5`` in ``[tool.flwr.app.config]``)."""
    return {k: v for k, v in run_config.items() if k.startswith((f"{plugin}-", f"{plugin}."))}


def _section_key(plugin: str, key: str) -> str:
    canon = canonical_key(key)
    return canon if canon.startswith(f"{plugin}.") else f"{plugin}.{key.replace('-', '_')}"


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
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise UserError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise UserError(f"input_shape: must be (channels, side, side), got {input_shape!r}")
        if shape[1] != shape[2]:
            raise UserError(f"input_shape: the generator makes square inputs, got {shape!r}")
        if not isinstance(min_teachers, int) or min_teachers < 1:
            raise UserError(f"min_teachers: must be an integer >= 1, got {min_teachers!r}")
        if precision not in ("fp32", "bf16"):
            raise UserError(f"precision: unknown value {precision!r}; use one of fp32, bf16")
        self.strategy = strategy
        self.plugin_name = plugin
        self.settings = plugin_settings(plugin, settings)
        self.settings.resolve(num_classes)
        self.num_classes = num_classes
        self.input_shape = shape
        self.min_teachers = min_teachers
        self.evaluate_fn = evaluate_fn
        self.seed = seed
        self.device = resolve_device(device)
        net = model if isinstance(model, nn.Module) else model()
        if not isinstance(net, nn.Module):
            raise UserError("model: expected a torch.nn.Module or a function returning one")
        self.model = copy.deepcopy(net).to(self.device).eval()
        self._shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        env = PluginEnv(
            num_classes=num_classes,
            channels=shape[0],
            image_size=shape[1],
            device=self.device,
            seed=seed,
            precision=precision,
        )
        self.plugin = registry.plugin(plugin).server(self.settings, env)
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
        record = next(iter(records.values()))
        if set(record.keys()) != set(self._shapes):
            return "model has other keys than the global model"
        for name, arr in record.items():
            if tuple(arr.shape) != self._shapes[name]:
                return f"model entry {name} has shape {tuple(arr.shape)}, not {self._shapes[name]}"
        for name, tensor in record.to_torch_state_dict().items():
            if not all_finite({name: tensor}):  # the engines' one NaN/Inf check
                return f"model entry {name} holds NaN or Inf"
        return None

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
        if not np.isfinite(values).all():
            return np.zeros(0), "label histogram holds NaN or Inf"
        if (values < 0).any():
            return np.zeros(0), "label histogram has negative counts"
        if values.sum() <= 0:
            return np.zeros(0), "label histogram is empty"
        return values, None

    def _step(
        self,
        server_round: int,
        arrays: ArrayRecord,
        teachers: list[tuple[int, ArrayRecord, np.ndarray]],
        metrics: MetricRecord,
    ) -> ArrayRecord:
        """Run the server step on the aggregate ``arrays``; the step's metrics go into
        ``metrics``; returns the fine-tuned arrays."""
        prefix, round_idx = self.plugin_name, server_round - 1
        start = time.perf_counter()
        dev = self.device
        self.model.load_state_dict({k: v.to(dev) for k, v in arrays.to_torch_state_dict().items()})
        self._evaluate(server_round, arrays, f"{prefix}-before", metrics)
        like = self.model.state_dict()  # the teachers in the model's dtypes (a float64 upload)
        states = [
            {k: v.to(device=dev, dtype=like[k].dtype) for k, v in rec.to_torch_state_dict().items()}
            for _, rec, _ in teachers
        ]
        counts = np.stack([h for _, _, h in teachers])
        stack = StackedModels(self.model, states)
        losses = plugin_step(self.plugin, self.model, stack, counts, self.seed, round_idx, dev)
        for name, value in losses.items():
            if math.isfinite(value):
                metrics[f"{prefix}-{name.replace('_', '-')}"] = float(value)
        tuned = to_record(self.model.state_dict())
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
        Save it with ``torch.save``; the wrapped strategy keeps its own state."""
        return self.plugin.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state_dict` output (e.g. after restarting the ServerApp)."""
        self.plugin.load_state_dict({k: v.to(self.device) for k, v in state.items()})
