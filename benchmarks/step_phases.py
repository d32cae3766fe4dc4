"""A server step's own effect by phase, seed by seed, from run directories' metrics.jsonl.

For every method with a server plug-in (FedFTG, FedDF, ...) in the given run directories,
per seed: the final accuracy and that of the base method (``--base``, default fedavg) of the
same seed at the same round, and per phase of rounds (1-5, 6-10, 11-20, ...) the step's own
change (test accuracy after the step minus the aggregate's before it, `acc_before_server`),
the rounds it helped, the generated samples' spread (`ftg_sample_spread`) and the
difference to the base method; then the same over each variant's seeds (their rounds
pooled, at the rounds every seed reached). Variants of one method (``--ftg-bn-stats
pooled``, ...) are told apart as `fedftg report` labels them (the settings they read,
where not at their defaults).

It reads the metrics rows only (not summary.json), so a run extended and then stopped, or
still running, counts with the rounds it has. Markdown on stdout. Usage:
  python benchmarks/step_phases.py runs/confirm33/*/a0.3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedftg.registry import split_method
from fedftg.report.report import method_label, method_of, metrics_rows, phases

Key = tuple[str, int]  # (method label, seed)


def collect(
    dirs: Iterable[Path], last_round: int | None = None
) -> dict[Key, dict[int, dict[str, Any]]]:
    """(label, seed) -> round -> metrics row (evaluated rows, up to ``last_round`` where
    given); labels as `fedftg.report.report.method_label` gives them. Two directories
    holding one (label, seed) (runs that differ in a setting no method reads, such as the
    participation) are a `ValueError`: their rounds would mix."""
    out: dict[Key, dict[int, dict[str, Any]]] = defaultdict(dict)
    source: dict[Key, Path] = {}
    for d in dirs:
        cfg = json.loads((d / "config.json").read_text())
        labels: dict[str, str] = {}  # once per method: a label resolves the run's settings
        for row in metrics_rows(d / "metrics.jsonl"):
            if row.get("test_acc") is None or (
                last_round is not None and row["round"] > last_round
            ):
                continue
            if row["method"] not in labels:
                labels[row["method"]] = method_label(row["method"], cfg)
            key = (labels[row["method"]], int(cfg["seed"]))
            if source.setdefault(key, d) != d:
                raise ValueError(
                    f"{source[key]} and {d} both hold {key[0]} seed {key[1]}: give them "
                    "in separate calls"
                )
            out[key][row["round"]] = row
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _pts(value: float | None, sign: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def _has_plugin(label: str) -> bool:
    """Whether the method of a `method_label` runs a server step (FedFTG, FedDF, ...)."""
    return split_method(method_of(label))[1] is not None


def _phase(
    pairs: list[tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]], lo: int, hi: int
) -> dict[str, Any]:
    """Rounds ``lo``-``hi`` of the (variant's rows, base's rows) ``pairs``, their rounds
    pooled: the step's mean change, the rounds it helped, mean spread and minus base."""
    steps, spread, diffs = [], [], []
    for rows, ref in pairs:
        for r in (rows[k] for k in sorted(rows) if lo <= k <= hi):
            if r.get("acc_before_server") is not None:
                steps.append(r["test_acc"] - r["acc_before_server"])
            if r.get("ftg_sample_spread") is not None:
                spread.append(r["ftg_sample_spread"])
            if r["round"] in ref:
                diffs.append(r["test_acc"] - ref[r["round"]]["test_acc"])
    return {
        "rounds": f"{lo}-{hi}",
        "step": _mean(steps),
        "helped": f"{sum(s > 0 for s in steps)} of {len(steps)}",
        "spread": _mean(spread),
        "minus_base": _mean(diffs),
    }


def seed_rows(runs: dict[Key, dict[int, dict[str, Any]]], base: str) -> list[dict[str, Any]]:
    """One summary per (plug-in variant, seed): finals, and per phase the step's change,
    the rounds it helped, the spread and the difference to ``base`` on the same seed."""
    out = []
    for (label, seed), rows in sorted(runs.items()):
        if not _has_plugin(label):
            continue
        ref = runs.get((base, seed), {})
        last = max(rows)
        out.append(
            {
                "variant": label,
                "seed": seed,
                "rounds": last,
                "final": rows[last]["test_acc"],
                "base_final": ref[last]["test_acc"] if last in ref else None,
                "phases": [_phase([(rows, ref)], lo, hi) for lo, hi in phases(last)],
            }
        )
    return out


