"""One run per directory at a time, rows that survive a crash, sweeps that end with their
parent, and failed commands that leave no empty folders (`fedftg.engine.dirlock`,
`fedftg.engine.rundir`, `fedftg.engine.sweep`)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clirun import run_cli
from fedftg.config import RunConfig
from fedftg.engine import rundir
from fedftg.engine.dirlock import LOCK_NAME
from fedftg.engine.rundir import RunDir
from test_rundir import FAST, _rows

FEDAVG = [*FAST, "--method", "fedavg", "--quiet", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _lock_pid(folder: Path) -> int | None:
    """The pid in ``folder``'s lock file (None while there is none)."""
    try:
        pid = (folder / LOCK_NAME).read_text().split(" ", 1)[0]
    except OSError:
        return None
    return int(pid) if pid.isdigit() else None


def _wait_for_lock(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> int | None:
    """The pid holding ``folder`` once it is held (None if ``proc`` ended first)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        pid = _lock_pid(folder)
        if pid is not None:
            return pid
        time.sleep(0.005)
    return None


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.mark.processes
def test_a_held_run_directory_refuses_a_second_run_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*FEDAVG, "--rounds", "6", "--out", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-m", "fedftg.cli", "run", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not _rows_written(out) and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, its directory half written
        if first.poll() is not None or _rows_written(out) >= 6:
            pytest.skip("the first run ended before it could be caught mid-run")
        code, _, err = run_cli(capsys, ["run", *args])
    finally:
        first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=300)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: out: ")
    assert f"in use by another run (pid {first.pid}, started " in err
    assert first.returncode == 0, first_err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not (out / LOCK_NAME).exists()  # the holder removed it at its end


def _rows_written(out: Path) -> int:
    """How many complete lines ``out``'s metrics.jsonl has."""
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def _open_default_out(out: str, ready, opened, queue) -> None:
    """A child of the test below: open ``out`` once every sibling is ready, report the
    directory, and hold it until every sibling has opened its own."""
    cfg = RunConfig(method=["fedavg"], rounds=1, out=out).validate()
    ready.wait()
    run = RunDir.open(cfg, engine="in-process")
    queue.put(str(run.path))
    opened.wait()


def test_default_out_runs_started_together_get_a_directory_each(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, t=None: "20261206-051000")
    n = 10
    ctx = multiprocessing.get_context("fork")  # the children share the frozen clock
    ready, opened, queue = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    out = str(tmp_path / "runs" / "{time}")
    procs = [
        ctx.Process(target=_open_default_out, args=(out, ready, opened, queue)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n
    paths = sorted(queue.get(timeout=10) for _ in range(n))
    stamp = tmp_path / "runs" / "20261206-051000"
    assert paths == sorted([str(stamp)] + [f"{stamp}-{i}" for i in range(2, n + 1)])
    assert all(Path(p).is_dir() for p in paths)


def test_sweeps_started_in_the_same_second_get_a_directory_each(tmp_path, monkeypatch, capsys):
    """The sweep claims its ``{time}`` root before its points start: a second sweep of the
    same second takes ``-2`` even while the first has written nothing yet."""
    from fedftg.engine import sweep

    class Done:  # the points' processes, which would create their own directories
        returncode = 0

    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, t=None: "20261206-051000")
    outs = []
    monkeypatch.setattr(
        sweep.subprocess, "run", lambda cmd, **kw: outs.append(json.loads(cmd[-1])["out"]) or Done()
    )
    args = ["sweep", "--grid", "seed=0,1", "--out", str(tmp_path / "{time}")]
    assert run_cli(capsys, args)[0] == 0
    assert run_cli(capsys, args)[0] == 0
    first, second = tmp_path / "20261206-051000", tmp_path / "20261206-051000-2"
    assert outs == [str(first / "seed=0"), str(first / "seed=1")] + [
        str(second / "seed=0"),
        str(second / "seed=1"),
    ]
    assert first.is_dir() and second.is_dir()


def test_a_sweep_stopped_before_its_points_wrote_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from fedftg.engine import sweep

    def stopped(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "is_complete", stopped)  # Ctrl-C before the first point
    args = ["sweep", "--grid", "seed=0,1", "--out", str(tmp_path / "runs" / "{time}")]
    assert run_cli(capsys, args)[0] == 130
    assert not (tmp_path / "runs").exists()  # its stamped folder and the parent it made


def test_a_run_failing_before_it_starts_leaves_no_folder(tmp_path, capsys, monkeypatch):
    def no_board(root):
        raise rundir.UserError("tensorboard: not installed (as the test pretends)")

    monkeypatch.setattr("fedftg.engine.run.TensorBoard", no_board)
    out = tmp_path / "new" / "run"
    code, _, err = run_cli(
        capsys,
        ["run", *FEDAVG, "--rounds", "1", "--tensorboard"]
        + [
            "--out",
            str(out),
        ],
    )
    assert code == 2 and "tensorboard" in err
    assert not (tmp_path / "new").exists()


def test_a_metrics_line_cut_short_is_restored_from_the_checkpoint(tmp_path, capsys):
    straight, out = tmp_path / "straight", tmp_path / "cut"
    assert run_cli(capsys, ["run", *FEDAVG, "--rounds", "3", "--out", str(straight)])[0] == 0
    assert run_cli(capsys, ["run", *FEDAVG, "--rounds", "2", "--out", str(out)])[0] == 0
    metrics = out / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 40])  # a crash or a full disk mid-append
    code, _, err = run_cli(capsys, ["run", *FEDAVG, "--rounds", "3", "--resume", "--out", str(out)])
    assert code == 0, err
    assert "metrics.jsonl: restored fedavg round 2 from the checkpoint (line 2 broken)" in err
    assert _rows(out) == _rows(straight)


def test_report_warns_once_per_file_with_broken_lines(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    assert run_cli(capsys, ["run", *FEDAVG, "--rounds", "2", "--out", str(run)])[0] == 0
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"method": "fedavg", "round": 3, "test_')
    code, _, err = run_cli(capsys, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r")])
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {run / 'metrics.jsonl'}: line 3 broken (cut short?); skipped"]


def test_a_failed_report_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "report"
    code, _, err = run_cli(capsys, ["report", str(tmp_path), "--out", str(out)])
    assert code == 2 and "no finished runs" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sweep_killed_with_kill_9_leaves_no_point_running(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fedftg.cli", "sweep", *FAST, "--method", "fedavg"]
    cmd += ["--rounds", "2000", "--grid", "seed=0", "--out", str(out)]
    sweep = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    point = None
    try:
        point = _wait_for_lock(out / "seed=0", sweep)
        assert point is not None and point != sweep.pid  # the child holds the point's directory
        while not (out / "seed=0" / "metrics.jsonl").exists() and sweep.poll() is None:
            time.sleep(0.05)  # the child is in its rounds
        sweep.kill()
        sweep.wait(timeout=60)
        deadline = time.time() + 60
        while not _ended(point) and time.time() < deadline:
            time.sleep(0.1)
        assert _ended(point), "the sweep's child outlived it"
    finally:
        if point is not None and not _ended(point):
            os.kill(point, signal.SIGKILL)
        if sweep.poll() is None:
            sweep.kill()
