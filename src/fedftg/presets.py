"""Presets: experiment protocols shipped as TOML files (``fedftg/presets/<name>.toml``).

A preset is a config file (the same keys and sections as ``--config``) with a one-line
``description``, optionally ``extends = "<preset>"`` (its settings first, this file's on top)
and ``[groups.<name>]`` tables. A protocol can give methods different data settings (the
FedFTG authors' scripts run FedProx and SCAFFOLD at another Dirichlet alpha than the rest),
and the methods of one run share one partition, so each group is one run: the shared
settings, then the group's (with its ``method`` list). Flags override every group; a
``--method`` list picks methods of the preset, each run in its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedftg.config import RunConfig, Source, finish, layered, load_config_file
from fedftg.errors import UserError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
_META = ("description", "extends", "groups")


@dataclass(frozen=True)
class Preset:
    """A loaded preset: its shared settings (TOML shape) and its groups (name -> settings)."""

    name: str
    description: str
    settings: dict[str, Any]
    groups: dict[str, dict[str, Any]]


def available() -> dict[str, str]:
    """The shipped presets: name -> one-line description."""
    return {p.stem: load_preset(p.stem).description for p in sorted(PRESET_DIR.glob("*.toml"))}


def _path(name_or_path: str) -> Path:
    shipped = PRESET_DIR / f"{name_or_path}.toml"
    if shipped.exists():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        return path
    known = ", ".join(p.stem for p in sorted(PRESET_DIR.glob("*.toml")))
    raise UserError(
        f"preset: unknown preset {name_or_path!r}; use one of {known} (or a .toml path)"
    )


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section tables merged key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_preset(name_or_path: str, _seen: tuple[str, ...] = ()) -> Preset:
    """A shipped preset by name, or a preset file by path; problems are `UserError`s."""
    path = _path(name_or_path)
    values = load_config_file(path)
    name = path.stem
    if name in _seen:
        raise UserError(f"{path}: extends itself ({' -> '.join([*_seen, name])})")
    description = values.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{path}: description: expected a string")
    settings = {k: v for k, v in values.items() if k not in _META}
    groups = values.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise UserError(f"{path}: groups: expected [groups.<name>] tables of settings")
    if "extends" in values:
        parent = load_preset(str(values["extends"]), (*_seen, name))
        settings = _merge(parent.settings, settings)
        groups = {
            **parent.groups,
            **{g: _merge(parent.groups.get(g, {}), v) for g, v in groups.items()},
        }
    preset = Preset(name, description, settings, dict(groups))
    preset_runs(preset, {})  # every group must make a valid run
    return preset


def preset_runs(
    preset: Preset, overrides: dict[str, Any], out: str | None = None
) -> list[tuple[str, RunConfig]]:
    """(group, validated config) of every run of ``preset`` with ``overrides`` (flags, TOML
    shape) on top. With several groups each run goes to ``<out>/<group>`` (``out`` defaults
    to runs/<preset>); a ``method`` override keeps only those methods, each in its group."""
    where = f"preset {preset.name}: "
    groups = preset.groups or {"": {}}
    wanted = overrides.get("method")
    if isinstance(wanted, str):
        wanted = [m.strip() for m in wanted.split(",") if m.strip()]
    rest = {k: v for k, v in overrides.items() if k != "method"}
    runs: list[tuple[str, RunConfig, list[str]]] = []
    for group, values in groups.items():
        cfg, given = layered(
            [
                Source(preset.settings, where, given=False),
                Source(values, f"{where}groups.{group}: ", given=False),
                Source(rest),
            ]
        )
        if wanted is not None:
            cfg.method = [m for m in cfg.method if m in wanted]
            if not cfg.method:
                continue
        cfg.preset = f"{preset.name}/{group}" if group else preset.name
        if len(groups) > 1:
            cfg.out = str(Path(out or f"runs/{preset.name}") / group)
        elif out is not None:
            cfg.out = out
        runs.append((group, cfg.validate(), given))
    if wanted is not None:
        have = {m for values in groups.values() for m in values.get("method", [])}
        have |= set(preset.settings.get("method", []))
        missing = [m for m in wanted if m not in have]
        if missing:
            raise UserError(
                f"method: {', '.join(missing)} not in preset {preset.name} "
                f"(its methods: {', '.join(sorted(have))})"
            )
    # a flag may set a method's setting for a run of another group
    methods = sorted({m for _, cfg, _ in runs for m in cfg.method})
    return [(g, finish(cfg, given, methods)) for g, cfg, given in runs]
