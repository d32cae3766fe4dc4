"""Cost of the FTG step's settings beyond the paper: step time with each, side by side.

Times FedFTG's server step (the authors' defaults: I = 10, I_g = 1, I_d = 5, B = 50) on K
teachers of one model for the dataset's shapes, once per variant in turn and ``--repeats``
times over, and prints JSON: the median CPU seconds of the process (with one torch thread,
the step's compute, barely affected by other processes sharing the cores) and wall-clock
seconds of each variant, and the CPU-time ratio to the default step of the same run. The
teachers are the model at its seeded initialisation with BatchNorm statistics from one
train-mode pass over a client's images (the cost does not depend on their training); the
step is the second round's (index 1), so that `gen_reset` acts.

    python benchmarks/ftg_options_cost.py --dataset digits --model cnn-bn --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from fedftg.data.sources import load_dataset
from fedftg.models import build_model
from fedftg.plugins.ftg import FTGServer
from fedftg.plugins.specs.ftg import FTGSettings

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "bn_loss=1": {"bn_loss": 1.0},
    "gen_ema=0.9": {"gen_ema": 0.9},
    "bn_stats=pooled": {"bn_stats": "pooled"},
    "gen_reset=1": {"gen_reset": 1},
    "all four": {"bn_loss": 1.0, "gen_ema": 0.9, "bn_stats": "pooled", "gen_reset": 1},
}
ROUND = 1  # the step's round index: the second round, where gen_reset restarts the generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="cnn-bn")
    parser.add_argument("--teachers", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset)
    x = torch.as_tensor(ds.train_x[:200], dtype=torch.float32) / 255.0
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    x = (x - mean) / std
    rng = np.random.default_rng(0)
    teachers = []
    for j in range(args.teachers):
        torch.manual_seed(j)
        net = build_model(args.model, ds.channels, ds.image_size, ds.num_classes).train()
        with torch.no_grad():
            net(x[40 * j : 40 * (j + 1)] if 40 * (j + 1) <= len(x) else x)
        teachers.append(net.eval())
    counts = rng.multinomial(100, rng.dirichlet([0.3] * ds.num_classes), size=args.teachers)
    torch.manual_seed(99)
    student = build_model(args.model, ds.channels, ds.image_size, ds.num_classes).eval()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, options in VARIANTS.items():
            cfg = dataclasses.replace(FTGSettings(), **options).validate()
            server = FTGServer(cfg, ds.num_classes, ds.channels, ds.image_size)
            s = copy.deepcopy(student)
            cpu, wall = time.process_time(), time.perf_counter()
            server.step(s, teachers, counts, ROUND, torch.Generator().manual_seed(0))
            times[name].append(time.process_time() - cpu)
            walls[name].append(time.perf_counter() - wall)
    base = statistics.median(times["default"])
    out = {
        "dataset": args.dataset,
        "model": args.model,
        "teachers": args.teachers,
        "repeats": args.repeats,
        "threads": args.threads,
        "median_cpu_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "median_wall_s": {k: round(statistics.median(v), 4) for k, v in walls.items()},
        "ratio_to_default": {k: round(statistics.median(v) / base, 3) for k, v in times.items()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
