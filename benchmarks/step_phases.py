"""A server step's own effect by phase, seed by seed, from run directories' metrics.jsonl.

For every method with a server plug-in (FedFTG, FedDF, ...) in the given run directories,
per seed: the final accuracy and that of the base method (``--base``, default fedavg) of the
same seed at the same round, and per phase of rounds (1-5, 6-10, 11-20, ...) the step's own
change (test accuracy after the step minus the aggregate's before it, `acc_before_server`),
the rounds it helped, the generated samples' spread (`ftg_sample_spread`) and the
difference to the base method. Variants of one method (``--ftg-bn-stats pooled``, ...) are
told apart as `fedftg report` labels them (the settings they read, where not at their
defaults).

It reads the metrics rows only (not summary.json), so a run extended and then stopped, or
still running, counts with the rounds it has. Markdown on stdout. Usage:
  python benchmarks/step_phases.py runs/confirm33/*/a0.3
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedftg.registry import split_method
from fedftg.report.report import method_label, method_of, metrics_rows, phases

Key = tuple[str, int]  # (method label, seed)


def collect(dirs: Iterable[Path]) -> dict[Key, dict[int, dict[str, Any]]]:
    """(label, seed) -> round -> metrics row (evaluated rows only); labels as
    `fedftg.report.report.method_label` gives them."""
    out: dict[Key, dict[int, dict[str, Any]]] = defaultdict(dict)
    for d in dirs:
        cfg = json.loads((d / "config.json").read_text())
        labels: dict[str, str] = {}  # once per method: a label resolves the run's settings
        for row in metrics_rows(d / "metrics.jsonl"):
            if row.get("test_acc") is None:
                continue
            if row["method"] not in labels:
                labels[row["method"]] = method_label(row["method"], cfg)
            out[(labels[row["method"]], int(cfg["seed"]))][row["round"]] = row
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _pts(value: float | None, sign: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def seed_rows(runs: dict[Key, dict[int, dict[str, Any]]], base: str) -> list[dict[str, Any]]:
    """One summary per (plug-in variant, seed): finals, and per phase the step's change,
    the rounds it helped, the spread and the difference to ``base`` on the same seed."""
    out = []
    for (label, seed), rows in sorted(runs.items()):
        if split_method(method_of(label))[1] is None:
            continue
        ref = runs.get((base, seed), {})
        last = max(rows)
        entry: dict[str, Any] = {
            "variant": label,
            "seed": seed,
            "rounds": last,
            "final": rows[last]["test_acc"],
            "base_final": ref[last]["test_acc"] if last in ref else None,
            "phases": [],
        }
        for lo, hi in phases(last):
            span = [rows[r] for r in sorted(rows) if lo <= r <= hi]
            steps = [
                r["test_acc"] - r["acc_before_server"]
                for r in span
                if r.get("acc_before_server") is not None
            ]
            spread = [
                r["ftg_sample_spread"] for r in span if r.get("ftg_sample_spread") is not None
            ]
            diffs = [r["test_acc"] - ref[r["round"]]["test_acc"] for r in span if r["round"] in ref]
            entry["phases"].append(
                {
                    "rounds": f"{lo}-{hi}",
                    "step": _mean(steps),
                    "helped": f"{sum(s > 0 for s in steps)} of {len(steps)}",
                    "spread": _mean(spread),
                    "minus_base": _mean(diffs),
                }
            )
        out.append(entry)
    return out


def markdown(entries: list[dict[str, Any]], base: str) -> str:
    lines = [
        f"| variant | seed | rounds | final | {base} final | difference | phase: step change "
        f"(rounds helped), spread, minus {base} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        diff = None if e["base_final"] is None else e["final"] - e["base_final"]
        phase_text = "; ".join(
            f"{p['rounds']}: {_pts(p['step'])} ({p['helped']}), "
            f"{'-' if p['spread'] is None else format(p['spread'], '.3f')}, "
            f"{_pts(p['minus_base'])}"
            for p in e["phases"]
        )
        lines.append(
            f"| {e['variant']} | {e['seed']} | {e['rounds']} | {_pts(e['final'], False)} | "
            f"{_pts(e['base_final'], False)} | {_pts(diff)} | {phase_text} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--base", default="fedavg", help="the method to compare against")
    parser.add_argument("--json", action="store_true", help="JSON instead of markdown")
    args = parser.parse_args(argv)
    entries = seed_rows(collect(args.runs), args.base)
    print(json.dumps(entries, indent=1) if args.json else markdown(entries, args.base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
