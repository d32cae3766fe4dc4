"""What the registry knows of a client method or a server plug-in (torch-free).

A spec module (``fedftg/methods/specs/<name>.py`` or ``fedftg/plugins/specs/<name>.py``)
defines one module-level ``METHOD = MethodSpec(...)`` or ``PLUGIN = PluginSpec(...)``;
`fedftg.registry` collects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from fedftg.settings import Settings

if TYPE_CHECKING:
    from fedftg.config import RunConfig
    from fedftg.fl.client import ClientMethod
    from fedftg.fl.plugin import ClientHalf, PluginEnv, ServerPlugin

M = TypeVar("M", bound="Settings | None")  # a method's settings class (None: it has none)
P = TypeVar("P", bound=Settings)  # a plug-in's settings class


@dataclass(frozen=True)
class MethodSpec(Generic[M]):
    """A client method: local objective term, client/server state, aggregation rule.

    ``build(settings, cfg)`` makes the method from its settings (None when it has none) and
    the run's config (for the shared local-training settings such as ``lr``).
    ``reads_features``: its term reads the model's representation, so the model needs the
    ``features`` / ``classifier`` split (`fedftg.models.check_split`).
    """

    name: str
    summary: str
    build: Callable[[M, RunConfig], ClientMethod]
    settings: type[M] | None = None
    order: int = 100
    reads_features: bool = False


@dataclass(frozen=True)
class PluginSpec(Generic[P]):
    """A server plug-in, run after aggregation each round, with an optional client half.

    ``server(settings, env)`` makes the server side (`fedftg.fl.plugin.ServerPlugin`).
    ``client(settings, env)``, when given, makes the client half
    (`fedftg.fl.plugin.ClientHalf`): the server side then also provides
    ``client_payload(round_idx)``, sent to the round's clients, and the half turns it into a
    term of the client's local loss. ``alias`` names the plug-in on FedAvg (``fedftg``).
    ``samples``: the server side has ``sample_images(per_class, generator)`` and the run
    directory gets a figure of generated samples. ``fine_tunes``: the server step changes
    the aggregate (so the engine measures the accuracy before it); False for a plug-in that
    only trains state of its own (FedGen's generator). ``reads_features``: it works on
    the model's ``features`` / ``classifier`` split (`fedftg.models.check_split`).
    """

    name: str
    summary: str
    settings: type[P]
    server: Callable[[P, PluginEnv], ServerPlugin]
    client: Callable[[P, PluginEnv], ClientHalf] | None = None
    alias: str | None = None
    samples: bool = False
    fine_tunes: bool = True
    order: int = 100
    reads_features: bool = False
