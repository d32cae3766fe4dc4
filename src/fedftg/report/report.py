"""`fedftg report`: tables and figures over run directories (seeds pooled per setting).

Runs that differ only in their seed form one setting; each method of a setting gets mean
+- std over seeds of final and best accuracy, rounds to a target accuracy and wall-clock,
and a curve with a shaded spread. Output: report.md linking PNG figures.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedftg.config import (
    RunConfig,
    core_fields,
    flatten_sections,
    method_specific,
    reads_setting,
    saved_settings,
)
from fedftg.data.partition import partition_label
from fedftg.errors import UserError
from fedftg.registry import split_method
from fedftg.report.files import (
    atomic_write,
    line_numbers,
    make_dirs,
    read_metrics_lines,
    remove_empty_dirs,
)

# settings that do not make two runs different experiments (declared ``pooled``)
POOLED = tuple(f.name for f, m in core_fields() if m.pooled)


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


def _defines_setting(key: str) -> bool:
    """Whether two runs that differ in config ``key`` (top-level, a plug-in section, or
    ``ftg.x``) are different settings, not seeds of one, nor methods or method variants
    within one. A plug-in's settings only make variants of the methods that use it."""
    return key not in POOLED and not method_specific(key) and key != "method"


def _setting_key(cfg: dict[str, Any]) -> str:
    kept = {k: v for k, v in saved_settings(cfg).items() if _defines_setting(k)}
    return json.dumps(kept, sort_keys=True, default=str)


@functools.cache
def _defaults(dataset: str, data_dir: str | None) -> dict[str, Any]:
    """Every setting's default, flat, resolved for the data (nz follows its classes); once
    per dataset, as resolving may read an image folder's class list."""
    return flatten_sections(RunConfig(dataset=dataset, data_dir=data_dir).resolve().to_dict())


def method_label(method: str, cfg: dict[str, Any]) -> str:
    """The method's name in tables: with the settings only it reads, where not at their
    default (``scaffold+ftg (scaffold.reference=sent)``, ``fedftg (ftg.ensemble=uniform)``),
    so that variants of one method (the paper's ablations among them) share a setting, and
    its base method, with each other. A config saved before a setting existed reads it as
    the value that reproduces that time's behaviour."""
    flat = saved_settings(cfg)
    defaults = _defaults(flat["dataset"], flat["data_dir"])
    extras = [
        f"{k}={flat[k]}"
        for k in defaults
        if method_specific(k) and reads_setting(method, k) and flat[k] != defaults[k]
    ]
    return f"{method} ({', '.join(extras)})" if extras else method


def method_of(label: str) -> str:
    """The method name of a `method_label`."""
    return label.partition(" (")[0]


def _label(flat_cfg: dict[str, Any], varying: list[str]) -> str:
    """``alpha=0.1, ftg.gen_lr=0.001``; ``flat_cfg`` keys sections as ``ftg.x``."""
    return ", ".join(f"{k}={flat_cfg.get(k)}" for k in varying) or f"{flat_cfg['dataset']}"


def metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl; its broken lines (cut short by a crash, or
    damaged) are skipped with one warning line on stderr naming the file and the lines."""
    rows, broken = read_metrics_lines(path)
    if broken:
        sys.stderr.write(f"warning: {path}: {line_numbers(broken)} broken (cut short?); skipped\n")
    return rows


def collect(runs: list[Path]) -> dict[str, Any]:
    """Group runs by setting; per setting and method, the per-seed summaries and curves.

    A method's seed counts once per setting: a plain method run beside each point of a
    plug-in grid (``--grid ftg.gen_lr=...``) is the same run each time.
    """
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        cfg = summary["config"]
        entry = settings.setdefault(
            _setting_key(cfg), {"config": cfg, "runs": [], "methods": defaultdict(list)}
        )
        entry["runs"].append(run)
        curves, gains = defaultdict(list), defaultdict(list)
        for r in metrics_rows(run / "metrics.jsonl"):
            if r.get("test_acc") is not None:
                curves[r["method"]].append((r["round"], r["test_acc"]))
                if r.get("acc_before_server") is not None:
                    gains[r["method"]].append((r["round"], r["test_acc"] - r["acc_before_server"]))
        for method, s in summary["methods"].items():
            per_seed = entry["methods"][method_label(method, cfg)]
            if any(seen["seed"] == cfg["seed"] for seen in per_seed):
                continue
            per_seed.append(
                {**s, "seed": cfg["seed"], "curve": curves[method], "server_gain": gains[method]}
            )
    return settings


def rounds_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first round whose test accuracy reaches ``target`` (None if never)."""
    return next((r for r, acc in sorted(curve) if acc >= target), None)


