"""Why does (or doesn't) FedFTG's server step help? A per-round counterfactual.

Follows the base method's own trajectory (no plug-in) and, every round, starts each variant
from the same aggregated model and the same uploaded client models:

  avg_acc             the aggregated model (what the base method evaluates)
  ensemble_acc        the uploads as a plain softmax average
  class_ensemble_acc  the uploads weighted by FedFTG's class-level weights: the teacher
                      FedFTG distils from, used as a classifier
  ftg_acc             after FedFTG's server step (the configured settings; its generator
                      carries over from round to round, as in a FedFTG run)
  real_kd_acc         the same distillation (same label sampling, class-level teacher,
                      optimiser, I x I_d student steps) on REAL training images that no
                      client holds instead of generated ones: what the step could do with
                      perfect samples
  real_kd_long_acc    real images and --long times more iterations: what the step budget
                      allows
  ftg_sample_spread   mean L1 distance between generated samples of the same label (0 when
                      the generator ignores its noise); real_sample_spread: the same for
                      real images

The lead of the ensembles over avg_acc is the knowledge averaging lost; the rest says how
much of it each variant recovers. Settings are `fedftg run` settings as key=value pairs.

Usage:
  python benchmarks/ftg_diagnosis.py dataset=fmnist data_dir=../shared/data clients=10 \
      samples_per_client=500 alpha=0.1 participation=0.5 local_epochs=5 rounds=10 \
      method=fedavg --out diag.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import torch

from fedftg.config import RunConfig, apply_overrides, nest_dotted
from fedftg.data.batches import DeviceArrays
from fedftg.engine.evaluate import evaluate, evaluate_ensemble
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.setup import Setup, prepare, server_plugin
from fedftg.errors import UserError
from fedftg.fl.ensemble import class_weights
from fedftg.models.stacked import StackedModels, Teachers
from fedftg.plugins.distill import sample_labels, within_class_distance
from fedftg.plugins.ftg import distill_loss, ensemble_target
from fedftg.plugins.specs.ftg import FTGSettings
from fedftg.report.files import atomic_write
from fedftg.seeding import torch_rng


def unseen_pool(setup: Setup) -> list[torch.Tensor]:
    """Per class, the training indices that no client holds (the server's real images)."""
    held = torch.zeros(len(setup.train), dtype=torch.bool, device=setup.train.y.device)
    for idx in setup.client_indices:
        held[idx] = True
    y = setup.train.y
    return [torch.nonzero((y == c) & ~held).flatten() for c in range(setup.dataset.num_classes)]


def distill_real(
    student: torch.nn.Module,
    teachers: Teachers,
    counts: np.ndarray,
    data: DeviceArrays,
    pool: list[torch.Tensor],
    cfg: FTGSettings,
    round_idx: int,
    iterations: int,
    gen: torch.Generator,
) -> float | None:
    """FedFTG's student phase with real images of the sampled labels in place of G(z, y).

    Returns the within-class spread of the last batch (to compare with the generator's).
    """
    opt = torch.optim.SGD(
        student.parameters(),
        lr=cfg.student_lr * cfg.lr_decay**round_idx,
        weight_decay=cfg.student_weight_decay,
    )
    alpha = class_weights(counts, cfg.ensemble).to(data.y.device)
    labels = sample_labels(counts.sum(0), iterations, cfg.batch_size, gen, cfg.label_sampling)
    student.train()
    for y in labels:
        picks = []
        for c in y.tolist():
            if len(pool[c]) == 0:
                raise UserError(f"no unseen training image of class {c} for the real-data run")
            picks.append(pool[c][torch.randint(len(pool[c]), (1,), generator=gen)])
        x, y_real = data.batch(torch.cat(picks))
        with torch.no_grad():
            target = ensemble_target(teachers.all(x), alpha[:, y_real])
        for _ in range(cfg.student_steps):
            loss = distill_loss(student(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    student.eval()
    return within_class_distance(x, y_real)


def diagnose(cfg: RunConfig, long: int) -> list[dict[str, float]]:
    """One record per round (see the module docstring)."""
    setup = prepare(cfg)
    base = cfg.methods()[0][1]
    runner = MethodRunner(setup, base, None)
    ftg = server_plugin(cfg, "ftg", setup.dataset, setup.device)
    pool = unseen_pool(setup)
    records = []
    for t in range(cfg.rounds):
        results, hists, start = runner.local_round()
        counts = np.stack(hists)
        rec = runner.server_update(results, hists, start)
        teachers = StackedModels(runner.model, [r.state for r in results])
        row = {"round": t + 1, "avg_acc": rec["test_acc"]}
        row.update(evaluate_ensemble(teachers, counts, setup.test, cfg.eval_batch_size))
        student = copy.deepcopy(runner.model)
        metrics = ftg.step(student, teachers, counts, t, torch_rng(cfg.seed, "server", t))
        row["ftg_acc"] = evaluate(student, setup.test)[0]
        row["ftg_sample_spread"] = metrics.get("sample_spread")
        for key, iters in (
            ("real_kd_acc", cfg.ftg.iterations),
            ("real_kd_long_acc", long * cfg.ftg.iterations),
        ):
            student = copy.deepcopy(runner.model)
            gen = torch_rng(cfg.seed, "diagnosis", t, device=setup.device)
            spread = distill_real(
                student, teachers, counts, setup.train, pool, cfg.ftg, t, iters, gen
            )
            row[key] = evaluate(student, setup.test)[0]
        row["real_sample_spread"] = spread
        records.append(row)
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", help="fedftg run settings as key=value")
    parser.add_argument("--long", type=int, default=10, help="iteration multiple for real_kd_long")
    parser.add_argument("--out", help="write the per-round records here (JSON lines)")
    args = parser.parse_intermixed_args(argv)
    flat: dict[str, str] = {}
    for item in args.settings:
        key, eq, value = item.partition("=")
        if not eq:
            print(
                f"error: settings must be key=value (ftg.key=value), got {item!r}", file=sys.stderr
            )
            return 2
        flat[key] = value
    try:
        cfg = apply_overrides(RunConfig(), nest_dotted(flat)).validate()
        records = diagnose(cfg, args.long)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = [k for k in records[0] if k != "round"]
    mean = {k: float(np.mean([r[k] for r in records if r[k] is not None])) for k in keys}
    print("mean over rounds: " + " ".join(f"{k}={v:.4f}" for k, v in mean.items()))
    if args.out:
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(args.out, lambda p: p.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
