"""Cross-device rounds of fedftg against pfl-research and Flower, interleaved in one run.

The peer workload: CIFAR-10 shapes (seeded random uint8 3x32x32 images, 10 classes),
``--clients`` clients x ``--samples`` samples, ``--per-round`` clients per round, one local
epoch of SGD at batch ``--batch`` (no momentum, weight decay, clipping or augmentation),
FedAvg, the same CNN (fedftg's `cnn`, re-declared in benchmarks/peer/workload.py for the
peers) and a ``--test-samples`` evaluation after every round. Frameworks, each in its own
process, one warm-up round then ``--rounds`` timed rounds, run in turn ``--repeats`` times
(fedftg-reference, fedftg, pfl, flower, fedftg-reference, ...):

- fedftg: the in-process engine (`MethodRunner`), ``--threads`` torch threads (default 1,
  as pfl and Flower's server; more threads only help on idle cores);
- fedftg-reference: the same on the simple paths of before, for the before/after ratio:
  `evaluate_reference` with torch's max pool in the CNN, the aggregate as one stack per
  tensor (`weighted_average_reference`'s form) and the elementwise finiteness check;
- pfl: pfl-research's FedAvg on its SimulatedBackend (benchmarks/peer/pfl_run.py) under
  ``--pfl-python`` (a Python with `pfl` installed; skipped without one);
- flower: a plain Flower app (benchmarks/peer/flower_app.py: FedAvg, central evaluation)
  through `flwr run` on a local simulation SuperLink (tests/flower_federation.py), one
  simulated SuperNode per client, one CPU and one thread per client actor (so Ray runs as
  many clients at once as there are cores); skipped when Flower is not installed.

Prints one JSON object: per framework the timed rounds' seconds (``round_s``), the median
round, the median CPU seconds of a round (user + system of the framework's processes: for
Flower the ServerApp's and its Ray workers', from /proc, so Linux only), the evaluation's
median and share of the round, and the ratios of each median round (wall clock and CPU) to
fedftg's, with the load average before and after. On a busy machine the CPU ratio is the
steadier one: wall clock then mostly measures the scheduler.
Usage: python benchmarks/peer_crossdevice.py [--rounds 3] [--repeats 2]
       [--pfl-python /path/to/venv/bin/python] [--frameworks fedftg,pfl,flower,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER = HERE / "peer"
FRAMEWORKS = ("fedftg-reference", "fedftg", "pfl", "flower")
SIZES = {  # name: default (the peer workload)
    "clients": 1000,
    "samples": 50,
    "per-round": 50,
    "rounds": 3,
    "batch": 10,
    "test-samples": 10_000,
    "eval-batch": 1000,
    "seed": 0,
    "threads": 1,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in SIZES.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=2, help="turns of every framework")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--pfl-python", default=None, help="a Python with pfl (default: this one)")
    p.add_argument("--worker", choices=("fedftg", "fedftg-reference"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.frameworks.split(",")) - set(FRAMEWORKS)
    if unknown:
        p.error(f"unknown frameworks {sorted(unknown)}; use some of {', '.join(FRAMEWORKS)}")
    return args


def size_args(args: argparse.Namespace, names: tuple[str, ...] = tuple(SIZES)) -> list[str]:
    """The workload's sizes as command-line flags."""
    out = [f"--lr={args.lr}"]
    return out + [f"--{n}={getattr(args, n.replace('-', '_'))}" for n in names]


# ------------------------------------------------------------------ fedftg (a worker)


def fedftg_rounds(args: argparse.Namespace, reference: bool) -> dict[str, Any]:
    """Warm-up plus ``args.rounds`` timed rounds of fedftg's engine on the workload."""
    import numpy as np
    import torch

    from fedftg.config import RunConfig
    from fedftg.data.sources import Dataset
    from fedftg.engine import evaluate as evaluation
    from fedftg.engine import server
    from fedftg.engine.inprocess import MethodRunner
    from fedftg.engine.setup import setup_from_dataset
    from fedftg.fl import aggregation
    from fedftg.models.cnn import MaxPool2x2

    sys.path.insert(0, str(PEER))
    from workload import CLASSES, MEAN, STD, images, tree_cpu_s

    torch.set_num_threads(args.threads)
    parts = [images(args.seed, k, args.samples) for k in range(args.clients)]
    test_x, test_y = images(args.seed, -1, args.test_samples)
    ds = Dataset(
        name="cifar10",
        train_x=np.concatenate([x for x, _ in parts]),
        train_y=np.concatenate([y for _, y in parts]),
        test_x=test_x,
        test_y=test_y,
        classes=tuple(str(c) for c in range(CLASSES)),
        mean=(MEAN,) * 3,
        std=(STD,) * 3,
    )
    cfg = RunConfig(
        dataset="cifar10",
        clients=args.clients,
        partition="iid",
        samples_per_client=args.samples,
        participation=args.per_round / args.clients,
        rounds=1 + args.rounds,
        model="cnn",
        local_epochs=1,
        batch_size=args.batch,
        lr=args.lr,
        lr_decay=1.0,
        weight_decay=0.0,
        clip=0.0,
        augment="off",
        method=["fedavg"],
        eval_batch_size=args.eval_batch,
        seed=args.seed,
    ).validate()
    runner = MethodRunner(setup_from_dataset(cfg, ds), "fedavg", None)
    evaluate = evaluation.evaluate_reference if reference else evaluation.evaluate
    if reference:  # the paths of before
        body = runner.model.body
        for i, layer in enumerate(body):  # torch's max pool in evaluation too
            if isinstance(layer, MaxPool2x2):
                body[i] = torch.nn.MaxPool2d(2)
        aggregation.CPU_AVERAGE_BLOCK = 2**62  # one stack per tensor
        server.all_finite = lambda tensors: all(
            bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point()
        )
    eval_s: list[float] = []

    def timed_evaluate(*a: Any, **k: Any) -> tuple[float, float]:
        start = time.perf_counter()
        out = evaluate(*a, **k)
        eval_s.append(time.perf_counter() - start)
        return out

    server.evaluate = timed_evaluate  # the server looks it up at each round
    round_s, cpu_s, records = [], [], []
    for _ in range(1 + args.rounds):
        start, cpu = time.perf_counter(), tree_cpu_s()
        records.append(runner.run_round())
        round_s.append(time.perf_counter() - start)
        cpu_s.append(tree_cpu_s() - cpu)
    return {
        "warmup_s": round_s[0],
        "round_s": round_s[1:],
        "cpu_s": cpu_s[1:],
        "eval_s": eval_s[1:],
        "test_acc": [r["test_acc"] for r in records],
        "test_loss": [r["test_loss"] for r in records],
    }


