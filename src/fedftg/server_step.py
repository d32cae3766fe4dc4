"""FedFTG's (or FedDF's) server step for any federated loop: `ServerStep`.

``step = ServerStep("ftg", model=Net, num_classes=10, input_shape=(1, 28, 28))``, then each
round, after averaging the clients' models: ``state, metrics = step(avg_state,
client_states, label_counts)``. A conditional generator is trained against the round's
client models (the teachers) and their label counts, and the averaged model is distilled
from the teachers' class-weighted ensemble on the generated samples (FedFTG); or, with
``"df"``, FedDF's ensemble distillation on generated samples. The generator persists across
calls; `state_dict` / `load_state_dict` carry it and the round counter.

This is the step `fedftg run` runs (the same plug-in, settings and random stream, through
`fedftg.engine.server.plugin_step`), so the same inputs and seed give the same fine-tuned
model; `fedftg.flower.FTGStrategy` is this step inside a Flower strategy. The model needs
only ``forward(x) -> (B, num_classes)`` logits (no ``features``/``classifier`` split).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedftg import registry
from fedftg.config import Source, canonical_key, layered
from fedftg.engine.server import all_finite, plugin_step
from fedftg.engine.setup import resolve_device
from fedftg.errors import UserError
from fedftg.fl.client import detached_state
from fedftg.fl.plugin import PluginEnv
from fedftg.models import check_contract, model_device
from fedftg.models.stacked import StackedModels
from fedftg.settings import Settings, validate_section

State = dict[str, torch.Tensor]
StateLike = Mapping[str, "torch.Tensor | np.ndarray"]


def step_plugins() -> tuple[str, ...]:
    """The server plug-ins a `ServerStep` can run: those that fine-tune the aggregate and
    need nothing from the clients but their models and label counts (ftg, df)."""
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


def _section_key(plugin: str, key: str) -> str:
    canon = canonical_key(key)
    return canon if canon.startswith(f"{plugin}.") else f"{plugin}.{key.replace('-', '_')}"


def checked_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``input_shape`` as (channels, side, side): the generator makes square images."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape
    ):
        raise UserError(f"input_shape: must be (channels, side, side), got {input_shape!r}")
    if shape[1] != shape[2]:
        raise UserError(f"input_shape: the generator makes square inputs, got {shape!r}")
    return shape[0], shape[1], shape[2]


def state_problem(
    state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Why ``state`` cannot stand for a model whose entries have ``shapes`` (None if it
    can): the same keys, the same shapes, every floating-point entry finite."""
    if set(state) != set(shapes):
        return "model has other keys than the global model"
    for name, value in state.items():
        if tuple(value.shape) != shapes[name]:
            return f"model entry {name} has shape {tuple(value.shape)}, not {shapes[name]}"
    for name, value in state.items():
        if not all_finite({name: value}):  # the engines' one NaN/Inf check
            return f"model entry {name} holds NaN or Inf"
    return None


def checked_counts(label_counts: Any, clients: int, num_classes: int) -> np.ndarray:
    """The round's label counts as a (clients, num_classes) array of numbers that
    `counts_problem` accepts."""
    counts = np.asarray(
        label_counts.detach().cpu() if isinstance(label_counts, torch.Tensor) else label_counts
    )
    if counts.dtype.kind not in "iuf":
        raise UserError(f"label_counts: expected numbers, got {counts.dtype}")
    if counts.shape != (clients, num_classes):
        raise UserError(
            f"label_counts: expected shape ({clients}, {num_classes}) (clients, classes), "
            f"got {counts.shape}"
        )
    problem = counts_problem(counts)
    if problem is not None:
        raise UserError(f"label_counts: {problem}")
    return counts


def counts_problem(counts: np.ndarray) -> str | None:
    """Why label counts cannot key the step's label draw (None if they can): each finite
    and >= 0, not all zero."""
    if not np.isfinite(counts).all():
        return "holds NaN or Inf"
    if (counts < 0).any():
        return "has negative counts"
    if counts.sum() <= 0:
        return "is empty"
    return None


