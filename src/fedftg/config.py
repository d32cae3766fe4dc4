"""Run configuration: the one place for defaults, with TOML files, overrides and validation.

A run is described by a flat `RunConfig`; server plug-in knobs live in the nested
`FTGConfig` / `FedDFConfig` sections (`[ftg]` and `[df]` tables in TOML, `--ftg-*` and
`--df-*` flags on the command line). Everything is validated once, in `validate`, and every
problem becomes a `UserError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedftg.errors import UserError
from fedftg.methods.client import SCAFFOLD_REFERENCES, SCAFFOLD_VARIATE_LRS
from fedftg.methods.feddf import FedDFConfig
from fedftg.methods.ftg import FTGConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DATASETS = ("digits", "mnist", "fmnist", "cifar10", "cifar100", "imagefolder")
PARTITIONS = ("iid", "dirichlet", "dirichlet-label", "shards")
CLIENT_METHODS = ("fedavg", "fedprox", "scaffold", "feddyn", "moon")
PLUGINS = ("ftg", "df")
ALIASES = {"fedftg": "fedavg+ftg", "feddf": "fedavg+df"}
SELECTIONS = ("fixed", "bernoulli")
AUGMENT = ("auto", "on", "off")
CLIENT_BATCHING = ("auto", "sequential", "vmap")
PRECISIONS = ("fp32", "bf16")


def split_method(name: str) -> tuple[str, str | None]:
    """(client method, server plug-in or None) of a method name: ``fedftg`` -> (fedavg, ftg)."""
    base, _, plugin = ALIASES.get(name, name).partition("+")
    return base, plugin or None


# settings that only some methods read: whether (client method, plug-in) reads ``name``
METHOD_SETTINGS: dict[str, typing.Callable[[str, str | None], bool]] = {
    "scaffold_reference": lambda base, plugin: base == "scaffold" and plugin is not None,
    "scaffold_variate_lr": lambda base, plugin: base == "scaffold",
}


def method_specific(name: str) -> bool:
    """Whether only some methods read setting ``name``: a `METHOD_SETTINGS` entry, or a
    plug-in's section (``ftg``) or one of its settings (``ftg.gen_lr``)."""
    return name in METHOD_SETTINGS or name.partition(".")[0] in PLUGINS


def reads_setting(method: str, name: str) -> bool:
    """Whether ``method`` (a method name, aliases allowed) reads the `method_specific`
    setting ``name``: a plug-in's settings are read by the methods with that plug-in."""
    base, plugin = split_method(method)
    section = name.partition(".")[0]
    if section in PLUGINS:
        return plugin == section
    return METHOD_SETTINGS[name](base, plugin)


def unused_settings(methods: list[str]) -> set[str]:
    """The `METHOD_SETTINGS` that none of ``methods`` reads."""
    return {k for k in METHOD_SETTINGS if not any(reads_setting(m, k) for m in methods)}


