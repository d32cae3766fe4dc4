"""The `fedftg` command's contract: output files, and exit 2 with one `error:` line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clirun import run_cli as _run
from fedftg.cli import main
from fedftg.config import RunConfig, Source, build_config, config_from_dict, settings_from
from fedftg.errors import UserError

FAST = ["--rounds", "2", "--clients", "4", "--local-epochs", "1", "--participation", "1"]


def test_run_writes_the_contract_files(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, ["run", *FAST, "--method", "fedavg,fedprox", "--out", str(out)])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["clients"] == 4 and cfg["method"] == ["fedavg", "fedprox"]
    assert cfg["environment"]["torch"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in records] == [
        ("fedavg", 1),
        ("fedavg", 2),
        ("fedprox", 1),
        ("fedprox", 2),
    ]
    for r in records:
        assert 0 <= r["test_acc"] <= 1 and r["test_loss"] > 0 and r["elapsed_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("fedavg", "fedprox"):
        s = summary["methods"][name]
        assert (
            s["rounds"] == 2
            and s["final_acc"] == records[-1 if name == "fedprox" else 1]["test_acc"]
        )
        assert s["best_acc"] >= s["final_acc"] and s["wall_s"] > 0
    assert summary["config"]["rounds"] == 2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fedavg" in stdout and "final acc" in stdout
    assert not list(out.glob(".*.tmp"))


def test_same_seed_same_metrics(tmp_path, capsys):
    args = ["run", *FAST, "--method", "fedavg", "--seed", "7"]
    _run(capsys, [*args, "--out", str(tmp_path / "a")])
    _run(capsys, [*args, "--out", str(tmp_path / "b")])

    def accs(d):
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [(json.loads(x)["test_acc"], json.loads(x)["test_loss"]) for x in lines]

    assert accs("a") == accs("b")


BAD = [
    (["--dataset", "nope"], "dataset"),
    (["--method", "fedsgd"], "method"),
    (["--method", "fedavg+xyz"], "method"),
    (["--alpha", "0"], "alpha"),
    (["--alpha", "-1"], "alpha"),
    (["--participation", "1.5"], "participation"),
    (["--participation", "0"], "participation"),
    (["--clients", "100000"], "clients"),
    (["--clients", "abc"], "clients"),
    (["--rounds", "0"], "rounds"),
    (["--partition", "weird"], "partition"),
    (["--ftg-iterations", "0"], "ftg.iterations"),
    (["--model", "vgg"], "vgg"),
    (["--no-such-flag", "1"], "no-such-flag"),
    (["--ftg-hard-mining", "maybe"], "ftg-hard-mining"),
    (["--no-download=true"], "no-download"),
]


@pytest.mark.parametrize(("args", "names"), BAD)
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, args, names):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("good")
    code, _, err = _run(capsys, ["run", *args, "--out", str(out)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], err
    assert (out / "summary.json").read_text() == "good"


def test_missing_dataset_offline_names_the_path(tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    args = ["run", "--dataset", "mnist", "--data-dir", str(empty), "--no-download"]
    code, _, err = _run(capsys, [*args, "--out", str(tmp_path / "o")])
    assert code == 2 and err.startswith("error:") and str(empty) in err


def test_unreadable_and_invalid_config_files(tmp_path, capsys):
    missing = tmp_path / "missing.toml"
    code, _, err = _run(capsys, ["run", "--config", str(missing)])
    assert code == 2 and str(missing) in err and err.startswith("error:")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    code, _, err = _run(capsys, ["run", "--config", str(bad)])
    assert code == 2 and str(bad) in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("roundz = 3\n")
    code, _, err = _run(capsys, ["run", "--config", str(unknown)])
    assert code == 2 and "roundz" in err


def test_config_file_then_flags_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nmethod = ["scaffold+ftg"]\nalpha = 0.3\n[ftg]\niterations = 4\n')
    cfg = build_config(f, {"alpha": "0.9"})
    assert cfg.rounds == 7 and cfg.method == ["scaffold+ftg"] and cfg.alpha == 0.9
    assert cfg.ftg.iterations == 4
    assert config_from_dict(cfg.to_dict()) == cfg


def test_settings_come_from_their_sources_in_order():
    first = Source({"alpha": 0.3, "rounds": 4, "ftg": {"iterations": 3}}, "first.toml: ")
    cfg = settings_from([first, Source({"alpha": "0.7", "method": "fedftg"})])
    assert (cfg.alpha, cfg.rounds, cfg.ftg.iterations, cfg.method) == (0.7, 4, 3, ["fedftg"])
    base = RunConfig(rounds=9)
    assert settings_from([Source({"seed": 2})], base).rounds == 9 and base.seed == 0
    with pytest.raises(UserError, match=r"^first\.toml: bogus: unknown setting$"):
        settings_from([Source({"bogus": 1}, "first.toml: ")])
    # only the user's own sources are held to the run's methods (a preset's table is not)
    other = {"method": "fedavg", "fedprox": {"mu": 0.5}}
    assert settings_from([Source(other, given=False)]).fedprox.mu == 0.5
    with pytest.raises(UserError, match=r"^fedprox\.mu: set to 0\.5, but no method"):
        settings_from([Source(other)])


def test_method_names_and_alias():
    cfg = RunConfig(method=["fedftg", "scaffold+ftg", "fedavg+df", "moon"]).validate()
    assert cfg.methods() == [
        ("fedftg", "fedavg", "ftg"),
        ("scaffold+ftg", "scaffold", "ftg"),
        ("fedavg+df", "fedavg", "df"),
        ("moon", "moon", None),
    ]
    with pytest.raises(UserError, match="method"):
        RunConfig(method=["fedavg", "fedavg"]).validate()


@pytest.mark.processes
def test_console_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedftg.cli", "run", "--alpha", "nan", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: alpha") and "Traceback" not in proc.stderr


def test_partition_command_prints_stats_and_writes_heatmap(tmp_path, capsys):
    png = tmp_path / "p.png"
    code, out, _ = _run(
        capsys, ["partition", "--clients", "6", "--alpha", "0.1", "--heatmap", str(png)]
    )
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert str(png) in out


def test_output_dir_is_a_file_is_an_error(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = _run(capsys, ["run", *FAST, "--method", "fedavg", "--out", str(f)])
    assert code == 2 and str(f) in err


def test_example_configs_are_valid():
    from pathlib import Path

    from fedftg.config import apply_overrides, load_config_file
    from fedftg.engine.sweep import grid_points, parse_grid

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        values = load_config_file(path)
        grid = parse_grid(values.pop("grid", {}))
        base = apply_overrides(RunConfig(), values).validate()
        assert grid_points(base, grid)


def test_tensorboard_scalars(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert (
        main(["run", *FAST, "--method", "fedavg", "--tensorboard", "--quiet", "--out", str(out)])
        == 0
    )
    acc = EventAccumulator(str(out / "tensorboard" / "fedavg"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("test_acc")]
    assert steps == [1, 2]
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert acc.Scalars("test_acc")[-1].value == pytest.approx(json.loads(metrics[-1])["test_acc"])
    assert capsys.readouterr().out == ""  # --quiet


def test_verbose_prints_one_line_per_round(tmp_path, capsys):
    main(["run", *FAST, "--method", "fedavg", "--verbose", "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert err.count("fedavg round ") == 2


def _printed(capsys, args):
    code, out, err = _run(capsys, ["run", "--method", "fedftg", *args, "--print-config"])
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    ("args", "value"),
    [
        (["--ftg-hard-mining", "false"], False),
        (["--ftg-hard-mining=false"], False),
        (["--no-ftg-hard-mining"], False),
        (["--ftg-hard-mining", "Off"], False),
        (["--ftg-hard-mining", "0"], False),
        (["--ftg-hard-mining=no"], False),
        (["--ftg-hard-mining"], True),
        (["--ftg-hard-mining", "true"], True),
        (["--ftg-hard-mining=yes"], True),
        (["--ftg-hard-mining", "ON"], True),
        (["--ftg-hard-mining", "1"], True),
    ],
)
def test_every_boolean_spelling_parses(capsys, args, value):
    assert _printed(capsys, args)["ftg"]["hard_mining"] is value
    # a value followed by another flag: the flag is not swallowed
    cfg = _printed(capsys, [*args, "--seed", "5"])
    assert cfg["ftg"]["hard_mining"] is value and cfg["seed"] == 5


def test_every_boolean_setting_has_the_three_forms(capsys):
    from fedftg.config import core_fields
    from fedftg.registry import plugins as all_plugins
    from fedftg.registry import sections
    from fedftg.settings import fields

    flags = [f.name.replace("_", "-") for f, m in core_fields() if f.type in (bool, "bool")]
    flags += [
        f"{name}-" + f.name.replace("_", "-")
        for name, cls in sections().items()
        for f, _ in fields(cls)
        if f.type in (bool, "bool")
    ]
    assert "download" in flags and "ftg-hard-mining" in flags
    PLUGINS = set(all_plugins())
    methods = ["--method", ",".join(f"fedavg+{p}" for p in sections() if p in PLUGINS)]
    for flag in flags:
        printed = {}
        for value, forms in {
            False: [[f"--{flag}", "false"], [f"--{flag}=false"], [f"--no-{flag}"]],
            True: [[f"--{flag}", "true"], [f"--{flag}=true"], [f"--{flag}"]],
        }.items():
            runs = [_run(capsys, ["run", *methods, *form, "--print-config"]) for form in forms]
            assert all(code == 0 for code, _, _ in runs), (flag, runs)
            assert len({out for _, out, _ in runs}) == 1, flag
            printed[value] = runs[0][1]
        assert printed[False] != printed[True], flag


def test_sweep_print_config_prints_every_point_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sw"
    args = ["sweep", "--method", "fedavg", "--rounds", "2", "--grid", "seed=0,1"]
    code, stdout, err = _run(capsys, [*args, "--out", str(out), "--print-config"])
    assert code == 0, err
    points = json.loads(stdout)
    assert [(p["point"], p["seed"], p["out"]) for p in points] == [
        ("seed=0", 0, str(out / "seed=0")),
        ("seed=1", 1, str(out / "seed=1")),
    ]
    assert list(tmp_path.iterdir()) == []
    code, stdout, _ = _run(capsys, ["sweep", "--preset", "paper-cifar10-cpu", "--print-config"])
    assert code == 0 and len(json.loads(stdout)) > 1
    assert list(tmp_path.iterdir()) == []
