"""benchmarks/bn_statistics.py: a finished run's final model under other BatchNorm statistics."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from benchmark_scripts import load_benchmark
from fedftg.config import RunConfig
from fedftg.engine.run import run_experiment
from fedftg.errors import UserError


@pytest.fixture(scope="module")
def bns():
    return load_benchmark("bn_statistics")


def test_statistics_are_the_plain_average_over_the_batches(bns):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(7.0)
    torch.manual_seed(0)
    batches = [torch.randn(5, 3) for _ in range(4)]
    out = bns.with_statistics_from(model, batches)
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in batches])
        per_batch_var = torch.stack([model[0](b).var(0) for b in batches])
    assert torch.allclose(out[1].running_mean, h.mean(0), atol=1e-6)
    assert torch.allclose(out[1].running_var, per_batch_var.mean(0), atol=1e-6)
    assert not out.training
    assert float(model[1].running_mean[0]) == 7.0  # the original is left alone
    with pytest.raises(UserError, match="no BatchNorm"):
        bns.with_statistics_from(nn.Linear(3, 4), batches)


@pytest.mark.parametrize("method", ["fedftg", "fedavg+df"])
def test_saved_is_the_runs_final_accuracy_and_the_others_differ(bns, tmp_path, method):
    cfg = RunConfig(
        model="cnn-bn",
        clients=4,
        samples_per_client=60,
        participation=1.0,
        local_epochs=1,
        rounds=2,
        method=[method],
        seed=1,
        out=str(tmp_path / "run"),
    )
    cfg.ftg.iterations = 2
    cfg.df.nz = 16  # unlike FedFTG's: the run's own plug-in has to rebuild its generator
    run_experiment(cfg.validate(), stream=io.StringIO(), progress=False)
    out = bns.diagnose(tmp_path / "run", images=120, batch_size=30, seed=0)
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["methods"][method]
    assert out["round"] == 2 and out["method"] == method
    assert out["saved"] == pytest.approx(final["final_acc"])
    assert 0.0 <= out["real"] <= 1.0 and 0.0 <= out["generated"] <= 1.0
    assert len({out["saved"], out["real"], out["generated"]}) > 1


def test_bad_input_is_one_line_and_status_2(bns, tmp_path, capsys):
    assert bns.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert bns.main([str(tmp_path), "--images", "0"]) == 2
