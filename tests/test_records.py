"""Typed records (`fedftg.engine.records`) serialise to the rows and summaries fedftg has
always written, and the one run loop (`fedftg.engine.loop.run_methods`) drives a method
source and a report the same way for both engines."""

from __future__ import annotations

import json

import pytest

from fedftg.config import RunConfig
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.loop import run_methods
from fedftg.engine.records import NO_FINITE_UPLOAD, SKIPPED, MethodSummary, RoundRecord
from fedftg.engine.rundir import RunDir
from fedftg.engine.setup import prepare


def test_a_trained_round_keeps_the_row_order_of_the_metrics_file():
    record = RoundRecord(
        round_num=3,
        clients=2,
        lr=0.1,
        train_loss=1.5,
        train_plugin_loss=0.25,
        acc_before_server=0.5,
        server_s=0.01,
        plugin={"ftg_loss_gen": 2.0},
        ensemble={"ensemble_acc": 0.7},
        test_acc=0.6,
        test_loss=1.25,
        round_s=0.5,
        elapsed_s=1.5,
        rejected=1,
    )
    assert list(record.to_row().items()) == [
        ("round", 3),
        ("clients", 2),
        ("lr", 0.1),
        ("train_loss", 1.5),
        ("train_plugin_loss", 0.25),
        ("acc_before_server", 0.5),
        ("server_s", 0.01),
        ("ftg_loss_gen", 2.0),
        ("ensemble_acc", 0.7),
        ("test_acc", 0.6),
        ("test_loss", 1.25),
        ("round_s", 0.5),
        ("elapsed_s", 1.5),
        ("rejected", 1),
    ]
    plain = RoundRecord(round_num=1, clients=3, lr=0.1, train_loss=1.0, diverged=True)
    assert list(plain.to_row()) == [
        *("round", "clients", "lr", "train_loss", "test_acc", "test_loss", "status"),
        *("round_s", "elapsed_s", "rejected"),
    ]
    assert plain.to_row()["status"] == "diverged" and plain.to_row()["test_acc"] is None


def test_rounds_without_an_aggregate_keep_their_rows():
    lost = RoundRecord(round_num=2, outcome=NO_FINITE_UPLOAD, lr=0.1, diverged=True, rejected=3)
    assert lost.to_row() == {
        "round": 2,
        "clients": 0,
        "rejected": 3,
        "train_loss": None,
        "test_acc": None,
        "test_loss": None,
        "status": "diverged",
        "lr": 0.1,
        "round_s": None,
        "elapsed_s": 0.0,
    }
    assert list(lost.to_row())[:3] == ["round", "clients", "rejected"]
    skipped = RoundRecord(round_num=4, outcome=SKIPPED, elapsed_s=7.5, rejected=2)
    assert list(skipped.to_row().items()) == [
        ("round", 4),
        ("skipped", True),
        ("test_acc", None),
        ("test_loss", None),
        ("elapsed_s", 7.5),
        ("rejected", 2),
    ]


def test_a_round_record_reads_as_its_row():
    record = RoundRecord(round_num=1, clients=2, test_acc=0.5, plugin={"ftg_loss_md": 0.1})
    assert record["test_acc"] == 0.5 and record["ftg_loss_md"] == 0.1
    assert "ftg_loss_md" in record and "acc_before_server" not in record
    assert dict(record) == record.to_row() and len(record) == len(record.to_row())
    with pytest.raises(KeyError):
        record["server_s"]


def test_method_summary_dicts():
    ok = MethodSummary(final_acc=0.8, final_loss=0.5, best_acc=0.9, rounds=3, wall_s=2.0)
    assert list(ok.to_dict().items()) == [
        ("status", "ok"),
        ("final_acc", 0.8),
        ("final_loss", 0.5),
        ("best_acc", 0.9),
        ("rounds", 3),
        ("wall_s", 2.0),
    ]
    gone = MethodSummary(
        final_acc=None,
        final_loss=None,
        best_acc=0.4,
        rounds=2,
        wall_s=1.0,
        diverged_round=2,
        reason="the test loss is not finite",
        rejections=["round 1: client 0: loss is not a finite number"],
    )
    assert list(gone.to_dict())[:3] == ["status", "diverged_round", "reason"]
    assert gone.to_dict()["status"] == "diverged" and gone.to_dict()["rejected"] == 1
    assert gone.to_dict()["rejections"] == ["round 1: client 0: loss is not a finite number"]


class _Events:
    """A `Report` that records what the loop told it."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def finished_before(self, method):
        self.events.append(("finished before", method))

    def start_method(self, method, rounds, done, later):
        self.events.append(("start", method, rounds, done, later))

    def round(self, method, record):
        self.events.append(("round", method, record.round_num))

    def end_method(self):
        self.events.append(("end",))

    def going_on(self, message):
        self.events.append(("going on", message))

    def close(self):
        self.events.append(("close",))


def test_the_run_loop_writes_every_round_and_resumes_where_it_stopped(tmp_path):
    cfg = RunConfig(
        clients=2,
        participation=1.0,
        rounds=2,
        local_steps=1,
        method=["fedavg", "fedprox"],
        out=str(tmp_path / "run"),
    ).validate()
    setup = prepare(cfg)
    calls: list[str] = []

    def start(display, base, plugin):
        runner = MethodRunner(setup, base, plugin)

        def next_round():
            calls.append(display)
            return runner.run_round()

        return runner, next_round

    def run_once(rounds: int, resume: bool = False) -> tuple[dict, list]:
        report = _Events()
        with RunDir.open(
            cfg.override({"rounds": rounds}), engine="in-process", resume=resume
        ) as run:
            run.start(setup.partition, setup.dataset)
            summary = run_methods(run, setup.partition, start, report, "stop")
        return summary, report.events

    summary, events = run_once(2)
    assert events == [
        ("start", "fedavg", 2, 0, 2),
        ("round", "fedavg", 1),
        ("round", "fedavg", 2),
        ("end",),
        ("start", "fedprox", 2, 0, 0),
        ("round", "fedprox", 1),
        ("round", "fedprox", 2),
        ("end",),
        ("close",),
    ]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [
        ("fedavg", 1),
        ("fedavg", 2),
        ("fedprox", 1),
        ("fedprox", 2),
    ]
    assert summary["methods"]["fedprox"]["rounds"] == 2
    # extended to 3 rounds: each method goes on from its final state, one round each
    calls.clear()
    summary, events = run_once(3, resume=True)
    assert calls == ["fedavg", "fedprox"]
    # the ETA's later rounds: fedprox has 1 of its 3 left, not 3
    assert ("start", "fedavg", 3, 2, 1) in events and ("round", "fedprox", 3) in events
    assert summary["methods"]["fedavg"]["rounds"] == 3
    # run again as it is: nothing left to run, both reported as finished before
    calls.clear()
    _, events = run_once(3)
    assert calls == [] and events[:2] == [
        ("finished before", "fedavg"),
        ("finished before", "fedprox"),
    ]
