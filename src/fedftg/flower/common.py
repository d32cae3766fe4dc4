"""What the Flower ClientApp and ServerApp share: config mapping and message layout.

Message layout (RecordDict keys):
- server -> client (train): ``global`` (ArrayRecord: the global model state), ``server``
  (ArrayRecord: the method's server state, e.g. SCAFFOLD's c), ``config`` (ConfigRecord:
  ``round`` and ``run`` = the fully resolved RunConfig as JSON).
- client -> server (train): ``model`` (ArrayRecord), ``upload`` (ArrayRecord: method
  extras, e.g. SCAFFOLD's change of c_k), ``metrics`` (MetricRecord: ``num-examples``,
  ``loss``, ``steps``, ``partition-id`` and ``histogram``, the client's label counts).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedftg.config import RunConfig, apply_overrides, config_from_dict

CLIENT_STATE_KEY = "fedftg-client-state"


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Map Flower's flat run config onto the validated `RunConfig`.

    Keys may use dashes or underscores; server plug-in settings are ``ftg-<name>`` /
    ``ftg.<name>`` (and ``df-`` / ``df.``), as the CLI's ``--ftg-<name>`` flags.
    """
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        norm = key.replace("-", "_")
        for section in ("ftg", "df"):
            for sep in (".", "_"):
                if norm.startswith(section + sep):
                    nested.setdefault(section, {})[norm[len(section) + 1 :]] = value
                    break
            else:
                continue
            break
        else:
            nested[norm] = value
    return apply_overrides(RunConfig(), nested, where="run config: ").validate()


def config_to_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict())


def config_from_json(text: str) -> RunConfig:
    return config_from_dict(json.loads(text))


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord (CPU copies)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """An ArrayRecord back to a state dict on ``device``."""
    return {k: v.to(device) for k, v in record.to_torch_state_dict().items()}
