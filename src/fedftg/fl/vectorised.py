"""Local training of several clients at once, vectorised across clients with `torch.func.vmap`.

`train_local_vmap` does what `fedftg.fl.client.train_local` does for each client, but
holds the clients' parameters, buffers, momentum buffers and method-term inputs stacked
along a leading client dimension and runs each step as one vmapped forward
(`functional_call` on a weightless template) and one backward. Clipping and SGD (weight
decay, momentum) are applied per client on the stacks. This pays off on accelerators, where
one client's small batches leave the device mostly idle.

Exactness: every client draws its batches and augmentations from its own generator in the
sequential loop's order, so both paths see the same batches; results agree up to float
summation order. Clients with different sample counts run different numbers of steps and
may end an epoch with a smaller batch: at each step index, the clients that still have a
batch are grouped by batch size and each group takes one vmapped step on its rows of the
stacks; finished clients are left untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from fedftg.data.batches import DeviceArrays, augment
from fedftg.fl.aggregation import State
from fedftg.fl.client import (
    ClientMethod,
    LocalContext,
    LocalResult,
    LocalSpec,
    Term,
    call_model,
    combine_terms,
    functional_template,
    local_batches,
    param_names,
    sum_parts,
    term_parts,
    without_plugin_part,
)
from fedftg.precision import autocast

# nn.utils.clip_grad_norm_'s guard against a zero norm
_CLIP_EPS = 1e-6


def train_local_vmap(
    model: nn.Module,
    data: DeviceArrays,
    indices_list: Sequence[torch.Tensor],
    method: ClientMethod,
    ctxs: Sequence[LocalContext],
    spec: LocalSpec,
    gens: Sequence[torch.Generator],
    extras: Sequence[Term | None] | None = None,
) -> list[LocalResult]:
    """Train client ``k`` on ``indices_list[k]`` from ``ctxs[k]`` with ``gens[k]``, all at once.

    Same results as calling `train_local` for each client in turn (each client's generator
    must be its own object); ``extras[k]`` is client k's `train_local` ``extra`` term (a
    plug-in's client half). ``model`` supplies the architecture and runs the method's
    ``finish`` hooks; it is left holding the last client's trained state.
    """
    n_clients = len(ctxs)
    extras = list(extras) if extras is not None else [None] * n_clients
    if not (len(indices_list) == len(gens) == len(extras) == n_clients):
        raise ValueError("indices_list, ctxs, gens and extras must have one entry per client")
    if n_clients == 0:
        return []
    spec = method.local_spec(spec)
    model.train()
    trained = param_names(model)
    keys = list(model.state_dict(keep_vars=True).keys())
    own = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    # the starting point of `model.load_state_dict(ctx.global_state)`, one row per client
    stacks = {
        n: torch.stack([ctx.global_state.get(n, t).detach().to(t) for ctx in ctxs])
        for n, t in own.items()
    }
    terms = [
        combine_terms(method.begin(model, ctx), e) for ctx, e in zip(ctxs, extras, strict=True)
    ]
    plugin = any(e is not None for e in extras)
    stepper = _Stepper(model, trained, stacks, terms, spec, plugin)

    iters = [local_batches(idx, spec, gen) for idx, gen in zip(indices_list, gens, strict=True)]
    steps = [0] * n_clients
    device = next(iter(stacks.values())).device
    loss_sums = torch.zeros(n_clients, dtype=torch.float64, device=device)
    plugin_sums = torch.zeros(n_clients, dtype=torch.float64, device=device)
    active = list(range(n_clients))
    while active:
        groups: dict[int, list[tuple[int, State]]] = {}
        for k in active:
            idx = next(iters[k], None)
            if idx is None:
                continue
            x, y = data.batch(idx)
            if spec.augment:
                x = augment(x, gens[k])
            term = terms[k]
            batch = term.inputs(x, y) if term is not None else {"x": x, "y": y}
            groups.setdefault(len(idx), []).append((k, batch))
        active = [k for members in groups.values() for k, _ in members]
        for members in groups.values():
            rows = [k for k, _ in members]
            batch = {n: torch.stack([b[n] for _, b in members]) for n in members[0][1]}
            losses, plugin_losses = stepper.step(rows, batch, first=steps[rows[0]] == 0)
            loss_sums[rows] += losses
            plugin_sums[rows] += plugin_losses
            for k in rows:
                steps[k] += 1
        active.sort()

    mean_losses = [total / max(s, 1) for total, s in zip(loss_sums.tolist(), steps, strict=True)]
    plugin_means = [total / max(s, 1) for total, s in zip(plugin_sums.tolist(), steps, strict=True)]
    results = []
    for k, ctx in enumerate(ctxs):
        state = {n: stacks[n][k].clone() for n in keys}
        model.load_state_dict(state)
        upload = method.finish(model, ctx, steps[k], spec.lr)
        results.append(
            LocalResult(
                state=state,
                num_samples=len(indices_list[k]),
                steps=steps[k],
                loss=mean_losses[k],
                upload=upload,
                plugin_loss=plugin_means[k] if extras[k] is not None else None,
            )
        )
    return results


class _Stepper:
    """One vmapped SGD step for a subset of the clients, on stacked per-client tensors."""

    def __init__(
        self,
        model: nn.Module,
        trained: list[str],
        stacks: State,
        terms: list[Term | None],
        spec: LocalSpec,
        plugin: bool = False,
    ) -> None:
        """``plugin``: the terms' last part is a plug-in's client half, logged apart."""
        self.trained = trained
        self.plugin = plugin
        self.stacks = stacks  # every parameter and buffer, (K, ...); updated in place
        self.momentum: State = {}
        self.spec = spec
        self.n_clients = len(terms)
        self.template = functional_template(
            model, train=True, features=any(t is not None and t.features for t in terms)
        )
        # one method for all clients: the same term function; shared inputs are the same
        # global model; per-client inputs are stacked
        self.term_fn = None
        self.shared: State = {}
        self.client: State = {}
        present = [t for t in terms if t is not None]
        if present and len(present) != len(terms):
            raise ValueError("a method must give every client a term, or none")
        if present:
            self.term_fn, self.shared = present[0].fn, present[0].shared
            self.client = {
                n: torch.stack([t.client[n] for t in present]) for n in present[0].client
            }

    def _loss(
        self, params: State, others: State, client: State, batch: State
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One client's loss on its batch (the body of `train_local`'s step), the part of it
        train_loss reports, and a plug-in's part (0 without one)."""
        x, y = batch["x"], batch["y"]
        low = self.spec.precision != "fp32"
        with autocast(x.device, self.spec.precision), _Fp32BatchNorm() if low else _NULL:
            feats, logits = call_model(self.template, {**others, **params}, x)
            loss = F.cross_entropy(logits, y)
            logged, plugin = loss, torch.zeros((), device=x.device)
            if self.term_fn is not None:
                parts = term_parts(self.term_fn, params, client, self.shared, feats, logits, batch)
                loss = loss + sum_parts(parts)
                if self.plugin:
                    logged, plugin = without_plugin_part(logged, parts), parts[-1]
                else:
                    logged = loss
        return loss, logged, plugin

    def step(self, rows: list[int], batch: State, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Train clients ``rows`` one step on their stacked step inputs ``batch`` (x: (G, B,
        ...), y: (G, B), and a term's prepared inputs); their logged losses and plug-in
        parts."""
        spec = self.spec
        x = batch["x"]
        full = rows == list(range(self.n_clients))
        sel = None if full else torch.tensor(rows, device=x.device)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t if sel is None else t[sel]

        params = {n: take(self.stacks[n]).detach().requires_grad_() for n in self.trained}
        others = {n: take(t) for n, t in self.stacks.items() if n not in params}
        client = {n: take(t) for n, t in self.client.items()}
        losses, logged, plugin = vmap(self._loss)(params, others, client, batch)
        grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)

        if spec.clip > 0:  # nn.utils.clip_grad_norm_ per client
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads if g is not None], 1)
            coef = (spec.clip / (norms.norm(dim=1) + _CLIP_EPS)).clamp(max=1.0)
            grads = tuple(None if g is None else g * _rows(coef, g) for g in grads)

        for (n, p), g in zip(params.items(), grads, strict=True):
            if g is None:  # no gradient: torch.optim.SGD leaves the parameter alone
                continue
            p = p.detach()
            if spec.weight_decay != 0:
                g = g.add(p, alpha=spec.weight_decay)
            if spec.momentum != 0:  # torch.optim.SGD, dampening 0: buf = grad at first step
                if first:
                    if sel is not None and n not in self.momentum:
                        self.momentum[n] = torch.zeros_like(self.stacks[n])
                    buf = g.clone()
                else:
                    buf = take(self.momentum[n]).mul(spec.momentum).add(g)
                self._put(self.momentum, n, sel, buf)
                g = buf
            self._put(self.stacks, n, sel, p.add(g, alpha=-spec.lr))
        if sel is not None:  # BatchNorm updated the running statistics of the taken copies
            for n, t in others.items():
                self.stacks[n][sel] = t
        return logged.detach(), plugin.detach()

    @staticmethod
    def _put(stacks: State, name: str, sel: torch.Tensor | None, value: torch.Tensor) -> None:
        if sel is None:
            stacks[name] = value
        else:
            stacks[name][sel] = value


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-client scalars ``v`` (G,) shaped to broadcast against ``like`` (G, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


_NULL = contextlib.nullcontext()


class _Fp32BatchNorm(TorchFunctionMode):
    """Runs ``F.batch_norm`` on a low-precision input in fp32, casting the output back.

    Under bf16 autocast the plain path hands BatchNorm a bf16 input with fp32 statistics,
    which cuDNN normalises in fp32. Vmapped, CUDA's batch-norm backward rejects that mix
    ("Expected running_mean to have type BFloat16"); doing the normalisation in fp32
    explicitly is the same arithmetic and works under vmap.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func is F.batch_norm and args[0].dtype in (torch.bfloat16, torch.float16):
            x = args[0]
            with torch.autocast(x.device.type, enabled=False):
                return func(x.float(), *args[1:], **kwargs).to(x.dtype)
        return func(*args, **kwargs)
