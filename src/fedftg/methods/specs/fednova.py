"""FedNova's spec (implementation: `fedftg.methods.fednova`); it reads the shared momentum."""

from __future__ import annotations

from typing import Any

from fedftg.registry import MethodSpec


def _build(settings: None, cfg: Any) -> Any:
    from fedftg.methods.fednova import FedNova

    return FedNova(cfg.momentum)


METHOD = MethodSpec(
    name="fednova",
    summary="normalised averaging: each client's change divided by its local steps",
    build=_build,
    order=50,
)
