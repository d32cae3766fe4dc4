"""FedDyn (Acar et al., ICLR 2021): a dynamic regulariser aligning local and global optima."""

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
    sq_dist,
)


class FedDyn(ParameterStateMethod):
    """FedDyn (Acar et al. 2021): dynamic regulariser.

    Local objective: CE(w) - <g_k, w> + alpha/2 ||w - w_global||^2, with g_k (the client's
    previous local gradient, zero at first) updated as g_k <- g_k - alpha (w_k - w_global).
    Server: h <- h - alpha/N * sum_k (w_k - w_global) and w = avg_k(w_k) - h/alpha over the
    parameters (BatchNorm buffers are plainly averaged).
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        names = param_names(model)
        return Term(
            self._term,
            client={n: ctx.client_state[n] for n in names},
            shared={n: ctx.global_state[n] for n in names},
        )

    def _term(self, params: State, client: State, shared: State, *_: object) -> torch.Tensor:
        return -dot(params, client) + 0.5 * self.alpha * sq_dist(params, shared)

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
