"""`fedftg.run`: the Python API over the engine of ``fedftg run``, with your own model and data.

``fedftg.run(method="fedavg,fedftg", rounds=10, alpha=0.3, model=MyNet, dataset=(x_train,
y_train, x_test, y_test), out="runs/mine")`` takes every setting by its TOML or flag name
(``ftg_gen_lr=...``, or a section as a mapping: ``ftg={"gen_lr": ...}``), validated by the
same pipeline (`fedftg.config.settings_from`), so a bad one raises the same one-line
`UserError`; then runs `fedftg.engine.run.run_experiment`, which writes the same run
directory and resumes it the same way.

Python objects get an identifier for config.json, part of the settings a rerun must match
(`model_name`, `dataset_name`): an importable top-level class or function its import path
(``mypkg.nets:MyNet``, which ``fedftg run --model`` takes too); anything else a name
registered in this process: ``python:<qualname>`` for a model, ``arrays:<12 hex digits of
the data's sha256>`` for data, so a rerun with other arrays does not resume silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedftg.config import RunConfig, Source, file_source, settings_from
from fedftg.data.arrays import arrays_digest
from fedftg.data.sources import DATASETS, DatasetSpec, dataset_from
from fedftg.engine.loop import DEFAULTS
from fedftg.engine.run import run_experiment
from fedftg.engine.rundir import Hints
from fedftg.errors import UserError
from fedftg.models import MODELS, ModelSpec, keyword_factory
from fedftg.report.report import metrics_rows
from fedftg.tables import import_path_of
from fedftg.threads import apply_threads, other_running, plan_threads, usable_cores

API_HINTS = Hints(fresh="fresh=True", out="another out", resume="resume=True")
# python:<qualname> -> the object registered under it in this process (`model_name`)
_FROM_PYTHON: dict[str, object] = {}


@dataclass(frozen=True)
class RunResult:
    """What a run left in its directory ``out``: ``metrics`` (metrics.jsonl's rows, one
    dict per method and round), ``summary`` (summary.json) and ``config`` (config.json,
    the resolved settings with the identifiers of the model and data)."""

    out: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]

    def final_acc(self, method: str) -> float | None:
        """The final test accuracy of ``method`` (as named in the run: ``fedftg``)."""
        return self.summary["methods"][method].get("final_acc")

    @classmethod
    def read(cls, out: str | Path) -> RunResult:
        """The result of the run directory ``out`` (a finished run's)."""
        path = Path(out)
        return cls(
            out=path,
            metrics=metrics_rows(path / "metrics.jsonl"),
            summary=json.loads((path / "summary.json").read_text()),
            config=json.loads((path / "config.json").read_text()),
        )


def run(
    *,
    model: Any = None,
    dataset: Any = None,
    num_classes: int | None = None,
    config: str | Path | None = None,
    preset: str | None = None,
    resume: bool = DEFAULTS.resume,
    fresh: bool = DEFAULTS.fresh,
    keep_checkpoint: bool = DEFAULTS.keep_checkpoint,
    verbosity: int = 0,
    progress: bool = False,
    on_divergence: str = DEFAULTS.on_divergence,
    **settings: Any,
) -> RunResult:
    """Run the methods of the given settings as ``fedftg run`` does; return its result.

    ``settings``: any run setting by name (``rounds=10``, ``method="fedavg,fedftg"``,
    ``ftg_gen_lr=1e-3`` or ``ftg={"gen_lr": 1e-3}``, ``out="runs/mine"``), over a TOML
    ``config`` file or a ``preset`` (one without groups). ``model``: a registered name, an
    import path, an ``nn.Module`` subclass or a factory (`model_name`). ``dataset``: a
    registered name, an import path, arrays or tensors ``(x_train, y_train, x_test,
    y_test)``, a ``(train, test)`` pair of torch Datasets or a fedftg ``Dataset``
    (`dataset_name`; ``num_classes``: the class count of arrays, else the largest label +
    1). ``partition``: a scheme's name or a ``flwr_datasets`` partitioner object
    (`partition_name`). ``resume``, ``fresh``, ``keep_checkpoint``, ``on_divergence`` as
    in ``fedftg run``; ``verbosity`` 0 prints nothing, 1 the results table, 2 also a line per round.
    Bad input raises `fedftg.UserError` before anything is written.
    """
    values = dict(settings)
    if model is not None:
        values["model"] = model_name(model)
    if dataset is not None:
        values["dataset"] = dataset_name(dataset, num_classes)
    elif num_classes is not None:
        raise UserError("num_classes: only for a dataset given as arrays or tensors")
    if not isinstance(values.get("partition", ""), str):
        values["partition"] = partition_name(values["partition"])
    cfg = _config(values, config, preset)
    apply_threads(plan_threads(usable_cores(), 1, cfg.threads, os.environ, other_running()))
    opened: list[Path] = []
    run_experiment(
        cfg,
        progress=progress,
        resume=resume,
        fresh=fresh,
        keep_checkpoint=keep_checkpoint,
        verbosity=verbosity,
        on_divergence=on_divergence,
        hints=API_HINTS,
        opened=opened.append,
    )
    return RunResult.read(opened[0])


def _config(values: dict[str, Any], config: str | Path | None, preset: str | None) -> RunConfig:
    """The run's settings: ``values`` over the TOML file ``config`` or the ``preset``."""
    if preset is None:
        return settings_from([*([file_source(config)] if config else []), Source(values)])
    if config is not None:
        raise UserError("preset: give a preset or a config file, not both")
    from fedftg.presets import load_preset, preset_runs

    out = values.pop("out", None)
    runs = preset_runs(load_preset(preset), values, out)
    if len(runs) != 1:
        groups = ", ".join(group for group, _ in runs)
        raise UserError(
            f"preset: {preset} has {len(runs)} groups ({groups}); run them with "
            "fedftg run --preset, or pass their settings here"
        )
    return runs[0][1]


def partition_name(partitioner: Any) -> str:
    """The ``partition`` setting for a built ``flwr_datasets`` partitioner: its scheme
    ``python:<Class>-<digest of its attributes>``, registered in this process, so an equal
    object resumes the run and one with other arguments is another run
    (`fedftg.data.flwr_partition.register_partitioner`)."""
    from fedftg.data.flwr_partition import register_partitioner

    return register_partitioner(partitioner)


def model_name(model: Any) -> str:
    """The ``model`` setting for ``model``: a string as it is; an ``nn.Module`` subclass
    or factory by its import path, else registered in this process as ``python:<qualname>``
    (a later object of that name replaces it)."""
    if isinstance(model, str):
        return model
    if not callable(model) or hasattr(model, "state_dict") and not isinstance(model, type):
        raise UserError(
            f"model: expected a registered name, an import path, an nn.Module subclass or a "
            f"factory; got a {type(model).__name__} (pass the class, not an instance)"
        )
    path = import_path_of(model)
    if path is not None:
        return path
    name = "python:" + getattr(model, "__qualname__", type(model).__name__).replace(" ", "")
    if name not in MODELS or _FROM_PYTHON.get(name) is not model:
        MODELS.add(name, ModelSpec(name, keyword_factory(model, name), "from Python"), replace=True)
        _FROM_PYTHON[name] = model
    return name


def dataset_name(dataset: Any, num_classes: int | None = None) -> str:
    """The ``dataset`` setting for ``dataset``: a string as it is; data (any form
    `fedftg.data.sources.dataset_from` takes) checked, converted and registered in this
    process as ``arrays:<12 hex digits of its sha256>``."""
    if isinstance(dataset, str):
        if num_classes is not None:
            raise UserError("num_classes: only for a dataset given as arrays or tensors")
        return dataset
    ds = dataset_from(dataset, "arrays", num_classes)
    arrays = (ds.train_x, ds.train_y, ds.test_x, ds.test_y)
    name = f"arrays:{arrays_digest(arrays, ds.num_classes)[:12]}"
    ds = dataclasses.replace(ds, name=name)
    spec = DatasetSpec(
        name,
        lambda root, download: ds,
        num_classes=ds.num_classes,
        channels=ds.channels,
        image_size=ds.image_size,
        note="from Python",
    )
    DATASETS.add(name, spec, replace=True)
    return name


__all__ = ["RunResult", "dataset_name", "model_name", "run"]
