"""FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020): normalised averaging.

Clients that take more local steps move further from the global model, so plain averaging
weights the objective toward them ("objective inconsistency"). FedNova divides each
client's change by its effective number of steps and rescales the average by the
participants' mean effective steps:

    d_k = (w - w_k) / a_k,   tau_eff = sum_k p_k a_k,   w <- w - tau_eff * sum_k p_k d_k

with p_k the clients' sample shares. For local SGD with momentum rho over tau_k steps,
a_k = (tau_k - rho (1 - rho^tau_k) / (1 - rho)) / (1 - rho) (tau_k without momentum), as in
NIID-Bench's implementation (Li et al., ICDE 2022), which this follows: the update applies
to every floating entry of the model state (BatchNorm statistics included), integer
buffers keep the largest value as in `weighted_average`, and weight decay is not part of
a_k. With equal steps everywhere FedNova is FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedftg.fl.aggregation import State, weighted_average
from fedftg.fl.client import ClientMethod, LocalResult


def effective_steps(steps: int, momentum: float = 0.0) -> float:
    """a_k: the number of plain SGD steps that ``steps`` momentum-SGD steps amount to."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def normalised_average(
    global_state: State, states: Sequence[State], weights: Sequence[float], a: Sequence[float]
) -> State:
    """w - tau_eff * sum_k p_k (w - w_k) / a_k, with p_k ``weights`` normalised and
    tau_eff = sum_k p_k a_k; integer buffers: the largest value."""
    total = float(sum(weights))
    p = [w / total for w in weights]
    tau_eff = sum(pk * ak for pk, ak in zip(p, a, strict=True))
    out: State = {}
    integers = weighted_average(states, weights)  # for the integer buffers only
    for name, g in global_state.items():
        if not g.is_floating_point():
            out[name] = integers[name]
            continue
        # a client that took no step has not moved: it adds nothing
        d = sum(pk * (g - s[name]) / ak for pk, s, ak in zip(p, states, a, strict=True) if ak)
        out[name] = g - tau_eff * d
    return out


class FedNova(ClientMethod):
    """FedAvg's clients; the server normalises each client's change by its local steps."""

    def __init__(self, momentum: float = 0.0) -> None:
        self.momentum = momentum

    def aggregate(
        self,
        global_state: State,
        results: Sequence[LocalResult],
        server_state: dict[str, torch.Tensor],
        num_clients: int,
    ) -> State:
        a = [effective_steps(r.steps, self.momentum) for r in results]
        return normalised_average(
            global_state, [r.state for r in results], [r.num_samples for r in results], a
        )
