"""A short run beside busy processes: its slowdown against its fair share of the cores.

Runs the same short job (digits, `fedftg run --method fedftg --rounds 3`) alone and beside
N busy processes (pure-Python spin loops, each bounded in time and killed at the end), in
each mode, interleaved in one invocation:

- before: the old behaviour, torch's defaults (as many threads as usable cores, OpenMP's
  default wait: spin, then sleep), i.e. torch loaded before fedftg chooses anything;
- after: fedftg's choice (`fedftg.threads`: its share of the cores, passive wait when other
  processes run);
- one: fedftg's choice with `--threads 1`, the override for a machine known to be busy
  (not in the default modes; `--modes before,after,one`).

The busy processes are children of this one, so they share its session and the kernel
shares the cores equally between all runnable threads (the job's and the busy ones). The
fair share of a job running T threads beside N busy processes on C cores is therefore its
time alone times (T + N) / C, and never less than its time alone: beside two busy
processes a two-threaded job on two cores deserves twice its time alone ("twice
oversubscribed"). T is read from the run's config.json. Prints one table: seconds and the
slowdown against the fair share per mode (1.00 = exactly its share; the goal is at most
1.25). Run it on a quiet machine: other work on the machine counts as load too.
Usage: python benchmarks/load.py [--rounds 3] [--busy 2,4] [--repeats 1] [--modes before,after]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedftg.threads import usable_cores

# a busy process: spins in pure Python until its time is up (or it is killed)
SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass"
# "before": torch loads first, so fedftg's choice of wait policy cannot take effect and the
# thread count stays torch's default (OMP_* are removed from the environment)
BEFORE = "import sys, torch\nfrom fedftg.cli import main\nsys.exit(main(sys.argv[1:]))"
MODES = ("before", "after", "one")


def fair_share(alone_s: float, busy: int, cores: int, threads: int) -> float:
    """The time a job taking ``alone_s`` alone with ``threads`` threads deserves beside
    ``busy`` busy processes on ``cores`` cores: every runnable thread an equal share of the
    cores, never faster than alone."""
    return alone_s * max(1.0, (threads + busy) / cores)


def job_command(mode: str, args: list[str]) -> list[str]:
    """The command line of the job in ``mode`` (before / after / one)."""
    if mode == "before":
        return [sys.executable, "-c", BEFORE, *args]
    if mode == "one":
        args = [*args, "--threads", "1"]
    return [sys.executable, "-m", "fedftg.cli", *args]


def clean_env() -> dict[str, str]:
    """This environment without the OpenMP settings, so each mode makes its own choice."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}


def run_threads(out: Path) -> int:
    """The torch thread count a finished run recorded in its config.json."""
    config = json.loads((out / "config.json").read_text())
    return int(config["environment"]["torch_threads"])


def timed_job(mode: str, busy: int, rounds: int, out: Path, limit_s: float) -> tuple[float, int]:
    """Seconds the job takes in ``mode`` beside ``busy`` spinning processes (inf when it
    has not finished after ``limit_s``: it is stopped there) and its thread count."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(limit_s)]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)  # let the spinners start
        args = ["run", "--method", "fedftg", "--rounds", str(rounds), "--quiet"]
        args += ["--fresh", "--out", str(out)]
        t0 = time.perf_counter()
        try:
            subprocess.run(job_command(mode, args), env=clean_env(), check=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            return math.inf, 0
        return time.perf_counter() - t0, run_threads(out)
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def table(seconds: dict[tuple[str, int], float], threads: dict[str, int], cores: int) -> str:
    """Seconds per (mode, busy processes) and the slowdown against each mode's fair share."""
    modes = [m for m in MODES if (m, 0) in seconds]
    head = f"{'busy':>4}" + "".join(f" {m + ' s':>9} {m + '/fair':>11}" for m in modes)
    lines = [head]
    for busy in sorted({b for _, b in seconds}):
        row = f"{busy:>4}"
        for m in modes:
            s = seconds[(m, busy)]
            fair = fair_share(seconds[(m, 0)], busy, cores, threads.get(m, cores))
            row += f" {s:9.1f} {s / fair:11.2f}"
        lines.append(row)
    lines.append("threads: " + ", ".join(f"{m} {threads.get(m, '?')}" for m in modes))
    if "before" in modes and "after" in modes:
        quiet = seconds[("after", 0)] / seconds[("before", 0)]
        lines.append(f"alone: after / before = {quiet:.3f} (the cost of the choice on a quiet CPU)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", default="2,4", help="busy process counts, comma list [2,4]")
    parser.add_argument("--repeats", type=int, default=1, help="medians of this many [1]")
    parser.add_argument("--limit", type=float, default=900.0, help="seconds per job at most")
    parser.add_argument("--modes", default="before,after", help=f"of {','.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; use {', '.join(MODES)}")
    counts = [0, *(int(n) for n in args.busy.split(","))]
    cores = usable_cores()
    load_before = os.getloadavg()
    out = Path(tempfile.mkdtemp()) / "run"
    runs: dict[tuple[str, int], list[float]] = {}
    threads: dict[str, int] = {}
    for _ in range(args.repeats):
        for busy in counts:
            for mode in modes:  # interleaved: every mode sees the same background
                s, n = timed_job(mode, busy, args.rounds, out, args.limit)
                runs.setdefault((mode, busy), []).append(s)
                if n:  # a job stopped at the limit recorded nothing
                    threads.setdefault(mode, n)
                print(f"{mode:<6} beside {busy} busy: {s:.1f} s", file=sys.stderr, flush=True)
    seconds = {k: statistics.median(v) for k, v in runs.items()}
    load = " -> ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in (load_before, os.getloadavg()))
    print(f"cores: {cores}; job: digits, fedftg, {args.rounds} rounds; load average {load}")
    print(table(seconds, threads, cores))


if __name__ == "__main__":
    main()
