"""Overhead of Flower's simulation engine over the in-process simulator, same rounds.

Runs the same config (same seed, clients, rounds) both ways in one process and prints one
JSON object: wall-clock of each (with and without start-up), and their ratio.
Usage: python benchmarks/flower_overhead.py [--rounds 5] [--clients 5] [--method fedavg]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedftg.config import RunConfig
from fedftg.engine.run import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args()
    from flwr.simulation import run_simulation

    from fedftg.flower.client_app import app as client_app
    from fedftg.flower.server_app import build_server_app

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
    t0 = time.perf_counter()
    run_simulation(
        build_server_app(config(str(tmp / "flower")), node_wait=30),
        client_app,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    flower_s = time.perf_counter() - t0
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