def over_seeds(runs: dict[Key, dict[int, dict[str, Any]]], base: str) -> list[dict[str, Any]]:
    """One summary per plug-in variant over its seeds, at the rounds every seed reached:
    the finals' mean and standard deviation, the seeds above ``base``, and per phase the
    seeds' rounds pooled (as `seed_rows` gives them for one seed)."""
    by_variant: dict[str, list[int]] = defaultdict(list)
    for label, seed in sorted(runs):
        if _has_plugin(label):
            by_variant[label].append(seed)
    out = []
    for label, seeds in by_variant.items():
        last = min(max(runs[(label, s)]) for s in seeds)
        pairs = [
            (
                {k: r for k, r in runs[(label, s)].items() if k <= last},
                runs.get((base, s), {}),
            )
            for s in seeds
        ]
        finals = [rows[last]["test_acc"] for rows, _ in pairs if last in rows]
        diffs = [
            rows[last]["test_acc"] - ref[last]["test_acc"]
            for rows, ref in pairs
            if last in rows and last in ref
        ]
        out.append(
            {
                "variant": label,
                "seeds": seeds,
                "rounds": last,
                "final": _mean(finals),
                "final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
                "minus_base": _mean(diffs),
                "above_base": f"{sum(d > 0 for d in diffs)} of {len(diffs)}",
                "phases": [_phase(pairs, lo, hi) for lo, hi in phases(last)],
            }
        )
    return out


def _phase_text(entry: dict[str, Any]) -> str:
    return "; ".join(
        f"{p['rounds']}: {_pts(p['step'])} ({p['helped']}), "
        f"{'-' if p['spread'] is None else format(p['spread'], '.3f')}, "
        f"{_pts(p['minus_base'])}"
        for p in entry["phases"]
    )


def markdown(entries: list[dict[str, Any]], summaries: list[dict[str, Any]], base: str) -> str:
    """The per-seed table, then the over-seeds table."""
    phase_head = f"phase: step change (rounds helped), spread, minus {base}"
    lines = [
        f"| variant | seed | rounds | final | {base} final | difference | {phase_head} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        diff = None if e["base_final"] is None else e["final"] - e["base_final"]
        lines.append(
            f"| {e['variant']} | {e['seed']} | {e['rounds']} | {_pts(e['final'], False)} | "
            f"{_pts(e['base_final'], False)} | {_pts(diff)} | {_phase_text(e)} |"
        )
    lines += [
        "",
        f"| variant | seeds | rounds | final (mean ± sd) | minus {base} (seeds above) | "
        f"{phase_head}, seeds' rounds pooled |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in summaries:
        sd = "" if e["final_std"] is None else f" ± {100 * e['final_std']:.2f}"
        lines.append(
            f"| {e['variant']} | {','.join(map(str, e['seeds']))} | {e['rounds']} | "
            f"{_pts(e['final'], False)}{sd} | {_pts(e['minus_base'])} ({e['above_base']}) | "
            f"{_phase_text(e)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--base", default="fedavg", help="the method to compare against")
    parser.add_argument(
        "--last-round",
        type=int,
        metavar="N",
        help="read rounds 1-N only (runs of different lengths compared at one round)",
    )
    parser.add_argument("--json", action="store_true", help="JSON instead of markdown")
    args = parser.parse_args(argv)
    if args.last_round is not None and args.last_round < 1:
        print(f"error: --last-round must be >= 1, got {args.last_round}", file=sys.stderr)
        return 2
    try:
        runs = collect(args.runs, args.last_round)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    entries, summaries = seed_rows(runs, args.base), over_seeds(runs, args.base)
    if args.json:
        print(json.dumps({"seeds": entries, "over_seeds": summaries}, indent=1))
    else:
        print(markdown(entries, summaries, args.base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
