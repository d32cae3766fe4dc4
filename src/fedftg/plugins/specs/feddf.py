"""FedDF's settings and spec (implementation: `fedftg.plugins.feddf`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.fl.specs import PluginSpec
from fedftg.plugins.specs.distill import DistillSettings, distill_server, distill_setting
from fedftg.settings import POSITIVE_INT

if TYPE_CHECKING:
    from fedftg.fl.plugin import PluginEnv
    from fedftg.plugins.feddf import FedDFServer


@dataclass
class FedDFSettings(DistillSettings):
    """FedDF baseline settings (step counts as in the FedFTG authors' baseline)."""

    gen_steps: int = distill_setting(50, "generator steps per round", check=POSITIVE_INT)
    student_steps: int = distill_setting(20, "student KL steps per round", check=POSITIVE_INT)


def _server(s: FedDFSettings, env: PluginEnv) -> FedDFServer:
    from fedftg.plugins.feddf import FedDFServer

    return distill_server(FedDFServer, s, env)


PLUGIN = PluginSpec(
    name="df",
    summary="FedDF-style data-free ensemble distillation, as the FedFTG authors' baseline",
    settings=FedDFSettings,
    server=_server,
    alias="feddf",
    samples=True,
    order=20,
)
