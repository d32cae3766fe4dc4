"""fedftg: FedFTG (CVPR 2022) and the standard federated client methods, on one engine.

The Python API is loaded on first use, so ``import fedftg`` (and every command that needs
no tensors) stays free of torch: `fedftg.run` runs methods as ``fedftg run`` does,
`fedftg.ServerStep` is FedFTG's (or FedDF's) server step for any FL loop, and
`fedftg.UserError` is what bad input raises.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first read)
_LAZY = {
    "run": "fedftg.api",
    "RunResult": "fedftg.api",
    "ServerStep": "fedftg.server_step",
    "UserError": "fedftg.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["RunResult", "ServerStep", "UserError", "__version__", "run"]
