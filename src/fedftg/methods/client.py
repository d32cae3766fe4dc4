"""Client methods: one local-training loop, with a per-method objective term and state.

FedAvg, FedProx, SCAFFOLD, FedDyn and MOON differ only in (a) a term added to the local
loss, (b) per-client / server state updated around local training, and (c) the server's
aggregation rule. Each method is a small class with those hooks; `train_local` is the one
loop they all share. Method state is plain dicts of tensors (checkpointable, and sendable
over Flower).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedftg.data.batches import DeviceArrays, augment, epoch_batches, step_batches
from fedftg.methods.aggregation import State, weighted_average
from fedftg.models.stacked import meta_copy
from fedftg.precision import autocast

Tensors = dict[str, torch.Tensor]
# fn(params, client, shared, features, logits, x) -> extra loss term
TermFn = Callable[
    [Tensors, Tensors, Tensors, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


@dataclass
class Term:
    """A method's extra loss term, with its inputs passed explicitly.

    ``fn(params, client, shared, feats, logits, x)`` is a pure function of the trained
    parameters (``params``, by name), this client's tensors (``client``: anchors,
    corrections, its previous model) and the tensors common to every client of the round
    (``shared``: the global model). Nothing per-client is captured in ``fn``, so one
    definition serves the sequential loop (``term(params, ...)``) and the vectorised path,
    which stacks ``client`` over clients and vmaps ``fn`` over it.
    """

    fn: TermFn
    client: Tensors = field(default_factory=dict)
    shared: Tensors = field(default_factory=dict)

    def __call__(
        self, params: Tensors, feats: torch.Tensor, logits: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        return self.fn(params, self.client, self.shared, feats, logits, x)


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
    loss: float
    upload: dict[str, torch.Tensor] = field(default_factory=dict)


def param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def detached_state(model: nn.Module) -> State:
    """A copy of the model's full state (parameters and buffers) detached from autograd."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ClientMethod:
    """FedAvg: no extra term, no state, sample-weighted average of full states."""

    name = "fedavg"

    def init_server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Server-side method state, created once per experiment."""
        return {}

    def init_client_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A client's method state, created the first time it is selected."""
        return {}

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


class FedProx(ClientMethod):
    """FedProx (Li et al. 2020): proximal term mu/2 * ||w - w_global||^2."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        return Term(self._term, shared={n: ctx.global_state[n] for n in param_names(model)})

    def _term(
        self, params: Tensors, client: Tensors, shared: Tensors, *_: torch.Tensor
    ) -> torch.Tensor:
        return 0.5 * self.mu * _sq_dist(params, shared)


class _ParameterStateMethod(ClientMethod):
    """A method whose server and client states are one zero-initialised tensor per parameter."""

    def init_server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return _zeros_like_params(model)

    def init_client_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return _zeros_like_params(model)


class Scaffold(_ParameterStateMethod):
    """SCAFFOLD (Karimireddy et al. 2020), option II control variates.

    The gradient correction (c - c_k) is applied as the linear term <w, c - c_k>, whose
    gradient is exactly that correction. After local training
    c_k <- c_k - c + (w_ref - w_k) / (steps * lr), lr being the round's (decayed) learning
    rate, or ``variate_lr`` when given (the authors divide by the undecayed lr0); the server moves
    w <- w_ref + server_lr * (avg(w_k) - w_ref) and c <- c + (1/N) * sum of the changes.
    w_ref is the model the clients started from, unless a server plug-in changed the
    aggregate before sending it: then, with ``reference="aggregate"`` (the authors'
    SCAFFOLD+FTG), w_ref is the aggregate before the plug-in's step, kept in the server
    state under ``ref.<name>`` so that it reaches the clients with c; with
    ``reference="sent"`` it is the model sent.
    """

    name = "scaffold"

    def __init__(
        self,
        server_lr: float = 1.0,
        reference: str = "aggregate",
        variate_lr: float | None = None,
    ) -> None:
        if reference not in SCAFFOLD_REFERENCES:
            raise ValueError(f"unknown SCAFFOLD reference {reference!r}")
        if variate_lr is not None and not variate_lr > 0:
            raise ValueError(f"SCAFFOLD's variate_lr must be > 0, got {variate_lr!r}")
        self.server_lr = server_lr
        self.reference = reference
        self.variate_lr = variate_lr

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        correction = {n: ctx.server_state[n] - ctx.client_state[n] for n in param_names(model)}
        return Term(self._term, client=correction)

    def _term(
        self, params: Tensors, client: Tensors, shared: Tensors, *_: torch.Tensor
    ) -> torch.Tensor:
        return _dot(params, client)

    def finish(
        self, model: nn.Module, ctx: LocalContext, steps: int, lr: float
    ) -> dict[str, torch.Tensor]:
        delta = {}
        scale = 1.0 / (max(steps, 1) * (lr if self.variate_lr is None else self.variate_lr))
        for n, p in model.named_parameters():
            ref = _reference(n, ctx.server_state, ctx.global_state)
            new_ck = ctx.client_state[n] - ctx.server_state[n]
            new_ck = new_ck + (ref - p.detach()) * scale
            delta[n] = new_ck - ctx.client_state[n]
            ctx.client_state[n] = new_ck
        return {"delta_c." + n: d for n, d in delta.items()}

    def aggregate(
        self,
        global_state: State,
        results: Sequence[LocalResult],
        server_state: dict[str, torch.Tensor],
        num_clients: int,
    ) -> State:
        avg = super().aggregate(global_state, results, server_state, num_clients)
        for n in _variate_names(server_state):
            ref = _reference(n, server_state, global_state)
            avg[n] = ref + self.server_lr * (avg[n] - ref)
            total = sum(r.upload["delta_c." + n] for r in results)
            server_state[n] = server_state[n] + total / num_clients
        return avg

    def note_server_step(self, aggregate: State, server_state: dict[str, torch.Tensor]) -> None:
        if self.reference == "aggregate":
            for n in _variate_names(server_state):
                server_state[REF_PREFIX + n] = aggregate[n].detach().clone()


SCAFFOLD_REFERENCES = ("aggregate", "sent")
# what c_k's update divides the local progress by: the round's decayed learning rate, or the
# initial one (the authors' code)
SCAFFOLD_VARIATE_LRS = ("round", "initial")
REF_PREFIX = "ref."


def _variate_names(server_state: dict[str, torch.Tensor]) -> list[str]:
    """The control variate entries of a SCAFFOLD server state (not the kept references)."""
    return [n for n in server_state if not n.startswith(REF_PREFIX)]


def _reference(name: str, server_state: dict[str, torch.Tensor], sent: State) -> torch.Tensor:
    """SCAFFOLD's w_ref for one parameter: the kept pre-plug-in aggregate, else the sent model."""
    kept = server_state.get(REF_PREFIX + name)
    return sent[name] if kept is None else kept


