"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates against client drift."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedftg.fl.aggregation import State
from fedftg.fl.client import (
    LocalContext,
    LocalResult,
    ParameterStateMethod,
    Term,
    dot,
    param_names,
)

REF_PREFIX = "ref."


class Scaffold(ParameterStateMethod):
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

    def __init__(
        self,
        server_lr: float = 1.0,
        reference: str = "aggregate",
        variate_lr: float | None = None,
    ) -> None:
        if variate_lr is not None and not variate_lr > 0:
            raise ValueError(f"SCAFFOLD's variate_lr must be > 0, got {variate_lr!r}")
        self.server_lr = server_lr
        self.reference = reference
        self.variate_lr = variate_lr

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        correction = {n: ctx.server_state[n] - ctx.client_state[n] for n in param_names(model)}
        return Term(self._term, client=correction)

    def _term(self, params: State, client: State, shared: State, *_: object) -> torch.Tensor:
        return dot(params, client)

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


def _variate_names(server_state: dict[str, torch.Tensor]) -> list[str]:
    """The control variate entries of a SCAFFOLD server state (not the kept references)."""
    return [n for n in server_state if not n.startswith(REF_PREFIX)]


def _reference(name: str, server_state: dict[str, torch.Tensor], sent: State) -> torch.Tensor:
    """SCAFFOLD's w_ref for one parameter: the kept pre-plug-in aggregate, else the sent model."""
    kept = server_state.get(REF_PREFIX + name)
    return sent[name] if kept is None else kept
