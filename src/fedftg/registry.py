"""The registries of client methods and server plug-ins.

A client method is a torch-free spec module under ``fedftg/methods/specs/`` that defines
a module-level ``METHOD = MethodSpec(...)``; a server plug-in one under
``fedftg/plugins/specs/`` with ``PLUGIN = PluginSpec(...)`` (`fedftg.fl.specs`): its name,
a one-line summary, its settings dataclass (a `fedftg.settings.Settings`; its section in
the config is the spec's name) and its factories, which import the implementation
(``fedftg/methods/<name>.py`` or ``fedftg/plugins/<name>.py``) when called.
Everything else is derived from here: the method names `fedftg run` accepts, the config
sections, flags and Flower run-config keys, the help text, the report labels and which
settings a run's fingerprint counts.

Method names: a client method, optionally ``+`` a plug-in (``scaffold+ftg``); a plug-in may
declare a shorthand for itself on FedAvg (``fedftg`` = ``fedavg+ftg``).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from fedftg.errors import UserError
from fedftg.fl.specs import MethodSpec, PluginSpec
from fedftg.settings import Settings, fields

__all__ = ["MethodSpec", "PluginSpec"]  # re-exported: what a spec module builds

_METHODS: dict[str, MethodSpec] = {}
_PLUGINS: dict[str, PluginSpec] = {}


def _discover() -> None:
    """Import every module of `fedftg.methods.specs` and `fedftg.plugins.specs` once and
    collect their specs."""
    if _METHODS or _PLUGINS:
        return
    import fedftg.methods.specs as method_specs
    import fedftg.plugins.specs as plugin_specs

    found_methods: list[MethodSpec] = []
    found_plugins: list[PluginSpec] = []
    for package in (method_specs, plugin_specs):
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            if isinstance(getattr(module, "METHOD", None), MethodSpec):
                found_methods.append(module.METHOD)
            if isinstance(getattr(module, "PLUGIN", None), PluginSpec):
                found_plugins.append(module.PLUGIN)
    seen: set[str] = set()
    taken = [{m.name} for m in found_methods]  # each spec's names: a plug-in's alias too
    taken += [{p.name} | ({p.alias} if p.alias else set()) for p in found_plugins]
    for names in taken:
        clash = names & seen
        if clash or any("+" in n or "." in n for n in names):
            raise RuntimeError(f"method/plug-in name {sorted(clash or names)} is taken or invalid")
        seen |= names
    for m in sorted(found_methods, key=lambda s: (s.order, s.name)):
        _METHODS[m.name] = m
    for p in sorted(found_plugins, key=lambda s: (s.order, s.name)):
        _PLUGINS[p.name] = p


def methods() -> dict[str, MethodSpec]:
    """The client methods by name, in display order (FedAvg first)."""
    _discover()
    return dict(_METHODS)


def plugins() -> dict[str, PluginSpec]:
    """The server plug-ins by name, in display order."""
    _discover()
    return dict(_PLUGINS)


def aliases() -> dict[str, str]:
    """Shorthands: ``{"fedftg": "fedavg+ftg", ...}``."""
    return {p.alias: f"fedavg+{p.name}" for p in plugins().values() if p.alias}


def method(name: str) -> MethodSpec:
    return methods()[name]


def plugin(name: str) -> PluginSpec:
    return plugins()[name]


def split_method(name: str) -> tuple[str, str | None]:
    """(client method, plug-in or None) of a method name: ``fedftg`` -> (fedavg, ftg)."""
    base, _, plug = aliases().get(name, name).partition("+")
    return base, plug or None


def check_method(name: str) -> tuple[str, str | None]:
    """`split_method`, raising `UserError` for an unknown client method or plug-in."""
    base, plug = split_method(name)
    if base not in methods() or (plug is not None and plug not in plugins()):
        alias_text = ", ".join(f"{a} = {full}" for a, full in aliases().items())
        raise UserError(
            f"method: unknown method {name!r}; use one of {', '.join(methods())}, optionally "
            f"with {', '.join('+' + p for p in plugins())} (aliases: {alias_text})"
        )
    return base, plug


def sections() -> dict[str, type[Settings]]:
    """Config sections: the settings class of every method that has one, then every plug-in."""
    out: dict[str, type[Settings]] = {
        name: spec.settings for name, spec in methods().items() if spec.settings is not None
    }
    out.update({name: spec.settings for name, spec in plugins().items()})
    return out


def section_summary(section: str) -> str:
    spec: Any = methods().get(section) or plugins()[section]
    return spec.summary


def reads(method_name: str, section: str, field: str | None = None) -> bool:
    """Whether the method ``method_name`` (aliases allowed) reads settings section
    ``section`` (or that section's setting ``field``): a method's own section is read by
    the methods with that client method, a plug-in's by the methods with that plug-in,
    narrowed by a setting's declared ``reads``."""
    base, plug = split_method(method_name)
    if section in plugins():
        used = plug == section
    else:
        used = base == section
    if not used or field is None:
        return used
    cls = sections()[section]
    for f, m in fields(cls):
        if f.name == field:
            return m.reads is None or m.reads(base, plug)
    return False


def plugin_with_samples(name: str | None) -> bool:
    """Whether plug-in ``name`` declares generated sample images."""
    return name is not None and plugins()[name].samples
