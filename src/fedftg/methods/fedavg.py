"""FedAvg (McMahan et al., AISTATS 2017): local SGD, then the sample-weighted average."""

from __future__ import annotations

from fedftg.methods.client import ClientMethod
from fedftg.registry import MethodSpec

METHOD = MethodSpec(
    name="fedavg",
    summary="sample-weighted average of the clients' full states (BatchNorm buffers included)",
    build=lambda settings, cfg: ClientMethod(),
    order=0,
)
