"""How much of a finished run's accuracy is its BatchNorm statistics? A diagnosis.

FedFTG's student steps run in train mode, so the model it hands on carries BatchNorm
running statistics estimated on generated samples. This evaluates the final global model
of each run directory (its checkpoint: the run's last method) with three sets of
statistics, the weights fixed:

  saved      as the run left them (the run's own final accuracy)
  real       re-estimated on real training images that the clients hold (a reference a
             data-free server does not have: what the weights are worth with good statistics)
  generated  re-estimated on the run's generator, labels in the clients' class mix
             (runs with a server plug-in: FedFTG or FedDF)

One JSON object per run on stdout. Usage:
  python benchmarks/bn_statistics.py runs/r18-a0.1-fedftg-s0 runs/r18-a0.1-fedavg-s0
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from fedftg.config import config_from_dict
from fedftg.engine.checkpoint import read_checkpoint
from fedftg.engine.clients import label_histogram
from fedftg.engine.evaluate import evaluate
from fedftg.engine.rundir import saved_states
from fedftg.engine.setup import Setup, prepare, server_plugin
from fedftg.errors import UserError
from fedftg.plugins.distill import sample_labels
from fedftg.registry import split_method


def with_statistics_from(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the plain average over ``batches``."""
    out = copy.deepcopy(model)
    norms = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise UserError("the model has no BatchNorm layer: nothing to re-estimate")
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    out.train()
    with torch.no_grad():
        for x in batches:
            out(x)
    return out.eval()


def diagnose(run: Path, images: int, batch_size: int, seed: int) -> dict[str, object]:
    """The three accuracies of ``run``'s final model (see the module docstring)."""
    try:
        saved_cfg = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{run}: no readable config.json ({exc})") from None
    saved_cfg.pop("environment", None)
    cfg = config_from_dict(saved_cfg)
    saved = read_checkpoint(run / "checkpoint.pt")
    states = saved_states(saved)  # the current method's, or the last finished one's
    method = saved.get("current") or list(states)[-1]
    state = states[method]
    setup: Setup = prepare(cfg)
    model = setup.new_model()
    model.load_state_dict(state["global_state"])
    gen = torch.Generator().manual_seed(seed)
    held = torch.cat(setup.client_indices)
    pick = held[torch.randperm(len(held), generator=gen)][:images]
    real = (setup.train.batch(pick[i : i + batch_size])[0] for i in range(0, len(pick), batch_size))
    out: dict[str, object] = {
        "run": str(run),
        "method": method,
        "round": int(state["round"]),
        "saved": evaluate(model, setup.test)[0],
        "real": evaluate(with_statistics_from(model, real), setup.test)[0],
    }
    plugin_name = split_method(method)[1]
    if plugin_name is not None:
        plugin = server_plugin(cfg, plugin_name, setup.dataset, setup.device)
        plugin.load_state_dict(state["plugin"])
        counts = label_histogram(setup.train.y[held], setup.dataset.num_classes)
        labels = sample_labels(counts.astype(float), -(-images // batch_size), batch_size, gen)
        generated = (plugin.generate(y, gen) for y in labels)
        out["generated"] = evaluate(with_statistics_from(model, generated), setup.test)[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (fedftg run --out)")
    parser.add_argument("--images", type=int, default=2500, help="images per re-estimation")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.images < 1 or args.batch_size < 2:
            raise UserError("--images must be >= 1 and --batch-size >= 2")
        for run in args.runs:
            print(json.dumps(diagnose(run, args.images, args.batch_size, args.seed)), flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
