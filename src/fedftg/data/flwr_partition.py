"""Flower Datasets partitioners as fedftg partition schemes, offline.

With the extra ``fedftg[flwr-datasets]``, any ``flwr_datasets.partitioner`` class splits the
data fedftg loads: the training labels and their row numbers become an in-memory
``datasets.Dataset`` (columns ``label`` and ``index``; no download, no hub), the
partitioner splits it and each partition's ``index`` column is read back as a client's
samples, so the result is a `Partition` like the built-in schemes' (heatmap, statistics and
report work unchanged).

Two ways in:

- ``flwr:<Class>`` (``--partition flwr:DirichletPartitioner --partition-args
  "alpha=0.3,partition_by=label"``): the class is built per run from ``partition_args``;
  the constructor's signature decides the rest: ``num_partitions`` is the run's client
  count, ``seed`` a seed derived from the run's seed, ``partition_by`` ``"label"`` unless
  given. The scheme name and its arguments are in config.json and the fingerprint.
- `register_partitioner` (an already built partitioner object, from Python): a scheme
  ``python:<Class>-<n>`` for this process; a copy of the object splits each time, with its
  own arguments and seed, which are not recorded.

Either way the rows are first shuffled by the run's seed (as Flower's ``FederatedDataset``
shuffles before partitioning), so even a partitioner without a seed of its own
(``IidPartitioner``) gives the same partition for the same seed and another for another.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedftg.data.partition import SchemeSpec, dealt, register_scheme
from fedftg.errors import UserError

FLWR_PREFIX = "flwr:"
PYTHON_PREFIX = "python:"
EXTRA = "pip install 'fedftg[flwr-datasets]'"
# the constructor arguments fedftg fills itself (see `partitioner_kwargs`)
FILLED = ("num_partitions", "seed")


@dataclass(frozen=True)
class ObjectSettings:
    """What a `register_partitioner` scheme reads: the samples dealt per client (None: all;
    the object holds its own arguments)."""

    samples_per_client: int | None = None


@dataclass(frozen=True)
class FlwrSettings(ObjectSettings):
    """What a ``flwr:<Class>`` scheme reads: also the partitioner's constructor arguments."""

    partition_args: Mapping[str, Any] = field(default_factory=dict)


def _partitioner_module() -> Any:
    """``flwr_datasets.partitioner``; its absence is a `UserError` naming the extra."""
    try:
        import flwr_datasets.partitioner as module
    except ImportError as exc:
        raise UserError(
            f"partition: Flower Datasets partitioners need the extra flwr-datasets ({EXTRA}); "
            f"importing it failed: {exc}"
        ) from None
    return module


def partitioner_class(name: str) -> type:
    """The ``flwr_datasets.partitioner`` class a scheme ``flwr:<Class>`` names."""
    module = _partitioner_module()
    cls_name = name.removeprefix(FLWR_PREFIX)
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, module.Partitioner)) or cls is (
        module.Partitioner
    ):
        known = ", ".join(
            n
            for n in sorted(getattr(module, "__all__", dir(module)))
            if n != "Partitioner" and isinstance(getattr(module, n, None), type)
        )
        raise UserError(
            f"partition: flwr_datasets.partitioner has no partitioner {cls_name!r}; "
            f"use flwr:<one of {known}>"
        )
    return cls


def partitioner_kwargs(
    cls: type, args: Mapping[str, Any], num_partitions: int, seed: int
) -> dict[str, Any]:
    """The constructor arguments of ``cls`` for a run: ``args``, plus ``num_partitions``,
    ``seed`` and ``partition_by="label"`` where the constructor takes them (``args`` may not
    set the first two: the run decides them). An argument the constructor does not take, or
    a required one missing, is a `UserError` naming it."""
    params = inspect.signature(cls).parameters
    where = f"partition_args: flwr:{cls.__name__}"
    for name in args:
        if name in FILLED:
            raise UserError(f"{where}: {name} is set by the run (clients, seed), not here")
        if name not in params:
            takes = ", ".join(p for p in params if p not in FILLED) or "none"
            raise UserError(f"{where} takes no argument {name!r} (arguments: {takes})")
    kwargs = dict(args)
    filled = {"num_partitions": num_partitions, "seed": seed, "partition_by": "label"}
    for name, value in filled.items():
        if name in params:
            kwargs.setdefault(name, value)
    missing = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and name not in kwargs
    ]
    if missing:
        raise UserError(f"{where} needs {', '.join(missing)} (give them in partition_args)")
    return kwargs


def label_rows(labels: np.ndarray, order: np.ndarray) -> Any:
    """The rows ``order`` of the training set as an in-memory ``datasets.Dataset`` of
    columns ``label`` and ``index`` (the row number, read back from each partition)."""
    from datasets import Dataset

    return Dataset.from_dict({"label": labels[order], "index": order})


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Without the progress bars of ``datasets`` and the partitioners (on stderr) and
    their warnings (a retry that succeeds is no news; one that fails is the `UserError`)."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def split_with(
    partitioner: Any,
    labels: np.ndarray,
    num_clients: int,
    s: ObjectSettings,
    rng: np.random.Generator,
    name: str,
) -> list[np.ndarray]:
    """Each client's row numbers as ``partitioner`` (unused) splits the training set
    shuffled by ``rng`` (its first ``samples_per_client * num_clients`` rows when that is
    set, as the built-in schemes deal them); a partition count other than ``num_clients``,
    an error of the partitioner or an empty client is a `UserError` naming ``name``."""
    where = f"partition: {name}"
    dealt_rows = dealt(len(labels), num_clients, s.samples_per_client)
    order = rng.permutation(len(labels))[:dealt_rows].astype(np.int64)
    try:
        with quiet():
            partitioner.dataset = label_rows(labels, order)
            count = partitioner.num_partitions
            if count != num_clients:
                raise UserError(f"{where} makes {count} partitions for {num_clients} clients")
            parts = [
                np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                for i in range(num_clients)
            ]
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise UserError(f"{where}: {exc}") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise UserError(f"{where} gave client {empty[0]} no samples; {len(empty)} empty in all")
    return parts


