"""Non-IID client partitions: which training samples each client holds.

Deterministic by seed, every loop bounded. The client-by-class count matrix is part of
the result: it is what FedFTG's label sampling and class-level ensemble are built from.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedftg.errors import UserError
from fedftg.seeding import numpy_rng
from fedftg.tables import Table


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


# (labels, num_classes, num_clients, settings, rng) -> one index array per client, each
# sample at most once; `partition_labels` sorts them and counts
SplitFn = Callable[[np.ndarray, int, int, Any, np.random.Generator], Sequence[np.ndarray]]


@dataclass(frozen=True)
class SchemeSpec:
    """A registered partition scheme: its split function and the settings it reads.

    ``settings`` is a dataclass whose fields are the run settings the scheme reads, under
    their `fedftg.config.RunConfig` names (``alpha``, ``min_size``); `scheme_settings`
    fills one from a run's config. ``note`` follows the name in the ``--partition`` help.
    """

    name: str
    split: SplitFn
    settings: type
    note: str = ""


SCHEMES: Table[SchemeSpec] = Table("scheme", "partition")


def register_scheme(name: str, split: SplitFn, settings: type, *, note: str = "") -> SchemeSpec:
    """Make partition scheme ``name`` a valid ``--partition``.

    ``split(labels, num_classes, num_clients, settings, rng)`` returns one int array of
    sample indices per client (a sample at most once), drawing only from ``rng`` (seeded
    from the run's seed and the scheme's name); ``settings`` is an instance of the
    ``settings`` dataclass, whose fields are the run settings the scheme reads (a new
    setting is a field of `fedftg.config.RunConfig` first). A taken name, a split that is
    not callable or settings that are not a dataclass are a `UserError`.
    """
    where = f"partition: cannot register scheme {name!r}"
    if not callable(split):
        raise UserError(f"{where}: its split function {split!r} is not callable")
    if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
        raise UserError(f"{where}: its settings {settings!r} are not a dataclass")
    return SCHEMES.add(name, SchemeSpec(name, split, settings, note))


def scheme_settings(scheme: str, values: Mapping[str, Any]) -> Any:
    """The settings of ``scheme`` taken from ``values`` (a run's settings by name)."""
    spec = SCHEMES.get(scheme)
    wanted = [f.name for f in dataclasses.fields(spec.settings)]
    missing = [name for name in wanted if name not in values]
    if missing:
        raise UserError(f"partition: scheme {scheme!r} reads {missing[0]!r}, which is not given")
    return spec.settings(**{name: values[name] for name in wanted})


def partition_labels(
    labels: np.ndarray, num_classes: int, num_clients: int, scheme: str, settings: Any, *, seed: int
) -> Partition:
    """Split sample ids 0..N-1 among ``num_clients`` clients with ``scheme`` and its
    ``settings`` (`scheme_settings`); deterministic by ``seed``."""
    labels = np.asarray(labels, dtype=np.int64)
    spec = SCHEMES.get(scheme)
    _check_clients(len(labels), num_clients)
    parts = spec.split(
        labels, num_classes, num_clients, settings, numpy_rng(seed, "partition", scheme)
    )
    if len(parts) != num_clients:
        raise UserError(
            f"partition: scheme {scheme!r} gave {len(parts)} parts for {num_clients} clients"
        )
    parts = tuple(np.sort(p).astype(np.int64) for p in parts)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    return Partition(client_indices=parts, counts=counts.astype(np.int64))


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
    """`partition_labels` with the built-in schemes' settings as keywords, each checked whether or
    not ``scheme`` reads it.

    iid: uniform random split. dirichlet: the FedFTG authors' scheme (each client draws a
    class prior from Dir(alpha) and fills a balanced, or lognormal(sigma)-skewed, quota).
    dirichlet-label: NIID-Bench / Flower (each class split across clients by Dir(alpha),
    retried until every client has ``min_size`` samples). shards: sorted by label, cut into
    ``num_clients * shards_per_client`` shards, ``shards_per_client`` shards each.
    """
    SCHEMES.get(scheme)
    n = len(labels)
    _check_clients(n, num_clients)
    values = {
        "alpha": alpha,
        "sigma": sigma,
        "shards_per_client": shards_per_client,
        "min_size": min_size,
        "samples_per_client": samples_per_client,
    }
    _check_values(values)
    dealt(n, num_clients, samples_per_client)
    settings = scheme_settings(scheme, values)
    return partition_labels(labels, num_classes, num_clients, scheme, settings, seed=seed)


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise UserError(f"clients: must be >= 1, got {num_clients}")
    if num_clients > n:
        raise UserError(f"clients: {num_clients} clients but only {n} samples")


def _check_values(values: Mapping[str, Any]) -> None:
    """Raise `UserError` naming the first of the built-in schemes' settings in ``values``
    out of its range (each settings class checks its own fields with this)."""
    alpha, sigma = values.get("alpha", 1.0), values.get("sigma", 0.0)
    if not (np.isfinite(alpha) and alpha > 0):
        raise UserError(f"alpha: must be a finite number > 0, got {alpha}")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise UserError(f"sigma: must be >= 0, got {sigma}")
    if values.get("shards_per_client", 1) < 1:
        raise UserError(f"shards_per_client: must be >= 1, got {values['shards_per_client']}")


def dealt(n: int, num_clients: int, samples_per_client: int | None) -> int:
    """How many of the ``n`` samples are dealt out: all, or ``samples_per_client`` each."""
    if samples_per_client is None:
        return n
    if samples_per_client < 1 or samples_per_client * num_clients > n:
        raise UserError(
            f"samples_per_client: {samples_per_client} x {num_clients} clients exceeds "
            f"the {n} samples"
        )
    return samples_per_client * num_clients


class _Checked:
    """Base of the built-in schemes' settings: a value out of range is a `UserError` as the
    settings are made, so a split function never sees one."""

    def __post_init__(self) -> None:
        _check_values(vars(self))


@dataclass(frozen=True)
class IidSettings(_Checked):
    """What `iid` reads: the size skew and the samples dealt per client (None: all)."""

    sigma: float = 0.0
    samples_per_client: int | None = None


@dataclass(frozen=True)
class DirichletSettings(_Checked):
    """What `dirichlet` reads: the prior's concentration, the size skew, the samples dealt."""

    alpha: float = 0.5
    sigma: float = 0.0
    samples_per_client: int | None = None


@dataclass(frozen=True)
class DirichletLabelSettings(_Checked):
    """What `dirichlet-label` reads: the concentration and the least samples per client."""

    alpha: float = 0.5
    min_size: int = 10


@dataclass(frozen=True)
class ShardsSettings(_Checked):
    """What `shards` reads: shards per client."""

    shards_per_client: int = 2


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


def _iid(
    labels: np.ndarray, num_classes: int, k: int, s: IidSettings, rng: np.random.Generator
) -> list[np.ndarray]:
    """Uniform random split (balanced, or lognormal(sigma)-skewed sizes)."""
    total = dealt(len(labels), k, s.samples_per_client)
    perm = rng.permutation(len(labels))[:total]
    bounds = np.cumsum(_client_sizes(total, k, s.sigma, rng))[:-1]
    return np.split(perm, bounds)


def _dirichlet(
    labels: np.ndarray, num_classes: int, k: int, s: DirichletSettings, rng: np.random.Generator
) -> list[np.ndarray]:
    """The authors' scheme: a Dir(alpha) class prior per client fills its quota."""
    sizes = _client_sizes(dealt(len(labels), k, s.samples_per_client), k, s.sigma, rng)
    return _dirichlet_prior(labels, num_classes, sizes, s.alpha, rng)


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
    s: DirichletLabelSettings,
    rng: np.random.Generator,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """NIID-Bench: per class, proportions over clients ~ Dir(alpha), clients above N/K skipped."""
    n, alpha, min_size = len(labels), s.alpha, s.min_size
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
    labels: np.ndarray, num_classes: int, k: int, s: ShardsSettings, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID: contiguous label-sorted shards, ``shards_per_client`` each."""
    per_client = s.shards_per_client
    if k * per_client > len(labels):
        raise UserError(
            f"shards_per_client: {k * per_client} shards for only {len(labels)} samples"
        )
    order = _sorted_ids(labels, rng)
    shards = np.array_split(order, k * per_client)
    assign = rng.permutation(k * per_client).reshape(k, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assign]


def _sorted_ids(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample ids sorted by label, in random order within each label."""
    perm = rng.permutation(len(labels))
    return perm[np.argsort(labels[perm], kind="stable")]


# ------------------------------------------------------------------ the built-in schemes

register_scheme("iid", _iid, IidSettings)
register_scheme("dirichlet", _dirichlet, DirichletSettings, note="authors'")
register_scheme("dirichlet-label", _dirichlet_label, DirichletLabelSettings, note="NIID-Bench")
register_scheme("shards", _shards, ShardsSettings)


def _flwr_scheme(name: str) -> SchemeSpec:
    """The scheme ``flwr:<Class>`` (`fedftg.data.flwr_partition`, imported by name: it
    builds on this module, and it is needed only when such a scheme is asked for)."""
    return importlib.import_module("fedftg.data.flwr_partition").flwr_scheme(name)


SCHEMES.on_first_use("flwr:", _flwr_scheme, "flwr:<Partitioner> (Flower Datasets)")


def partition_label(values: Mapping[str, Any]) -> str:
    """A run's partition for titles, from its settings by name (a config or its dict):
    ``dirichlet alpha=0.1``, ``flwr:DirichletPartitioner(alpha=0.3)``; a scheme from
    outside the package (``flwr:``, ``python:``) reads no ``alpha``."""
    scheme, args = values["partition"], values.get("partition_args") or {}
    if ":" not in scheme:
        return f"{scheme} alpha={values['alpha']}"
    return f"{scheme}({','.join(f'{k}={v}' for k, v in args.items())})" if args else scheme


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
