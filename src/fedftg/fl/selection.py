"""Which clients take part in a round (seeded, the same for every method and engine)."""

from __future__ import annotations

import numpy as np

from fedftg.seeding import numpy_rng


def select_clients(
    num_clients: int, participation: float, mode: str, seed: int, round_idx: int
) -> np.ndarray:
    """Sorted ids of the clients active in ``round_idx``.

    ``fixed``: exactly max(1, round(participation * N)) clients drawn without replacement.
    ``bernoulli``: each client active independently with probability ``participation``
    (as the FedFTG authors' code), with at least one client. Seeded by (seed, round) so
    every method of an experiment sees the same clients.
    """
    rng = numpy_rng(seed, "select", round_idx)
    if mode == "fixed":
        m = max(1, int(round(participation * num_clients)))
        return np.sort(rng.choice(num_clients, size=m, replace=False))
    if mode == "bernoulli":
        active = np.flatnonzero(rng.random(num_clients) < participation)
        if active.size == 0:
            active = np.array([rng.integers(num_clients)])
        return active
    raise ValueError(f"unknown selection mode {mode!r}")
