"""FedDyn's settings and spec (implementation: `fedftg.methods.feddyn`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.fl.specs import MethodSpec
from fedftg.settings import POSITIVE, Settings, setting

if TYPE_CHECKING:
    from fedftg.config import RunConfig
    from fedftg.fl.client import ClientMethod


@dataclass
class FedDynSettings(Settings):
    alpha: float = setting(
        0.01,
        "regulariser weight alpha",
        check=POSITIVE,
        legacy_key="feddyn_alpha",
        always_hashed=True,
    )


def _build(s: FedDynSettings, cfg: RunConfig) -> ClientMethod:
    from fedftg.methods.feddyn import FedDyn

    return FedDyn(s.alpha)


METHOD = MethodSpec(
    name="feddyn",
    summary="dynamic regulariser",
    settings=FedDynSettings,
    build=_build,
    order=30,
)
