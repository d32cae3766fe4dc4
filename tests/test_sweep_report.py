"""Sweeps (grid, skip finished, parallel) and reports (tables, figures) on tiny runs."""

from __future__ import annotations

import json

import pytest

from fedftg.cli import main
from fedftg.config import RunConfig
from fedftg.engine.sweep import grid_points, parse_grid
from fedftg.errors import UserError
from fedftg.report.report import build_report, phases, rounds_to_target

TINY = ["--rounds", "2", "--clients", "3", "--local-epochs", "1", "--participation", "1"]


def test_grid_points_names_and_values(tmp_path):
    base = RunConfig(out=str(tmp_path))
    points = grid_points(base, parse_grid(["alpha=0.1,0.5", "seed=0,1,2"]))
    assert [n for n, _ in points][:2] == ["alpha=0.1,seed=0", "alpha=0.1,seed=1"]
    assert len(points) == 6
    cfg = dict(points)["alpha=0.5,seed=2"]
    assert cfg.alpha == 0.5 and cfg.seed == 2 and cfg.out == str(tmp_path / "alpha=0.5,seed=2")
    assert base.alpha == 0.1  # the base config is not modified
    with pytest.raises(UserError, match="grid"):
        parse_grid(["alpha"])
    with pytest.raises(UserError, match="alpha"):
        grid_points(base, parse_grid(["alpha=0,1"]))
    with pytest.raises(UserError, match="method"):
        grid_points(base, {"method": ["fedavg"]})


def test_grid_sweeps_section_settings_under_every_spelling(tmp_path):
    base = RunConfig(out=str(tmp_path), method=["fedavg", "fedftg", "feddf"])
    for key in ("ftg.gen_lr", "ftg-gen-lr", "ftg_gen_lr"):
        points = grid_points(base, parse_grid([f"{key}=0.01,0.001", "seed=0,1"]))
        assert [n for n, _ in points][:2] == ["ftg.gen_lr=0.01,seed=0", "ftg.gen_lr=0.01,seed=1"]
        assert [c.ftg.gen_lr for _, c in points] == [0.01, 0.01, 0.001, 0.001]
        assert [c.seed for _, c in points] == [0, 1, 0, 1]
    # a TOML [grid] table with a [grid.ftg] sub-table means the same
    toml = parse_grid({"seed": [0], "ftg": {"gen_lr": [0.01, 0.001]}, "df": {"nz": 64}})
    assert toml == {"seed": [0], "ftg.gen_lr": [0.01, 0.001], "df.nz": [64]}
    cfg = dict(grid_points(base, toml))["seed=0,ftg.gen_lr=0.001,df.nz=64"]
    assert cfg.ftg.gen_lr == 0.001 and cfg.df.nz == 64 and base.ftg.gen_lr == 0.01
    assert base.df.nz != 64 and grid_points(base, toml)[0][1].ftg is not base.ftg
    with pytest.raises(UserError, match=r"grid: ftg\.nope: unknown setting"):
        grid_points(base, parse_grid(["ftg.nope=1,2"]))
    with pytest.raises(UserError, match="ftg.gen_lr"):
        grid_points(base, parse_grid(["ftg.gen_lr=fast"]))


