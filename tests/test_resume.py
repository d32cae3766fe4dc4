"""Reliability: kill -9 and resume gives identical metrics; damaged checkpoints; atomic files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedftg.engine.checkpoint import load_latest, read_checkpoint, save_checkpoint
from fedftg.engine.rundir import saved_states
from fedftg.errors import UserError
from fedftg.report.files import atomic_write, write_json

ARGS = [
    "run",
    "--rounds",
    "6",
    "--clients",
    "4",
    "--participation",
    "0.5",
    "--local-epochs",
    "1",
    "--method",
    "fedavg+ftg,scaffold+ftg",
    "--ftg-iterations",
    "2",
    "--seed",
    "11",
]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedftg.cli", *ARGS, "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _metrics(out: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["method"], r["round"], r["test_acc"], r["test_loss"], r["train_loss"]) for r in rows]


def _rounds_done(out: Path) -> int:
    p = out / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of ARGS, to compare interrupted and resumed runs with."""
    ref = tmp_path_factory.mktemp("reference") / "ref"
    subprocess.run(_cli(ref), check=True, env=_env(), capture_output=True, timeout=600)
    return ref


@pytest.mark.processes
def test_kill_9_at_a_random_round_then_resume_gives_identical_metrics(reference, tmp_path):
    ref = reference
    expected = _metrics(ref)
    assert len(expected) == 12

    out = tmp_path / "killed"
    target = random.Random().randint(1, 10)  # a random point in the 12 method-rounds
    proc = subprocess.Popen(
        _cli(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while _rounds_done(out) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _rounds_done(out) < 12, "the run finished before it could be killed"
    subprocess.run(_cli(out), check=True, env=_env(), capture_output=True, timeout=600)
    assert _metrics(out) == expected
    summary = json.loads((out / "summary.json").read_text())
    ref_summary = json.loads((ref / "summary.json").read_text())
    for name in ("fedavg+ftg", "scaffold+ftg"):
        assert summary["methods"][name]["final_acc"] == ref_summary["methods"][name]["final_acc"]


@pytest.mark.processes
def test_sigterm_checkpoints_exits_143_and_resumes_identically(reference, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(
        _cli(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while _rounds_done(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143 and "rerun the same command" in err and str(out) in err
    saved = read_checkpoint(out / "checkpoint.pt")
    assert sum(s["round"] for s in saved_states(saved).values()) >= 2
    subprocess.run(_cli(out), check=True, env=_env(), capture_output=True, timeout=600)
    assert _metrics(out) == _metrics(reference)


@pytest.mark.processes
def test_checkpoint_from_other_settings_is_refused_with_or_without_resume(tmp_path):
    out = tmp_path / "o"
    subprocess.run(_cli(out), check=True, env=_env(), capture_output=True, timeout=600)
    for resume in (["--resume"], []):
        proc = subprocess.run(
            _cli(out, "--alpha", "0.7", *resume),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 2
        assert proc.stderr.startswith("error:") and "(alpha 0.1 -> 0.7)" in proc.stderr


def test_truncated_or_corrupt_checkpoint_is_detected_and_previous_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "w": torch.ones(3)})
    save_checkpoint(path, {"round": 2, "w": torch.full((3,), 2.0)})
    assert read_checkpoint(path)["round"] == 2
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_checkpoint(path)
    saved, warnings = load_latest(path)
    assert saved["round"] == 1 and warnings and str(path) in warnings[0]
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="checksum"):
        read_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="header"):
        read_checkpoint(path)


def test_checkpoint_does_not_execute_pickled_code(tmp_path):
    import hashlib
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    buf = io.BytesIO()
    pickle.dump({"x": Evil()}, buf)
    data = buf.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(b"FEDFTGC1" + hashlib.sha256(data).digest() + data)
    with pytest.raises(UserError):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"good": True})

    def half_then_crash(p: Path) -> None:
        p.write_text('{"partial":')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_settings_added_later_keep_older_runs_resumable(tmp_path):
    from fedftg.config import RunConfig
    from fedftg.engine.checkpoint import config_fingerprint
    from fedftg.engine.sweep import is_complete

    now = RunConfig(out=str(tmp_path), rounds=2, method=["fedftg"]).validate().to_dict()
    older = json.loads(json.dumps(now))  # as written before `diversity` existed
    del older["ftg"]["diversity"], older["df"]["diversity"]
    assert config_fingerprint(older) == config_fingerprint(now)
    assert now["ftg"]["diversity"] == "all"  # the caller's dict is not modified
    other = json.loads(json.dumps(now))
    other["ftg"]["diversity"] = "same_label"
    assert config_fingerprint(other) != config_fingerprint(now)
    # a finished run written by the older version is still skipped by a sweep
    summary = {"config": older, "methods": {"fedftg": {"rounds": 2}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert is_complete(RunConfig(out=str(tmp_path), rounds=2, method=["fedftg"]).validate())
    cfg = RunConfig(out=str(tmp_path), rounds=2, method=["fedftg"])
    cfg.ftg.diversity = "same_label"
    assert not is_complete(cfg.validate())


def _fingerprints_without_and_with(methods: list[str], name: str, value: str) -> tuple[str, str]:
    """Fingerprints of a config written before the section setting ``name`` (``a.b``)
    existed, and of the same config with ``name`` = ``value``."""
    from fedftg.config import RunConfig
    from fedftg.engine.checkpoint import config_fingerprint

    now = RunConfig(method=methods).override({name: value}).to_dict()
    older = json.loads(json.dumps(now))
    section, _, field = name.partition(".")
    del older[section][field]
    return config_fingerprint(older), config_fingerprint(now)


def test_scaffold_reference_counts_only_for_scaffold_with_a_plug_in():
    def pair(methods: list[str], reference: str) -> tuple[str, str]:
        return _fingerprints_without_and_with(methods, "scaffold.reference", reference)

    # without a plug-in on SCAFFOLD the setting changes nothing, so older runs still match
    for methods in (["fedavg", "fedftg"], ["scaffold"], ["scaffold", "feddyn+ftg"]):
        for reference in ("aggregate", "sent"):
            old, now = pair(methods, reference)
            assert old == now, (methods, reference)
    # older SCAFFOLD+FTG runs measured from the model sent: only that value matches them
    old, now = pair(["scaffold+ftg"], "aggregate")
    assert old != now
    old, now = pair(["scaffold+ftg"], "sent")
    assert old == now


def test_scaffold_variate_lr_counts_only_for_scaffold_and_round_matches_older_runs():
    def pair(methods: list[str], value: str) -> tuple[str, str]:
        return _fingerprints_without_and_with(methods, "scaffold.variate_lr", value)

    for methods in (["fedavg", "fedftg"], ["feddyn+ftg"]):
        for value in ("round", "initial"):
            old, now = pair(methods, value)
            assert old == now, (methods, value)
    for methods in (["scaffold"], ["scaffold+ftg"], ["fedavg", "scaffold"]):
        old, now = pair(methods, "round")
        assert old == now, methods
        old, now = pair(methods, "initial")
        assert old != now, methods