# ------------------------------------------------------------------ the driver


def run_fedftg(args: argparse.Namespace, name: str, tmp: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, f"--worker={name}", *size_args(args)]
    return _json_tail(subprocess.run(cmd, capture_output=True, text=True, check=False), name)


def run_pfl(args: argparse.Namespace, python: str, tmp: Path) -> dict[str, Any]:
    cmd = [python, str(PEER / "pfl_run.py"), *size_args(args)]
    return _json_tail(subprocess.run(cmd, capture_output=True, text=True, check=False), "pfl")


def run_flower(args: argparse.Namespace, fed: Any, tmp: Path) -> dict[str, Any]:
    out = tmp / f"flower-{time.time_ns()}.json"
    keys = " ".join(f"{n}={getattr(args, n.replace('-', '_'))}" for n in SIZES)
    proc = fed.run(f"{keys} lr={args.lr} out='{out}'", args.clients, timeout=7200, app=PEER)
    if not out.exists():
        raise RuntimeError(f"flower wrote no timings:\n{(proc.stdout + proc.stderr)[-3000:]}")
    data = json.loads(out.read_text())
    rounds = [b - a for a, b in zip(data["marks"], data["marks"][1:], strict=False)]
    cpu = [b - a for a, b in zip(data["cpu_marks"], data["cpu_marks"][1:], strict=False)]
    return {
        "warmup_s": rounds[0],
        "round_s": rounds[1:],
        "cpu_s": cpu[1:],
        "eval_s": data["eval_s"][2:],
    }


def _json_tail(proc: subprocess.CompletedProcess, name: str) -> dict[str, Any]:
    """The JSON object a worker printed last."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1])


def pfl_python(args: argparse.Namespace) -> str | None:
    """The Python that runs pfl (None if it has no pfl)."""
    python = args.pfl_python or sys.executable
    probe = subprocess.run([python, "-c", "import pfl"], capture_output=True, check=False)
    return python if probe.returncode == 0 else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median round and evaluation per framework, and every ratio to fedftg."""
    out: dict[str, Any] = {}
    for name, trials in runs.items():
        rounds = [s for t in trials for s in t["round_s"]]
        cpus = [s for t in trials for s in t["cpu_s"]]
        evals = [s for t in trials for s in t["eval_s"]]
        out[name] = {
            "round_s": [round(s, 3) for s in rounds],
            "median_round_s": round(statistics.median(rounds), 3),
            "median_cpu_s": round(statistics.median(cpus), 3),
            "median_eval_s": round(statistics.median(evals), 3),
            "eval_share": round(statistics.median(evals) / statistics.median(rounds), 3),
        }
        if "test_loss" in trials[-1]:  # fedftg's: the old and the new path must agree
            out[name]["test_acc"] = trials[-1]["test_acc"]
            out[name]["test_loss"] = trials[-1]["test_loss"]
    if "fedftg" in out:
        base, base_cpu = out["fedftg"]["median_round_s"], out["fedftg"]["median_cpu_s"]
        for name in out:
            if name != "fedftg":
                out[name]["ratio_to_fedftg"] = round(out[name]["median_round_s"] / base, 3)
                out[name]["cpu_ratio_to_fedftg"] = round(out[name]["median_cpu_s"] / base_cpu, 3)
    return out


def drive(args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in FRAMEWORKS if n in args.frameworks.split(",")]
    skipped: dict[str, str] = {}
    python = pfl_python(args) if "pfl" in names else None
    if "pfl" in names and python is None:
        skipped["pfl"] = "no pfl in --pfl-python"
    sys.path.insert(0, str(HERE.parent / "tests"))
    from flower_federation import available, running

    if "flower" in names and not available():
        skipped["flower"] = "Flower is not installed"
    names = [n for n in names if n not in skipped]
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="peer-"))
    with (
        running(tmp / "federation", args.clients, simulation=True)
        if "flower" in names
        else (_Nothing()) as fed
    ):
        for _ in range(args.repeats):
            for name in names:
                if name == "pfl":
                    runs[name].append(run_pfl(args, python, tmp))  # type: ignore[arg-type]
                elif name == "flower":
                    runs[name].append(run_flower(args, fed, tmp))
                else:
                    runs[name].append(run_fedftg(args, name, tmp))
    return {
        "workload": {n: getattr(args, n.replace("-", "_")) for n in SIZES} | {"lr": args.lr},
        "repeats": args.repeats,
        "order": names,
        "skipped": skipped,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "frameworks": summarise(runs),
    }


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        print(json.dumps(fedftg_rounds(args, reference=args.worker == "fedftg-reference")))
        return
    print(json.dumps(drive(args), indent=1))


if __name__ == "__main__":
    main()
