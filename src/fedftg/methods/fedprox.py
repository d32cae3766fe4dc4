"""FedProx (Li et al., MLSys 2020): a proximal term toward the global model.

``variant = "weight_decay"`` is FedProx as the FedFTG authors' code runs it
(methods/FedProx.py there passes ``weight_decay + mu`` to the clients' SGD): mu joins the
weight decay, which pulls toward zero rather than toward the global model, and no proximal
term is added. It is what their FedProx numbers measure, so the paper presets use it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from fedftg.fl.aggregation import State
from fedftg.fl.client import (
    ClientMethod,
    LocalContext,
    LocalSpec,
    Term,
    param_names,
    sq_dist,
)


class FedProx(ClientMethod):
    """FedProx: local loss + mu/2 * ||w - w_global||^2 over the trained parameters."""

    def __init__(self, mu: float, variant: str = "proximal") -> None:
        self.mu = mu
        self.variant = variant

    def local_spec(self, spec: LocalSpec) -> LocalSpec:
        if self.variant == "weight_decay":
            return replace(spec, weight_decay=spec.weight_decay + self.mu)
        return spec

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        if self.variant == "weight_decay":
            return None
        return Term(self._term, shared={n: ctx.global_state[n] for n in param_names(model)})

    def _term(self, params: State, client: State, shared: State, *_: object) -> torch.Tensor:
        return 0.5 * self.mu * sq_dist(params, shared)
