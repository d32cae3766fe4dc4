"""FedProx's settings and spec (implementation: `fedftg.methods.fedprox`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.fl.specs import MethodSpec
from fedftg.settings import NON_NEGATIVE, Settings, setting

if TYPE_CHECKING:
    from fedftg.config import RunConfig
    from fedftg.fl.client import ClientMethod

VARIANTS = ("proximal", "weight_decay")


@dataclass
class FedProxSettings(Settings):
    mu: float = setting(
        0.01,
        "proximal weight mu in mu/2 ||w - w_global||^2",
        check=NON_NEGATIVE,
        legacy_key="prox_mu",
        always_hashed=True,
    )
    variant: str = setting(
        "proximal",
        "proximal: mu/2 ||w - w_global||^2 (the paper); weight_decay: mu added to the weight "
        "decay instead (the FedFTG authors' code)",
        choices=VARIANTS,
        before="proximal",
    )


def _build(s: FedProxSettings, cfg: RunConfig) -> ClientMethod:
    from fedftg.methods.fedprox import FedProx

    return FedProx(s.mu, s.variant)


METHOD = MethodSpec(
    name="fedprox",
    summary="proximal term mu/2 ||w - w_global||^2",
    settings=FedProxSettings,
    build=_build,
    order=10,
)