class FedDyn(_ParameterStateMethod):
    """FedDyn (Acar et al. 2021): dynamic regulariser.

    Local objective: CE(w) - <g_k, w> + alpha/2 ||w - w_global||^2, with g_k (the client's
    previous local gradient, zero at first) updated as g_k <- g_k - alpha (w_k - w_global).
    Server: h <- h - alpha/N * sum_k (w_k - w_global) and w = avg_k(w_k) - h/alpha over the
    parameters (BatchNorm buffers are plainly averaged).
    """

    name = "feddyn"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        names = param_names(model)
        return Term(
            self._term,
            client={n: ctx.client_state[n] for n in names},
            shared={n: ctx.global_state[n] for n in names},
        )

    def _term(
        self, params: Tensors, client: Tensors, shared: Tensors, *_: torch.Tensor
    ) -> torch.Tensor:
        return -_dot(params, client) + 0.5 * self.alpha * _sq_dist(params, shared)

    def finish(
        self, model: nn.Module, ctx: LocalContext, steps: int, lr: float
    ) -> dict[str, torch.Tensor]:
        for n, p in model.named_parameters():
            ctx.client_state[n] = ctx.client_state[n] - self.alpha * (
                p.detach() - ctx.global_state[n]
            )
        return {}

    def aggregate(
        self,
        global_state: State,
        results: Sequence[LocalResult],
        server_state: dict[str, torch.Tensor],
        num_clients: int,
    ) -> State:
        avg = super().aggregate(global_state, results, server_state, num_clients)
        for n in server_state:
            drift = sum(r.state[n] - global_state[n] for r in results)
            server_state[n] = server_state[n] - self.alpha / num_clients * drift
            avg[n] = avg[n] - server_state[n] / self.alpha
        return avg


class Moon(ClientMethod):
    """MOON (Li et al. 2021): model-contrastive term on the representation.

    mu * -log(exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)))
    with cosine similarity; the positive is the global model's representation, the
    negative the client's previous local model's (the global model on its first round).
    """

    name = "moon"

    def __init__(self, mu: float, tau: float) -> None:
        self.mu = mu
        self.tau = tau

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        net = functional_template(model, train=False)

        def term(
            params: Tensors,
            client: Tensors,
            shared: Tensors,
            feats: torch.Tensor,
            logits: torch.Tensor,
            x: torch.Tensor,
        ) -> torch.Tensor:
            with torch.no_grad():  # both representations are fixed targets (eval mode)
                z_glob = call_model(net, shared, x)[0]
                z_prev = call_model(net, client, x)[0]
            return self.mu * moon_contrastive(feats, z_glob, z_prev, self.tau)

        prev = dict(ctx.client_state or ctx.global_state)
        return Term(term, client=prev, shared=dict(ctx.global_state))

    def finish(
        self, model: nn.Module, ctx: LocalContext, steps: int, lr: float
    ) -> dict[str, torch.Tensor]:
        ctx.client_state.clear()
        ctx.client_state.update(detached_state(model))
        return {}