def test_report_makes_plug_in_settings_variants_of_the_methods_that_use_them(tmp_path):
    def ftg(**changes):
        return {**RunConfig().resolve().to_dict()["ftg"], **changes}

    # a plain method beside each point of an ftg grid is the same run: counted once
    for lr in (0.01, 0.001):
        _fake_run(tmp_path / f"a0-{lr}", "fedavg", 0, [0.5] * 3, ftg=ftg(gen_lr=lr))
    _fake_run(tmp_path / "f0", "fedftg", 0, [0.52] * 3, [0.5] * 3)
    _fake_run(tmp_path / "u0", "fedftg", 0, [0.47] * 3, [0.5] * 3, ftg=ftg(ensemble="uniform"))
    _fake_run(tmp_path / "u1", "fedftg", 1, [0.45] * 3, [0.5] * 3, ftg=ftg(ensemble="uniform"))
    # a df setting leaves ftg methods alone
    _fake_run(tmp_path / "d0", "fedftg", 2, [0.5] * 3, [0.5] * 3, df={"nz": 64})
    md = build_report([tmp_path], tmp_path / "rep", target=0.0).read_text()
    assert "6 runs in 1 setting(s)" in md and md.count("## ") == 1
    assert "| fedavg | 1 | 50.00 |" in md
    assert "| fedftg | 2 | 51.00 ± 1.41 |" in md
    assert "| fedftg (ftg.ensemble=uniform) | 2 | 46.00 ± 1.41 |" in md
    assert "| fedftg | fedavg | 1 | +2.00 (+1.00) | +2.00 | 3 of 6 |" in md
    assert "| fedftg (ftg.ensemble=uniform) | fedavg | 1 | -3.00 (-4.00) | -3.00 | 0 of 6 |" in md
    # a setting every method reads still splits
    _fake_run(tmp_path / "x0", "fedftg", 0, [0.5] * 3, [0.5] * 3, alpha=0.9)
    md = build_report([tmp_path], tmp_path / "rep", target=0.0).read_text()
    assert "7 runs in 2 setting(s)" in md
    assert "## alpha=0.1\n" in md and "## alpha=0.9\n" in md


@pytest.mark.processes
def test_sweep_skips_finished_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        *TINY,
        "--method",
        "fedavg,fedprox",
        "--grid",
        "seed=0,1",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--report",
        "--target",
        "0.3",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.count(" done ") == 2
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped (complete)") == 2
    md = (out / "report" / "report.md").read_text()
    assert "| fedavg | 2 |" in md and "| fedprox | 2 |" in md and "±" in md
    assert (out / "report" / "curves_0.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report" / "partition_0.png").exists()


def test_report_pools_seeds_and_separates_settings(tmp_path, capsys):
    for seed in (0, 1):
        for alpha in ("0.1", "1.0"):
            main(
                [
                    "run",
                    *TINY,
                    "--method",
                    "fedavg",
                    "--seed",
                    str(seed),
                    "--alpha",
                    alpha,
                    "--out",
                    str(tmp_path / f"a{alpha}s{seed}"),
                    "--quiet",
                ]
            )
    capsys.readouterr()
    md = build_report([tmp_path], tmp_path / "rep", target=0.0).read_text()
    assert md.count("## ") == 2 and "alpha=0.1" in md and "alpha=1.0" in md
    assert md.count("| fedavg | 2 |") == 2
    finals = [
        json.loads((tmp_path / f"a0.1s{s}" / "summary.json").read_text())["methods"]["fedavg"][
            "final_acc"
        ]
        for s in (0, 1)
    ]
    mean = 100 * sum(finals) / 2
    assert f"{mean:.2f} ±" in md


def test_rounds_to_target():
    curve = [(1, 0.2), (2, 0.5), (3, 0.45), (4, 0.9)]
    assert rounds_to_target(curve, 0.5) == 2 and rounds_to_target(curve, 0.95) is None


def test_report_of_nothing_is_an_error(tmp_path, capsys):
    code = None
    try:
        main(["report", str(tmp_path)])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and capsys.readouterr().err.startswith("error:")


def test_phases_split_early_rounds_finely():
    assert phases(3) == [(1, 3)]
    assert phases(5) == [(1, 5)]
    assert phases(30) == [(1, 5), (6, 10), (11, 20), (21, 30)]
    assert phases(1000)[3:] == [(21, 50), (51, 100), (101, 200), (201, 500), (501, 1000)]


def _fake_run(path, method, seed, accs, before=None, **settings):
    """A finished run directory with a given accuracy curve (and pre-server accuracies);
    a setting given as None is left out of its config, as in runs older than the setting;
    a section setting is named with two underscores (``scaffold__reference``)."""
    cfg = RunConfig(method=[method], seed=seed, rounds=len(accs), out=str(path)).resolve()
    cfg = cfg.to_dict()
    for key, value in settings.items():
        section, _, name = key.partition("__")
        table = cfg[section] if name else cfg
        table[name or key] = value
        if value is None:
            del table[name or key]
    path.mkdir(parents=True)
    records = []
    for r, acc in enumerate(accs, start=1):
        rec = {"method": method, "round": r, "test_acc": acc}
        if before is not None:
            rec["acc_before_server"] = before[r - 1]
        records.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(records) + "\n")
    summary = {"final_acc": accs[-1], "best_acc": max(accs), "rounds": len(accs), "wall_s": 1.0}
    (path / "summary.json").write_text(json.dumps({"methods": {method: summary}, "config": cfg}))


