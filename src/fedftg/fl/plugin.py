"""The server plug-in protocol: a step after aggregation, with an optional client half.

Server side (every plug-in): `ServerPlugin.step` changes the aggregated model in place (or
leaves it, training only the plug-in's own state) from the round's client models and label
histograms; its state (a generator, say) persists across rounds through
`state_dict` / `load_state_dict` and is checkpointed by the engine.

Client half (optional, declared by `fedftg.registry.PluginSpec.client`): each round the
server side's `WithClientHalf.client_payload` is sent to the selected clients (in-process,
or in the Flower message); on each client `ClientHalf.term` turns it into a
`fedftg.fl.client.Term` that is added to the client method's own loss term, in the
sequential and in the vectorised local-training paths alike.

Capabilities beyond these are declared on the spec (``samples``), never probed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fedftg.fl.aggregation import State
from fedftg.fl.client import LocalSpec, Term
from fedftg.models.stacked import Teachers


@dataclass(frozen=True)
class PluginEnv:
    """What a plug-in is built from besides its settings: the task and the run."""

    num_classes: int
    channels: int
    image_size: int
    device: torch.device
    seed: int = 0
    precision: str = "fp32"
    model: str = "cnn"  # the classifier architecture's name (fedftg.models.build_model)
    dataset: str = ""  # the dataset's name (fedftg.data.sources)
    # the clients' local training (what a client half or a generator batch follows)
    batch_size: int = 50
    local_epochs: int = 1
    local_steps: int | None = None


class ServerPlugin(Protocol):
    """The server side of a plug-in."""

    def step(
        self,
        student: nn.Module,
        teachers: Teachers,
        counts: np.ndarray,
        round_idx: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """Run the round's server step. ``student``: the aggregated global model, changed in
        place; ``teachers``: the participating clients' models after local training (held
        as the engine chose); ``counts``: their (K, C) label histograms as uploaded;
        ``generator``: the round's random stream. Returns the round's metrics."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@runtime_checkable
class WithClientHalf(ServerPlugin, Protocol):
    """A server side whose plug-in has a client half."""

    def client_payload(self, round_idx: int) -> State:
        """What every client selected in round ``round_idx`` receives (CPU or device
        tensors; sent before the round's local training)."""
        ...


class WithSamples(ServerPlugin, Protocol):
    """A server side with generated sample images (``PluginSpec.samples``)."""

    def sample_images(
        self, per_class: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class ClientHalf(Protocol):
    """The client half of a plug-in: a term for the client's local loss."""

    def term(
        self,
        model: nn.Module,
        payload: State,
        histogram: np.ndarray,
        round_idx: int,
        spec: LocalSpec,
        rng: torch.Generator,
    ) -> Term | None:
        """The term client training adds this round (None for none). ``model``: the client's
        model (architecture and parameter names); ``payload``: `client_payload`'s tensors;
        ``histogram``: the client's own label counts; ``rng``: the client's stream for the
        term's random draws (its own, so the client method's batches are unchanged). Every
        client's term of one round must share ``fn`` and ``shared`` (vectorised clients
        stack only ``client`` and the per-step inputs)."""
        ...