def phases(last_round: int) -> list[tuple[int, int]]:
    """Round ranges 1-5, 6-10, 11-20, 21-50, 51-100, 101-200, ... up to ``last_round``.

    Early rounds get short ranges of their own: a server step's effect is often largest
    there and would vanish in a whole-run average.
    """
    ends = [5]
    while ends[-1] < last_round:
        end = ends[-1]
        ends.append(end * 5 // 2 if str(end).startswith("2") else end * 2)
    out, start = [], 1
    for end in ends:
        if start > last_round:
            break
        out.append((start, min(end, last_round)))
        start = end + 1
    return out


def plugin_rows(methods: dict[str, list[dict[str, Any]]], last_round: int) -> list[list[str]]:
    """Per server plug-in method: its accuracy minus its base method's, seed by seed.

    Cells: the method, its base, the seeds both ran, the mean difference (points) over the
    paired seeds and the rounds of each `phases` range, with the server step's own mean
    change (test accuracy after it minus before it, over all its seeds) in brackets, the
    final difference per paired seed (by seed), and the number of rounds in which the step
    raised the accuracy.
    """
    rows = []
    for name, per_seed in methods.items():
        base, plugin = split_method(method_of(name))
        if plugin is None:
            continue
        base_by_seed = {s["seed"]: s for s in methods.get(base, [])}
        paired = sorted(
            ((s, base_by_seed[s["seed"]]) for s in per_seed if s["seed"] in base_by_seed),
            key=lambda pair: pair[0]["seed"],
        )
        cells = [name, base if base in methods else "-", str(len(paired))]
        for lo, hi in phases(last_round):
            diffs = []
            for s, b in paired:
                ref = dict(b["curve"])
                diffs += [a - ref[r] for r, a in s["curve"] if lo <= r <= hi and r in ref]
            own = [g for s in per_seed for r, g in s["server_gain"] if lo <= r <= hi]
            diff_text = f"{100 * np.mean(diffs):+.2f}" if diffs else "-"
            cells.append(diff_text + (f" ({100 * np.mean(own):+.2f})" if own else ""))
        finals = [
            f"{100 * (s['final_acc'] - b['final_acc']):+.2f}"
            for s, b in paired
            if s["final_acc"] is not None and b["final_acc"] is not None
        ]
        cells.append(" / ".join(finals) or "-")
        gains = [g for s in per_seed for _, g in s["server_gain"]]
        cells.append(f"{sum(g > 0 for g in gains)} of {len(gains)}" if gains else "-")
        rows.append(cells)
    return rows


def _mean_std(values: list[float]) -> str:
    """Mean ± sample std in %; one value has no spread to show."""
    if not values:
        return "-"
    arr = 100 * np.asarray(values, dtype=float)
    return f"{arr.mean():.2f} ± {arr.std(ddof=1):.2f}" if len(arr) > 1 else f"{arr[0]:.2f}"


def build_report(paths: list[str | Path], out: str | Path, target: float = 0.8) -> Path:
    """Write ``out``/report.md with its figures; returns the markdown path. The folders
    it creates for them are removed again if it fails."""
    out_dir = Path(out)
    settings = collect(find_runs(paths))
    try:
        made = make_dirs(out_dir)
    except OSError as exc:
        raise UserError(f"out: cannot create {out_dir} ({exc.strerror or exc})") from None
    try:
        return _write_report(settings, out_dir, target)
    except BaseException:
        remove_empty_dirs(made)
        raise


def _write_report(settings: dict[str, Any], out_dir: Path, target: float) -> Path:
    """`build_report` into the existing ``out_dir``."""
    configs = [saved_settings(s["config"]) for s in settings.values()]
    varying = sorted(
        k
        for k in {k for c in configs for k in c}
        if _defines_setting(k) and len({json.dumps(c.get(k), default=str) for c in configs}) > 1
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
            f"{partition_label(cfg)}, participation {cfg['participation']}"
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
        lines += _plugin_table(entry["methods"], int(cfg["rounds"]))
        curve_png = f"curves_{i}.png"
        plot_spread(entry["methods"], out_dir / curve_png, title)
        lines += ["", f"![accuracy curves]({curve_png})", ""]
        first = entry["runs"][0]
        for src, caption in [(first / "partition.png", "partition (first seed)")] + [
            (p, _grid_caption(p)) for p in sample_grids(first)
        ]:
            if src.exists():
                dest = f"{src.stem}_{i}.png"
                shutil.copyfile(src, out_dir / dest)
                lines += [f"![{caption}]({dest})", ""]
    md = out_dir / "report.md"
    text = "\n".join(lines) + "\n"
    atomic_write(md, lambda p: p.write_text(text))
    return md


def sample_grids(run: Path) -> list[Path]:
    """A run's generated-sample grids: samples_<method>.png, one per method, or the single
    samples.png of a run directory from before them."""
    grids = sorted(run.glob("samples_*.png"))
    return grids or [p for p in [run / "samples.png"] if p.exists()]


def _grid_caption(path: Path) -> str:
    method = path.stem.partition("_")[2]  # samples_fedavg_ftg.png -> fedavg_ftg
    return f"generated samples{': ' + method if method else ''} (first seed)"


def _plugin_table(methods: dict[str, list[dict[str, Any]]], last_round: int) -> list[str]:
    """The markdown of `plugin_rows`, or nothing when no method has a server plug-in."""
    rows = plugin_rows(methods, last_round)
    if not rows:
        return []
    spans = [f"rounds {lo}-{hi}" if hi > lo else f"round {lo}" for lo, hi in phases(last_round)]
    head = ["method", "base", "paired seeds", *spans, "final, per seed", "rounds the step helped"]
    return [
        "",
        "Server plug-ins against their base method: test accuracy minus the base method's on "
        "the same seeds (points, mean over the paired seeds and rounds), the server step's own "
        "change in brackets; the step's change and the rounds it helped count every seed of the "
        "plug-in, paired or not.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def plot_spread(methods: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Mean test accuracy per round with a shaded ±1 std band over seeds, per method."""
    from fedftg.report.plots import plt, save_figure  # matplotlib: only when drawing

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
