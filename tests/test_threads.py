"""CPU threads: the choice of thread count and wait policy, its record, and sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark
from fedftg.config import RunConfig, fingerprint
from fedftg.engine import sweep
from fedftg.errors import UserError
from fedftg.threads import ThreadPlan, child_env, other_running, plan_threads

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_idle_machine_uses_every_usable_core_and_openmps_own_wait():
    assert plan_threads(8) == ThreadPlan(8, "default", "cores")
    assert plan_threads(8, others=0.5) == ThreadPlan(8, "default", "cores")


def test_shared_cores_wait_passively():
    assert plan_threads(8, others=1) == ThreadPlan(8, "passive", "cores")  # a busy neighbour
    assert plan_threads(8, jobs=2) == ThreadPlan(4, "passive", "cores")  # sweep siblings


@pytest.mark.processes
def test_another_process_running_is_seen_at_once():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert other_running() >= 1
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize(("cores", "jobs", "threads"), [(8, 2, 4), (8, 3, 2), (2, 4, 1), (1, 1, 1)])
def test_sweep_jobs_share_the_cores_with_at_least_one_thread_each(cores, jobs, threads):
    assert plan_threads(cores, jobs).threads == threads


def test_omp_num_threads_overrides_the_share_and_the_flag_overrides_both():
    env = {"OMP_NUM_THREADS": "3"}
    assert plan_threads(8, 2, env=env) == ThreadPlan(3, "passive", "OMP_NUM_THREADS")
    assert plan_threads(8, 2, env={"OMP_NUM_THREADS": "6,2"}).threads == 6  # nested form
    assert plan_threads(8, 2, flag=5, env=env) == ThreadPlan(5, "passive", "flag")
    assert plan_threads(8, flag=5) == ThreadPlan(5, "default", "flag")
    assert plan_threads(8, env={"OMP_NUM_THREADS": " "}).source == "cores"


def test_omp_wait_policy_is_respected_in_any_case():
    assert plan_threads(4, env={"OMP_WAIT_POLICY": "ACTIVE"}).wait_policy == "active"
    assert plan_threads(4, env={"OMP_WAIT_POLICY": "passive"}).wait_policy == "passive"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS"),
        ({"OMP_NUM_THREADS": "many"}, "OMP_NUM"),
        ({"OMP_WAIT_POLICY": "spin"}, "OMP_WAIT_POLICY"),
    ],
)
def test_bad_environment_values_are_user_errors_naming_the_variable(env, name):
    with pytest.raises(UserError, match=name):
        plan_threads(4, env=env)


def test_a_child_runs_under_the_plan():
    env = child_env(ThreadPlan(2, "passive", "cores"), {"PATH": "/bin", "OMP_NUM_THREADS": "9"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "passive"}
    env = child_env(ThreadPlan(2, "default", "cores"), {"OMP_WAIT_POLICY": "active"})
    assert env == {"OMP_NUM_THREADS": "2"}  # OpenMP's own wait: the variable unset


def test_threads_are_not_part_of_the_run_identity():
    one, two = RunConfig(), RunConfig()
    two.threads = 1
    assert fingerprint(one.to_dict()) == fingerprint(two.to_dict())
    saved = one.to_dict()
    del saved["threads"]  # a config.json from before the setting
    assert fingerprint(saved) == fingerprint(two.to_dict())


def test_sweep_says_when_its_points_run_on_fewer_threads_than_a_run_alone(monkeypatch):
    monkeypatch.setattr(sweep, "usable_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    base = RunConfig()
    assert sweep.sweep_threads(base, 2).threads == 2
    line = sweep.threads_line(base, 2)
    assert "2 torch threads per run" in line and "float rounding" in line
    assert "--threads 2" in line
    assert "the same numbers" in sweep.threads_line(base, 1)
    base.threads = 3
    assert "the same numbers" in sweep.threads_line(base, 2)
    with pytest.raises(UserError, match="jobs"):
        sweep.sweep_threads(base, 0)


def _run(args: list[str], out: Path, env: dict[str, str]) -> dict:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    full = {**inherited, "PYTHONPATH": SRC, **env}
    cmd = [sys.executable, "-m", "fedftg.cli", "run", "--method", "fedavg", "--rounds", "1"]
    cmd += ["--clients", "2", "--local-epochs", "1", "--quiet", "--out", str(out), *args]
    subprocess.run(cmd, check=True, env=full, timeout=300)
    return json.loads((out / "config.json").read_text())["environment"]


@pytest.mark.processes
def test_a_run_records_the_threads_and_wait_policy_in_force(tmp_path):
    env = _run(["--threads", "1"], tmp_path / "a", {"OMP_WAIT_POLICY": "passive"})
    assert env["torch_threads"] == 1 and env["omp_wait_policy"] == "passive"
    env = _run([], tmp_path / "b", {"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "1"})
    assert env["torch_threads"] == 1 and env["omp_wait_policy"] == "active"
    # another thread count resumes (extends) the same run instead of refusing it
    env = _run(["--threads", "2", "--rounds", "2", "--resume"], tmp_path / "b", {})
    assert env["torch_threads"] == 2


LIGHT = [
    ["--help"],
    ["--version"],
    ["presets"],
    ["run", "--help"],
    ["sweep", "--help"],
    ["report", "--help"],
    ["partition", "--help"],
    ["bench", "--help"],
    ["presets", "--help"],
    ["run", "--print-config"],
    ["run", "--preset", "paper-cifar10-cpu", "--print-config"],
    ["run", "--rounds", "0"],
    ["run", "--method", "nope"],
    ["run", "--threads", "0"],
    ["run", "--config", "/nonexistent.toml"],
    ["run", "--no-such-flag"],
    ["sweep", "--grid", "seed"],
    ["sweep", "--jobs", "0", "--grid", "seed=0,1"],
    ["partition", "--clients", "0"],
    ["report", "/nonexistent"],
]
HEAVY = ("torch", "matplotlib", "sklearn", "flwr")


@pytest.mark.processes
@pytest.mark.parametrize("args", LIGHT, ids=" ".join)
def test_commands_that_need_no_tensors_do_not_load_torch(args):
    code = f"""
import sys
import fedftg.cli
try:
    status = fedftg.cli.main({args!r})
except SystemExit as exc:
    status = exc.code
loaded = [m for m in {HEAVY!r} if m in sys.modules]
assert not loaded, loaded
sys.exit(status)
"""
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "AssertionError" not in done.stderr, done.stderr
    assert done.returncode in (0, 2), done.stderr
    if done.returncode == 2:  # bad input: one error line, no traceback
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_load_benchmark_fair_share_and_table():
    load = load_benchmark("load")
    assert load.fair_share(10.0, 0, 2, 2) == 10.0  # alone: its own time
    assert load.fair_share(10.0, 1, 2, 1) == 10.0  # one thread, a core each: no slower
    assert load.fair_share(10.0, 2, 2, 2) == 20.0  # four threads on two cores
    assert load.fair_share(10.0, 4, 2, 2) == 30.0
    assert load.fair_share(10.0, 4, 2, 1) == 25.0
    seconds = {("before", 0): 10.0, ("after", 0): 10.2, ("before", 2): 80.0}
    seconds[("after", 2)] = 20.4
    text = load.table(seconds, {"before": 2, "after": 2}, 2)
    assert "4.00" in text and "1.00" in text and "after / before = 1.020" in text
    assert "threads: before 2, after 2" in text
    assert load.job_command("after", ["run"])[1:] == ["-m", "fedftg.cli", "run"]
    assert load.job_command("one", ["run"])[-2:] == ["--threads", "1"]