def flwr_scheme(name: str) -> SchemeSpec:
    """The scheme ``flwr:<Class>``: its class built per split from the run's
    ``partition_args``, seeded from the run's seed (`SCHEMES` makes it on first use)."""
    cls = partitioner_class(name)

    @dataclass(frozen=True)
    class Checked(FlwrSettings):
        """`FlwrSettings` whose argument names are checked against ``cls`` as they are made
        (a config's validation makes them: bad names fail before any data loads)."""

        def __post_init__(self) -> None:
            partitioner_kwargs(cls, self.partition_args, 1, 0)

    def split(
        labels: np.ndarray, num_classes: int, k: int, s: FlwrSettings, rng: np.random.Generator
    ) -> Sequence[np.ndarray]:
        seed = int(rng.integers(2**32))
        kwargs = partitioner_kwargs(cls, dict(s.partition_args), k, seed)
        try:
            partitioner = cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise UserError(f"partition_args: flwr:{cls.__name__}: {exc}") from None
        return split_with(partitioner, labels, k, s, rng, name)

    return SchemeSpec(name, split, Checked, note="Flower Datasets")


_registered: list[str] = []


def _object_key(obj: Any) -> str | None:
    """Eight hex digits of a digest of ``obj``'s class and attributes (None when they do
    not pickle): the same for equal partitioners, in any process."""
    try:
        blob = pickle.dumps((type(obj).__module__, type(obj).__qualname__, vars(obj)), 4)
    except Exception:  # a lambda, a lock, ...: not an identity we can record
        return None
    return hashlib.sha256(blob).hexdigest()[:8]


def register_partitioner(partitioner: Any) -> str:
    """Register a built ``flwr_datasets`` partitioner (no dataset assigned yet) as a scheme
    for this process; returns its name, ``python:<Class>-<key>``, to give as the partition.

    ``key`` is a digest of the object's attributes, so equal objects (same class, arguments
    and seed) get the same name, in this process or another: a rerun with an equal object
    resumes, one with other arguments is refused by the run directory. An object whose
    attributes cannot be pickled gets a counter instead (``-n``, in registration order).
    Each split uses a copy, so one object serves every run and resume of the process. The
    arguments themselves are not recorded; ``flwr:<Class>`` with ``partition_args`` is the
    form a config file can repeat."""
    module = _partitioner_module()
    if not isinstance(partitioner, module.Partitioner):
        raise UserError(
            f"partition: {partitioner!r} is not a flwr_datasets.partitioner.Partitioner"
        )
    if partitioner.is_dataset_assigned():
        raise UserError(
            f"partition: the {type(partitioner).__name__} already holds a dataset; pass one "
            "that has not been used"
        )
    key = _object_key(partitioner) or str(len(_registered) + 1)
    name = f"{PYTHON_PREFIX}{type(partitioner).__name__}-{key}"
    if name in _registered:  # an equal object: the scheme it registered splits alike
        return name

    def split(
        labels: np.ndarray, num_classes: int, k: int, s: ObjectSettings, rng: np.random.Generator
    ) -> Sequence[np.ndarray]:
        return split_with(copy.deepcopy(partitioner), labels, k, s, rng, name)

    register_scheme(name, split, ObjectSettings, note="Flower Datasets object")
    _registered.append(name)
    return name


def parse_args(name: str, text: str) -> dict[str, Any]:
    """``"alpha=0.3,partition_by=label"`` as ``{"alpha": 0.3, "partition_by": "label"}``:
    each value an int, float, true/false, none or else a string; a malformed pair is a
    `UserError` naming the setting ``name``."""
    out: dict[str, Any] = {}
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        key, eq, value = (s.strip() for s in pair.partition("="))
        if not (eq and key.isidentifier()):
            raise UserError(f"{name}: expected key=value pairs separated by commas, got {pair!r}")
        if key in out:
            raise UserError(f"{name}: {key!r} given twice")
        out[key] = scalar(value)
    return out


def scalar(text: str) -> Any:
    """A command-line value as the type it spells: int, float, bool, None or str."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_args(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a TOML table) as partitioner arguments: string keys, each value a
    number, bool, string or a list of them; anything else is a `UserError`."""
    scalars = (int, float, bool, str)
    out: dict[str, Any] = {}
    for key, value in values.items():
        plain = isinstance(value, scalars) or (
            isinstance(value, list) and all(isinstance(v, scalars) for v in value)
        )
        if not (isinstance(key, str) and key.isidentifier() and plain):
            raise UserError(f"{name}: {key!r} = {value!r} is not a number, string or list")
        out[key] = value
    return out
