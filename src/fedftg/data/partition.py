"""Non-IID client partitions: which training samples each client holds.

Deterministic by seed, every loop bounded. The client-by-class count matrix is part of
the result: it is what FedFTG's label sampling and class-level ensemble are built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedftg.errors import UserError
from fedftg.seeding import numpy_rng

SCHEMES = ("iid", "dirichlet", "dirichlet-label", "shards")


@dataclass(frozen=True)
class Partition:
    """Per-client sample indices and the (clients, classes) label-count matrix."""

    client_indices: tuple[np.ndarray, ...]
    counts: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def sizes(self) -> np.ndarray:
        return self.counts.sum(axis=1)


def make_partition(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    sigma: float = 0.0,
    shards_per_client: int = 2,
    min_size: int = 10,
    samples_per_client: int | None = None,
    seed: int = 0,
) -> Partition:
    """Split sample ids 0..N-1 among ``num_clients`` clients with ``scheme``.

    iid: uniform random split. dirichlet: the FedFTG authors' scheme (each client draws a
    class prior from Dir(alpha) and fills a balanced, or lognormal(sigma)-skewed, quota).
    dirichlet-label: NIID-Bench / Flower (each class split across clients by Dir(alpha),
    retried until every client has ``min_size`` samples). shards: sorted by label, cut into
    ``num_clients * shards_per_client`` shards, ``shards_per_client`` shards each.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    _validate(n, num_clients, scheme, alpha, sigma, shards_per_client, samples_per_client)
    rng = numpy_rng(seed, "partition", scheme)
    total = n if samples_per_client is None else samples_per_client * num_clients
    if scheme == "iid":
        parts = _iid(n, num_clients, total, sigma, rng)
    elif scheme == "dirichlet":
        sizes = _client_sizes(total, num_clients, sigma, rng)
        parts = _dirichlet_prior(labels, num_classes, sizes, alpha, rng)
    elif scheme == "dirichlet-label":
        parts = _dirichlet_label(labels, num_classes, num_clients, alpha, min_size, rng)
    else:
        parts = _shards(labels, num_clients, shards_per_client, rng)
    indices = tuple(np.sort(p).astype(np.int64) for p in parts)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in indices])
    return Partition(client_indices=indices, counts=counts.astype(np.int64))


