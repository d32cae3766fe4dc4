"""The run directory (`fedftg.engine.rundir`): one run per directory, nothing touched before
the checks pass, extension by --resume --rounds, clean write errors, both engines alike."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from fedftg.cli import main
from fedftg.config import RunConfig
from fedftg.engine.checkpoint import read_checkpoint
from fedftg.errors import UserError
from fedftg.report.files import atomic_write

FAST = [
    "--clients",
    "4",
    "--local-epochs",
    "1",
    "--participation",
    "1",
    "--samples-per-client",
    "40",
]
FTG = ["--ftg-iterations", "1", "--ftg-student-steps", "1", "--ftg-batch-size", "16"]
TWO = ["--method", "fedavg,fedftg", *FTG]
TIMING = {"round_s", "elapsed_s", "server_s", "wall_s"}


def _run(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of ``fedftg run ARGS``."""
    try:
        code = main(["run", *FAST, "--quiet", "--no-progress", *args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder``: its bytes, mtime and mode."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return sorted(rows, key=lambda r: (r["method"], r["round"]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-round run of fedavg and fedftg (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", *FAST, *TWO, "--rounds", "1", "--out", str(out), "--quiet"]) == 0
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_rerun_with_other_settings_is_refused_and_touches_nothing(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    code, err = _run(capsys, *TWO, "--rounds", "1", "--seed", "1", "--out", str(out))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(out) in err and "seed 0 -> 1" in err
    assert "--fresh" in err and "--out" in err
    assert _snapshot(out) == before
    # --fresh replaces it: the new run's files only, no leftovers of the old one
    assert _run(capsys, "--method", "fedavg", "--rounds", "1", "--fresh", "--out", str(out))[0] == 0
    assert {r["method"] for r in _rows(out)} == {"fedavg"}
    assert not list(out.glob("samples*.png"))


@pytest.mark.parametrize("extra", [[], ["--fresh"]])
def test_a_run_failing_its_checks_leaves_the_directory_untouched(
    finished, tmp_path, capsys, monkeypatch, extra
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    out = _copy(finished, tmp_path)
    (out / ".metrics.jsonl.0123.tmp").write_text("stale")  # not cleaned by a failed start
    before = _snapshot(out)
    code, err = _run(capsys, *TWO, "--rounds", "1", "--tensorboard", *extra, "--out", str(out))
    assert code == 2 and err.startswith("error: tensorboard")
    assert _snapshot(out) == before


def test_resume_with_more_rounds_extends_a_finished_run_exactly(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    code, err = _run(capsys, *TWO, "--rounds", "2", "--out", str(out))
    assert code == 2 and "--resume extends it to 2" in err  # more rounds only when asked
    assert _run(capsys, *TWO, "--rounds", "2", "--resume", "--out", str(out))[0] == 0
    whole = tmp_path / "whole"
    assert _run(capsys, *TWO, "--rounds", "2", "--out", str(whole))[0] == 0
    assert _rows(out) == _rows(whole)
    summary = json.loads((out / "summary.json").read_text())
    assert {m: s["rounds"] for m, s in summary["methods"].items()} == {"fedavg": 2, "fedftg": 2}
    code, err = _run(capsys, *TWO, "--rounds", "1", "--resume", "--out", str(out))
    assert code == 2 and "cannot shrink" in err


def test_an_extension_stopped_early_leaves_no_summary_of_the_shorter_run(
    finished, tmp_path, capsys, monkeypatch
):
    from fedftg.engine.rundir import RunDir

    out = _copy(finished, tmp_path)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "finish", stop)  # stopped after the new rounds, before the end
    code, _ = _run(capsys, *TWO, "--rounds", "2", "--resume", "--out", str(out))
    assert code == 130
    assert {(r["method"], r["round"]) for r in _rows(out)} >= {("fedavg", 2), ("fedftg", 2)}
    assert not (out / "summary.json").exists()  # it described the 1-round run
    monkeypatch.undo()
    assert _run(capsys, *TWO, "--rounds", "2", "--resume", "--out", str(out))[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {m: s["rounds"] for m, s in summary["methods"].items()} == {"fedavg": 2, "fedftg": 2}
    # a rerun of the finished run at the same rounds is not an extension: its summary stays
    monkeypatch.setattr(RunDir, "finish", stop)
    assert _run(capsys, *TWO, "--rounds", "2", "--resume", "--out", str(out))[0] == 130
    assert json.loads((out / "summary.json").read_text())["methods"]["fedftg"]["rounds"] == 2


def test_a_finished_run_keeps_a_small_checkpoint_unless_asked(tmp_path, capsys):
    args = ["--method", "scaffold", "--rounds", "1"]
    small, full = tmp_path / "small", tmp_path / "full"
    assert _run(capsys, *args, "--out", str(small))[0] == 0
    assert _run(capsys, *args, "--keep-checkpoint", "--out", str(full))[0] == 0
    assert not (small / "checkpoint.pt.prev").exists()
    saved = read_checkpoint(small / "checkpoint.pt")
    assert saved["state"] is None and set(saved["final"]) == {"scaffold"}
    assert all(s["client_states"] == {} for s in saved["final"].values())
    assert saved["final"]["scaffold"]["client_states_dropped"]
    kept = read_checkpoint(full / "checkpoint.pt")
    assert kept["final"]["scaffold"]["client_states"]
    assert (small / "checkpoint.pt").stat().st_size < (full / "checkpoint.pt").stat().st_size
    # SCAFFOLD's client state is gone: extending it would not be the longer run
    code, err = _run(capsys, *args[:2], "--rounds", "2", "--resume", "--out", str(small))
    assert code == 2 and "scaffold keeps per-client state" in err
    assert _run(capsys, *args[:2], "--rounds", "2", "--resume", "--out", str(full))[0] == 0
    whole = tmp_path / "whole"
    assert _run(capsys, *args[:2], "--rounds", "2", "--out", str(whole))[0] == 0
    assert _rows(full) == _rows(whole)


def test_an_unwritable_out_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    targets = [blocker / "x"]
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        targets.append(locked / "run")
    for target in targets:
        code, err = _run(capsys, "--method", "fedavg", "--rounds", "1", "--out", str(target))
        assert code == 2
        assert len(err.splitlines()) == 1 and err.startswith("error: out:")
        assert str(target) in err


def test_a_write_failing_mid_run_is_one_error_line(tmp_path, capsys, monkeypatch):
    replace = os.replace

    def no_prev(src, dst):  # as if the directory became read-only after round 1
        if str(dst).endswith(".prev"):
            raise PermissionError(13, "Permission denied", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", no_prev)
    out = tmp_path / "run"
    code, err = _run(capsys, "--method", "fedavg", "--rounds", "2", "--out", str(out))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {out / 'checkpoint.pt.prev'}: cannot write")
    monkeypatch.setattr(os, "replace", replace)
    assert _run(capsys, "--method", "fedavg", "--rounds", "2", "--out", str(out))[0] == 0
    assert [r["round"] for r in _rows(out)] == [1, 2]  # continued from round 1


def test_a_write_through_a_file_is_a_user_error_naming_the_path(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "summary.json"
    with pytest.raises(UserError, match="summary.json: cannot write"):
        atomic_write(target, lambda p: p.write_text("{}"))
    try:
        code = main(["partition", "--clients", "4", "--heatmap", str(target.with_suffix(".png"))])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "summary.png: cannot write" in err


def test_stale_temporary_files_are_removed_at_the_next_start(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    stale = [out / ".checkpoint.pt.ab12cd.tmp", out / ".summary.json.x.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert _run(capsys, *TWO, "--rounds", "1", "--out", str(out))[0] == 0
    assert not any(p.exists() for p in stale)


def test_output_files_get_the_users_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert _run(capsys, *TWO, "--rounds", "1", "--out", str(out))[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert "checkpoint.pt" in modes and "summary.json" in modes
    assert set(modes.values()) == {0o640}, modes


def test_the_default_out_is_a_new_directory_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for seed in ("0", "1"):  # other settings: refused if they shared a directory
        assert _run(capsys, "--method", "fedavg", "--rounds", "1", "--seed", seed)[0] == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(runs) == 2 and all((p / "summary.json").exists() for p in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[-1].resolve()
    assert json.loads((latest / "config.json").read_text())["seed"] == 1


def test_the_flower_server_refuses_a_directory_of_other_settings(finished, tmp_path):
    pytest.importorskip("flwr")
    from fedftg.flower.server_app import run_federation

    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    cfg = RunConfig(clients=4, rounds=1, seed=3, method=["fedavg"], out=str(out)).validate()
    with pytest.raises(UserError, match="seed 0 -> 3.*fresh=true.*another out"):
        run_federation(None, cfg)  # refused before it looks at the grid
    assert _snapshot(out) == before


@pytest.mark.processes
def test_both_engines_write_the_same_files(tmp_path, capsys):
    pytest.importorskip("flwr")
    from flower_federation import available, running  # its SuperLink + SuperNodes

    if not available():
        pytest.skip("the flwr commands are not on PATH")
    flower, local = tmp_path / "flower", tmp_path / "local"
    with running(tmp_path, 2) as fed:
        proc = fed.run(
            "clients=2 participation=1.0 rounds=1 local-epochs=1 method='fedftg' "
            "ftg-iterations=1 ftg-student-steps=1 "
            f"node-wait=60.0 out='{flower}'"
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    args = ["--clients", "2", "--local-epochs", "1", "--participation", "1"]
    args += ["--method", "fedftg", "--ftg-iterations", "1", "--ftg-student-steps", "1"]
    assert main(["run", *args, "--rounds", "1", "--quiet", "--out", str(local)]) == 0
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in flower.iterdir())
    assert {"partition.png", "samples_fedftg.png", "checkpoint.pt", "summary.json"} <= set(names)
    assert "samples.png" not in names  # one grid per method, no shared copy
    summaries = [json.loads((d / "summary.json").read_text()) for d in (local, flower)]
    assert summaries[0]["partition"] == summaries[1]["partition"]
    assert [s["engine"] for s in summaries] == ["in-process", "flower"]
