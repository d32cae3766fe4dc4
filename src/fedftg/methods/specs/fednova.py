"""FedNova's spec (implementation: `fedftg.methods.fednova`); it reads the shared momentum."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedftg.fl.specs import MethodSpec

if TYPE_CHECKING:
    from fedftg.config import RunConfig
    from fedftg.fl.client import ClientMethod


def _build(settings: None, cfg: RunConfig) -> ClientMethod:
    from fedftg.methods.fednova import FedNova

    return FedNova(cfg.momentum)


METHOD = MethodSpec(
    name="fednova",
    summary="normalised averaging: each client's change divided by its local steps",
    build=_build,
    order=50,
)