class ServerStep:
    """FedFTG's (``"ftg"``) or FedDF's (``"df"``) server step, for any FL loop.

    ``model``: the global model's architecture, a module or a factory (its weights are not
    used), whose ``forward(x)`` gives (B, num_classes) logits for x of shape (B,
    *input_shape). ``input_shape``: one input, (channels, side, side), on the scale the
    model sees (normalised). ``settings``: the plug-in's settings object or a mapping of
    setting names (see `plugin_settings`). ``seed`` keys the generator's initialisation and
    each round's random stream, as in `fedftg run`; ``precision`` ``"bf16"`` runs the
    step's forwards under bf16 autocast.
    """

    def __init__(
        self,
        plugin: str = "ftg",
        *,
        model: nn.Module | Callable[[], nn.Module],
        num_classes: int,
        input_shape: Sequence[int],
        settings: Settings | Mapping[str, Any] | None = None,
        seed: int = 0,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise UserError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
        shape = checked_shape(input_shape)
        if precision not in ("fp32", "bf16"):
            raise UserError(f"precision: unknown value {precision!r}; use one of fp32, bf16")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise UserError(f"seed: must be an integer, got {seed!r}")
        self.plugin_name = plugin
        self.settings = plugin_settings(plugin, settings)
        self.settings.resolve(num_classes)
        self.num_classes = num_classes
        self.input_shape = shape
        self.seed = seed
        self.device = resolve_device(device)
        batched = getattr(self.settings, "impl", "fast") == "fast"
        self.model = _checked_model(model, shape, num_classes, batched).to(self.device)
        self.shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        env = PluginEnv(
            num_classes=num_classes,
            channels=shape[0],
            image_size=shape[1],
            device=self.device,
            seed=seed,
            precision=precision,
        )
        self.plugin = registry.plugin(plugin).server(self.settings, env)
        self.round = 0  # the 0-based index of the next round (steps taken, unless told)

    def step(
        self,
        aggregate_state: StateLike,
        client_states: Sequence[StateLike],
        label_counts: Any,
        round: int | None = None,
    ) -> tuple[State, dict[str, float]]:
        """Fine-tune the round's aggregate; returns its fine-tuned state (on this step's
        device) and the step's metrics (mean loss terms, ...).

        ``aggregate_state``: the averaged model's state dict; ``client_states``: the
        round's client models after local training (the teachers); ``label_counts``: their
        (K, num_classes) label histograms; ``round``: the 0-based round index, which keys
        the random stream (default: the step counter, 0 at first; `fedftg run`'s round r
        is index r - 1). Bad input is a `UserError` naming it.
        """
        round_idx = self.round if round is None else round
        if not isinstance(round_idx, int) or isinstance(round_idx, bool) or round_idx < 0:
            raise UserError(f"round: must be an integer >= 0, got {round_idx!r}")
        aggregate = self._checked("aggregate_state", aggregate_state)
        if isinstance(client_states, Mapping) or not isinstance(client_states, Sequence):
            raise UserError("client_states: expected a list of state dicts, one per client")
        if not client_states:
            raise UserError("client_states: empty; the step needs at least one client model")
        teachers = [self._checked(f"client_states[{j}]", s) for j, s in enumerate(client_states)]
        counts = checked_counts(label_counts, len(teachers), self.num_classes)
        self.model.load_state_dict(aggregate)
        stack = StackedModels(self.model, teachers)
        metrics = plugin_step(
            self.plugin, self.model, stack, counts, self.seed, round_idx, self.device
        )
        self.round = round_idx + 1
        return detached_state(self.model), {k: float(v) for k, v in metrics.items()}

    __call__ = step

    def state_problem(self, state: Mapping[str, torch.Tensor]) -> str | None:
        """Why ``state`` cannot be one of this model's states (None if it can)."""
        return state_problem(state, self.shapes)

    def _checked(self, what: str, state: StateLike) -> State:
        """``state`` as tensors on this device in the model's dtypes (a float64 upload
        included), or a `UserError` naming ``what`` and why it does not fit the model."""
        if not isinstance(state, Mapping):
            raise UserError(f"{what}: expected a state dict (name -> tensor)")
        try:
            tensors = {k: torch.as_tensor(v) for k, v in state.items()}
        except (TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"{what}: entries must be tensors or arrays ({err})") from None
        problem = self.state_problem(tensors)
        if problem is not None:
            raise UserError(f"{what}: {problem}")
        like = self.model.state_dict()
        return {k: v.to(device=self.device, dtype=like[k].dtype) for k, v in tensors.items()}

    def state_dict(self) -> dict[str, Any]:
        """What persists across rounds: ``plugin`` (the generator, and its moving average
        with ``gen_ema``) and ``round`` (the next round's index); save it with
        ``torch.save``."""
        return {"plugin": self.plugin.state_dict(), "round": self.round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict` output (e.g. after restarting the loop)."""
        if not isinstance(state, Mapping) or set(state) != {"plugin", "round"}:
            raise UserError("state: expected ServerStep.state_dict() output (plugin, round)")
        self.load_plugin_state(state["plugin"])
        self.round = int(state["round"])

    def load_plugin_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the plug-in's own state (its generator) onto this device."""
        self.plugin.load_state_dict({k: v.to(self.device) for k, v in state.items()})


def _checked_model(
    model: nn.Module | Callable[[], nn.Module],
    shape: tuple[int, int, int],
    classes: int,
    batched: bool,
) -> nn.Module:
    """A private eval-mode copy of ``model`` (or of what the factory returns), after one
    forward pass on a zero batch shows it maps inputs of ``shape`` to ``classes`` logits
    and, when the step is to run the teachers ``batched``, that the same pass works under
    ``torch.func.vmap`` as `StackedModels` runs it."""
    net = model() if callable(model) and not isinstance(model, nn.Module) else model
    if not isinstance(net, nn.Module):
        raise UserError("model: expected a torch.nn.Module or a function returning one")
    net = copy.deepcopy(net).eval()
    check_contract("model", net, classes, shape, where=f"model: the {type(net).__name__}")
    if batched:
        x = torch.zeros((2, *shape), device=model_device(net))
        try:
            with torch.no_grad():
                StackedModels(net, [net.state_dict()] * 2).all(x)
        except Exception as err:  # as above: the user's forward, now under vmap
            raise UserError(
                f"model: forward fails under torch.func.vmap, which runs the client models "
                f"together ({err}); settings impl='reference' runs them one by one"
            ) from None
    return net
