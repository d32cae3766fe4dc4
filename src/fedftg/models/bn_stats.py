"""BatchNorm running statistics: the gap of a batch to them, and their pooling over models.

`bn_statistics_gap` is DeepInversion's feature-statistics distance (Yin et al. CVPR 2020;
DENSE's ``--bn`` loss, Zhang et al. NeurIPS 2022): at one BatchNorm layer, the L2 norm of
(batch variance - running_var) plus that of (batch mean - running_mean), per channel over
every other dimension, with the biased batch variance. `bn_gap_recorder` collects it at
every BatchNorm layer of a model during a forward pass through forward hooks, so a server
step gets it from the teacher pass it already runs. `pooled_statistics` is the mixture of
several models' statistics (law of total variance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def tracks_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer with running statistics."""
    return isinstance(module, _BatchNorm) and module.running_mean is not None


def bn_statistics_gap(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """||var(x) - running_var||_2 + ||mean(x) - running_mean||_2 over the channels (dim 1).

    Mean and biased variance per channel over the batch and every spatial position, as
    DeepInversion and DENSE compute them; the running statistics are constants.
    """
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, correction=0)
    return torch.linalg.vector_norm(var - running_var.detach()) + torch.linalg.vector_norm(
        mean - running_mean.detach()
    )


@contextmanager
def bn_gap_recorder(net: nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that receives `bn_statistics_gap` of each BatchNorm layer of ``net`` (with
    running statistics) at every forward pass inside the context, from the layer's input and
    the running statistics the layer holds during that pass (`functional_call` swaps in a
    teacher's own)."""
    gaps: list[torch.Tensor] = []

    def hook(module: _BatchNorm, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x, mean, var = inputs[0], module.running_mean, module.running_var
        if mean is None or var is None:  # hooked only where `tracks_statistics`
            return
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        gaps.append(bn_statistics_gap(x, mean, var))

    handles = [
        m.register_forward_hook(hook)
        for m in net.modules()
        if isinstance(m, _BatchNorm) and tracks_statistics(m)
    ]
    try:
        yield gaps
    finally:
        for h in handles:
            h.remove()


def with_bn_gap(
    net: nn.Module, forward: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward()`` (a pass through ``net``) and the sum of its BatchNorm layers' gaps
    (0 for a model without BatchNorm)."""
    with bn_gap_recorder(net) as gaps:
        out = forward()
    total = torch.stack(gaps).sum() if gaps else out.new_zeros((), dtype=torch.float32)
    return out, total


def pooled_statistics(
    means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the mixture of K per-channel distributions, (K, C) each.

    With w the weights normalised to sum 1: mean = sum_k w_k m_k and
    var = sum_k w_k (v_k + m_k^2) - mean^2 (the within-model variances plus the spread of the
    models' means), where the plain weighted average of the variances would drop the spread.
    """
    w = (weights / weights.sum()).to(means.dtype).view(-1, *([1] * (means.dim() - 1)))
    mean = (w * means).sum(0)
    var = (w * (variances + means**2)).sum(0) - mean**2
    return mean, var.clamp_min(0.0)


@torch.no_grad()
def load_pooled_statistics(
    model: nn.Module, states: Sequence[dict[str, torch.Tensor]], weights: torch.Tensor
) -> None:
    """Set every BatchNorm layer's running statistics of ``model`` to `pooled_statistics` of
    the same layer in ``states`` (models of its architecture) with ``weights``, in place."""
    for name, module in model.named_modules():
        if not tracks_statistics(module):
            continue
        prefix = f"{name}." if name else ""
        means = torch.stack([s[prefix + "running_mean"] for s in states])
        variances = torch.stack([s[prefix + "running_var"] for s in states])
        mean, var = pooled_statistics(means, variances, weights.to(means.device))
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
