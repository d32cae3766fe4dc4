"""Flower deployment with real processes on loopback: SuperLink, SuperNodes, `flwr run`
(the processes are managed by tests/flower_federation.py)."""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

pytest.importorskip("flwr")

pytestmark = pytest.mark.processes  # a SuperLink, SuperNodes and `flwr run` each test

from flower_federation import available, running  # noqa: E402


@pytest.fixture
def federation(tmp_path):
    """Start a deployment of N SuperNodes: ``federation(N)``; all stopped at the end."""
    if not available():
        pytest.skip("flower-superlink is not installed")
    with ExitStack() as stack:
        yield lambda nodes: stack.enter_context(running(tmp_path, nodes))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def test_superlink_and_three_supernodes_run_fedftg(federation, tmp_path):
    fed = federation(3)
    out = tmp_path / "out"
    proc = fed.run(
        f"clients=3 participation=1.0 rounds=2 local-epochs=1 method='fedavg+ftg' "
        f"ftg-iterations=2 node-wait=60.0 out='{out}'"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = _metrics(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["clients"] == 3 and 0 <= r["test_acc"] <= 1 for r in records)
    assert "ftg_loss_gen" in records[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["methods"]["fedavg+ftg"]["rounds"] == 2


def test_a_supernode_dying_mid_run_does_not_kill_the_run(federation, tmp_path):
    fed = federation(3)
    out = tmp_path / "out"
    cmd = fed.command(
        f"clients=3 participation=1.0 rounds=4 local-epochs=1 method='fedavg' "
        f"min-replies=2 round-timeout=60.0 node-wait=60.0 out='{out}'"
    )
    runner = subprocess.Popen(
        cmd, env=fed.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while len(_metrics(out / "metrics.jsonl")) < 1 and time.time() < deadline:
            time.sleep(0.2)
        fed.kill(fed.nodes[2])  # partition 2 disappears after round 1
        output, _ = runner.communicate(timeout=400)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, output[-3000:]
    records = _metrics(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert records[0]["clients"] == 3
    assert all(r["clients"] == 2 for r in records[2:])  # the dead node no longer counts
    assert all(r["rejected"] <= 1 for r in records)  # counted per round, not over the run
