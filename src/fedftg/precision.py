"""Numeric precision of training: fp32, or bf16 autocast on CPU and GPU."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """A context that runs forwards in bf16 (``precision="bf16"``) or leaves fp32 alone."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if autocast produced a half-precision tensor, else unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
