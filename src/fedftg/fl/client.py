"""The one local-training loop every client method shares, and the method base class.

FedAvg, FedProx, SCAFFOLD, FedDyn, MOON and the rest differ only in (a) a term added to the
local loss, (b) per-client / server state updated around local training, and (c) the
server's aggregation rule. Each method is a `ClientMethod` subclass in a module of its own
(``fedftg/methods/<name>.py``, found through `fedftg.registry`); `train_local` is the loop
they all share, and a server plug-in's client half adds its own `Term` beside the method's.
Method state is plain dicts of tensors (checkpointable, and sendable over Flower).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedftg.data.batches import DeviceArrays, augment, epoch_batches, step_batches
from fedftg.fl.aggregation import State, weighted_average
from fedftg.models.stacked import meta_copy
from fedftg.precision import autocast

# fn(params, client, shared, features, logits, batch) -> extra loss term; batch holds the
# step's inputs "x" (as the model sees them, augmented) and "y", and what `Term.prepare` adds;
# features are None unless the term asks for them (`Term.features`)
TermFn = Callable[[State, State, State, "torch.Tensor | None", torch.Tensor, State], torch.Tensor]


@dataclass
class Term:
    """An extra loss term, with its inputs passed explicitly.

    ``fn(params, client, shared, feats, logits, batch)`` is a pure function of the trained
    parameters (``params``, by name), this client's tensors (``client``: anchors,
    corrections, its previous model), the tensors common to every client of the round
    (``shared``: the global model) and the step's inputs (``batch``). ``prepare(x, y)``, if
    given, computes further per-step inputs outside autograd (e.g. samples of a frozen
    generator, drawn from the term's own random stream); they join ``batch``. Nothing
    per-client is captured in ``fn``, so one definition serves the sequential loop and the
    vectorised path, which stacks ``client`` and the prepared inputs over clients and
    vmaps ``fn``. ``features``: ``fn`` reads the model's features (MOON), so the loop runs
    the model as ``features`` then ``classifier``; otherwise it calls the plain forward
    (any model) and ``fn`` gets None for them.
    """

    fn: TermFn
    client: State = field(default_factory=dict)
    shared: State = field(default_factory=dict)
    prepare: Callable[[torch.Tensor, torch.Tensor], State] | None = None
    features: bool = False

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> State:
        """The per-step ``batch`` of ``fn``: x, y and what ``prepare`` adds."""
        extra = self.prepare(x, y) if self.prepare is not None else {}
        return {"x": x, "y": y, **extra}

    def __call__(
        self, params: State, feats: torch.Tensor | None, logits: torch.Tensor, batch: State
    ) -> torch.Tensor:
        return self.fn(params, self.client, self.shared, feats, logits, batch)

    def parts(
        self, params: State, feats: torch.Tensor | None, logits: torch.Tensor, batch: State
    ) -> tuple[torch.Tensor, ...]:
        """The values of the summed terms of `combine_terms` (one value for a plain term),
        so that a plug-in's part can be logged apart from the method's."""
        return term_parts(self.fn, params, self.client, self.shared, feats, logits, batch)


@dataclass(frozen=True)
class _SumOfTerms:
    """The term function of `combine_terms`: the parts' functions on their own inputs."""

    fns: tuple[TermFn, ...]

    def __call__(
        self,
        params: State,
        client: State,
        shared: State,
        feats: torch.Tensor | None,
        logits: torch.Tensor,
        batch: State,
    ) -> torch.Tensor:
        return sum_parts(self.parts(params, client, shared, feats, logits, batch))

    def parts(
        self,
        params: State,
        client: State,
        shared: State,
        feats: torch.Tensor | None,
        logits: torch.Tensor,
        batch: State,
    ) -> tuple[torch.Tensor, ...]:
        """Each part's value, in the order of `combine_terms`' arguments."""
        values = []
        for i, fn in enumerate(self.fns):
            prefix = f"{i}."
            own = {"x": batch["x"], "y": batch["y"], **_part(batch, prefix)}
            values.append(
                fn(params, _part(client, prefix), _part(shared, prefix), feats, logits, own)
            )
        return tuple(values)


def sum_parts(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of a term's parts (at least one), in the order `_SumOfTerms` has always
    added them (from 0.0, left to right), so that splitting a term off for logging changes
    no number."""
    if not parts:
        raise ValueError("sum_parts needs at least one part")
    total = 0.0 + parts[0]
    for value in parts[1:]:
        total = total + value
    return total


def without_plugin_part(ce: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """What ``train_loss`` logs when a plug-in adds a term: the cross-entropy ``ce`` plus
    every part of the combined term but the plug-in's, the last (`combine_terms`)."""
    return ce + sum_parts(parts[:-1]) if len(parts) > 1 else ce


def term_parts(
    fn: TermFn,
    params: State,
    client: State,
    shared: State,
    feats: torch.Tensor | None,
    logits: torch.Tensor,
    batch: State,
) -> tuple[torch.Tensor, ...]:
    """A term function's parts: those of a `combine_terms` sum, else the one value."""
    if isinstance(fn, _SumOfTerms):
        return fn.parts(params, client, shared, feats, logits, batch)
    return (fn(params, client, shared, feats, logits, batch),)


def _part(tensors: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _prefixed(dicts: Sequence[State]) -> State:
    return {f"{i}.{k}": v for i, d in enumerate(dicts) for k, v in d.items()}


def combine_terms(*terms: Term | None) -> Term | None:
    """One term that is the sum of ``terms`` (None entries skipped; None if all are).

    The parts keep their own inputs, under ``<i>.`` prefixes, so the sum is again a pure
    function of explicit inputs: a client method's term and a plug-in's client half compose
    in both local-training paths.
    """
    present = [t for t in terms if t is not None]
    if len(present) <= 1:
        return present[0] if present else None
    preparers = [(i, t.prepare) for i, t in enumerate(present) if t.prepare is not None]

    def prepare(x: torch.Tensor, y: torch.Tensor) -> State:
        return {f"{i}.{k}": v for i, p in preparers for k, v in p(x, y).items()}

    return Term(
        _SumOfTerms(tuple(t.fn for t in present)),
        client=_prefixed([t.client for t in present]),
        shared=_prefixed([t.shared for t in present]),
        prepare=prepare if preparers else None,
        features=any(t.features for t in present),
    )


@dataclass(frozen=True)
class LocalSpec:
    """Local-training hyper-parameters for one round (``lr`` already decayed)."""

    lr: float
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 50
    weight_decay: float = 0.0
    momentum: float = 0.0
    clip: float = 0.0
    augment: bool = False
    precision: str = "fp32"  # "bf16": forward and loss under bf16 autocast


@dataclass
class LocalContext:
    """What a client knows when it trains: the global model and the method states."""

    global_state: State
    client_state: dict[str, torch.Tensor]
    server_state: dict[str, torch.Tensor]
    num_clients: int = 1


@dataclass
class LocalResult:
    """What a client uploads after local training."""

    state: State
    num_samples: int
    steps: int
    loss: float  # mean cross-entropy plus the client method's own term
    upload: dict[str, torch.Tensor] = field(default_factory=dict)
    plugin_loss: float | None = None  # mean of a plug-in's client term (FedGen), if it had one


def param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def detached_state(model: nn.Module) -> State:
    """A copy of the model's full state (parameters and buffers) detached from autograd."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ClientMethod:
    """The base of every client method, and FedAvg itself: no extra term, no state,
    sample-weighted average of the clients' full states."""

    def init_server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Server-side method state, created once per experiment."""
        return {}

    def init_client_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A client's method state, created the first time it is selected."""
        return {}

    def local_spec(self, spec: LocalSpec) -> LocalSpec:
        """The local-training settings this method trains with (default: as given)."""
        return spec

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        """Called before local training; returns the extra loss term (or None)."""
        return None

    def finish(
        self, model: nn.Module, ctx: LocalContext, steps: int, lr: float
    ) -> dict[str, torch.Tensor]:
        """Called after local training: update ``ctx.client_state``; return extra uploads."""
        return {}

    def aggregate(
        self,
        global_state: State,
        results: Sequence[LocalResult],
        server_state: dict[str, torch.Tensor],
        num_clients: int,
    ) -> State:
        """The new global state from the round's uploads (may update ``server_state``)."""
        return weighted_average([r.state for r in results], [r.num_samples for r in results])

    def note_server_step(self, aggregate: State, server_state: dict[str, torch.Tensor]) -> None:
        """Called when a server plug-in (FTG, FedDF) turned ``aggregate``, the output of
        `aggregate`, into a different model to send; a method whose state refers to the
        pre-step model keeps it here. Default: the state follows the model sent."""


class ParameterStateMethod(ClientMethod):
    """A method whose server and client states are one zero-initialised tensor per parameter."""

    def init_server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return zeros_like_params(model)

    def init_client_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return zeros_like_params(model)


def local_batches(
    indices: torch.Tensor, spec: LocalSpec, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """The client's index batches for one round (lazy: draws from ``gen`` as it goes)."""
    if spec.steps is not None:
        return step_batches(indices, spec.batch_size, spec.steps, gen)
    return (b for _ in range(spec.epochs) for b in epoch_batches(indices, spec.batch_size, gen))


class Classifier(Protocol):
    """The contract of every classifier of `fedftg.models`:
    ``forward(x) == classifier(features(x))``, features (B, D), logits (B, C)."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def classifier(self, feats: torch.Tensor) -> torch.Tensor: ...


def features_and_logits(
    model: nn.Module, x: torch.Tensor, features: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The features and the logits of ``x`` from one pass through classifier ``model``;
    without ``features``, (None, the plain forward's logits): what a model without the
    split can give (for the built-in ones the same numbers, their forward being
    ``classifier(features(x))``)."""
    if not features:
        return None, model(x)
    net = cast(Classifier, model)  # nn.Module types any attribute as Tensor | Module
    feats = net.features(x)
    return feats, net.classifier(feats)


def classifier_head(model: nn.Module) -> nn.Linear:
    """The linear last layer (``classifier``) of classifier ``model``."""
    head = model.get_submodule("classifier")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}.classifier is not an nn.Linear")
    return head


def train_local(
    model: nn.Module,
    data: DeviceArrays,
    indices: torch.Tensor,
    method: ClientMethod,
    ctx: LocalContext,
    spec: LocalSpec,
    gen: torch.Generator,
    extra: Term | None = None,
) -> LocalResult:
    """Train ``model`` from the global state on the client's ``indices``; the one loop.

    Loss = mean cross-entropy + the method's term + ``extra`` (a plug-in's client half), under
    bf16 autocast when ``spec.precision`` says so; SGD with weight decay and momentum,
    gradient-norm clipping at ``spec.clip`` (0 = off). The reference for `train_local_vmap`.
    """
    spec = method.local_spec(spec)
    model.load_state_dict(ctx.global_state)
    model.train()
    term = combine_terms(method.begin(model, ctx), extra)
    params: State = dict(model.named_parameters())
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    steps, loss_sum, plugin_sum = 0, 0.0, 0.0
    for idx in local_batches(indices, spec, gen):
        x, y = data.batch(idx)
        if spec.augment:
            x = augment(x, gen)
        batch = term.inputs(x, y) if term is not None else {}
        with autocast(x.device, spec.precision):
            feats, logits = features_and_logits(model, x, term is not None and term.features)
            loss = F.cross_entropy(logits, y)
            logged = loss  # what train_loss reports: without a plug-in's part
            if term is not None:
                parts = term.parts(params, feats, logits, batch)
                loss = loss + sum_parts(parts)
                logged = loss if extra is None else without_plugin_part(logged, parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        steps += 1
        loss_sum += float(logged.detach())
        if extra is not None:  # the plug-in's part is the last (`combine_terms`' order)
            plugin_sum += float(parts[-1].detach())
    upload = method.finish(model, ctx, steps, spec.lr)
    return LocalResult(
        state=detached_state(model),
        num_samples=len(indices),
        steps=steps,
        loss=loss_sum / max(steps, 1),
        upload=upload,
        plugin_loss=None if extra is None else plugin_sum / max(steps, 1),
    )


class _FeaturesLogits(nn.Module):
    """Wraps a classifier so one `functional_call` returns (features, logits), or (None,
    logits) without ``features`` (`features_and_logits`)."""

    def __init__(self, net: nn.Module, features: bool = True) -> None:
        super().__init__()
        self.net = net
        self.with_features = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return features_and_logits(self.net, x, self.with_features)


_TEMPLATES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[bool, bool], nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def functional_template(model: nn.Module, train: bool, features: bool = True) -> nn.Module:
    """A weightless (meta) copy of ``model`` in train or eval mode for `call_model`, which
    gives its features too when ``features``.

    Cached per model, mode and ``features``: it only carries the architecture; every
    parameter and buffer is supplied at each call.
    """
    cached = _TEMPLATES.setdefault(model, {})
    if (train, features) not in cached:
        cached[train, features] = _FeaturesLogits(meta_copy(model), features).train(train)
    return cached[train, features]


def call_model(
    template: nn.Module, state: State, x: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(features, logits) of the model with parameters and buffers ``state`` on ``x``
    (features None for a template made without them).

    Works under `torch.func.vmap` with batched ``state`` (one model per client); in train
    mode BatchNorm updates the running statistics in ``state`` in place.
    """
    return functional_call(template, {"net." + k: v for k, v in state.items()}, (x,))


def zeros_like_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """One zero tensor per parameter of ``model`` (a method's initial state)."""
    return {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters()}


def dot(params: State, other: State) -> torch.Tensor:
    """sum over ``other``'s names of <params[n], other[n]>."""
    return sum_parts([(params[n] * other[n]).sum() for n in other])


def sq_dist(params: State, anchors: State) -> torch.Tensor:
    """||params - anchors||^2 over ``anchors``' names."""
    return sum_parts([((params[n] - a) ** 2).sum() for n, a in anchors.items()])
