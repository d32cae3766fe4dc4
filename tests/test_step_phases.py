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
