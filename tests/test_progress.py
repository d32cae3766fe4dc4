"""Progress on stderr: a line per round without a terminal, none with --quiet, a resumed run
says where it resumed, a sweep reports each point as it finishes, Ctrl-C is acknowledged."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess

import pytest

from clirun import run_cli as _run
from fedftg.config import RunConfig
from fedftg.engine import sweep
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.loop import StopFlag
from fedftg.engine.progress import Reporter

FAST = ["--rounds", "2", "--clients", "3", "--local-epochs", "1", "--participation", "1"]
FAST += ["--local-steps", "2", "--method", "fedavg"]


def test_no_terminal_prints_one_line_per_round(tmp_path, capsys):
    code, _, err = _run(capsys, ["run", *FAST, "--out", str(tmp_path / "r")])
    assert code == 0
    rounds = [line for line in err.splitlines() if re.match(r"fedavg round \d/2: test acc", line)]
    assert len(rounds) == 2 and "ETA" in rounds[-1] and "\r" not in err


def test_quiet_prints_no_progress(tmp_path, capsys):
    code, out, err = _run(capsys, ["run", *FAST, "--quiet", "--out", str(tmp_path / "q")])
    assert code == 0 and err == "" and out == ""


def test_resumed_run_says_where(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "res")
    real = MethodRunner.run_round
    calls = []

    def crash_in_round_2(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(MethodRunner, "run_round", crash_in_round_2)
    code, _, _ = _run(capsys, ["run", *FAST, "--checkpoint-every", "1", "--out", out])
    assert code == 130
    monkeypatch.setattr(MethodRunner, "run_round", real)
    code, _, err = _run(capsys, ["run", *FAST, "--checkpoint-every", "1", "--out", out])
    assert code == 0 and "fedavg: resumed at round 2 of 2" in err
    assert "fedavg round 2/2" in err and "fedavg round 1/2" not in err


def test_rate_counts_only_the_rounds_run():
    stream = io.StringIO()
    rep = Reporter("lines", stream)
    rep.start_method("m", 10, done=8)
    rep.start -= 2.0  # two seconds into the resumed run
    rep.round({"round": 9, "test_acc": 0.5, "train_loss": 1.0, "round_s": 2.0})
    assert "resumed at round 9 of 10" in stream.getvalue()
    assert "ETA 0:02" in stream.getvalue()  # one round left at 2 s/round, not 2/9 s


def test_first_signal_is_acknowledged_at_once_second_stops():
    stream = io.StringIO()
    rep = Reporter("off", stream)  # even --quiet hears it
    rep.start_method("fedavg", 5, done=0)
    rep.round({"round": 2, "round_s": 1.0})
    stop = StopFlag(rep.stopping)
    stop._handle(signal.SIGINT, None)
    assert stream.getvalue() == (
        "finishing round 3 of fedavg, then saving; Ctrl-C again to stop now\n"
    )
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_sweep_reports_each_point_as_it_finishes(tmp_path, monkeypatch):
    events = []

    class Done:
        returncode = 0

    def fake_run(cmd, **kwargs):
        events.append("run")
        return Done()

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    base = RunConfig(out=str(tmp_path / "sw"), method=["fedavg"]).validate()
    points = sweep.grid_points(base, {"seed": ["0", "1"]})
    sweep.run_sweep(base, points, on_point=lambda r: events.append(r["name"]))
    assert events == ["run", "seed=0", "run", "seed=1"]


def test_sweep_cli_prints_point_lines(tmp_path, monkeypatch, capsys):
    class Done:
        returncode = 0

    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: Done())
    code, out, _ = _run(capsys, ["sweep", "--grid", "seed=0,1", "--out", str(tmp_path / "s")])
    assert code == 0 and re.search(r"seed=0\s+done", out) and re.search(r"seed=1\s+done", out)
    assert subprocess is sweep.subprocess


def test_a_sweep_builds_its_points_once_into_one_stamped_directory(tmp_path, monkeypatch, capsys):
    class Done:
        returncode = 0

    outs, built = [], []
    real = sweep.grid_points
    monkeypatch.setattr(sweep, "grid_points", lambda *a: built.append(a) or real(*a))
    monkeypatch.setattr(
        sweep.subprocess, "run", lambda cmd, **kw: outs.append(json.loads(cmd[-1])["out"]) or Done()
    )
    args = ["sweep", "--grid", "seed=0,1", "--out", str(tmp_path / "{time}")]
    code, _, _ = _run(capsys, args)
    (stamped,) = [p for p in tmp_path.iterdir() if p.name != "latest"]
    assert code == 0 and len(built) == 1
    assert outs == [str(stamped / "seed=0"), str(stamped / "seed=1")]


def test_verbose_prints_round_lines_even_with_no_progress(tmp_path, capsys):
    args = ["run", *FAST, "--verbose", "--no-progress", "--out", str(tmp_path / "v")]
    code, _, err = _run(capsys, args)
    assert code == 0
    assert [line[:17] for line in err.splitlines() if " round " in line] == [
        "fedavg round 1/2:",
        "fedavg round 2/2:",
    ]
    code, _, err = _run(capsys, ["run", *FAST, "--no-progress", "--out", str(tmp_path / "n")])
    assert code == 0 and " round " not in err


def test_eta_counts_the_rounds_of_every_method(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("fedftg.engine.progress.time.perf_counter", lambda: clock[0])
    stream = io.StringIO()
    rep = Reporter("lines", stream)
    rep.start_method("fedavg", 3, done=0, later=3)  # fedavg+ftg's 3 rounds follow
    for r in (1, 2, 3):
        clock[0] += 2.0
        rep.round({"round": r, "test_acc": 0.5, "train_loss": 1.0, "round_s": 2.0})
    rep.end_method()
    rep.start_method("fedavg+ftg", 3, done=0)
    clock[0] += 8.0  # a slower method: (6 s + 8 s) / 4 rounds = 3.5 s a round
    rep.round({"round": 1, "test_acc": 0.5, "train_loss": 1.0, "round_s": 8.0})
    etas = re.findall(r"ETA (\S+)", stream.getvalue())
    assert etas == ["0:10", "0:08", "0:06", "0:07"]


def test_a_run_tells_the_reporter_the_rounds_of_the_later_methods(tmp_path, capsys, monkeypatch):
    seen = []
    real = Reporter.start_method

    def spy(self, label, total, done, later=0):
        seen.append((label, total, done, later))
        real(self, label, total, done, later)

    monkeypatch.setattr(Reporter, "start_method", spy)
    args = ["run", *FAST, "--method", "fedavg,fedprox", "--out", str(tmp_path / "e")]
    assert _run(capsys, args)[0] == 0
    assert seen == [("fedavg", 2, 0, 2), ("fedprox", 2, 0, 0)]
    # extended by one round: one round of fedprox follows fedavg's, not all three
    seen.clear()
    assert _run(capsys, [*args, "--rounds", "3", "--resume"])[0] == 0
    assert seen == [("fedavg", 3, 2, 1), ("fedprox", 3, 2, 0)]
