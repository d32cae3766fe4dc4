"""SCAFFOLD's settings and spec (implementation: `fedftg.methods.scaffold`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.fl.specs import MethodSpec
from fedftg.settings import POSITIVE, Settings, setting

if TYPE_CHECKING:
    from fedftg.config import RunConfig
    from fedftg.fl.client import ClientMethod

SCAFFOLD_REFERENCES = ("aggregate", "sent")
# what c_k's update divides the local progress by: the round's decayed learning rate, or the
# initial one (the authors' code)
SCAFFOLD_VARIATE_LRS = ("round", "initial")


@dataclass
class ScaffoldSettings(Settings):
    server_lr: float = setting(
        1.0,
        "server step size on the averaged change",
        check=POSITIVE,
        legacy_key="scaffold_server_lr",
        always_hashed=True,
    )
    reference: str = setting(
        "aggregate",
        "with a server plug-in, the model the control variates measure the clients' progress "
        "from: aggregate (before the plug-in's step, authors') or sent",
        choices=SCAFFOLD_REFERENCES,
        legacy_key="scaffold_reference",
        before="sent",
        reads=lambda base, plugin: plugin is not None,
    )
    variate_lr: str = setting(
        "round",
        "the learning rate the control-variate update divides the clients' progress by: "
        "round (this round's decayed lr) or initial (--lr, authors')",
        choices=SCAFFOLD_VARIATE_LRS,
        legacy_key="scaffold_variate_lr",
        before="round",
    )


def _build(s: ScaffoldSettings, cfg: RunConfig) -> ClientMethod:
    from fedftg.methods.scaffold import Scaffold

    return Scaffold(s.server_lr, s.reference, cfg.lr if s.variate_lr == "initial" else None)


METHOD = MethodSpec(
    name="scaffold",
    summary="control variates (option II); --local-steps for a fixed number of steps",
    settings=ScaffoldSettings,
    build=_build,
    order=20,
)
