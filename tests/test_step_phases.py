"""benchmarks/step_phases.py: a server step's own change by phase against hand-made runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark
from fedftg.config import RunConfig

phases = load_benchmark("step_phases")


def _run(path: Path, seed: int, rows: list[dict], **ftg) -> Path:
    path.mkdir(parents=True)
    cfg = RunConfig(seed=seed, method=["fedavg", "fedftg"]).validate().to_dict()
    cfg["ftg"].update(ftg)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ftg(rnd: int, before: float, after: float, spread: float) -> dict:
    return {
        "method": "fedftg",
        "round": rnd,
        "test_acc": after,
        "acc_before_server": before,
        "ftg_sample_spread": spread,
    }


def test_phases_finals_and_variants_by_hand(tmp_path, capsys):
    fedavg = [{"method": "fedavg", "round": r, "test_acc": 0.1 * r} for r in range(1, 7)]
    plain = _run(
        tmp_path / "a",
        0,
        [*fedavg, *(_ftg(r, 0.1 * r, 0.1 * r + 0.02, 0.5) for r in range(1, 7))],
    )
    pooled_rows = [_ftg(r, 0.1 * r, 0.1 * r - 0.01 * (r > 5), 0.2) for r in range(1, 7)]
    pooled_rows.insert(2, {"method": "fedftg", "round": 99, "test_acc": None})  # not evaluated
    pooled = _run(tmp_path / "b", 0, pooled_rows, bn_stats="pooled")
    other_seed = _run(tmp_path / "c", 1, [_ftg(1, 0.3, 0.4, 0.1)], bn_stats="pooled")
    entries = phases.seed_rows(phases.collect([plain, pooled, other_seed]), "fedavg")
    assert [(e["variant"], e["seed"], e["rounds"]) for e in entries] == [
        ("fedftg", 0, 6),
        ("fedftg (ftg.bn_stats=pooled)", 0, 6),
        ("fedftg (ftg.bn_stats=pooled)", 1, 1),
    ]
    first, second, third = entries
    assert first["final"] == pytest.approx(0.62) and first["base_final"] == pytest.approx(0.6)
    assert [p["rounds"] for p in first["phases"]] == ["1-5", "6-6"]
    assert first["phases"][0]["step"] == pytest.approx(0.02)
    assert first["phases"][0]["helped"] == "5 of 5"
    assert first["phases"][0]["minus_base"] == pytest.approx(0.02)
    assert second["phases"][0]["step"] == pytest.approx(0.0)  # unchanged: not helped
    assert second["phases"][0]["helped"] == "0 of 5"
    assert second["phases"][1]["step"] == pytest.approx(-0.01)
    assert second["phases"][1]["spread"] == pytest.approx(0.2)
    assert third["base_final"] is None and third["phases"][0]["minus_base"] is None
    assert phases.main([str(plain), str(pooled), str(other_seed)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| fedftg | 0 | 6 | 62.00 | 60.00 | +2.00 | 1-5: +2.00 (5 of 5)")
    assert table[4].startswith("| fedftg (ftg.bn_stats=pooled) | 1 | 1 | 40.00 | - | - |")


def test_over_seeds_pools_the_rounds_every_seed_reached(tmp_path, capsys):
    def fedavg(finals: float) -> list[dict]:
        return [{"method": "fedavg", "round": r, "test_acc": finals} for r in range(1, 8)]

    # seed 0: 7 rounds, step +0.04 in rounds 1-5, -0.02 after; seed 1: 6 rounds, step +0.02
    s0 = [_ftg(r, 0.5, 0.54 if r <= 5 else 0.48, 0.3) for r in range(1, 8)]
    s1 = [_ftg(r, 0.4, 0.42, 0.1) for r in range(1, 7)]
    runs = [
        _run(tmp_path / "a", 0, [*fedavg(0.5), *s0]),
        _run(tmp_path / "b", 1, [*fedavg(0.45), *s1]),
    ]
    (summary,) = phases.over_seeds(phases.collect(runs), "fedavg")
    assert summary["seeds"] == [0, 1] and summary["rounds"] == 6  # seed 1's last round
    assert summary["final"] == pytest.approx((0.48 + 0.42) / 2)
    assert summary["final_std"] == pytest.approx(0.06 / 2**0.5)  # sample sd of 0.48, 0.42
    assert summary["minus_base"] == pytest.approx((-0.02 - 0.03) / 2)
    assert summary["above_base"] == "0 of 2"
    early, late = summary["phases"]
    assert early["rounds"] == "1-5" and early["helped"] == "10 of 10"
    assert early["step"] == pytest.approx(0.03) and early["spread"] == pytest.approx(0.2)
    assert late["rounds"] == "6-6" and late["helped"] == "1 of 2"  # seed 0's round 7 left out
    assert late["step"] == pytest.approx(0.0)
    assert phases.main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("| fedftg | 0,1 | 6 | 45.00 ± 4.24 | -2.50 (0 of 2) | 1-5: +3.00")


def test_one_variant_and_seed_in_two_directories_is_refused(tmp_path, capsys):
    rows = [_ftg(1, 0.3, 0.4, 0.1)]
    a, b = _run(tmp_path / "a", 0, rows), _run(tmp_path / "b", 0, rows)
    assert phases.main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "both hold fedftg seed 0" in err


def test_last_round_compares_runs_of_different_lengths_at_one_round(tmp_path, capsys):
    fedavg = [{"method": "fedavg", "round": r, "test_acc": 0.5} for r in range(1, 9)]
    s0 = [_ftg(r, 0.5, 0.6 if r <= 4 else 0.4, 0.3) for r in range(1, 9)]  # 8 rounds
    run = _run(tmp_path / "a", 0, [*fedavg, *s0])
    (entry,) = phases.seed_rows(phases.collect([run], last_round=4), "fedavg")
    assert entry["rounds"] == 4 and entry["final"] == pytest.approx(0.6)
    assert [p["rounds"] for p in entry["phases"]] == ["1-4"]
    assert entry["phases"][0]["step"] == pytest.approx(0.1)
    assert phases.main(["--last-round", "6", str(run)]) == 0
    assert "| fedftg | 0 | 6 | 40.00 | 50.00 | -10.00 |" in capsys.readouterr().out
    assert phases.main(["--last-round", "0", str(run)]) == 2
    assert capsys.readouterr().err.startswith("error: --last-round must be >= 1")
