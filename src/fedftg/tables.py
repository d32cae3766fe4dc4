"""Named tables of registered building blocks: datasets, models, partition schemes.

Each kind has one `Table` (`fedftg.data.sources`, `fedftg.models`,
`fedftg.data.partition`) and a public ``register_*`` function that adds to it. From the
tables come the values the config accepts (``--dataset``, ``--model``, ``--partition``), their
help texts and the errors for unknown names. A table holds small torch-free records whose
factories import their implementation when called, so the commands that need no tensors
never load torch.

A table with a ``resolve`` function also takes an *import path* as a name
(``mypkg.nets:make_net``, `is_import_path`): the first `Table.get` of it imports the object
(`import_object`), makes an entry of it with ``resolve`` and registers it under that very
string, so a run's config.json records the path and a resume compares it. The config
accepts such a name without importing it (`Names`): the user's module is imported only
where the model or the data is needed.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from fedftg.errors import UserError

# module.path:attr.path (the form of a console-script entry point)
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_import_path(name: object) -> bool:
    """Whether ``name`` has the form of an import path, ``pkg.mod:attr`` (attr may be dotted)."""
    return isinstance(name, str) and _IMPORT_PATH.fullmatch(name) is not None


def import_object(setting: str, path: str) -> Any:
    """The object import path ``path`` names, looked for in the current directory first
    (as ``python -m`` does), then on ``sys.path``; a module that does not import or an
    attribute it lacks is a `UserError` naming ``setting`` and the path."""
    module_name, _, attrs = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own folder first
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while it runs
        raise UserError(f"{setting}: cannot import {path!r}: {_one_line(exc)}") from None
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            raise UserError(f"{setting}: cannot import {path!r}: {module_name} has no {attrs!r}")
        obj = getattr(obj, attr)
    return obj


def import_path_of(obj: Any) -> str | None:
    """The import path naming ``obj`` (``module:qualname``), or None when it has none that
    imports back to it: a lambda, a local or ``__main__`` definition, an object that
    is not a module's top-level class or function."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__":
        return None
    path = f"{module}:{qualname}"
    if not is_import_path(path):  # "<lambda>", "f.<locals>.g"
        return None
    try:
        return path if import_object("", path) is obj else None
    except UserError:
        return None


def call_user(setting: str, name: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs)``, a user's function behind ``name`` (a model factory, a data
    loader); any exception it raises becomes a `UserError` naming ``setting`` and ``name``
    (a `UserError` of its own passes as it is)."""
    try:
        return fn(**kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{setting}: calling {name!r} failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Names(tuple[str, ...]):
    """A table's registered names as a setting's ``choices``: besides them, it *contains*
    every import path when the table resolves them, so the config accepts one unimported
    (the error messages list only the registered names)."""

    open_to_paths: bool = False
    hints: tuple[str, ...] = ()  # what else an error should offer (families, import paths)
    made: frozenset[str] = frozenset()  # names made on first use: valid, but not listed

    def __contains__(self, value: object) -> bool:
        return super().__contains__(value) or (self.open_to_paths and is_import_path(value))

    def listed(self) -> str:
        """The registered names, then the hints (not the names a hint stands for), for an
        error message: the same text whatever this process made before."""
        return ", ".join([*(n for n in self if n not in self.made), *self.hints])


class Noted(Protocol):
    """An entry with a note for the help text (empty: none)."""

    @property
    def note(self) -> str: ...


Entry = TypeVar("Entry", bound=Noted)


class Table(Generic[Entry]):
    """Entries of one kind by name, in registration order.

    ``kind`` names an entry in messages (``"model"``); ``setting`` is the config setting
    that picks one (``"model"``), the field an error names.
    """

    def __init__(
        self, kind: str, setting: str, resolve: Callable[[str, Any], Entry] | None = None
    ) -> None:
        """``resolve(path, obj)``, when given, makes the entry of the object an import path
        names (a `UserError` if it is the wrong kind of thing)."""
        self.kind, self.setting = kind, setting
        self._resolve = resolve
        self._entries: dict[str, Entry] = {}
        self._first_use: dict[str, tuple[Callable[[str], Entry], str]] = {}
        self._made: set[str] = set()  # names made on first use: their family's note stands

    def add(self, name: str, entry: Entry, *, replace: bool = False) -> Entry:
        """Register ``entry`` as ``name``; a taken (unless ``replace``) or malformed name is
        a `UserError`."""
        if not isinstance(name, str) or not name or any(c.isspace() or c == "," for c in name):
            raise UserError(
                f"{self.setting}: cannot register {self.kind} {name!r}: a name is a non-empty "
                "string without spaces or commas"
            )
        if name in self._entries and not replace:
            raise UserError(f"{self.setting}: a {self.kind} named {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def on_first_use(self, prefix: str, make: Callable[[str], Entry], note: str) -> None:
        """Names starting with ``prefix`` are made by ``make(name)`` and registered the first
        time one is asked for (`resolve`, `get`): a family of entries too large to list
        (``flwr:<Partitioner>``). ``note`` stands for the family in help and errors."""
        self._first_use[prefix] = (make, note)

    def resolve(self, name: str) -> None:
        """Register ``name`` now if it is unknown and a first-use prefix makes it (the maker's
        `UserError` says why it cannot); any other unknown name is left for `get` or the
        setting's check to report."""
        if name in self._entries:
            return
        for prefix, (make, _) in self._first_use.items():
            if name.startswith(prefix):
                self.add(name, make(name))
                self._made.add(name)
                return
        if self._resolve is not None and is_import_path(name):
            self._entries[name] = self._resolve(name, import_object(self.setting, name))
            self._made.add(name)

    def get(self, name: str) -> Entry:
        """The entry ``name``; an unknown name is a `UserError` listing the known ones. A
        first-use name (`on_first_use`) or an import path is made and registered here."""
        self.resolve(name)
        if name not in self._entries:
            raise UserError(
                f"{self.setting}: unknown {self.kind} {name!r}; use one of "
                f"{self.choices().listed()}"
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def choices(self) -> Names:
        """The valid values of the setting that picks an entry: the registered names, and
        any import path when this table resolves them (`Names`)."""
        names = Names(self._entries)
        names.open_to_paths = self._resolve is not None
        paths = ("an import path module:attr",) if self._resolve else ()
        names.hints = (*(note for _, note in self._first_use.values()), *paths)
        names.made = frozenset(self._made)
        return names

    def help_text(self) -> str:
        """The names with their notes, for a setting's help: ``iid, dirichlet (authors')``,
        then the first-use families' notes (for the names made from them) and, for a table
        that resolves them, ``or an import path module:attr``."""
        named = [
            f"{n} ({e.note})" if e.note else n
            for n, e in self._entries.items()
            if n not in self._made
        ]
        paths = ["or an import path module:attr"] if self._resolve else []
        return ", ".join([*named, *(note for _, note in self._first_use.values()), *paths])

    def entries(self) -> dict[str, Entry]:
        """A copy of the table: name -> entry, in registration order."""
        return dict(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
