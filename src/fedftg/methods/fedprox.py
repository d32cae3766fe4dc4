"""FedProx (Li et al., MLSys 2020): a proximal term toward the global model.

``variant = "weight_decay"`` is FedProx as the FedFTG authors' code runs it
(methods/FedProx.py there passes ``weight_decay + mu`` to the clients' SGD): mu joins the
weight decay, which pulls toward zero rather than toward the global model, and no proximal
term is added. It is what their FedProx numbers measure, so the paper presets use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fedftg.methods.client import (
    ClientMethod,
    LocalContext,
    LocalSpec,
    Tensors,
    Term,
    param_names,
    sq_dist,
)
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
    variant: str = setting(
        "proximal",
        "proximal: mu/2 ||w - w_global||^2 (the paper); weight_decay: mu added to the weight "
        "decay instead (the FedFTG authors' code)",
        choices=("proximal", "weight_decay"),
        before="proximal",
    )


class FedProx(ClientMethod):
    """FedProx: local loss + mu/2 * ||w - w_global||^2 over the trained parameters."""

    name = "fedprox"

    def __init__(self, mu: float, variant: str = "proximal") -> None:
        if variant not in ("proximal", "weight_decay"):
            raise ValueError(f"unknown FedProx variant {variant!r}")
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

    def _term(self, params: Tensors, client: Tensors, shared: Tensors, *_: object) -> torch.Tensor:
        return 0.5 * self.mu * sq_dist(params, shared)


METHOD = MethodSpec(
    name="fedprox",
    summary="proximal term mu/2 ||w - w_global||^2",
    settings=FedProxSettings,
    build=lambda s, cfg: FedProx(s.mu, s.variant),
    order=10,
)
