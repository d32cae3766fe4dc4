"""`fedftg run`: run every requested method on one setup and write the run directory."""

from __future__ import annotations

import platform
import sys
import time
from typing import Any, TextIO

import torch

import fedftg
from fedftg.config import RunConfig
from fedftg.engine.simulation import MethodRunner, Setup, denormalise, output_paths, prepare
from fedftg.report.files import MetricsLog, read_metrics, write_json
from fedftg.report.plots import plot_curves, plot_samples
from fedftg.report.progress import Progress


def environment() -> dict[str, Any]:
    """The reproducibility record stored beside the config."""
    return {
        "fedftg": fedftg.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_experiment(
    cfg: RunConfig, *, stream: TextIO | None = None, progress: bool | None = None
) -> dict[str, Any]:
    """Run all methods of ``cfg``; write config.json, metrics.jsonl, summary.json, plots.

    Returns the summary (per method: final_acc, best_acc, rounds, wall_s).
    """
    stream = stream or sys.stdout
    paths = output_paths(cfg.out)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    setup = prepare(cfg)
    write_json(paths["config"], {**cfg.to_dict(), "environment": environment()})
    paths["metrics"].unlink(missing_ok=True)
    log = MetricsLog(paths["metrics"])
    summary: dict[str, Any] = {"methods": {}}
    sample_written = False
    for display, base, plugin in cfg.methods():
        runner = MethodRunner(setup, base, plugin)
        bar = Progress(cfg.rounds, display, enabled=progress)
        for _ in range(cfg.rounds):
            record = runner.run_round()
            log.append({"method": display, **record})
            bar.update(runner.state.round, runner.state.last_acc)
        bar.close()
        summary["methods"][display] = runner.summary()
        if hasattr(runner.plugin, "sample_images"):
            _write_samples(runner, setup, paths["dir"] / f"samples_{_slug(display)}.png")
            if not sample_written:
                _write_samples(runner, setup, paths["samples"])
                sample_written = True
    summary["config"] = cfg.to_dict()
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(paths["summary"], summary)
    title = f"{cfg.dataset}, {cfg.clients} clients, {cfg.partition} alpha={cfg.alpha}"
    plot_curves(read_metrics(paths["metrics"]), paths["curves"], title)
    stream.write(format_table(summary["methods"]) + "\n")
    stream.write(f"results in {paths['dir']}\n")
    return summary


def _write_samples(runner: MethodRunner, setup: Setup, path: Any) -> None:
    gen = torch.Generator(device=setup.device)
    gen.manual_seed(setup.cfg.seed)
    images, labels = runner.plugin.sample_images(8, gen)
    plot_samples(
        denormalise(images, setup.dataset),
        labels.cpu().numpy(),
        list(setup.dataset.classes),
        path,
    )


def _slug(name: str) -> str:
    return name.replace("+", "_")


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    """A plain-text results table: method, final and best accuracy, wall-clock."""
    lines = [f"{'method':<16} {'final acc':>9} {'best acc':>9} {'rounds':>6} {'wall s':>8}"]
    for name, s in methods.items():
        final = "-" if s["final_acc"] is None else f"{100 * s['final_acc']:.2f}"
        lines.append(
            f"{name:<16} {final:>9} {100 * s['best_acc']:>9.2f} {s['rounds']:>6} "
            f"{s['wall_s']:>8.1f}"
        )
    return "\n".join(lines)