def test_report_compares_plugins_with_their_base_seed_by_seed(tmp_path):
    _fake_run(tmp_path / "a0", "fedavg", 0, [0.5] * 6)
    _fake_run(tmp_path / "a1", "fedavg", 1, [0.6] * 6)
    # seed 0: +2 points in rounds 1-5 (step +1 each), -1 in round 6 (step -2)
    _fake_run(tmp_path / "f0", "fedftg", 0, [0.52] * 5 + [0.49], [0.51] * 5 + [0.51])
    # seed 1: +3 points in rounds 1-5 (step +1 each), level in round 6 (step +1)
    _fake_run(tmp_path / "f1", "fedftg", 1, [0.63] * 5 + [0.6], [0.62] * 5 + [0.59])
    # a plug-in whose base method did not run: only the step's own change is known
    _fake_run(tmp_path / "s0", "scaffold+ftg", 0, [0.4] * 6, [0.45] * 6)
    md = build_report([tmp_path], tmp_path / "rep", target=0.0).read_text()
    assert "| method | base | paired seeds | rounds 1-5 | round 6 |" in md
    row = "| fedftg | fedavg | 2 | +2.50 (+1.00) | -0.50 (-0.50) | -1.00 / +0.00 | 11 of 12 |"
    assert row in md
    assert "| scaffold+ftg | - | 0 | - (-5.00) | - (-5.00) | - | 0 of 6 |" in md
    assert "| fedavg |" in md and "| fedavg | fedavg" not in md  # plain methods get no row
    assert "count every seed of the plug-in, paired or not" in md


def test_report_without_plugins_has_no_plugin_table(tmp_path):
    _fake_run(tmp_path / "a0", "fedavg", 0, [0.5, 0.6])
    md = build_report([tmp_path], tmp_path / "rep", target=0.0).read_text()
    assert "Server plug-ins" not in md


def test_report_names_method_settings_and_pairs_every_variant_with_its_base(tmp_path):
    # the base from before `scaffold.reference` existed, one run of each reference, and an
    # older SCAFFOLD+FTG run: its missing setting reads as the earlier behaviour, `sent`
    _fake_run(tmp_path / "b0", "scaffold", 0, [0.5] * 3, scaffold__reference=None)
    _fake_run(tmp_path / "g0", "scaffold+ftg", 0, [0.52] * 3, [0.5] * 3)
    _fake_run(tmp_path / "s0", "scaffold+ftg", 0, [0.49] * 3, [0.5] * 3, scaffold__reference="sent")
    _fake_run(tmp_path / "o1", "scaffold+ftg", 1, [0.47] * 3, [0.5] * 3, scaffold__reference=None)
    md = build_report([tmp_path], tmp_path / "rep", target=0.0).read_text()
    assert "4 runs in 1 setting(s)" in md
    assert "| scaffold | 1 | 50.00 | 50.00 |" in md  # one seed: no spread to show
    assert "| scaffold+ftg (scaffold.reference=sent) | 2 | 48.00 ± 1.41 |" in md
    assert "| scaffold+ftg | scaffold | 1 | +2.00 (+2.00) | +2.00 | 3 of 3 |" in md
    sent = (
        "| scaffold+ftg (scaffold.reference=sent) | scaffold | 1 | -1.00 (-2.00) | -1.00 | 0 of 6 |"
    )
    assert sent in md
    # runs of another client method, or another plug-in setting, still split
    _fake_run(tmp_path / "x0", "scaffold", 0, [0.5] * 3, alpha=0.9)
    md = build_report([tmp_path], tmp_path / "rep", target=0.0).read_text()
    assert "5 runs in 2 setting(s)" in md
