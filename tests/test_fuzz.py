"""Fuzzing the config loader and the command line: bad input is exit 2 + one error line."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedftg.cli import main
from fedftg.config import RunConfig, apply_overrides
from fedftg.errors import UserError

FIELDS = [f for f in RunConfig.__dataclass_fields__ if f not in ("ftg", "df")]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["bogus", "ftg"]), values, max_size=4))
def test_config_loader_only_raises_user_errors(overrides):
    try:
        apply_overrides(RunConfig(), overrides).validate()
    except UserError as exc:
        assert str(exc)


flag_names = st.sampled_from(
    [
        "--alpha",
        "--clients",
        "--participation",
        "--rounds",
        "--dataset",
        "--method",
        "--model",
        "--partition",
        "--lr",
        "--seed",
        "--ftg-iterations",
        "--ftg-md-distance",
        "--batch-size",
        "--selection",
        "--device",
        "--local-steps",
        "--bogus",
    ]
)
junk = st.sampled_from(["-1", "0", "nan", "inf", "abc", "", "1e309", "fedavg+", "+ftg", "2.5"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(flag_names, junk), min_size=1, max_size=3))
def test_cli_rejects_junk_with_exit_2_and_one_line(tmp_path, capsys, monkeypatch, pairs):
    import fedftg.engine.run

    # validation happens before the run; valid junk must not start a real experiment
    monkeypatch.setattr(fedftg.engine.run, "run_experiment", lambda cfg, **kw: None)
    args = ["run", "--out", str(tmp_path / "o")]
    for flag, value in pairs:
        args += [flag, value]
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    if code == 0:  # the junk happened to be valid (e.g. --seed 0): nothing to check
        return
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
