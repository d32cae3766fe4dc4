"""Wall and CPU seconds of the commands that need no tensors (`--version`, `--help`, ...).

Runs each command in a fresh process several times, interleaved with the same commands of
an older source tree when ``--before SRC`` is given (e.g. ``git worktree add /tmp/old
<commit>`` and ``--before /tmp/old/src``), and prints the medians. The CPU seconds of a
command change little with the machine's load; the wall seconds are what a user waits.
Usage: python benchmarks/light_commands.py [--runs 7] [--before SRC]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ("--version",),
    ("presets",),
    ("run", "--help"),
    ("run", "--print-config"),
    ("run", "--rounds", "0"),
)
HERE = Path(__file__).resolve().parents[1] / "src"


def timed(src: str, args: tuple[str, ...]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fedftg ARGS`` run from source tree ``src``."""
    env = {**os.environ, "PYTHONPATH": src}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedftg.cli", *args], env=env, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command [7]")
    parser.add_argument("--before", help="an older source tree (its src/) to compare with")
    args = parser.parse_args()
    trees = {"now": str(HERE)}
    if args.before:
        trees = {"before": args.before, **trees}
    seen: dict[tuple[str, tuple[str, ...]], list[tuple[float, float]]] = {}
    for _ in range(args.runs):
        for command in COMMANDS:
            for name, src in trees.items():  # interleaved: both see the same background
                seen.setdefault((name, command), []).append(timed(src, command))
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.runs}")
    print(f"{'command':<22}" + "".join(f" {n + ' wall s':>13} {n + ' cpu s':>12}" for n in trees))
    for command in COMMANDS:
        cells = ""
        for name in trees:
            runs = seen[(name, command)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            cells += f" {wall:13.2f} {cpu:12.2f}"
        print(f"{' '.join(command):<22}{cells}")


if __name__ == "__main__":
    main()
