"""The method / plug-in registries, settings sections, their old names, and old run directories.

tests/fixtures/legacy-v0 holds run directories written by fedftg before the registry (the
commit 3f29c5a): an interrupted run (its checkpoint after round 2 of scaffold+ftg, fedprox
done), a finished run and a finished two-point sweep, all with the command in ARGS. The
interrupted run's checkpoint is stored without its tensor values (checkpoint-v0.json: its
layout, fingerprint and numbers); the `interrupted` fixture fills them in from this code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedftg import registry
from fedftg.cli import build_parser, main
from fedftg.config import (
    RunConfig,
    build_config,
    canonical_key,
    config_from_dict,
    fingerprint,
    read_saved,
)
from fedftg.engine.checkpoint import checkpoint_matches, read_checkpoint, save_checkpoint
from fedftg.engine.sweep import grid_points, is_complete
from fedftg.errors import UserError
from fedftg.flower.common import config_from_run_config
from fedftg.legacy import fingerprint_v0

LEGACY = Path(__file__).parent / "fixtures" / "legacy-v0"
LEGACY_ARGS = (LEGACY / "ARGS").read_text().split()
LEGACY_METHODS = ["--method", "fedprox,scaffold+ftg"]
# today's command for them: the old one set --moon-tau for a run without MOON, which is now
# refused; a setting no method reads is not part of the fingerprint, so leaving it out
# still matches the old run
TODAY_ARGS = [
    a for i, a in enumerate(LEGACY_ARGS) if "--moon-tau" not in LEGACY_ARGS[i - 1 : i + 1]
]


def legacy_fingerprint(values: dict) -> str:
    """The v0 fingerprint of a saved config dict."""
    return fingerprint_v0(read_saved(values))


def _tensor_layout(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{"body.0.bias": "float32 (32,)"}``: the names, dtypes and shapes of a state dict."""
    return {k: f"{str(t.dtype)[6:]} {tuple(t.shape)}" for k, t in tensors.items()}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """The interrupted v0 run directory: config.json and metrics.jsonl as fedftg 3f29c5a
    wrote them, and checkpoint.pt in its v0 layout (checkpoint-v0.json: no ``rows``,
    ``final`` or ``rounds``, the old fingerprint and numbers), whose tensors, 6.3 MB that
    the repository does not keep, come from this code running the same settings to the
    same point (scaffold+ftg after round 2) and must have v0's names, dtypes and shapes."""
    root = tmp_path_factory.mktemp("legacy-v0")
    args = [a for i, a in enumerate(TODAY_ARGS) if "--prox-mu" not in TODAY_ARGS[i - 1 : i + 1]]
    made = root / "made"
    flags = ["--method", "scaffold+ftg", "--rounds", "2", "--keep-checkpoint", "--quiet"]
    assert main(["run", *args, *flags, "--no-progress", "--out", str(made)]) == 0
    state = read_checkpoint(made / "checkpoint.pt")["final"]["scaffold+ftg"]
    v0 = json.loads((LEGACY / "interrupted" / "checkpoint-v0.json").read_text())
    for group, layout in v0["tensors"].items():
        have = state[group]
        if group == "client_states":
            assert {c: _tensor_layout(t) for c, t in have.items()} == layout, group
        else:
            assert _tensor_layout(have) == layout, group
    run = root / "interrupted"
    shutil.copytree(
        LEGACY / "interrupted", run, ignore=shutil.ignore_patterns("checkpoint-v0.json")
    )
    saved = {key: v0[key] for key in ("fingerprint", "done", "current")}
    saved["state"] = {**v0["state"], **{group: state[group] for group in v0["tensors"]}}
    save_checkpoint(run / "checkpoint.pt", saved)
    return run


