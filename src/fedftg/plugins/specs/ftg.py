"""FedFTG's settings and spec (implementation: `fedftg.plugins.ftg`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.fl.specs import PluginSpec
from fedftg.plugins.specs.distill import DistillSettings, distill_server, distill_setting
from fedftg.settings import NON_NEGATIVE, POSITIVE_INT

if TYPE_CHECKING:
    from fedftg.fl.plugin import PluginEnv
    from fedftg.plugins.ftg import FTGServer


@dataclass
class FTGSettings(DistillSettings):
    """FedFTG server settings; defaults are the authors' (CIFAR-10 setting)."""

    iterations: int = distill_setting(
        10, "generator/student iterations I per round", check=POSITIVE_INT
    )
    lambda_cls: float = distill_setting(1.0, "fidelity weight", check=NON_NEGATIVE)
    md_distance: str = distill_setting(
        "l1", "hard-sample gap: l1 on logits (authors) or kl", choices=("l1", "kl")
    )
    label_sampling: str = distill_setting(
        "customized",
        "ablation: uniform labels instead of the clients' class mix",
        choices=("customized", "uniform"),
    )
    ensemble: str = distill_setting(
        "class",
        "ablation: uniform teacher average instead of class-level weights",
        choices=("class", "uniform"),
    )
    hard_mining: bool = distill_setting(True, "ablation: false drops the hard-sample term")


def _server(s: FTGSettings, env: PluginEnv) -> FTGServer:
    from fedftg.plugins.ftg import FTGServer

    return distill_server(FTGServer, s, env)


PLUGIN = PluginSpec(
    name="ftg",
    summary="FedFTG: fine-tune the aggregate by data-free distillation on hard generated samples",
    settings=FTGSettings,
    server=_server,
    alias="fedftg",
    samples=True,
    order=10,
)
