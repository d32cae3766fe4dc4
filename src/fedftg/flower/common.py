"""What the Flower ClientApp and ServerApp share: config mapping and message layout.

Message layout (RecordDict keys):
- server -> client (train): ``global`` (ArrayRecord: the global model state), ``server``
  (ArrayRecord: the method's server state, e.g. SCAFFOLD's c), ``config`` (ConfigRecord:
  ``round``, ``run`` = the fully resolved RunConfig as JSON, ``base``, ``method`` and
  ``plugin``, the server plug-in's name or ""), and for a plug-in with a client half
  (FedGen) ``plugin`` (ArrayRecord: its client payload, e.g. the generator and known labels).
- client -> server (train): ``model`` (ArrayRecord), ``upload`` (ArrayRecord: method
  extras, e.g. SCAFFOLD's change of c_k), ``metrics`` (MetricRecord: ``num-examples``,
  ``loss``, ``steps``, ``partition-id`` and ``histogram``, the client's label counts, and
  ``plugin-loss``, a plug-in's client term, apart from ``loss``, when it had one).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedftg.config import RunConfig, Source, config_from_dict, settings_from
from fedftg.engine.run import Diverged
from fedftg.errors import UserError

CLIENT_STATE_KEY = "fedftg-client-state"


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Map Flower's flat run config onto the validated `RunConfig`.

    Keys are the CLI's flag names with dashes or underscores (``local-epochs``,
    ``ftg-gen-lr``, ``fedprox-mu``, also the older ``prox-mu``) or dotted TOML paths
    (``ftg.gen_lr``); a method's setting given for a run without that method is an error,
    as on the command line.
    """
    return settings_from([Source(run_config, "run config: ")])


class ReportedError(UserError):
    """A `UserError` already logged as one ``error:`` line; Flower logs it without traceback."""


class _ReportedWithoutTraceback(logging.Filter):
    """Drop the traceback Flower attaches when it logs a `ReportedError` (flwr 1.42 logs
    every exception leaving a ServerApp or ClientApp with ``exc_info``); its one-line
    record ("ServerApp raised an exception") and the run's failed status stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ReportedError):
            record.exc_info = record.exc_text = None
        return True


_FILTER = _ReportedWithoutTraceback()


@contextmanager
def report_user_errors(logger: logging.Logger) -> Iterator[None]:
    """A `UserError` or a `Diverged` run inside: one ``error:`` line and a failed app.

    The error is re-raised as a `ReportedError`, so Flower still ends the app as failed
    (run status ``finished:failed`` with the message as its details, a non-zero exit of
    the ServerApp process), without printing a traceback.
    """
    try:
        yield
    except ReportedError:
        raise
    except (UserError, Diverged) as err:
        flwr_logger = logging.getLogger("flwr")
        if _FILTER not in flwr_logger.filters:
            flwr_logger.addFilter(_FILTER)
        logger.error("error: %s", err)
        raise ReportedError(str(err)) from None


def use_run_threads(cfg: RunConfig) -> None:
    """Run this app's torch kernels on the run's thread plan (`fedftg.threads`): the run's
    ``threads`` setting, else ``OMP_NUM_THREADS`` (which Flower's Ray simulation sets from
    each ClientApp's ``num-cpus``), else the cores this process may use. The apps load
    torch before any run config is known, so OpenMP's wait policy stays what the process's
    environment gave it."""
    from fedftg.threads import apply_threads, plan_threads, usable_cores

    apply_threads(plan_threads(usable_cores(), 1, cfg.threads, os.environ))


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


def int_entry(record: Mapping[str, object], key: str) -> int:
    """The integer ``key`` of a Flower record (a `TypeError` naming it otherwise)."""
    value = record[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"record entry {key!r} is not an integer: {value!r}")
    return value


def float_entry(record: Mapping[str, object], key: str) -> float:
    """The number ``key`` of a Flower record, as a float (a `TypeError` naming it otherwise)."""
    value = record[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"record entry {key!r} is not a number: {value!r}")
    return float(value)
