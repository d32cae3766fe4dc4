"""Deterministic random streams keyed by (seed, round, client, purpose).

Every draw in fedftg comes from a stream derived here instead of global RNG state, so the
same seed gives the same numbers whatever the order of execution, after a resume, and on
Flower nodes.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on every key (stable across processes and platforms)."""
    text = "/".join(str(k) for k in keys).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def numpy_rng(*keys: int | str) -> np.random.Generator:
    """A NumPy generator for the stream named by ``keys``."""
    return np.random.default_rng(derive_seed(*keys))


def torch_rng(*keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for the stream named by ``keys``."""
    import torch  # here: the config and the CLI use this module without loading torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*keys))
    return gen
