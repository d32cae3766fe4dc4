"""MOON's settings and spec (implementation: `fedftg.methods.moon`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.fl.specs import MethodSpec
from fedftg.settings import NON_NEGATIVE, POSITIVE, Settings, setting

if TYPE_CHECKING:
    from fedftg.config import RunConfig
    from fedftg.fl.client import ClientMethod


@dataclass
class MoonSettings(Settings):
    mu: float = setting(
        1.0,
        "weight of the contrastive term",
        check=NON_NEGATIVE,
        legacy_key="moon_mu",
        always_hashed=True,
    )
    tau: float = setting(
        0.5,
        "temperature of the cosine similarities",
        check=POSITIVE,
        legacy_key="moon_tau",
        always_hashed=True,
    )


def _build(s: MoonSettings, cfg: RunConfig) -> ClientMethod:
    from fedftg.methods.moon import Moon

    return Moon(s.mu, s.tau)


METHOD = MethodSpec(
    name="moon",
    summary="model-contrastive term on the representation",
    settings=MoonSettings,
    build=_build,
    order=40,
    reads_features=True,
)
