"""FedAvg's spec (`fedftg.fl.client.ClientMethod` is FedAvg: no term, the plain average)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedftg.fl.specs import MethodSpec

if TYPE_CHECKING:
    from fedftg.config import RunConfig
    from fedftg.fl.client import ClientMethod


def _build(settings: None, cfg: RunConfig) -> ClientMethod:
    from fedftg.fl.client import ClientMethod

    return ClientMethod()


METHOD = MethodSpec(
    name="fedavg",
    summary="sample-weighted average of the clients' full states (BatchNorm buffers included)",
    build=_build,
    order=0,
)