def _run(capsys, args: list[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_the_registry_holds_every_method_and_plug_in_once():
    methods, plugins = registry.methods(), registry.plugins()
    assert list(methods)[:5] == ["fedavg", "fedprox", "scaffold", "feddyn", "moon"]
    assert {"ftg", "df"} <= set(plugins)
    assert registry.aliases()["fedftg"] == "fedavg+ftg"
    assert registry.split_method("feddf") == ("fedavg", "df")
    assert registry.split_method("scaffold+ftg") == ("scaffold", "ftg")
    aliases = [a for a in registry.aliases() if a not in plugins]  # fedgen names both
    names = [*methods, *plugins, *aliases]
    assert len(names) == len(set(names))
    for name, spec in methods.items():
        assert spec.name == name and spec.summary
        if spec.settings is not None:
            assert name in registry.sections()


def test_every_section_setting_has_a_flag_with_its_help():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    by_dest = {a.dest: a for a in run._actions}  # noqa: SLF001
    for section, cls in registry.sections().items():
        for name in cls.__dataclass_fields__:
            action = by_dest[f"{section}.{name}"]
            assert f"--{section}-{name.replace('_', '-')}" in action.option_strings
            assert action.help and "[" in action.help
    assert "--prox-mu" in by_dest["fedprox.mu"].option_strings  # the name from before sections
    assert "fedavg, fedprox, scaffold" in by_dest["method"].help


@pytest.mark.parametrize(
    ("key", "canonical"),
    [
        ("prox_mu", "fedprox.mu"),
        ("prox-mu", "fedprox.mu"),
        ("fedprox-mu", "fedprox.mu"),
        ("fedprox.mu", "fedprox.mu"),
        ("scaffold_reference", "scaffold.reference"),
        ("feddyn-alpha", "feddyn.alpha"),
        ("moon_tau", "moon.tau"),
        ("ftg-gen-lr", "ftg.gen_lr"),
        ("df_nz", "df.nz"),
        ("local-epochs", "local_epochs"),
    ],
)
def test_setting_names_old_and_new(key, canonical):
    assert canonical_key(key) == canonical


def test_old_and_new_names_give_the_same_config(tmp_path):
    new = build_config(None, {"method": "fedprox,moon", "fedprox": {"mu": 0.3}, "moon.tau": 0.7})
    old = build_config(None, {"method": "fedprox,moon", "prox_mu": 0.3, "moon_tau": 0.7})
    toml = tmp_path / "c.toml"
    toml.write_text('method = ["fedprox", "moon"]\nprox_mu = 0.3\n[moon]\ntau = 0.7\n')
    flower = config_from_run_config({"method": "fedprox,moon", "prox-mu": 0.3, "moon-tau": 0.7})
    assert new == old == build_config(toml) == flower
    assert new.fedprox.mu == 0.3 and new.moon.tau == 0.7
    saved = new.to_dict()
    assert saved["fedprox"] == {"mu": 0.3, "variant": "proximal"} and "prox_mu" not in saved
    assert config_from_dict(saved) == new


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--method", "fedavg", "--fedprox-mu", "0.3"], "fedprox.mu"),
        (["--method", "fedavg,fedftg", "--prox-mu", "0.3"], "fedprox.mu"),
        (["--method", "scaffold", "--scaffold-reference", "sent"], "scaffold.reference"),
        (["--method", "fedavg,moon", "--ftg-iterations", "3"], "ftg.iterations"),
        (["--method", "fedprox", "--fedprox-mu", "-1"], "fedprox.mu"),
        (["--method", "moon", "--moon-tau", "0"], "moon.tau"),
        (["--method", "scaffold", "--scaffold-variate-lr", "sometimes"], "scaffold.variate_lr"),
        (["--method", "fedavg+nope"], "method"),
        (["--method", "fedsgd+ftg"], "method"),
    ],
)
def test_bad_method_settings_exit_2_naming_the_field(tmp_path, capsys, args, field):
    code, err = _run(capsys, ["run", *args, "--out", str(tmp_path / "o")])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: " + field), err
    assert not (tmp_path / "o").exists()


