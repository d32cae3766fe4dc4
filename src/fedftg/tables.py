"""Named tables of registered building blocks: datasets, models, partition schemes.

Each kind has one `Table` (`fedftg.data.sources`, `fedftg.models`,
`fedftg.data.partition`) and a public ``register_*`` function that adds to it. From the
tables come the values the config accepts (``--dataset``, ``--model``, ``--partition``), their
help texts and the errors for unknown names. A table holds small torch-free records whose
factories import their implementation when called, so the commands that need no tensors
never load torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from fedftg.errors import UserError


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

    def __init__(self, kind: str, setting: str) -> None:
        self.kind, self.setting = kind, setting
        self._entries: dict[str, Entry] = {}
        self._first_use: dict[str, tuple[Callable[[str], Entry], str]] = {}
        self._made: set[str] = set()  # names made on first use: their family's note stands

    def add(self, name: str, entry: Entry) -> Entry:
        """Register ``entry`` as ``name``; a taken or malformed name is a `UserError`."""
        if not isinstance(name, str) or not name or any(c.isspace() or c == "," for c in name):
            raise UserError(
                f"{self.setting}: cannot register {self.kind} {name!r}: a name is a non-empty "
                "string without spaces or commas"
            )
        if name in self._entries:
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

    def get(self, name: str) -> Entry:
        """The entry ``name``; an unknown name is a `UserError` listing the known ones."""
        self.resolve(name)
        if name not in self._entries:
            raise UserError(
                f"{self.setting}: unknown {self.kind} {name!r}; use one of "
                f"{', '.join([*self._entries, *(note for _, note in self._first_use.values())])}"
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def help_text(self) -> str:
        """The names with their notes, for a setting's help: ``iid, dirichlet (authors')``,
        then the first-use families' notes (for the names made from them)."""
        named = [
            f"{n} ({e.note})" if e.note else n
            for n, e in self._entries.items()
            if n not in self._made
        ]
        return ", ".join([*named, *(note for _, note in self._first_use.values())])

    def entries(self) -> dict[str, Entry]:
        """A copy of the table: name -> entry, in registration order."""
        return dict(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
