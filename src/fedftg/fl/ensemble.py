"""How a server weighs its client teachers per class (FedFTG's class-level ensemble)."""

from __future__ import annotations

import numpy as np
import torch


def class_weights(counts: np.ndarray | torch.Tensor, mode: str = "class") -> torch.Tensor:
    """Teacher weights alpha_k^c, shape (K, C).

    class (the paper's class-level ensemble): alpha_k^c = n_k^c / (n^c + 1e-6), so for a
    class c the clients that hold it share the vote by their amount of c and a client
    without c has no say. uniform (the ablation): 1/K everywhere.
    """
    n = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
    if mode == "uniform":
        return torch.full_like(n, 1.0 / n.shape[0])
    if mode != "class":
        raise ValueError(f"unknown ensemble {mode!r}")
    return n / (n.sum(dim=0, keepdim=True) + 1e-6)