def _validate(
    n: int,
    num_clients: int,
    scheme: str,
    alpha: float,
    sigma: float,
    shards_per_client: int,
    samples_per_client: int | None,
) -> None:
    if scheme not in SCHEMES:
        raise UserError(f"partition: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise UserError(f"clients: must be >= 1, got {num_clients}")
    if num_clients > n:
        raise UserError(f"clients: {num_clients} clients but only {n} samples")
    if not (np.isfinite(alpha) and alpha > 0):
        raise UserError(f"alpha: must be a finite number > 0, got {alpha}")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise UserError(f"sigma: must be >= 0, got {sigma}")
    if shards_per_client < 1:
        raise UserError(f"shards_per_client: must be >= 1, got {shards_per_client}")
    if scheme == "shards" and num_clients * shards_per_client > n:
        raise UserError(
            f"shards_per_client: {num_clients * shards_per_client} shards for only {n} samples"
        )
    if samples_per_client is not None and (
        samples_per_client < 1 or samples_per_client * num_clients > n
    ):
        raise UserError(
            f"samples_per_client: {samples_per_client} x {num_clients} clients exceeds "
            f"the {n} samples"
        )


def _client_sizes(total: int, k: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Balanced sizes, or lognormal(sigma) quantity skew; each >= 1, summing to ``total``."""
    if sigma == 0:
        sizes = np.full(k, total // k, dtype=np.int64)
        sizes[: total - sizes.sum()] += 1
        return sizes
    raw = rng.lognormal(mean=0.0, sigma=sigma, size=k)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * (total - k)).astype(np.int64) + 1)
    short = total - int(sizes.sum())
    order = np.argsort(-raw)
    i = 0
    while short != 0:  # hand out (or take back) the rounding remainder, largest first
        j = order[i % k]
        step = 1 if short > 0 else -1
        if sizes[j] + step >= 1:
            sizes[j] += step
            short -= step
        i += 1
    return sizes


def _iid(n: int, k: int, total: int, sigma: float, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)[:total]
    bounds = np.cumsum(_client_sizes(total, k, sigma, rng))[:-1]
    return np.split(perm, bounds)


def _dirichlet_prior(
    labels: np.ndarray,
    num_classes: int,
    sizes: np.ndarray,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The authors' scheme, vectorised over clients and with bounded redraws.

    Each client repeatedly draws a class from its Dir(alpha) prior and takes an unused
    sample of it. Exhausted classes are masked out of every prior (instead of redrawing
    forever, the pitfall at small alpha); a client whose prior mass is all on exhausted
    classes draws from the remaining class proportions.
    """
    k = len(sizes)
    priors = rng.dirichlet(np.full(num_classes, alpha), size=k)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(num_classes, dtype=np.int64)
    need = sizes.astype(np.int64).copy()
    got: list[list[np.ndarray]] = [[] for _ in range(k)]
    for _ in range(int(need.sum()) + 1):  # each pass grants at least one sample
        active = np.flatnonzero(need > 0)
        if active.size == 0:
            break
        avail = remaining > 0
        p = priors[active] * avail
        mass = p.sum(axis=1, keepdims=True)
        fallback = remaining / remaining.sum()
        p = np.where(mass > 0, p / np.where(mass > 0, mass, 1), fallback)
        u = rng.random(active.size)
        cls = np.minimum((p.cumsum(axis=1) < u[:, None]).sum(axis=1), num_classes - 1)
        cls = np.where(avail[cls], cls, np.argmax(avail))  # guard against rounding
        order = rng.permutation(active.size)
        for c in np.unique(cls):
            who = active[order][cls[order] == c][: remaining[c]]
            picks = pools[c][taken[c] : taken[c] + who.size]
            for client, idx in zip(who, picks, strict=True):
                got[client].append(idx)
            taken[c] += who.size
            remaining[c] -= who.size
            need[who] -= 1
    return [np.asarray(g, dtype=np.int64) for g in got]


def _dirichlet_label(
    labels: np.ndarray,
    num_classes: int,
    k: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """NIID-Bench: per class, proportions over clients ~ Dir(alpha), clients above N/K skipped."""
    n = len(labels)
    if min_size * k > n:
        raise UserError(f"min_size: {min_size} x {k} clients exceeds the {n} samples")
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for c in range(num_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(k, alpha)) * (sizes < n / k)
            p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
                sizes[j] += len(chunk)
        if sizes.min() >= min_size:
            return [np.concatenate(p) for p in parts]
    raise UserError(
        f"min_size: no split with >= {min_size} samples per client found in {max_tries} "
        f"tries at alpha={alpha}; lower --min-size or raise --alpha"
    )


def _shards(
    labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID: contiguous label-sorted shards, ``per_client`` per client."""
    order = _sorted_ids(labels, rng)
    shards = np.array_split(order, k * per_client)
    assign = rng.permutation(k * per_client).reshape(k, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assign]


def _sorted_ids(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample ids sorted by label, in random order within each label."""
    perm = rng.permutation(len(labels))
    return perm[np.argsort(labels[perm], kind="stable")]


def partition_stats(part: Partition) -> dict[str, Any]:
    """Summary statistics: client sizes, classes per client, and label skew.

    ``mean_tv`` is the mean total-variation distance between each client's label
    distribution and the global one (0 = IID, near 1 = disjoint).
    """
    sizes = part.sizes
    glob = part.counts.sum(axis=0) / max(part.counts.sum(), 1)
    local = part.counts / np.maximum(sizes[:, None], 1)
    tv = 0.5 * np.abs(local - glob).sum(axis=1)
    return {
        "clients": part.num_clients,
        "samples": int(sizes.sum()),
        "size_min": int(sizes.min()),
        "size_mean": float(sizes.mean()),
        "size_max": int(sizes.max()),
        "classes_per_client_mean": float((part.counts > 0).sum(axis=1).mean()),
        "mean_tv": float(tv.mean()),
    }


def format_partition_table(part: Partition, max_rows: int = 30) -> str:
    """Per-client sizes and class counts as a plain-text table."""
    c = part.counts.shape[1]
    head = f"{'client':>6} {'size':>6} {'classes':>7}  " + " ".join(f"{j:>5}" for j in range(c))
    lines = [head]
    for i, row in enumerate(part.counts[:max_rows]):
        lines.append(
            f"{i:>6} {int(row.sum()):>6} {int((row > 0).sum()):>7}  "
            + " ".join(f"{int(v):>5}" for v in row)
        )
    if part.num_clients > max_rows:
        lines.append(f"... {part.num_clients - max_rows} more clients")
    return "\n".join(lines)
