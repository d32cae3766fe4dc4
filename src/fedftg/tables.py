"""Named tables of registered building blocks: datasets, models, partition schemes.

Each kind has one `Table` (`fedftg.data.sources`, `fedftg.models`,
`fedftg.data.partition`) and a public ``register_*`` function that adds to it. From the
tables come the values the config accepts (``--dataset``, ``--model``, ``--partition``), their
help texts and the errors for unknown names. A table holds small torch-free records whose
factories import their implementation when called, so the commands that need no tensors
never load torch.
"""

from __future__ import annotations

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

    def get(self, name: str) -> Entry:
        """The entry ``name``; an unknown name is a `UserError` listing the known ones."""
        if name not in self._entries:
            raise UserError(
                f"{self.setting}: unknown {self.kind} {name!r}; use one of "
                f"{', '.join(self._entries)}"
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def help_text(self) -> str:
        """The names with their notes, for a setting's help: ``iid, dirichlet (authors')``."""
        return ", ".join(
            f"{name} ({entry.note})" if entry.note else name
            for name, entry in self._entries.items()
        )

    def entries(self) -> dict[str, Entry]:
        """A copy of the table: name -> entry, in registration order."""
        return dict(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
