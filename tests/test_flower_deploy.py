"""Flower deployment with real processes on loopback: SuperLink, SuperNodes, `flwr run`.

Every process is started in its own session and stopped by its pid (process group) at
the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "flower-app"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Wait until something listens on ``port`` (the process must stay alive)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited early:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on port {port} after {timeout}s")


class Federation:
    """A SuperLink and N SuperNodes as real local processes."""

    def __init__(self, tmp: Path, nodes: int) -> None:
        if shutil.which("flower-superlink") is None:
            pytest.skip("flower-superlink is not installed")
        self.tmp = tmp
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "OMP_NUM_THREADS": "1"}
        # one HTTP port serves the SuperLink's fleet, control and runtime APIs
        self.port, *node_ports = _free_ports(1 + nodes)
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen] = []
        self.node_ports = node_ports

    def start(self) -> None:
        """Start the SuperLink, wait for it, then the SuperNodes."""
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self._start(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port)],
        )
        _wait_port(self.port, self.procs[0], self.tmp / "superlink.log")
        for i, port in enumerate(self.node_ports):
            self.nodes.append(
                self._start(
                    f"supernode{i}",
                    [
                        "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.port}",
                        "--node-config",
                        f"partition-id={i} num-partitions={len(self.node_ports)}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                )
            )

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("w")
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def run(self, run_config: str, timeout: float = 400) -> subprocess.CompletedProcess:
        cmd = ["flwr", "run", str(APP), "deploy", "--run-config", run_config, "--stream"]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.time() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill(proc)


@pytest.fixture
def federation(tmp_path):
    feds: list[Federation] = []

    def make(nodes: int) -> Federation:
        feds.append(Federation(tmp_path, nodes))
        feds[-1].start()  # registered first, so a failed start is still cleaned up
        return feds[-1]

    yield make
    for fed in feds:
        fed.stop()
        assert all(p.poll() is not None for p in fed.procs), "a process was left running"


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
    cmd = [
        "flwr",
        "run",
        str(APP),
        "deploy",
        "--stream",
        "--run-config",
        f"clients=3 participation=1.0 rounds=4 local-epochs=1 method='fedavg' "
        f"min-replies=2 round-timeout=60.0 node-wait=60.0 out='{out}'",
    ]
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