def test_a_setting_for_a_method_not_run_is_refused_in_files_and_on_flower(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('method = ["fedavg"]\n[fedprox]\nmu = 0.5\n')
    with pytest.raises(UserError, match=r"^fedprox\.mu: set to 0.5, but no method"):
        build_config(toml)
    with pytest.raises(UserError, match=r"^ftg\.iterations"):
        config_from_run_config({"method": "fedavg", "ftg-iterations": 3})
    # at its default, or with a method that reads it, it is fine (example files list defaults)
    toml.write_text('method = ["fedavg"]\n[ftg]\niterations = 10\n')
    assert build_config(toml).ftg.iterations == 10
    with pytest.raises(UserError, match=r"^grid: |^ftg\.gen_lr"):
        grid_points(RunConfig(method=["fedavg"]), {"ftg.gen_lr": [0.01, 0.001]})


@pytest.mark.processes
def test_report_does_not_import_the_engine():
    code = (
        "import sys, fedftg.report.report; "
        "print([m for m in sys.modules if m.startswith('fedftg.engine')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------- settings added later


def test_a_saved_config_without_a_later_setting_reads_its_before_value():
    saved = json.loads((LEGACY / "finished" / "config.json").read_text())
    del saved["scaffold_reference"]  # as written before the setting existed
    cfg = config_from_dict(saved)
    assert cfg.scaffold.reference == "sent"  # the behaviour of that time, not the default
    assert RunConfig().scaffold.reference == "aggregate"


def test_fingerprint_counts_only_what_the_run_reads():
    base = RunConfig(method=["fedavg", "fedftg"]).validate().to_dict()
    moved = RunConfig(method=["fedavg", "fedftg"]).override({"fedprox.mu": 0.5}).to_dict()
    assert fingerprint(base) == fingerprint(moved)
    assert legacy_fingerprint(base) != legacy_fingerprint(moved)  # the old hash counted it
    ftg = RunConfig(method=["fedavg", "fedftg"]).override({"ftg.iterations": 3}).to_dict()
    assert fingerprint(base) != fingerprint(ftg)
    plain = RunConfig(method=["scaffold"]).validate()
    assert fingerprint(plain.to_dict()) == fingerprint(
        plain.override({"scaffold.reference": "sent"}).to_dict()
    )


# ---------------------------------------------------------- run directories from before


def test_old_checkpoints_match_todays_command(interrupted):
    saved = read_checkpoint(interrupted / "checkpoint.pt")
    old_cfg = json.loads((interrupted / "config.json").read_text())
    assert saved["fingerprint"] == legacy_fingerprint(old_cfg)
    with pytest.raises(UserError, match="^moon.tau"):
        build_config(None, _flags_to_overrides([*LEGACY_ARGS, *LEGACY_METHODS]))
    cli = build_config(None, _flags_to_overrides([*TODAY_ARGS, *LEGACY_METHODS]))
    assert checkpoint_matches(saved, cli.to_dict(), old_cfg)
    assert not checkpoint_matches(saved, cli.to_dict())  # the old hash counted moon_tau
    old_command = cli.override({"moon.tau": 0.7}).to_dict()
    assert checkpoint_matches(saved, old_command)
    other = cli.override({"fedprox.mu": 0.06})
    assert not checkpoint_matches(saved, other.to_dict(), old_cfg)


def _flags_to_overrides(args: list[str]) -> dict[str, str]:
    pairs = zip(args[::2], args[1::2], strict=True)
    return {flag.removeprefix("--"): value for flag, value in pairs}


def test_an_old_interrupted_run_resumes_and_equals_a_whole_run(interrupted, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(interrupted, run)
    before = (run / "metrics.jsonl").read_text().splitlines()
    args = ["run", *TODAY_ARGS, *LEGACY_METHODS, "--no-progress", "--quiet"]
    assert main([*args, "--out", str(run)]) == 0
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # continued, not started over
    assert [(r["method"], r["round"]) for r in map(json.loads, after[len(before) :])] == [
        ("scaffold+ftg", 3)
    ]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # the old rows may come from another CPU, whose kernels round differently (the FTG
    # step amplifies that): the same run within a few test samples; a restart from
    # scratch would have rewritten the old rows, checked above
    keys = ("test_acc", "test_loss", "train_loss")
    rows = [(r["method"], r["round"], [r[k] for k in keys]) for r in map(json.loads, after)]
    assert rows == [
        (r["method"], r["round"], pytest.approx([r[k] for k in keys], rel=0.02, abs=0.01))
        for r in whole
    ]


def test_old_sweeps_skip_their_finished_points():
    values = _flags_to_overrides([*TODAY_ARGS, *LEGACY_METHODS])
    values.update(rounds="1", method="fedavg,fedprox+ftg")
    del values["scaffold-variate-lr"], values["ftg-student-steps"]
    base = build_config(None, values)
    base.out = str(LEGACY / "sweep")
    points = grid_points(base, {"seed": ["0", "1"]})
    assert [is_complete(cfg) for _, cfg in points] == [True, True]
    changed = grid_points(base.override({"ftg.iterations": 3}), {"seed": ["0", "1"]})
    assert [is_complete(cfg) for _, cfg in changed] == [False, False]


def test_the_fixture_checkpoint_is_what_the_test_assumes(interrupted):
    saved = read_checkpoint(interrupted / "checkpoint.pt")
    assert sorted(saved) == ["current", "done", "fingerprint", "state"]  # v0's keys only
    assert saved["current"] == "scaffold+ftg" and saved["state"]["round"] == 2
    assert list(saved["done"]) == ["fedprox"]
    assert all(isinstance(v, torch.Tensor) for v in saved["state"]["global_state"].values())
