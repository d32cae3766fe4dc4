"""benchmarks/peer_crossdevice.py runs at a tiny size with the frameworks installed here."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark
from flower_federation import available

peer = load_benchmark("peer_crossdevice")
TINY = ["--clients=6", "--samples=4", "--per-round=2", "--rounds=1", "--batch=2"]
TINY += ["--test-samples=30", "--eval-batch=8", "--repeats=1"]


def test_an_unknown_framework_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        peer.parse(["--frameworks", "fedftg,tff"])
    assert exc.value.code == 2
    assert "unknown frameworks ['tff']" in capsys.readouterr().err


def test_tiny_run_times_fedftg_both_paths_equal_and_pfl_if_installed():
    out = peer.drive(peer.parse([*TINY, "--frameworks=fedftg-reference,fedftg,pfl"]))
    names = ["fedftg-reference", "fedftg"] + ([] if "pfl" in out["skipped"] else ["pfl"])
    assert out["order"] == names
    for name in names:
        result = out["frameworks"][name]
        assert len(result["round_s"]) == 1 and result["median_round_s"] > 0
        assert 0 < result["eval_share"] < 1
    old, new = out["frameworks"]["fedftg-reference"], out["frameworks"]["fedftg"]
    assert old["ratio_to_fedftg"] > 0
    # the old and the new evaluation and aggregation: the same numbers, bit for bit
    assert old["test_loss"] == new["test_loss"] and old["test_acc"] == new["test_acc"]


@pytest.mark.slow
@pytest.mark.skipif(not available(), reason="Flower is not installed")
def test_tiny_run_of_the_flower_app():
    out = peer.drive(peer.parse([*TINY, "--frameworks=fedftg,flower"]))
    flower = out["frameworks"]["flower"]
    assert len(flower["round_s"]) == 1 and flower["ratio_to_fedftg"] > 0
