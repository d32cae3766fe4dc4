"""benchmarks/ftg_diagnosis.py: the per-round counterfactual behind docs/results.md."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark_scripts import load_benchmark
from fedftg.config import RunConfig
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.setup import prepare
from fedftg.models.stacked import StackedModels
from fedftg.seeding import torch_rng


@pytest.fixture(scope="module")
def diag():
    return load_benchmark("ftg_diagnosis")


@pytest.fixture(scope="module")
def setup():
    cfg = RunConfig(clients=4, samples_per_client=60, participation=1.0, rounds=1, seed=2)
    return prepare(cfg.validate())


def test_pool_is_exactly_the_images_no_client_holds(diag, setup):
    pool = diag.unseen_pool(setup)
    held = torch.cat(setup.client_indices)
    unseen = torch.cat(pool)
    assert not np.intersect1d(unseen.numpy(), held.numpy()).size
    assert len(unseen) + len(held) == len(setup.train)
    for c, idx in enumerate(pool):
        assert (setup.train.y[idx] == c).all()


def test_real_distillation_moves_the_student_toward_the_teacher(diag, setup):
    runner = MethodRunner(setup, "fedavg", None)
    results, hists, start = runner.local_round()
    runner.server_update(results, hists, start)
    teachers = StackedModels(runner.model, [r.state for r in results])
    counts = np.stack(hists)
    pool = diag.unseen_pool(setup)
    x, y = setup.train.batch(torch.cat([p[:20] for p in pool]))
    alpha = diag.class_weights(counts, "class")

    def gap(model):
        with torch.no_grad():
            target = diag.ensemble_target(teachers.all(x), alpha[:, y])
            return float(F.kl_div(F.log_softmax(model(x), 1), target, reduction="batchmean"))

    student = copy.deepcopy(runner.model)
    before = gap(student.eval())
    gen = torch_rng(0, "test", device=setup.device)
    diag.distill_real(student, teachers, counts, setup.train, pool, setup.cfg.ftg, 0, 20, gen)
    assert gap(student) < 0.8 * before


def test_script_writes_one_record_per_round(diag, tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    rc = diag.main(
        [
            "samples_per_client=40",
            "rounds=2",
            "clients=3",
            "--long",
            "2",
            "ftg.iterations=2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    keys = {
        "avg_acc",
        "ensemble_acc",
        "class_ensemble_acc",
        "ftg_acc",
        "real_kd_acc",
        "real_kd_long_acc",
    }
    assert all(keys <= set(r) and all(0 <= r[k] <= 1 for k in keys) for r in rows)
    assert "mean over rounds" in capsys.readouterr().out


def test_bad_settings_are_one_line_and_status_2(diag, capsys):
    assert diag.main(["rounds=zero"]) == 2
    assert diag.main(["rounds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
