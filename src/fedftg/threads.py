"""CPU threads: how many torch uses and how its OpenMP threads wait, chosen before torch loads.

On a shared CPU (a laptop, a cluster node, `fedftg sweep --jobs N`) OpenMP threads that
spin while they wait for each other burn the cores other processes need, and a run slows
down far beyond its share of the machine. So a run uses the cores it may run on, divided
between the jobs of a sweep, and its threads wait passively (they sleep instead of
spinning) when the cores are shared: beside a sweep's siblings, or when other processes are
running as the run starts. On an idle machine OpenMP's own wait (spin a while, then sleep) is
kept, since passive waiting there costs about a quarter of the time of the many small kernels
of a FedFTG step (benchmarks/README.md, "CPU load"). ``OMP_NUM_THREADS`` /
``OMP_WAIT_POLICY`` and ``--threads`` override the choice.

The wait policy is read by OpenMP when torch loads, so `apply_threads` must run before the
first ``import torch`` of the process to change it; what is actually in force is recorded
(`in_force`) in config.json's environment. The thread count changes the float rounding of
some kernels (not which samples are drawn), so it is recorded but not fingerprinted.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from fedftg.errors import UserError

WAIT_POLICIES = ("passive", "active")
# OpenMP's own wait (OMP_WAIT_POLICY unset): what an idle machine gets, and what a process
# that loaded torch before fedftg chose reports
DEFAULT_POLICY = "default"


@dataclass(frozen=True)
class ThreadPlan:
    """The torch intra-op thread count and the OpenMP wait policy of a process."""

    threads: int
    wait_policy: str
    source: str  # where the thread count came from: flag, OMP_NUM_THREADS or cores


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _env_threads(value: str) -> int:
    """The thread count of an ``OMP_NUM_THREADS`` value (its first level: ``"4,2"`` -> 4)."""
    first = value.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise UserError(f"OMP_NUM_THREADS: must be a positive integer, got {value!r}")
    return int(first)


def other_running() -> float:
    """How many other processes are running now: the median of a few readings of the
    kernel's count of runnable tasks, less this one (Linux); elsewhere the 1-minute load
    average. A spinning neighbour counts at once, a passing one is out-voted."""
    try:
        readings = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                readings.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.005)
        return float(sorted(readings)[len(readings) // 2])
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def plan_threads(
    cores: int,
    jobs: int = 1,
    flag: int | None = None,
    env: Mapping[str, str] | None = None,
    others: float = 0.0,
) -> ThreadPlan:
    """The thread count and wait policy for a process sharing ``cores`` usable cores with
    ``jobs - 1`` siblings of its sweep and ``others`` other running processes: ``flag``
    (``--threads``), else ``OMP_NUM_THREADS`` from ``env``, else an equal share of the cores
    (at least one thread); the wait policy is ``OMP_WAIT_POLICY`` from ``env``, else passive
    where the cores are shared (siblings, or at least one other running process), else
    OpenMP's default."""
    env = {} if env is None else env
    if cores < 1 or jobs < 1:
        raise ValueError(f"cores and jobs must be >= 1, got {cores}, {jobs}")
    if flag is not None:
        threads, source = flag, "flag"
    elif env.get("OMP_NUM_THREADS", "").strip():
        threads, source = _env_threads(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        threads, source = max(1, cores // jobs), "cores"
    shared = jobs > 1 or others >= 1
    policy = env.get("OMP_WAIT_POLICY", "").strip().lower()
    policy = policy or ("passive" if shared else DEFAULT_POLICY)
    if policy not in (*WAIT_POLICIES, DEFAULT_POLICY):
        raise UserError(
            f"OMP_WAIT_POLICY: unknown value {env['OMP_WAIT_POLICY']!r}; use passive or active"
        )
    return ThreadPlan(threads, policy, source)


def child_env(plan: ThreadPlan, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a child process that should run under ``plan`` (a sweep's point)."""
    out = {**env, "OMP_NUM_THREADS": str(plan.threads), "OMP_WAIT_POLICY": plan.wait_policy}
    if plan.wait_policy == DEFAULT_POLICY:
        del out["OMP_WAIT_POLICY"]
    return out


_IN_FORCE: dict[str, str] = {}


def apply_threads(plan: ThreadPlan) -> None:
    """Put ``plan`` in force in this process: the wait policy when torch is not loaded yet
    (OpenMP reads it once, as torch loads), the thread count in any case."""
    if "torch" not in sys.modules:
        if plan.wait_policy == DEFAULT_POLICY:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = plan.wait_policy
        _IN_FORCE["wait_policy"] = plan.wait_policy
    import torch

    torch.set_num_threads(plan.threads)


def in_force() -> dict[str, object]:
    """The thread count and wait policy this process runs under, for the run's record."""
    import torch

    policy = _IN_FORCE.get("wait_policy")
    if policy is None:  # chosen by whoever loaded torch: the environment of that time
        policy = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() or DEFAULT_POLICY
    return {"torch_threads": torch.get_num_threads(), "omp_wait_policy": policy}