@dataclass
class RunConfig:
    """Everything that defines one experiment (all methods in it share data, split and init)."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = True
    # federation
    clients: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.1
    sigma: float = 0.0
    shards_per_client: int = 2
    min_size: int = 10
    samples_per_client: int | None = None
    participation: float = 0.5
    selection: str = "fixed"
    rounds: int = 30
    # model and local training
    model: str = "cnn"
    local_epochs: int = 2
    local_steps: int | None = None
    batch_size: int = 50
    lr: float = 0.1
    lr_decay: float = 0.998
    weight_decay: float = 1e-3
    momentum: float = 0.0
    clip: float = 10.0
    augment: str = "auto"
    # methods
    method: list[str] = field(default_factory=lambda: ["fedavg", "fedavg+ftg"])
    prox_mu: float = 0.01
    scaffold_server_lr: float = 1.0
    scaffold_reference: str = "aggregate"
    scaffold_variate_lr: str = "round"
    feddyn_alpha: float = 0.01
    moon_mu: float = 1.0
    moon_tau: float = 0.5
    histogram_epsilon: float = 0.0
    # evaluation and bookkeeping
    eval_every: int = 1
    eval_batch_size: int = 1000
    eval_ensemble: bool = False
    seed: int = 0
    device: str = "cpu"
    client_batching: str = "auto"
    precision: str = "fp32"
    out: str = "runs/latest"
    checkpoint_every: int = 1
    # server plug-ins
    ftg: FTGConfig = field(default_factory=FTGConfig)
    df: FedDFConfig = field(default_factory=FedDFConfig)

    def methods(self) -> list[tuple[str, str, str | None]]:
        """(display name, client method, plug-in or None) for each requested method."""
        return [(raw, *split_method(raw)) for raw in self.method]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fully resolved config."""
        return dataclasses.asdict(self)

    def validate(self) -> RunConfig:
        """Check every field; raise `UserError` naming the first bad one. Returns self."""
        _choice("dataset", self.dataset, DATASETS)
        _choice("partition", self.partition, PARTITIONS)
        _choice("selection", self.selection, SELECTIONS)
        _choice("augment", self.augment, AUGMENT)
        _choice("client_batching", self.client_batching, CLIENT_BATCHING)
        _choice("precision", self.precision, PRECISIONS)
        _choice("scaffold_reference", self.scaffold_reference, SCAFFOLD_REFERENCES)
        _choice("scaffold_variate_lr", self.scaffold_variate_lr, SCAFFOLD_VARIATE_LRS)
        if self.dataset == "imagefolder" and not self.data_dir:
            raise UserError("data_dir: the imagefolder dataset needs --data-dir (a folder or .zip)")
        _positive_int("clients", self.clients)
        _positive_int("rounds", self.rounds)
        _positive_int("local_epochs", self.local_epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_every", self.eval_every)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("shards_per_client", self.shards_per_client)
        if isinstance(self.checkpoint_every, bool) or self.checkpoint_every < 0:
            raise UserError(
                f"checkpoint_every: must be >= 0 (0 = off), got {self.checkpoint_every}"
            )
        if self.local_steps is not None:
            _positive_int("local_steps", self.local_steps)
        if self.samples_per_client is not None:
            _positive_int("samples_per_client", self.samples_per_client)
        if self.min_size < 0:
            raise UserError(f"min_size: must be >= 0, got {self.min_size}")
        if not (_finite(self.alpha) and self.alpha > 0):
            raise UserError(f"alpha: must be a finite number > 0, got {self.alpha}")
        if not (_finite(self.sigma) and self.sigma >= 0):
            raise UserError(f"sigma: must be >= 0, got {self.sigma}")
        if not (_finite(self.participation) and 0 < self.participation <= 1):
            raise UserError(f"participation: must be in (0, 1], got {self.participation}")
        for name in ("lr", "lr_decay"):
            value = getattr(self, name)
            if not (_finite(value) and value > 0):
                raise UserError(f"{name}: must be a finite number > 0, got {value}")
        for name in (
            "weight_decay",
            "momentum",
            "clip",
            "prox_mu",
            "feddyn_alpha",
            "moon_mu",
            "histogram_epsilon",
        ):
            value = getattr(self, name)
            if not (_finite(value) and value >= 0):
                raise UserError(f"{name}: must be a finite number >= 0, got {value}")
        if self.momentum >= 1:
            raise UserError(f"momentum: must be < 1, got {self.momentum}")
        if not (_finite(self.moon_tau) and self.moon_tau > 0):
            raise UserError(f"moon_tau: must be > 0, got {self.moon_tau}")
        if not (_finite(self.scaffold_server_lr) and self.scaffold_server_lr > 0):
            raise UserError(f"scaffold_server_lr: must be > 0, got {self.scaffold_server_lr}")
        if self.feddyn_alpha == 0 and any(b == "feddyn" for _, b, _ in self.methods()):
            raise UserError("feddyn_alpha: must be > 0 for feddyn")
        if not self.method:
            raise UserError("method: give at least one method")
        if len(set(self.method)) != len(self.method):
            raise UserError(f"method: listed twice in {','.join(self.method)}")
        for raw, base, plugin in self.methods():
            if base not in CLIENT_METHODS or (plugin is not None and plugin not in PLUGINS):
                valid = ", ".join(CLIENT_METHODS)
                raise UserError(
                    f"method: unknown method {raw!r}; use one of {valid}, optionally with "
                    f"'+ftg' or '+df' (aliases: {', '.join(ALIASES)})"
                )
        if not self.device or not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise UserError(f"device: expected cpu, cuda, cuda:N or mps, got {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed: must be an integer >= 0, got {self.seed!r}")
        _wrap("ftg", self.ftg.validate)
        _wrap("df", self.df.validate)
        return self


def _wrap(section: str, check: Any) -> None:
    try:
        check()
    except UserError as exc:
        raise UserError(f"{section}.{exc}") from None


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"{name}: unknown value {value!r}; use one of {', '.join(valid)}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}: must be an integer >= 1, got {value!r}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------
# Building a config from a file and overrides


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(name: str, kind: Any, value: Any) -> Any:
    """Convert ``value`` (from TOML or a command-line string) to the field's type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(name, args[0], value)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{name}: expected a list, got {value!r}")
        return [coerce(name, item, v) for v in value]
    if origin is tuple:
        items = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise UserError(f"{name}: expected {len(items)} comma-separated values, got {value!r}")
        return tuple(coerce(name, t, v) for t, v in zip(items, value, strict=True))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise UserError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise UserError(f"{name}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise UserError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise UserError(f"{name}: unsupported value {value!r}")  # pragma: no cover


SECTIONS: dict[str, type] = {"ftg": FTGConfig, "df": FedDFConfig}


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys to sections: ``{"ftg.gen_lr": v}`` -> ``{"ftg": {"gen_lr": v}}`` (TOML shape)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, name = key.partition(".")
        if dot:
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def section_key(key: str) -> str:
    """A setting's canonical name: ``ftg-gen-lr``, ``ftg_gen_lr`` and ``ftg.gen_lr`` all
    name FedFTG's generator learning rate (the CLI flag, its underscore form, the TOML path).
    """
    norm = key.strip().replace("-", "_")
    if "." in norm or norm in _field_types(RunConfig):
        return norm
    for section, cls in SECTIONS.items():
        name = norm.removeprefix(section + "_")
        if name != norm and name in _field_types(cls):
            return f"{section}.{name}"
    return norm


def flatten_sections(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `nest_dotted`: ``{"ftg": {"gen_lr": v}}`` -> ``{"ftg.gen_lr": v}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            out[key] = value
    return out


def apply_overrides(cfg: RunConfig, values: dict[str, Any], where: str = "") -> RunConfig:
    """Set fields of ``cfg`` from a nested dict (TOML shape); unknown keys are errors."""
    top = _field_types(RunConfig)
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"{where}{norm}: expected a table of settings")
            section = getattr(cfg, norm)
            kinds = _field_types(SECTIONS[norm])
            for sub, sub_value in value.items():
                sub_norm = sub.replace("-", "_")
                if sub_norm not in kinds:
                    raise UserError(f"{where}{norm}.{sub}: unknown setting")
                label = f"{norm}.{sub_norm}"
                setattr(section, sub_norm, coerce(label, kinds[sub_norm], sub_value))
        elif norm in top:
            setattr(cfg, norm, coerce(norm, top[norm], value))
        else:
            raise UserError(f"{where}{key}: unknown setting")
    return cfg


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a dict; unreadable or invalid files are `UserError`s."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UserError(f"{p}: cannot read config file ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: invalid TOML ({exc})") from None


def build_config(
    file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Defaults, then the TOML file, then overrides; validated."""
    cfg = RunConfig()
    if file is not None:
        apply_overrides(cfg, load_config_file(file), where=f"{file}: ")
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg.validate()


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a validated config from `RunConfig.to_dict` output (e.g. a saved config.json)."""
    return apply_overrides(RunConfig(), values).validate()
