"""MOON (Li, He, Song, CVPR 2021): model-contrastive learning on the representation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedftg.fl.aggregation import State
from fedftg.fl.client import (
    ClientMethod,
    LocalContext,
    Term,
    call_model,
    detached_state,
    functional_template,
)


class Moon(ClientMethod):
    """MOON (Li et al. 2021): model-contrastive term on the representation.

    mu * -log(exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)))
    with cosine similarity; the positive is the global model's representation, the
    negative the client's previous local model's (the global model on its first round).
    """

    def __init__(self, mu: float, tau: float) -> None:
        self.mu = mu
        self.tau = tau

    def begin(self, model: nn.Module, ctx: LocalContext) -> Term | None:
        net = functional_template(model, train=False)

        def term(
            params: State,
            client: State,
            shared: State,
            feats: torch.Tensor | None,
            logits: torch.Tensor,
            batch: State,
        ) -> torch.Tensor:
            x = batch["x"]
            with torch.no_grad():  # both representations are fixed targets (eval mode)
                z_glob = call_model(net, shared, x)[0]
                z_prev = call_model(net, client, x)[0]
            assert feats is not None and z_glob is not None and z_prev is not None
            return self.mu * moon_contrastive(feats, z_glob, z_prev, self.tau)

        prev = dict(ctx.client_state or ctx.global_state)
        return Term(term, client=prev, shared=dict(ctx.global_state), features=True)

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
