"""Overhead of Flower's simulation engine over the in-process simulator, same rounds.

Runs the same config (same seed, clients, rounds) both ways in one invocation: in-process,
then `flwr run flower-app` on a local SuperLink in simulation mode (started here on a free
port with a temporary FLWR_HOME, by tests/flower_federation.py, and stopped at the end).
Both engines train with one thread per process (the Flower processes get OMP_NUM_THREADS=1;
two threads per process on a busy 2-core machine stall on each other). Prints one JSON
object: wall-clock of each (with and without start-up), and their ratio.
Usage: python benchmarks/flower_overhead.py [--rounds 5] [--clients 5] [--method fedavg]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedftg.config import RunConfig
from fedftg.engine.run import run_experiment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flower_federation import running  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in the Flower processes
    tmp = Path(tempfile.mkdtemp())

    def config(out: str) -> RunConfig:
        return RunConfig(
            clients=args.clients,
            participation=1.0,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            method=[args.method],
            out=out,
        ).validate()

    t0 = time.perf_counter()
    local = run_experiment(config(str(tmp / "local")), verbosity=0)
    local_s = time.perf_counter() - t0
    # the same settings as run config; the app's other defaults are `fedftg run`'s
    run_config = (
        f"clients={args.clients} participation=1.0 rounds={args.rounds} "
        f"local-epochs={args.local_epochs} method='{args.method}' node-wait=60.0 "
        f"out='{tmp / 'flower'}'"
    )
    t0 = time.perf_counter()
    with running(tmp / "federation", nodes=args.clients, simulation=True) as fed:
        superlink_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = fed.run(run_config, timeout=3600)
        flower_s = time.perf_counter() - t0
        status = fed.status(proc.stdout)["status"]
    if status != "finished:completed":
        sys.exit(f"the Flower run ended {status}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    flower = json.loads((tmp / "flower" / "summary.json").read_text())
    rounds_local = local["methods"][args.method]["wall_s"]
    rounds_flower = flower["methods"][args.method]["wall_s"]
    print(
        json.dumps(
            {
                "rounds": args.rounds,
                "clients": args.clients,
                "method": args.method,
                "in_process_total_s": round(local_s, 2),
                "flower_total_s": round(flower_s, 2),
                "superlink_start_s": round(superlink_s, 2),
                "in_process_rounds_s": round(rounds_local, 2),
                "flower_rounds_s": round(rounds_flower, 2),
                "ratio_total": round(flower_s / local_s, 2),
                "ratio_rounds": round(rounds_flower / rounds_local, 2),
                "final_acc_in_process": local["methods"][args.method]["final_acc"],
                "final_acc_flower": flower["methods"][args.method]["final_acc"],
            }
        )
    )


if __name__ == "__main__":
    main()
