"""Declared settings: a dataclass field carries its help text, its check and its history.

A method's or plug-in's settings are one dataclass of `setting(...)` fields. From the
declarations come the validation (one `UserError` naming the field), the command-line help,
and what the run fingerprint needs to stay stable as settings are added:

- ``before``: for a setting added after run directories were first written, the value that
  reproduces the behaviour from before it existed. A saved config without the setting reads
  it as this value, and at this value it is left out of the fingerprint, so older runs keep
  resuming and older sweeps keep skipping their finished points.
- ``legacy_key``: the flat top-level name the setting had before settings moved into
  per-method sections (``prox_mu`` for ``fedprox.mu``); still accepted as a flag, a TOML key
  and a Flower run-config key, and the name it is fingerprinted under.
- ``always_hashed``: the settings of the first run directories were fingerprinted whether
  or not a method of the run read them; they stay so. Every later setting counts only for
  runs with a method that reads it.
- ``reads``: which methods of a section read the setting, where not all of them do
  (SCAFFOLD's reference model matters only with a server plug-in).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fedftg.errors import UserError


class _Missing:
    """The marker of "no value declared" (``before``)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Check:
    """A validity test and the phrase an error uses for it (``must be <what>``)."""

    ok: Callable[[Any], bool]
    what: str

    def __call__(self, value: Any) -> bool:
        if isinstance(value, bool):  # True is an int to Python, never a number here
            return False
        try:
            return bool(self.ok(value))
        except TypeError:
            return False


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def at_least(low: float, *, integer: bool = False) -> Check:
    """``value >= low``: an integer, or a finite number."""
    if integer:
        return Check(lambda v: isinstance(v, int) and v >= low, f"an integer >= {low:g}")
    return Check(lambda v: _finite(v) and v >= low, f"a finite number >= {low:g}")


def above(low: float) -> Check:
    """``value > low``, a finite number."""
    return Check(lambda v: _finite(v) and v > low, f"a finite number > {low:g}")


def between(low: float, high: float, *, low_open: bool = True) -> Check:
    """``low < value <= high`` (``low <= value`` with ``low_open=False``)."""
    left = "(" if low_open else "["

    def ok(v: Any) -> bool:
        return _finite(v) and (v > low if low_open else v >= low) and v <= high

    return Check(ok, f"in {left}{low:g}, {high:g}]")


def below(high: float) -> Check:
    """``0 <= value < high``."""
    return Check(lambda v: _finite(v) and 0 <= v < high, f"in [0, {high:g})")


POSITIVE_INT = at_least(1, integer=True)
NON_NEGATIVE = at_least(0)
POSITIVE = above(0)

Reads = Callable[[str, "str | None"], bool]
# a help text or a list of choices, or a function giving it when asked: the choices and
# help of a setting whose values come from a registry (datasets, models, partition schemes)
# follow registrations made after the settings class was defined
Text = str | Callable[[], str]
Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


@dataclass(frozen=True)
class Meta:
    """What `setting` records about a field (``dataclasses.Field.metadata['fedftg']``)."""

    help: Text
    choices: Choices | None = None
    check: Check | None = None
    optional: bool = False  # None is a valid value (the check applies otherwise)
    legacy_key: str | None = None
    before: Any = MISSING
    always_hashed: bool = False
    reads: Reads | None = None
    resumable: bool = False  # may change between a run and its resume (not fingerprinted)
    pooled: bool = False  # runs differing only here are repeats of one setting in reports
    hidden: bool = False  # not a flag of its own (set through another, or internal)

    def help_text(self) -> str:
        """The help text (asked of its function when it has one)."""
        return self.help() if callable(self.help) else self.help

    def choice_names(self) -> tuple[str, ...] | None:
        """The valid values (asked of their function when they have one), or None: any."""
        return self.choices() if callable(self.choices) else self.choices


def setting(
    default: Any = MISSING,
    help: Text = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    **meta: Any,
) -> Any:
    """A dataclass field with its `Meta` (help, choices, check, history)."""
    md = {"fedftg": Meta(help=help, **meta)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    if default is MISSING:
        return dataclasses.field(metadata=md)
    return dataclasses.field(default=default, metadata=md)


def meta(f: dataclasses.Field) -> Meta:
    """The `Meta` of a field (an empty one for a plain field)."""
    return f.metadata.get("fedftg") or Meta(help="")


def fields(cls_or_obj: Any) -> Iterator[tuple[dataclasses.Field, Meta]]:
    """The (field, meta) pairs of a settings dataclass, in declaration order."""
    for f in dataclasses.fields(cls_or_obj):
        yield f, meta(f)


def check_value(name: str, value: Any, m: Meta) -> None:
    """Raise `UserError` if ``value`` breaks the declaration ``m`` of setting ``name``."""
    if value is None and m.optional:
        return
    choices = m.choice_names()
    if choices is not None and value not in choices:
        listed = choices.listed() if hasattr(choices, "listed") else ", ".join(choices)
        raise UserError(f"{name}: unknown value {value!r}; use one of {listed}")
    if m.check is not None and not m.check(value):
        raise UserError(f"{name}: must be {m.check.what}, got {value!r}")


@dataclass
class Settings:
    """Base of a method's or plug-in's settings: declared fields, checked by `validate`."""

    def validate(self) -> Settings:
        """Check every declared field, then `check` (cross-field rules). Returns self."""
        for f, m in fields(self):
            check_value(f.name, getattr(self, f.name), m)
        self.check()
        return self

    def check(self) -> None:
        """Rules across fields; raise `UserError` naming the field. None by default."""

    def resolve(self, num_classes: int) -> None:
        """Fill the settings whose default depends on the task (None = "follow the data")
        for a dataset of ``num_classes`` classes, in place. None by default."""


def validate_section(section: str, settings: Settings) -> None:
    """`Settings.validate` with the section named in the error (``ftg.iterations: ...``)."""
    try:
        settings.validate()
    except UserError as exc:
        raise UserError(f"{section}.{exc}") from None