def moon_contrastive(
    z: torch.Tensor, z_pos: torch.Tensor, z_neg: torch.Tensor, tau: float
) -> torch.Tensor:
    """MOON's contrastive loss (mean over the batch) with cosine similarity / tau."""
    pos = F.cosine_similarity(z, z_pos, dim=-1) / tau
    neg = F.cosine_similarity(z, z_neg, dim=-1) / tau
    return -(pos - torch.logaddexp(pos, neg)).mean()


def build_method(
    name: str,
    *,
    prox_mu: float = 0.01,
    scaffold_server_lr: float = 1.0,
    scaffold_reference: str = "aggregate",
    scaffold_variate_lr: float | None = None,
    feddyn_alpha: float = 0.01,
    moon_mu: float = 1.0,
    moon_tau: float = 0.5,
) -> ClientMethod:
    """The client method called ``name`` with its hyper-parameters."""
    if name == "fedavg":
        return ClientMethod()
    if name == "fedprox":
        return FedProx(prox_mu)
    if name == "scaffold":
        return Scaffold(scaffold_server_lr, scaffold_reference, scaffold_variate_lr)
    if name == "feddyn":
        return FedDyn(feddyn_alpha)
    if name == "moon":
        return Moon(moon_mu, moon_tau)
    raise ValueError(f"unknown client method {name!r}")


def local_batches(
    indices: torch.Tensor, spec: LocalSpec, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """The client's index batches for one round (lazy: draws from ``gen`` as it goes)."""
    if spec.steps is not None:
        return step_batches(indices, spec.batch_size, spec.steps, gen)
    return (b for _ in range(spec.epochs) for b in epoch_batches(indices, spec.batch_size, gen))


def train_local(
    model: nn.Module,
    data: DeviceArrays,
    indices: torch.Tensor,
    method: ClientMethod,
    ctx: LocalContext,
    spec: LocalSpec,
    gen: torch.Generator,
) -> LocalResult:
    """Train ``model`` from the global state on the client's ``indices``; the one loop.

    Loss = mean cross-entropy + the method's term (under bf16 autocast when
    ``spec.precision`` says so); SGD with weight decay and momentum, gradient-norm clipping
    at ``spec.clip`` (0 = off). The reference for `train_local_vmap`.
    """
    model.load_state_dict(ctx.global_state)
    model.train()
    term = method.begin(model, ctx)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    steps, loss_sum = 0, 0.0
    for idx in local_batches(indices, spec, gen):
        x, y = data.batch(idx)
        if spec.augment:
            x = augment(x, gen)
        with autocast(x.device, spec.precision):
            feats = model.features(x)
            logits = model.classifier(feats)
            loss = F.cross_entropy(logits, y)
            if term is not None:
                loss = loss + term(params, feats, logits, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        steps += 1
        loss_sum += float(loss.detach())
    upload = method.finish(model, ctx, steps, spec.lr)
    return LocalResult(
        state=detached_state(model),
        num_samples=len(indices),
        steps=steps,
        loss=loss_sum / max(steps, 1),
        upload=upload,
    )


class _FeaturesLogits(nn.Module):
    """Wraps a classifier so one `functional_call` returns (features, logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net.features(x)
        return feats, self.net.classifier(feats)


_TEMPLATES: weakref.WeakKeyDictionary[nn.Module, dict[bool, nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def functional_template(model: nn.Module, train: bool) -> nn.Module:
    """A weightless (meta) copy of ``model`` in train or eval mode for `call_model`.

    Cached per model and mode: it only carries the architecture; every parameter and
    buffer is supplied at each call.
    """
    cached = _TEMPLATES.setdefault(model, {})
    if train not in cached:
        cached[train] = _FeaturesLogits(meta_copy(model)).train(train)
    return cached[train]


def call_model(
    template: nn.Module, state: Tensors, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of the model with parameters and buffers ``state`` on ``x``.

    Works under `torch.func.vmap` with batched ``state`` (one model per client); in train
    mode BatchNorm updates the running statistics in ``state`` in place.
    """
    return functional_call(template, {"net." + k: v for k, v in state.items()}, (x,))


def _zeros_like_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters()}


def _dot(params: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((params[n] * other[n]).sum() for n in other)  # type: ignore[return-value]


def _sq_dist(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(((params[n] - a) ** 2).sum() for n, a in anchors.items())  # type: ignore[return-value]
