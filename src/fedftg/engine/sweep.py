"""`fedftg sweep`: a grid of runs (e.g. alpha x seed), each a normal run directory.

Every grid point runs all requested methods on its own shared partition and initial model.
Points whose run directory already holds a finished run with the same settings are
skipped; interrupted ones continue from their checkpoint. Each point runs in a child
process (``jobs > 1``: that many in parallel, the CPU threads split between them), which
holds the point's run directory (`fedftg.engine.dirlock`) and ends with the sweep, however
the sweep ends (`follow_parent`).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedftg.config import (
    RunConfig,
    Source,
    canonical_key,
    fingerprint,
    finish,
    flatten_sections,
    layered,
    nest_dotted,
)
from fedftg.errors import UserError
from fedftg.threads import ThreadPlan, child_env, other_running, plan_threads, usable_cores


def parse_grid(items: list[str] | dict[str, Any]) -> dict[str, list[Any]]:
    """``["alpha=0.1,0.5", "ftg.gen_lr=0.01,0.001"]`` (or a TOML table, sections as
    sub-tables) -> ordered {setting: values}; section settings keyed ``ftg.gen_lr``."""
    if isinstance(items, dict):
        return {
            canonical_key(k): v if isinstance(v, list) else [v]
            for k, v in flatten_sections(items).items()
        }
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key.strip() or not values.strip():
            raise UserError(f"grid: expected FIELD=V1,V2,... got {item!r}")
        grid[canonical_key(key)] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def grid_points(base: RunConfig, grid: dict[str, list[Any]]) -> list[tuple[str, RunConfig]]:
    """(name, validated config) for every combination; names like ``alpha=0.1,seed=2``."""
    if "method" in grid or "out" in grid:
        raise UserError("grid: 'method' and 'out' cannot be swept (list methods in --method)")
    points = []
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = ",".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) or "run"
        point = Source(nest_dotted(dict(zip(keys, combo, strict=True))), "grid: ")
        cfg, given = layered([point], base)
        cfg.out = point_out(base, name)
        points.append((name, finish(cfg, given)))
    return points


def point_out(base: RunConfig, name: str) -> str:
    """The run directory of grid point ``name`` of the sweep ``base``: ``<out>/<name>``."""
    return str(Path(base.out) / name)


def is_complete(cfg: RunConfig) -> bool:
    """True if ``cfg.out`` holds a finished run written with the same settings."""
    path = Path(cfg.out) / "summary.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    same = fingerprint(saved.get("config", {})) == fingerprint(cfg.to_dict())
    done = all(saved.get("methods", {}).get(m, {}).get("rounds") == cfg.rounds for m in cfg.method)
    return same and done


def point_line(r: dict[str, Any]) -> str:
    """The line a sweep prints for a point as it finishes (or is skipped)."""
    return f"{r['name']:<40} {r['status']}  ({r['out']})"


def sweep_threads(base: RunConfig, jobs: int) -> ThreadPlan:
    """The threads of each point of a sweep of ``jobs`` parallel runs: ``--threads`` or
    ``OMP_NUM_THREADS`` if given, else the usable cores split between the jobs. Split once:
    every point runs on the same count, whatever order the points finish in, since the
    count changes float rounding (a point's tail running alone keeps its share)."""
    if jobs < 1:
        raise UserError(f"jobs: must be >= 1, got {jobs}")
    return plan_threads(usable_cores(), jobs, base.threads, os.environ, other_running())


def threads_line(base: RunConfig, jobs: int) -> str:
    """The line a sweep starts with: its points' thread count and whether their numbers
    are those of the same settings run alone (same count) or differ at float rounding."""
    plan = sweep_threads(base, jobs)
    lone = plan_threads(usable_cores(), 1, base.threads, os.environ).threads
    each = f"{plan.threads} torch thread{'s' if plan.threads > 1 else ''} per run"
    if plan.threads == lone:
        return f"sweep: {jobs} job(s), {each}, as a run alone: the same numbers"
    return (
        f"sweep: {jobs} jobs, {each} (a run alone uses {lone}): points differ from a run "
        f"alone at float rounding; `fedftg run --threads {plan.threads}` repeats one exactly"
    )


# exit status of a child `fedftg run` whose method diverged (see `fedftg.cli`)
EXIT_DIVERGED = 3


def run_sweep(
    base: RunConfig,
    points: list[tuple[str, RunConfig]],
    jobs: int = 1,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every point (`grid_points` of ``base``) not yet complete; returns one status
    dict per point.

    ``on_point`` is called with each point's status as soon as it is known (skipped ones
    first, then each run as it finishes), from the calling thread's lock-guarded workers."""
    lock = threading.Lock()

    def tell(r: dict[str, Any]) -> dict[str, Any]:
        if on_point is not None:
            with lock:
                on_point(r)
        return r

    plan = sweep_threads(base, jobs)
    todo = [(n, c) for n, c in points if not is_complete(c)]
    status = [
        {"name": n, "out": c.out, "status": "skipped (complete)"}
        for n, c in points
        if (n, c) not in todo
    ]
    for r in status:
        tell(r)
    Path(base.out).mkdir(parents=True, exist_ok=True)

    def launch(item: tuple[str, RunConfig]) -> dict[str, Any]:
        name, cfg = item
        cmd = [
            sys.executable,
            "-m",
            "fedftg.sweep_point",  # `fedftg run` that ends with this process
            str(os.getpid()),
            "run",  # not a terminal: its log gets one progress line per round
            "--config-json",
            json.dumps(cfg.to_dict()),
        ]
        env = child_env(plan, os.environ)
        log = Path(cfg.out + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        text = "done" if code == 0 else f"failed ({code})"
        if code == EXIT_DIVERGED:
            text = "failed (diverged)"
        return tell({"name": name, "out": cfg.out, "status": text, "log": str(log)})

    if jobs == 1:
        status += [launch(item) for item in todo]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            status += list(pool.map(launch, todo))
    return status


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def follow_parent(parent: int, poll_s: float = 1.0) -> None:
    """Send this process SIGTERM when process ``parent`` (the sweep) ends, kill -9 included.

    SIGTERM, not SIGKILL: the point then stops as on Ctrl-C (its round finished and saved,
    exit 143), so a rerun of the sweep continues it. On Linux the kernel sends the signal
    (``prctl(PR_SET_PDEATHSIG)``; it fires when the thread that started this process ends,
    and `run_sweep`'s threads wait for their child); elsewhere a daemon thread looks every
    ``poll_s`` seconds whether the parent has gone. A parent that ended before this call
    gets the signal sent at once."""
    me = os.getpid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    else:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(poll_s)
            os.kill(me, signal.SIGTERM)

        threading.Thread(target=watch, name="follow-parent", daemon=True).start()
    if os.getppid() != parent:
        os.kill(me, signal.SIGTERM)
