"""fedftg.legacy: the formats kept for older versions, one by one (the v0 run directories
themselves are resumed in tests/test_registry.py)."""

from __future__ import annotations

import hashlib

from clirun import run_cli
from fedftg.legacy import digest, flat_name, flat_names, round_candidates, rows_covered


def test_flat_names_map_each_moved_setting_both_ways():
    names = flat_names()
    assert names["prox_mu"] == "fedprox.mu" and names["scaffold_server_lr"] == "scaffold.server_lr"
    for flat, dotted in names.items():
        assert flat_name(*dotted.split(".")) == flat
    assert flat_name("ftg", "iterations") is None  # added after sections: no flat name


def test_the_fingerprint_digest_stays_what_old_checkpoints_hold():
    assert digest({"b": [1, 2], "a": 0.5}) == hashlib.sha256(b'{"a": 0.5, "b": [1, 2]}').hexdigest()


def test_round_candidates_most_certain_first():
    assert round_candidates({"rounds": 5}, {"rounds": 4}, 3) == [5, 4, 3]
    assert round_candidates({}, {"rounds": 3}, 3) == [3]  # a checkpoint from before `rounds`
    assert round_candidates({}, None, 7) == [7]


def test_an_old_checkpoint_keeps_the_rows_it_covers_and_names_those_it_lost():
    saved = {"done": {"fedavg": {"rounds": 2}}}
    rows = [
        {"method": "fedavg", "round": 1},
        {"method": "fedavg", "round": 2},
        {"method": "fedavg", "round": 3},  # after the checkpoint: runs again
        {"method": "fedftg", "round": 2},
    ]
    kept, lost = rows_covered(saved, {"fedftg": {"round": 2}}, rows)
    assert kept == [rows[0], rows[1], rows[3]]
    assert lost == [{"method": "fedftg", "round": 1}]


def test_a_directory_holding_only_an_old_runs_samples_png_is_not_taken_over(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "samples.png").write_bytes(b"png")
    args = ["run", "--method", "fedavg", "--rounds", "1", "--clients", "2", "--quiet"]
    code, _, err = run_cli(capsys, [*args, "--out", str(out)])
    assert code == 2 and "holds run files (samples.png)" in err
