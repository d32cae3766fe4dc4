"""Normalisation layers the classifiers take as a `norm(channels)` factory."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Norm = Callable[[int], nn.Module]


def batch_norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def group_norm(channels: int) -> nn.Module:
    """GroupNorm with 2 groups, the usual federated replacement for BatchNorm."""
    return nn.GroupNorm(2, channels)
