"""A local Flower federation as real processes on loopback, driven with `flwr run`.

Shared by the Flower tests and benchmarks/flower_overhead.py. A SuperLink on a free port
(in simulation mode, or with N SuperNodes as separate processes) and a temporary
FLWR_HOME whose config.toml names it as the connection ``fedftg``. Every process is
started in its own session and stopped by its pid (process group), whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "flower-app"
CONNECTION = "fedftg"


class FederationError(RuntimeError):
    """A process of the federation did not start."""


def available() -> bool:
    """Whether Flower's SuperLink executable is installed beside this Python."""
    return shutil.which("flower-superlink", path=_path()) is not None


def _path() -> str:
    # the venv's executables first, so a non-activated run finds flwr-simulation etc.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Wait until something listens on ``port`` (the process must stay alive)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"process exited early:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"nothing listens on port {port} after {timeout}s")


class Federation:
    """A SuperLink and, unless ``simulation``, ``nodes`` SuperNodes as local processes.

    With ``simulation`` the SuperLink runs Flower's simulation runtime: each `flwr run`
    simulates ``nodes`` SuperNodes (``--federation-config num-supernodes=N``).
    """

    def __init__(self, tmp: Path, nodes: int, simulation: bool = False) -> None:
        self.tmp = tmp
        self.simulation = simulation
        self.home = tmp / "flwr-home"
        self.home.mkdir(parents=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "OMP_NUM_THREADS": "1",
            "PATH": _path(),
        }
        # one HTTP port serves the SuperLink's fleet, control and runtime APIs
        self.port, *node_ports = free_ports(1 + (0 if simulation else nodes))
        self.num_nodes = nodes
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen] = []
        self.node_ports = node_ports

    def start(self) -> None:
        """Start the SuperLink, wait for it, then the SuperNodes."""
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        link = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
        self._start("superlink", link + (["--simulation"] if self.simulation else []))
        wait_port(self.port, self.procs[0], self.tmp / "superlink.log")
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

    def command(self, run_config: str, nodes: int | None = None, app: Path = APP) -> list[str]:
        """The `flwr run` command line of ``app`` (fedftg's) with ``run_config``, logs
        streamed; in simulation over ``nodes`` simulated SuperNodes (default: the
        federation's)."""
        cmd = ["flwr", "run", str(app), CONNECTION, "--run-config", run_config, "--stream"]
        if self.simulation:
            # one CPU per simulated node, as Flower's default of 2 would run them one by one
            size = f"num-supernodes={nodes or self.num_nodes} client-resources-num-cpus=1"
            cmd += ["--federation-config", size]
        return cmd

    def run(
        self, run_config: str, nodes: int | None = None, timeout: float = 400, app: Path = APP
    ) -> subprocess.CompletedProcess:
        """`flwr run` to the end of its log stream (its exit status is 0 even when the run
        failed, in flwr 1.42: see `status`)."""
        cmd = self.command(run_config, nodes, app)
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self, output: str) -> dict:
        """Flower's record of the run that `flwr run` printed in ``output`` (status etc.)."""
        match = re.search(r"Successfully started run (\d+)", output)
        if match is None:
            raise FederationError(f"no run id in the output:\n{output[-2000:]}")
        cmd = ["flwr", "list", CONNECTION, "--run-id", match.group(1), "--format", "json"]
        listed = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        text = listed.stdout
        return json.loads(text[text.index("{") :])["runs"][0]

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


@contextmanager
def running(tmp: Path, nodes: int, simulation: bool = False) -> Iterator[Federation]:
    """A started `Federation`, stopped afterwards (an error if a process outlives it)."""
    fed = Federation(tmp, nodes, simulation)
    try:
        fed.start()
        yield fed
    finally:
        fed.stop()
    if any(p.poll() is None for p in fed.procs):
        raise FederationError("a process was left running")
