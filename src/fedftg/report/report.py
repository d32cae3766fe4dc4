"""`fedftg report`: tables and figures over run directories (seeds pooled per setting).

Runs that differ only in their seed form one setting; each method of a setting gets mean
+- std over seeds of final and best accuracy, rounds to a target accuracy and wall-clock,
and a curve with a shaded spread. Output: report.md linking PNG figures.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedftg.config import flatten_sections
from fedftg.errors import UserError
from fedftg.report.files import atomic_write, read_metrics
from fedftg.report.plots import plt, save_figure

# settings that do not make two runs different experiments
POOLED = (
    "seed",
    "out",
    "device",
    "eval_batch_size",
    "eval_ensemble",
    "checkpoint_every",
    "data_dir",
)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding summary.json) at or below ``paths``."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such run directory")
        runs += sorted(s.parent for s in p.rglob("summary.json")) if p.is_dir() else []
    if not runs:
        raise UserError(f"{', '.join(map(str, paths))}: no finished runs (summary.json) found")
    return runs


def _setting_key(cfg: dict[str, Any]) -> str:
    kept = {k: v for k, v in cfg.items() if k not in POOLED and k != "method"}
    return json.dumps(kept, sort_keys=True, default=str)


def _label(flat_cfg: dict[str, Any], varying: list[str]) -> str:
    """``alpha=0.1, ftg.gen_lr=0.001``; ``flat_cfg`` keys sections as ``ftg.x``."""
    return ", ".join(f"{k}={flat_cfg.get(k)}" for k in varying) or f"{flat_cfg['dataset']}"


def collect(runs: list[Path]) -> dict[str, Any]:
    """Group runs by setting; per setting and method, the per-seed summaries and curves."""
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        cfg = summary["config"]
        entry = settings.setdefault(
            _setting_key(cfg), {"config": cfg, "runs": [], "methods": defaultdict(list)}
        )
        entry["runs"].append(run)
        curves = defaultdict(list)
        for r in read_metrics(run / "metrics.jsonl"):
            if r.get("test_acc") is not None:
                curves[r["method"]].append((r["round"], r["test_acc"]))
        for method, s in summary["methods"].items():
            entry["methods"][method].append({**s, "seed": cfg["seed"], "curve": curves[method]})
    return settings


def rounds_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first round whose test accuracy reaches ``target`` (None if never)."""
    return next((r for r, acc in sorted(curve) if acc >= target), None)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    arr = 100 * np.asarray(values, dtype=float)
    return f"{arr.mean():.2f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.2f}"


def build_report(paths: list[str | Path], out: str | Path, target: float = 0.8) -> Path:
    """Write ``out``/report.md with its figures; returns the markdown path."""
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"out: cannot create {out_dir} ({exc.strerror or exc})") from None
    settings = collect(find_runs(paths))
    configs = [flatten_sections(s["config"]) for s in settings.values()]
    varying = sorted(
        k
        for k in {k for c in configs for k in c}
        if k not in POOLED
        and k != "method"
        and len({json.dumps(c.get(k), default=str) for c in configs}) > 1
    )
    lines = [
        "# fedftg report",
        "",
        f"{sum(len(s['runs']) for s in settings.values())} runs in {len(settings)} "
        f"setting(s); accuracy in %, mean ± std over seeds; target accuracy "
        f"{100 * target:.0f}%.",
        "",
    ]
    for i, (entry, flat_cfg) in enumerate(zip(settings.values(), configs, strict=True)):
        cfg = entry["config"]
        title = _label(flat_cfg, varying)
        lines += [
            f"## {title}",
            "",
            f"{cfg['dataset']}, model {cfg['model']}, {cfg['clients']} clients, "
            f"{cfg['partition']} alpha={cfg['alpha']}, participation {cfg['participation']}"
            f", {cfg['rounds']} rounds, {cfg['local_epochs']} local epochs.",
            "",
            "| method | seeds | final acc | best acc | rounds to target | wall-clock s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method, per_seed in entry["methods"].items():
            reach = [rounds_to_target(s["curve"], target) for s in per_seed]
            hit = [r for r in reach if r is not None]
            reach_text = (
                f"{np.mean(hit):.1f} ({len(hit)}/{len(reach)} seeds)"
                if hit
                else f"never (0/{len(reach)})"
            )
            walls = [s["wall_s"] for s in per_seed]
            lines.append(
                f"| {method} | {len(per_seed)} | "
                f"{_mean_std([s['final_acc'] for s in per_seed if s['final_acc'] is not None])}"
                f" | {_mean_std([s['best_acc'] for s in per_seed])} | {reach_text} | "
                f"{np.mean(walls):.1f} |"
            )
        curve_png = f"curves_{i}.png"
        plot_spread(entry["methods"], out_dir / curve_png, title)
        lines += ["", f"![accuracy curves]({curve_png})", ""]
        for name in ("partition.png", "samples.png"):
            src = entry["runs"][0] / name
            if src.exists():
                dest = f"{Path(name).stem}_{i}.png"
                shutil.copyfile(src, out_dir / dest)
                caption = "partition (first seed)" if "partition" in name else "generated samples"
                lines += [f"![{caption}]({dest})", ""]
    md = out_dir / "report.md"
    text = "\n".join(lines) + "\n"
    atomic_write(md, lambda p: p.write_text(text))
    return md


def plot_spread(methods: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Mean test accuracy per round with a shaded ±1 std band over seeds, per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, per_seed in methods.items():
        rounds = sorted({r for s in per_seed for r, _ in s["curve"]})
        if not rounds:
            continue
        table = np.full((len(per_seed), len(rounds)), np.nan)
        for i, s in enumerate(per_seed):
            lookup = dict(s["curve"])
            table[i] = [lookup.get(r, np.nan) for r in rounds]
        mean = 100 * np.nanmean(table, axis=0)
        std = 100 * np.nanstd(table, axis=0)
        (line,) = ax.plot(rounds, mean, label=f"{method} (n={len(per_seed)})")
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
