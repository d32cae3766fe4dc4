"""FedProx (Li et al., MLSys 2020): a proximal term toward the global model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedftg.methods.client import ClientMethod, LocalContext, Tensors, Term, param_names, sq_dist
from fedftg.registry import MethodSpec
from fedftg.settings import NON_NEGATIVE, Settings, setting


@dataclass
class FedProxSettings(Settings):
    mu: float = setting(
        0.01,
        "proximal weight mu in mu/2 ||w - w_global||^2",
        check=NON_NEGATIVE,
        legacy_key="prox_mu",
        always_hashed=True,
    )


class FedProx(ClientMethod):
    """FedProx: local loss + mu/2 * ||w - w_global||^2 over the trained parameters."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        return Term(self._term, shared={n: ctx.global_state[n] for n in param_names(model)})

    def _term(self, params: Tensors, client: Tensors, shared: Tensors, *_: object) -> torch.Tensor:
        return 0.5 * self.mu * sq_dist(params, shared)


METHOD = MethodSpec(
    name="fedprox",
    summary="proximal term mu/2 ||w - w_global||^2",
    settings=FedProxSettings,
    build=lambda s, cfg: FedProx(s.mu),
    order=10,
)
