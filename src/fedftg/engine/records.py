"""Typed records of a run, the same for both engines: `RoundRecord` (one metrics.jsonl
row) and `MethodSummary` (one method's entry in summary.json and in a checkpoint's
``done``). Each is built by `fedftg.engine.server.ServerRunner` and serialised here only
(`RoundRecord.to_row`, `MethodSummary.to_dict`); what is read back (old metrics.jsonl
files, checkpoints' rows and summaries) stays the plain dicts these wrote.

``rejected`` means one thing everywhere: a row's is the number of uploads (in-process) or
replies (Flower) of that round left out of the aggregate; a summary's is the method's
total over the run, beside the reasons (``rejections``, one ``round N: ...`` line each).
Round numbers in records are 1-based (``round_num``, serialised as ``round``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

TRAINED = "trained"  # the uploads were aggregated (and the server step ran)
NO_FINITE_UPLOAD = "no-finite-upload"  # every upload held NaN/Inf: the method diverged
SKIPPED = "skipped"  # Flower: fewer valid replies than min-replies, the model kept


@dataclass
class RoundRecord(Mapping[str, Any]):
    """One round of one method. It reads as its metrics.jsonl row (``record["test_acc"]``,
    ``dict(record)``), which `to_row` builds: the keys, their order and values that both
    engines have always written."""

    round_num: int
    outcome: str = TRAINED
    clients: int = 0
    lr: float | None = None
    train_loss: float | None = None
    train_plugin_loss: float | None = None  # a plug-in's client term (FedGen), apart
    acc_before_server: float | None = None  # before a fine-tuning plug-in's step
    server_s: float | None = None  # the plug-in step's seconds
    plugin: dict[str, float] = field(default_factory=dict)  # "<plugin>_<term>" -> value
    ensemble: dict[str, float] = field(default_factory=dict)  # --eval-ensemble's metrics
    test_acc: float | None = None
    test_loss: float | None = None
    diverged: bool = False
    round_s: float | None = None
    elapsed_s: float = 0.0
    rejected: int = 0

    def to_row(self) -> dict[str, Any]:
        """The metrics.jsonl row (without ``method``, which the run directory adds)."""
        status = {"status": "diverged"} if self.diverged else {}
        if self.outcome == SKIPPED:
            return {
                "round": self.round_num,
                "skipped": True,
                "test_acc": None,
                "test_loss": None,
                "elapsed_s": self.elapsed_s,
                "rejected": self.rejected,
            }
        if self.outcome == NO_FINITE_UPLOAD:
            return {
                "round": self.round_num,
                "clients": self.clients,
                "rejected": self.rejected,
                "train_loss": self.train_loss,
                "test_acc": self.test_acc,
                "test_loss": self.test_loss,
                **status,
                "lr": self.lr,
                "round_s": self.round_s,
                "elapsed_s": self.elapsed_s,
            }
        row: dict[str, Any] = {
            "round": self.round_num,
            "clients": self.clients,
            "lr": self.lr,
            "train_loss": self.train_loss,
        }
        optional = {
            "train_plugin_loss": self.train_plugin_loss,
            "acc_before_server": self.acc_before_server,
            "server_s": self.server_s,
        }
        row.update({k: v for k, v in optional.items() if v is not None})
        row.update(self.plugin)
        row.update(self.ensemble)
        row.update(test_acc=self.test_acc, test_loss=self.test_loss, **status)
        row.update(round_s=self.round_s, elapsed_s=self.elapsed_s, rejected=self.rejected)
        return row

    def __getitem__(self, key: str) -> Any:
        return self.to_row()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_row())

    def __len__(self) -> int:
        return len(self.to_row())


@dataclass
class MethodSummary:
    """One method's result: how it ended, its accuracies, rounds run and seconds spent."""

    final_acc: float | None
    final_loss: float | None
    best_acc: float
    rounds: int  # the rounds run (a diverged method's diverged round included)
    wall_s: float
    diverged_round: int | None = None  # set when the method diverged
    reason: str | None = None  # why it diverged
    rejections: list[str] = field(default_factory=list)  # "round N: why", over the run

    def to_dict(self) -> dict[str, Any]:
        """The summary as summary.json and checkpoints hold it; ``rejected`` (the total)
        and ``rejections`` only when an upload or reply was left out."""
        if self.diverged_round is not None:
            head: dict[str, Any] = {
                "status": "diverged",
                "diverged_round": self.diverged_round,
                "reason": self.reason,
            }
        else:
            head = {"status": "ok"}
        out = {
            **head,
            "final_acc": self.final_acc,
            "final_loss": self.final_loss,
            "best_acc": self.best_acc,
            "rounds": self.rounds,
            "wall_s": self.wall_s,
        }
        if self.rejections:
            out.update(rejected=len(self.rejections), rejections=list(self.rejections))
        return out
