"""FedDF's settings and spec (implementation: `fedftg.methods.feddf`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.methods.specs.ftg import DistillConfig, _distill_field, distill_server
from fedftg.registry import PluginSpec
from fedftg.settings import POSITIVE_INT

if TYPE_CHECKING:
    from fedftg.methods.feddf import FedDFServer
    from fedftg.methods.plugin import PluginEnv


@dataclass
class FedDFConfig(DistillConfig):
    """FedDF baseline settings (step counts as in the FedFTG authors' baseline)."""

    gen_steps: int = _distill_field(50, "generator steps per round", check=POSITIVE_INT)
    student_steps: int = _distill_field(20, "student KL steps per round", check=POSITIVE_INT)


def _server(s: FedDFConfig, env: PluginEnv) -> FedDFServer:
    from fedftg.methods.feddf import FedDFServer

    return distill_server(FedDFServer, s, env)


PLUGIN = PluginSpec(
    name="df",
    summary="FedDF-style data-free ensemble distillation, as the FedFTG authors' baseline",
    settings=FedDFConfig,
    server=_server,
    alias="feddf",
    samples=True,
    order=20,
)
