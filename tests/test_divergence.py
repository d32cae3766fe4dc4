"""Divergence: NaN uploads are rejected in-process, a NaN model stops the method, and every
JSON file stays strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedftg.cli import main
from fedftg.config import RunConfig
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.setup import prepare
from fedftg.report.files import MetricsLog, write_json

FAST = ["--rounds", "2", "--clients", "3", "--local-epochs", "1", "--participation", "1"]
FAST += ["--local-steps", "2"]


def _strict(text: str):
    """json.loads that refuses NaN / Infinity, as JavaScript's JSON.parse does."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _run(capsys, args):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _poison_client(runner: MethodRunner, client: int) -> None:
    """Make one client's upload NaN (as a diverging local update would)."""
    local_round = runner.local_round

    def poisoned(selected=None):
        results, histograms, start = local_round(selected)
        first = next(iter(results[client].state))
        results[client].state[first] = torch.full_like(results[client].state[first], math.nan)
        return results, histograms, start

    runner.local_round = poisoned


def test_nan_upload_is_rejected_and_counted():
    cfg = RunConfig(clients=3, participation=1.0, rounds=1, local_steps=2, method=["fedavg"])
    setup = prepare(cfg.validate())
    runner = MethodRunner(setup, "fedavg", None)
    _poison_client(runner, 1)
    record = runner.run_round()
    assert record["rejected"] == 1 and record["clients"] == 2
    assert runner.diverged is None and math.isfinite(record["test_loss"])
    assert all(torch.isfinite(v).all() for v in runner.state.global_state.values())
    # the summary carries the run's total and why, one line per rejected upload
    summary = runner.summary().to_dict()
    assert summary["rejected"] == 1
    assert summary["rejections"] == ["round 1: client 1: model holds NaN or Inf"]
    # round 2 is clean
    runner.local_round = lambda selected=None: MethodRunner.local_round(runner, selected)
    assert runner.run_round()["rejected"] == 0  # per round, not over the run
    assert runner.summary().to_dict()["rejected"] == 1


def test_all_uploads_nan_marks_the_method_diverged():
    cfg = RunConfig(clients=2, participation=1.0, rounds=1, local_steps=2, method=["fedavg"])
    runner = MethodRunner(prepare(cfg.validate()), "fedavg", None)
    _poison_client(runner, 0)
    _poison_client(runner, 1)
    record = runner.run_round()
    assert record["status"] == "diverged" and record["rejected"] == 2
    summary = runner.summary().to_dict()
    assert summary["status"] == "diverged" and summary["final_acc"] is None
    assert summary["rejected"] == 2 and len(summary["rejections"]) == 2


def test_strict_json_writers(tmp_path):
    write_json(tmp_path / "s.json", {"a": math.nan, "b": [math.inf, 1.5], "c": torch.ones(2)})
    assert _strict((tmp_path / "s.json").read_text()) == {"a": None, "b": [None, 1.5], "c": [1, 1]}
    MetricsLog(tmp_path / "m.jsonl").append({"round": 1, "loss": -math.inf})
    line = _strict((tmp_path / "m.jsonl").read_text())
    assert line == {"round": 1, "loss": None, "status": "non-finite"}


def _outputs_are_strict(out: Path) -> dict:
    for path in out.glob("*.json"):
        _strict(path.read_text())
    lines = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and any(r.get("status") == "diverged" for r in lines)
    return _strict((out / "summary.json").read_text())


def test_divergence_stops_with_exit_3_and_strict_json(tmp_path, capsys):
    out = tmp_path / "n"
    code, err = _run(
        capsys, ["run", *FAST, "--lr", "1e6", "--method", "fedavg,fedprox", "--out", str(out)]
    )
    assert code == 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fedavg diverged at round " in errors[0]
    summary = _outputs_are_strict(out)
    assert summary["methods"]["fedavg"]["status"] == "diverged"
    assert "fedprox" not in summary["methods"]  # stopped before the next method


def test_divergence_continue_records_status_and_runs_the_rest(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["run", *FAST, "--lr", "1e6", "--method", "fedavg,fedprox", "--out", str(out)]
    code, err = _run(capsys, [*args, "--on-divergence", "continue"])
    assert code == 0 and "fedavg diverged at round " in err
    summary = _outputs_are_strict(out)
    assert summary["methods"]["fedavg"]["status"] == "diverged"
    assert summary["methods"]["fedprox"]["status"] == "diverged"
    assert summary["methods"]["fedprox"]["diverged_round"] in (1, 2)


@pytest.mark.parametrize("value", ["maybe"])
def test_on_divergence_choices(capsys, value):
    code, err = _run(capsys, ["run", "--on-divergence", value])
    assert code == 2 and err.startswith("error:")
