"""Run configuration: the one place for defaults, with TOML files, overrides and validation.

A `RunConfig` holds the settings every method of a run shares (data, federation, local
training, bookkeeping) as fields, and one section per client method or server plug-in that
has settings of its own (`fedftg.registry.sections`): ``cfg.fedprox.mu``,
``cfg.ftg.iterations``. In TOML they are ``[fedprox]`` / ``[ftg]`` tables, on the command line
``--fedprox-mu`` / ``--ftg-iterations``, in Flower's run config ``fedprox-mu``. The names
settings had before they moved into sections (``prox_mu``, ``--prox-mu``) keep working
(`fedftg.legacy` holds every format kept for older versions).

Every setting is declared with its help, check and history (`fedftg.settings`); from those
come validation (one `UserError` naming the field), the CLI flags and the run fingerprint
(`fingerprint`), which stays the same for run directories written before a setting existed.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedftg import registry
from fedftg.data.flwr_partition import check_args, parse_args
from fedftg.data.partition import SCHEMES, scheme_settings
from fedftg.data.sources import DATASETS, dataset_classes
from fedftg.errors import UserError
from fedftg.legacy import digest, fill_before, flat_names
from fedftg.models import MODELS
from fedftg.settings import (
    MISSING,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Check,
    Meta,
    Settings,
    at_least,
    below,
    between,
    check_value,
    fields,
    setting,
    validate_section,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

AUGMENT = ("auto", "on", "off")
CLIENT_BATCHING = ("auto", "sequential", "vmap")
PRECISIONS = ("fp32", "bf16")
SELECTIONS = ("fixed", "bernoulli")  # client selection modes of `select_clients`
# keys a saved config.json holds beside the settings
RECORD_KEYS = ("environment", "engine")

_DEVICE = Check(
    lambda v: isinstance(v, str) and (v == "cpu" or v.startswith(("cuda", "mps"))),
    "cpu, cuda, cuda:N or mps",
)


def method_help() -> str:
    alias_text = ", ".join(f"{a} = {full}" for a, full in registry.aliases().items())
    return (
        f"comma list: {', '.join(registry.methods())}, each optionally "
        f"{' or '.join('+' + p for p in registry.plugins())}; {alias_text}"
    )


def _default_sections() -> dict[str, Settings]:
    return {name: cls() for name, cls in registry.sections().items()}


@dataclass
class RunConfig:
    """Everything that defines one experiment (all methods in it share data, split and init).

    Sections are reached as attributes: ``cfg.ftg`` is ``cfg.sections["ftg"]``.
    """

    # data
    dataset: str = setting("digits", DATASETS.help_text, choices=DATASETS.choices)
    data_dir: str | None = setting(
        None,
        "folder with the dataset files (default $FEDFTG_DATA or ~/.cache/fedftg/data)",
        pooled=True,
    )
    download: bool = setting(True, "download missing dataset files (when online)")
    # federation
    clients: int = setting(10, "number of clients", check=POSITIVE_INT)
    partition: str = setting("dirichlet", SCHEMES.help_text, choices=SCHEMES.choices)
    partition_args: dict[str, Any] = setting(
        default_factory=dict,
        help="arguments of a flwr:<Partitioner> scheme: key=value,... (TOML: a table)",
        before={},
    )
    alpha: float = setting(0.1, "Dirichlet concentration (smaller = more non-IID)", check=POSITIVE)
    sigma: float = setting(0.0, "lognormal quantity skew (0 = balanced)", check=NON_NEGATIVE)
    shards_per_client: int = setting(2, "shards per client (shards)", check=POSITIVE_INT)
    min_size: int = setting(
        10, "least samples per client (dirichlet-label)", check=at_least(0, integer=True)
    )
    samples_per_client: int | None = setting(
        None,
        "samples per client (default: the whole training set, split)",
        check=POSITIVE_INT,
        optional=True,
    )
    participation: float = setting(0.5, "fraction of clients per round (0, 1]", check=between(0, 1))
    selection: str = setting(
        "fixed",
        "fixed: exactly round(participation*N); bernoulli: each client independently",
        choices=SELECTIONS,
    )
    rounds: int = setting(30, "communication rounds", check=POSITIVE_INT)
    # model and local training
    model: str = setting("cnn", MODELS.help_text, choices=MODELS.choices)
    local_epochs: int = setting(2, "local epochs per round", check=POSITIVE_INT)
    local_steps: int | None = setting(
        None,
        "fixed number of local steps (overrides --local-epochs)",
        check=POSITIVE_INT,
        optional=True,
    )
    batch_size: int = setting(50, "local batch size", check=POSITIVE_INT)
    lr: float = setting(
        0.1, "local SGD learning rate (round t uses lr * lr_decay**t)", check=POSITIVE
    )
    lr_decay: float = setting(0.998, "per-round learning-rate decay", check=POSITIVE)
    weight_decay: float = setting(1e-3, "local weight decay", check=NON_NEGATIVE)
    momentum: float = setting(0.0, "local SGD momentum", check=below(1))
    clip: float = setting(10.0, "gradient-norm clipping (0 = off)", check=NON_NEGATIVE)
    augment: str = setting("auto", "auto (flip + pad-crop for 32x32 RGB), on, off", choices=AUGMENT)
    # methods
    method: list[str] = setting(
        default_factory=lambda: ["fedavg", "fedavg+ftg"], help="(see fedftg run --help)"
    )
    histogram_epsilon: float = setting(
        0.0,
        "Laplace noise on the uploaded label histograms (0 = exact counts)",
        check=NON_NEGATIVE,
    )
    # evaluation and bookkeeping
    eval_every: int = setting(
        1, "evaluate on the full test set every k rounds (and at the last)", check=POSITIVE_INT
    )
    eval_batch_size: int = setting(
        1000, "evaluation batch size", check=POSITIVE_INT, resumable=True, pooled=True
    )
    eval_ensemble: bool = setting(
        False,
        "also record the test accuracy of the round's client models as an ensemble "
        "(ensemble_acc, class_ensemble_acc): the knowledge averaging lost",
        resumable=True,
        pooled=True,
    )
    seed: int = setting(
        0,
        "one seed for partition, initial model, selection and every batch",
        check=at_least(0, integer=True),
        pooled=True,
    )
    device: str = setting(
        "cpu", "cpu, cuda, cuda:N, mps", check=_DEVICE, resumable=True, pooled=True
    )
    threads: int | None = setting(
        None,
        "torch CPU threads (default: $OMP_NUM_THREADS, else the usable cores divided "
        "between a sweep's jobs); changes float rounding only, so not part of the run's identity",
        check=POSITIVE_INT,
        optional=True,
        resumable=True,
        pooled=True,
    )
    client_batching: str = setting(
        "auto",
        "sequential (one client after another), vmap (the round's clients in one batched "
        "step), auto (vmap on CUDA, sequential on CPU)",
        choices=CLIENT_BATCHING,
    )
    precision: str = setting(
        "fp32",
        "fp32, or bf16 autocast for local training and the server step",
        choices=PRECISIONS,
    )
    out: str = setting(
        "runs/{time}",
        "run directory for config.json, metrics.jsonl, summary.json, curves.png; {time} "
        "becomes the start time and <parent>/latest links the newest",
        resumable=True,
        pooled=True,
    )
    checkpoint_every: int = setting(
        1,
        "checkpoint every k rounds (0 = off)",
        check=at_least(0, integer=True),
        resumable=True,
        pooled=True,
    )
    preset: str | None = setting(
        None,
        "the preset (and group) the run's settings came from (set by --preset)",
        resumable=True,
        pooled=True,
        hidden=True,
    )
    # one per client method / server plug-in with settings (fedftg.registry.sections)
    sections: dict[str, Settings] = setting(default_factory=_default_sections, help="", hidden=True)

    def __post_init__(self) -> None:
        # own copies (dataclasses.replace passes the same dict), every section present
        given = self.sections
        self.sections = {
            name: copy.deepcopy(given[name]) if name in given else cls()
            for name, cls in registry.sections().items()
        }
        unknown = set(given) - set(self.sections)
        if unknown:
            raise UserError(f"{sorted(unknown)[0]}: unknown settings section")

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"RunConfig has no setting or section {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            sections[name] = value
        else:
            object.__setattr__(self, name, value)

    def methods(self) -> list[tuple[str, str, str | None]]:
        """(display name, client method, plug-in or None) for each requested method."""
        return [(raw, *registry.split_method(raw)) for raw in self.method]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fully resolved config (sections as sub-tables)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f, _ in core_fields()}
        out.update({name: dataclasses.asdict(s) for name, s in self.sections.items()})
        return out

    def resolve(self, num_classes: int | None = None) -> RunConfig:
        """Fill, in place, the settings whose default follows the data (FedFTG's nz) for
        ``num_classes`` classes, by default the dataset's as known without loading it;
        left as they are when that is unknown. Returns self."""
        if num_classes is None:
            num_classes = dataset_classes(self.dataset, self.data_dir)
        if num_classes is not None:
            for s in self.sections.values():
                s.resolve(num_classes)
        return self

    def copy(self) -> RunConfig:
        """An independent copy (sections included)."""
        return copy.deepcopy(self)

    def override(self, values: dict[str, Any]) -> RunConfig:
        """A validated copy with ``values`` set (any key form `canonical_key` accepts)."""
        return apply_overrides(self.copy(), values).validate()

    def validate(self) -> RunConfig:
        """Check every field; raise `UserError` naming the first bad one. Returns self."""
        SCHEMES.resolve(self.partition)  # a flwr:<Partitioner> is registered on first use
        for f, m in core_fields():
            check_value(f.name, getattr(self, f.name), m)
        scheme = scheme_settings(self.partition, vars(self))  # the scheme's own checks
        if self.partition_args and not hasattr(scheme, "partition_args"):
            raise UserError(
                f"partition_args: the {self.partition} scheme takes none "
                "(a flwr:<Partitioner> does)"
            )
        # an import path not imported yet needs no --data-dir (its function loads the data)
        needs = DATASETS.get(self.dataset).data_dir if self.dataset in DATASETS else ""
        if needs and not self.data_dir:
            raise UserError(f"data_dir: the {self.dataset} dataset needs --data-dir ({needs})")
        if not self.method:
            raise UserError("method: give at least one method")
        if len(set(self.method)) != len(self.method):
            raise UserError(f"method: listed twice in {','.join(self.method)}")
        for raw in self.method:
            registry.check_method(raw)
        for name, s in self.sections.items():
            validate_section(name, s)
        return self


def core_fields() -> list[tuple[dataclasses.Field, Meta]]:
    """The shared settings of `RunConfig` (every field but the sections)."""
    return [(f, m) for f, m in fields(RunConfig) if f.name != "sections"]


# ---------------------------------------------------------------------------------------
# Names of settings


def canonical_key(key: str) -> str:
    """A setting's canonical name: ``ftg-gen-lr``, ``ftg_gen_lr`` and ``ftg.gen_lr`` all
    name FedFTG's generator learning rate, ``prox-mu`` and ``fedprox-mu`` FedProx's mu (the
    CLI flag, its underscore form, the TOML path, the name from before sections)."""
    norm = key.strip().replace("-", "_")
    if "." in norm:
        section, _, name = norm.partition(".")
        return f"{section}.{name}"
    if norm in _core_types():
        return norm
    flat = flat_names()
    if norm in flat:
        return flat[norm]
    for section, cls in registry.sections().items():
        name = norm.removeprefix(section + "_")
        if name != norm and name in _field_types(cls):
            return f"{section}.{name}"
    return norm


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


def flatten_sections(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `nest_dotted`: ``{"ftg": {"gen_lr": v}}`` -> ``{"ftg.gen_lr": v}``;
    flat names from before sections (``prox_mu``) become their dotted names."""
    out: dict[str, Any] = {}
    sections = registry.sections()
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm in sections and isinstance(value, dict):
            out.update({f"{norm}.{sub.replace('-', '_')}": v for sub, v in value.items()})
        else:
            out[canonical_key(key) if norm not in _core_types() else norm] = value
    return out


def setting_meta(key: str) -> Meta | None:
    """The declaration of setting ``key`` (canonical), or None if there is none."""
    section, dot, name = key.partition(".")
    if not dot:
        return next((m for f, m in core_fields() if f.name == key), None)
    cls = registry.sections().get(section)
    if cls is None:
        return None
    return next((m for f, m in fields(cls) if f.name == name), None)


def method_specific(key: str) -> bool:
    """Whether ``key`` (canonical) is a method's or plug-in's section or one of its settings."""
    return key.partition(".")[0] in registry.sections()


def reads_setting(method: str, key: str) -> bool:
    """Whether ``method`` (aliases allowed) reads the section setting ``key``."""
    section, _, name = key.partition(".")
    return registry.reads(method, section, name or None)


# ---------------------------------------------------------------------------------------
# Building a config from a file and overrides


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _core_types() -> dict[str, Any]:
    types_ = _field_types(RunConfig)
    types_.pop("sections")
    return types_


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
    if origin is dict:  # a flwr:<Partitioner>'s arguments: "k=v,k=v" or a TOML table
        if isinstance(value, str):
            return parse_args(name, value)
        if not isinstance(value, dict):
            raise UserError(f"{name}: expected key=value pairs or a table, got {value!r}")
        return check_args(name, value)
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


def _set_section_value(cfg: RunConfig, key: str, value: Any, where: str) -> None:
    section, _, name = key.partition(".")
    if section not in cfg.sections:
        raise UserError(f"{where}{key}: unknown setting")
    kinds = _field_types(type(cfg.sections[section]))
    if name not in kinds:
        raise UserError(f"{where}{key}: unknown setting")
    setattr(cfg.sections[section], name, coerce(key, kinds[name], value))


def apply_overrides(cfg: RunConfig, values: dict[str, Any], where: str = "") -> RunConfig:
    """Set settings of ``cfg`` from a dict in TOML shape (sections as tables) or with
    flat keys in any form `canonical_key` accepts; unknown keys are errors."""
    top = _core_types()
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm in cfg.sections:
            if not isinstance(value, dict):
                raise UserError(f"{where}{norm}: expected a table of settings")
            for sub, sub_value in value.items():
                _set_section_value(cfg, f"{norm}.{sub.replace('-', '_')}", sub_value, where)
            continue
        canon = canonical_key(key)
        if "." in canon:
            _set_section_value(cfg, canon, value, where)
        elif canon in top:
            setattr(cfg, canon, coerce(canon, top[canon], value))
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


def given_keys(values: dict[str, Any]) -> list[str]:
    """The canonical names of the settings in ``values`` (TOML shape or flat)."""
    return list(flatten_sections({k: v for k, v in values.items() if k != "grid"}))


def check_given(cfg: RunConfig, keys: list[str], methods: list[str] | None = None) -> None:
    """A section setting the user set away from its default while no method of the run
    (or of ``methods``: a preset's runs together) reads it is a `UserError`
    (``--fedprox-mu 0.1 --method fedavg`` is a mistake)."""
    methods = cfg.method if methods is None else methods
    defaults = RunConfig()
    for key in keys:
        if not method_specific(key):
            continue
        section, _, name = key.partition(".")
        value = getattr(cfg.sections[section], name)
        if value == getattr(defaults.sections[section], name):
            continue
        if not any(reads_setting(m, key) for m in methods):
            raise UserError(
                f"{key}: set to {value!r}, but no method of this run reads it "
                f"(method: {','.join(methods)})"
            )


@dataclass(frozen=True)
class Source:
    """One layer of settings: ``values`` in TOML shape or flat (any name `canonical_key`
    accepts), ``where`` they come from (the prefix of their errors: ``"c.toml: "``), and
    whether they are the user's own choices (``given``), which `check_given` holds to the
    run's methods; a preset's tables and a saved config.json are not."""

    values: dict[str, Any]
    where: str = ""
    given: bool = True


def file_source(path: str | Path, values: dict[str, Any] | None = None) -> Source:
    """The TOML file ``path`` as a source (``values``: its contents, when already read)."""
    return Source(load_config_file(path) if values is None else values, f"{path}: ")


def layered(sources: list[Source], base: RunConfig | None = None) -> tuple[RunConfig, list[str]]:
    """``base`` (default: the defaults; not modified) with ``sources`` applied in order,
    each over the ones before, unvalidated; and the names of the settings the given
    sources set. The one way settings are built from their sources (`settings_from`)."""
    cfg = RunConfig() if base is None else base.copy()
    keys: list[str] = []
    for source in sources:
        apply_overrides(cfg, source.values, where=source.where)
        if source.given:
            keys += given_keys(source.values)
    return cfg, keys


def finish(cfg: RunConfig, keys: list[str], methods: list[str] | None = None) -> RunConfig:
    """A layered config made ready to run: validated, the given settings ``keys`` held to
    the run's methods (or ``methods``, `check_given`), data-dependent defaults resolved."""
    cfg.validate()
    check_given(cfg, keys, methods)
    return cfg.resolve()


def settings_from(sources: list[Source], base: RunConfig | None = None) -> RunConfig:
    """The validated config of ``sources`` over ``base`` (default: the defaults): what
    `fedftg run` (defaults, preset or TOML file, flags), `fedftg sweep` (the same, then
    each grid point) and Flower (defaults, run config) each state their sources to."""
    return finish(*layered(sources, base))


def build_config(
    file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Defaults, then the TOML file, then overrides; validated."""
    sources = [file_source(file)] if file is not None else []
    return settings_from([*sources, Source(overrides or {})])


def read_saved(values: dict[str, Any]) -> RunConfig:
    """A config from a saved dict, unvalidated: settings it lacks (it was written before
    they existed) take the value that reproduces the behaviour of that time
    (`fedftg.legacy.fill_before`), the others their defaults."""
    settings = {k: v for k, v in values.items() if k not in RECORD_KEYS}
    cfg, _ = layered([Source(settings, given=False)], fill_before(RunConfig()))
    return cfg.resolve()


def saved_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a saved config dict, flat (``ftg.gen_lr``), as `config_from_dict`
    reads them (a setting the dict lacks has its ``before`` value)."""
    return flatten_sections(read_saved(values).to_dict())


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a validated config from `RunConfig.to_dict` output (e.g. a saved config.json,
    today's or one written by an older version)."""
    return read_saved(values).validate()


def fingerprint(values: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """A hash of the settings that determine a run's numbers, from a saved or current
    config dict (`RunConfig.to_dict`), besides the settings named in ``ignore``.

    Counted: the shared settings that cannot change on resume (not ``resumable``) and the
    section settings a method of the run reads. A saved dict is read as `config_from_dict`
    reads it (a setting it lacks has its ``before`` value), so a run written before a
    setting existed matches a new run exactly when the new run keeps the old behaviour.
    """
    cfg = read_saved(values)
    kept: dict[str, Any] = {}
    for f, m in core_fields():
        value = getattr(cfg, f.name)
        if m.before is not MISSING and value == m.before:
            continue  # added later, at the value that behaves as before it existed
        if not (m.resumable or f.name in ignore):
            kept[f.name] = value
    for section, s in cfg.sections.items():
        for f, _ in fields(s):
            key = f"{section}.{f.name}"
            if key not in ignore and any(reads_setting(meth, key) for meth in cfg.method):
                kept[key] = getattr(s, f.name)
    return digest(kept)


def differing_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The canonical names of the fingerprinted settings whose values differ between two
    config dicts (for a message that says what changed)."""
    ca, cb = read_saved(a), read_saved(b)
    flat_a, flat_b = flatten_sections(ca.to_dict()), flatten_sections(cb.to_dict())
    out = []
    for key, value in flat_a.items():
        m = setting_meta(key)
        if m is None or m.resumable or value == flat_b.get(key):
            continue
        if method_specific(key) and not any(
            reads_setting(meth, key) for meth in {*ca.method, *cb.method}
        ):
            continue
        out.append(key)
    return out


__all__ = [
    "AUGMENT",
    "CLIENT_BATCHING",
    "DATASETS",
    "PRECISIONS",
    "RunConfig",
    "Source",
    "apply_overrides",
    "build_config",
    "canonical_key",
    "check_given",
    "config_from_dict",
    "fingerprint",
    "layered",
    "load_config_file",
    "settings_from",
]
