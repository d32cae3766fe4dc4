"""`fedftg.run`: your own nn.Module and tensors through the engine of ``fedftg run``, the
same settings pipeline, run directory and resume; bad input a `UserError` with nothing
written; float images kept exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fedftg
from clirun import run_cli
from fedftg.api import dataset_name, model_name
from fedftg.data.batches import DeviceArrays
from fedftg.data.partition import SCHEMES
from fedftg.data.sources import DATASETS
from fedftg.models import MODELS

TINY = {"rounds": 1, "clients": 3, "local_steps": 2, "participation": 1}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_tables(monkeypatch):
    """What a test registers (its Python model, its arrays) ends with it."""
    for table in (DATASETS, MODELS, SCHEMES):
        monkeypatch.setattr(table, "_entries", table.entries())


class BNNet(nn.Module):
    """A researcher's small network with BatchNorm and the features / classifier split."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(6, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PlainNet(nn.Module):
    """A forward-only network: enough for every method but MOON and FedGen."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _tensors(seed: int = 0, n: int = 150, classes: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    xt = torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8)
    return (
        x,
        torch.randint(0, classes, (n,), generator=g),
        xt,
        torch.randint(0, classes, (40,), generator=g),
    )


def test_a_custom_module_and_tensors_run_three_methods_and_resume(tmp_path):
    out = tmp_path / "mine"
    kwargs = dict(
        method="fedavg,fedftg,fedgen",
        model=BNNet,
        dataset=_tensors(),
        out=str(out),
        ftg={"iterations": 1},
        **{**TINY, "rounds": 2},
    )
    result = fedftg.run(**kwargs)
    assert result.out == out and (out / "curves.png").exists()
    assert [(r["method"], r["round"]) for r in result.metrics] == [
        (m, t) for m in ("fedavg", "fedftg", "fedgen") for t in (1, 2)
    ]
    assert result.config["model"] == "test_api:BNNet"  # importable: by its import path
    assert result.config["dataset"].startswith("arrays:") and result.config["ftg"]["nz"] == 100
    assert set(result.summary["methods"]) == {"fedavg", "fedftg", "fedgen"}
    assert 0 <= result.final_acc("fedftg") <= 1
    # the same call with more rounds continues the run directory, as fedftg run --resume
    more = fedftg.run(**{**kwargs, "rounds": 3}, resume=True)
    assert more.metrics[:6] == result.metrics
    assert [(r["method"], r["round"]) for r in more.metrics[6:]] == [
        ("fedavg", 3),
        ("fedftg", 3),
        ("fedgen", 3),
    ]


def test_other_arrays_are_another_run_which_the_directory_refuses(tmp_path):
    kwargs = dict(method="fedavg", model=PlainNet, out=str(tmp_path / "run"), **TINY)
    fedftg.run(dataset=_tensors(0), **kwargs)
    with pytest.raises(fedftg.UserError, match=r"holds a run with other settings \(dataset"):
        fedftg.run(dataset=_tensors(1), **kwargs)


def test_a_model_named_by_class_is_the_registered_model_bit_for_bit(tmp_path):
    from fedftg.models.cnn import CNN  # what --model cnn builds, by its import path

    runs = [
        fedftg.run(method="fedavg", model=m, out=str(tmp_path / str(i)), **TINY)
        for i, m in enumerate(["cnn", CNN])
    ]
    assert runs[1].config["model"] == "fedftg.models.cnn:CNN"
    drop = ("elapsed_s", "round_s")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in run.metrics] for run in runs]
    assert rows[0] == rows[1]


def test_settings_are_checked_as_from_toml_and_flags(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["run", "--rounds", "0"])
    with pytest.raises(fedftg.UserError) as exc:
        fedftg.run(rounds=0, out=str(tmp_path / "run"))
    assert code == 2 and err == f"error: {exc.value}\n"
    with pytest.raises(fedftg.UserError, match="^roundz: unknown setting$"):
        fedftg.run(roundz=3)
    with pytest.raises(fedftg.UserError, match=r"^ftg.gen_lr: must be a finite number > 0"):
        fedftg.run(method="fedftg", ftg={"gen_lr": -1})
    with pytest.raises(fedftg.UserError, match="^fedprox.mu: set to 0.5, but no method"):
        fedftg.run(method="fedavg", fedprox_mu=0.5)
    assert not (tmp_path / "run").exists()


def _bad(x=None, y=None, xt=None, yt=None) -> tuple:
    good = [t.numpy() for t in _tensors()]
    return tuple(g if b is None else b for g, b in zip(good, (x, y, xt, yt), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dataset=_bad(x=np.zeros((150, 1, 8, 8), np.int32))), "x_train is int32; images"),
        (dict(dataset=_bad(x=np.zeros((150, 8, 9), np.uint8))), "has shape (150, 1, 8, 9)"),
        (dict(dataset=_bad(xt=np.zeros((40, 3, 8, 8), np.uint8))), "they must match"),
        (dict(dataset=_bad(y=np.zeros(150))), "y_train is float64; labels must be integers"),
        (dict(dataset=_bad(y=np.zeros(149, np.int64))), "expected (150,), one label per"),
        (dict(dataset=_bad(yt=np.full(40, -1))), "y_test has label -1, outside 0..2"),
        (dict(dataset=_bad(), num_classes=2), "y_train has label 2, outside 0..1"),
        (dict(dataset=_bad(x=np.full((150, 1, 8, 8), np.nan))), "x_train holds NaN"),
        (dict(dataset=np.zeros(3)), "expected (x_train, y_train, x_test, y_test)"),
        (dict(dataset="digits", num_classes=3), "num_classes: only for a dataset given as"),
        (dict(model=BNNet(1, 3)), "got a BNNet (pass the class, not an instance)"),
        (dict(model=lambda: nn.Linear(64, 3)), "forward fails on a (2, 1, 8, 8) batch"),
        (dict(model=lambda num_classes: PlainNet(5)), "gives (2, 5) for a batch of 2, not (2, 3)"),
        (dict(model=PlainNet, method="moon"), "without a features(x) method, which moon needs"),
        (dict(model=lambda c: PlainNet(c)), "calling 'python:<lambda>' failed: TypeError"),
    ],
)
def test_bad_input_is_one_user_error_and_writes_nothing(kwargs, message, tmp_path):
    kwargs = {"dataset": _tensors(), "model": PlainNet, **kwargs}
    out = tmp_path / "run"
    with pytest.raises(fedftg.UserError) as exc:
        fedftg.run(out=str(out), **{"method": "fedavg", **TINY, **kwargs})
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not out.exists()


def test_identifiers_follow_the_data_not_its_container():
    x, y, xt, yt = _tensors()
    by_tensors = dataset_name((x, y, xt, yt))
    assert by_tensors == dataset_name((x.numpy(), y.numpy(), xt.numpy(), yt.numpy()))
    assert by_tensors == dataset_name((TensorDataset(x, y), TensorDataset(xt, yt)))
    assert by_tensors != dataset_name((x, y, xt, yt), num_classes=4)
    assert by_tensors == dataset_name((x[:, 0], y, xt[:, 0], yt))  # NHW: the same images
    assert by_tensors != dataset_name((x, y.flip(0), xt, yt))
    assert model_name("cnn") == "cnn" and model_name(PlainNet) == "test_api:PlainNet"

    class Local(PlainNet):
        pass

    name = model_name(Local)  # not importable: registered in this process
    assert name == "python:test_identifiers_follow_the_data_not_its_container.<locals>.Local"
    assert MODELS.get(name).build(1, 8, 3).__class__ is Local
    first = Local

    class Local(PlainNet):  # redefined, as in a notebook: the new class replaces it
        pass

    assert model_name(Local) == name and MODELS.get(name).build(1, 8, 3).__class__ is Local
    assert Local is not first


def test_float_images_are_kept_exact_and_normalised_with_their_own_statistics():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 2, 8, 8, generator=g) * torch.tensor([3.0, 0.5]).view(1, 2, 1, 1)) + 7
    y = torch.randint(0, 3, (200,), generator=g)
    ds = DATASETS.get(dataset_name((x, y, x[:20], y[:20]))).load(None, False)
    assert ds.train_x.dtype == np.float32 and np.array_equal(ds.train_x, x.numpy())
    arrays = DeviceArrays(ds.train_x, ds.train_y, ds.mean, ds.std)
    normed, _ = arrays.batch(torch.arange(200))
    assert normed.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (normed.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    # uint8 images keep their [0, 1]-scale statistics: the arithmetic of before, unchanged
    u8 = DeviceArrays(np.full((1, 1, 2, 2), 51, np.uint8), np.zeros(1), (0.1,), (0.5,))
    expected = torch.tensor(51.0) * (1.0 / (255.0 * torch.tensor(0.5))) + (-0.1 / 0.5)
    assert torch.equal(u8.batch(torch.arange(1))[0], expected.expand(1, 1, 2, 2))


def test_a_float_dataset_runs(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(120, 1, 8, 8, generator=g), torch.randint(0, 3, (120,), generator=g)
    result = fedftg.run(method="fedavg", model=PlainNet, dataset=(x, y, x[:30], y[:30]),
                        out=str(tmp_path / "run"), **TINY)  # fmt: skip
    assert result.metrics[0]["test_acc"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"].startswith(
        "arrays:"
    )


def test_the_readme_example_runs_shrunk(tmp_path, monkeypatch, capsys):
    """README's Python block as written, its run at test size (2 rounds of 4 clients)."""
    (block,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
        if "fedftg.run(" in b
    ]
    monkeypatch.chdir(REPO)  # examples.mynets, from the repository's root
    monkeypatch.syspath_prepend(str(REPO))
    real = fedftg.api.run

    def shrunk(**kwargs):
        small = {**TINY, "rounds": 2, "clients": 4, "ftg": {"iterations": 1}}
        return real(**{**kwargs, **small, "out": str(tmp_path / "run")})

    monkeypatch.setattr(fedftg.api, "run", shrunk)
    exec(compile(block, "README.md", "exec"), {})
    assert str(tmp_path / "run") in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "examples.mynets:SmallNet" and config["alpha"] == 0.3


def test_a_forward_only_model_trains_alike_in_both_client_paths(tmp_path):
    """The vectorised clients call the plain forward too when no term reads features."""
    runs = [
        fedftg.run(
            method="fedavg,fedprox",
            model=PlainNet,
            dataset=_tensors(),
            client_batching=b,
            out=str(tmp_path / b),
            **TINY,
        )  # fmt: skip
        for b in ("sequential", "vmap")
    ]
    for a, b in zip(runs[0].metrics, runs[1].metrics, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


def test_a_config_file_then_keywords_and_a_preset_with_groups_refused(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('alpha = 0.7\nmethod = "fedprox"\n[fedprox]\nmu = 0.05\n')
    result = fedftg.run(config=toml, model=PlainNet, dataset=_tensors(), out=str(tmp_path / "r"),
                        **TINY)  # fmt: skip
    assert (result.config["alpha"], result.config["fedprox"]["mu"]) == (0.7, 0.05)
    assert result.config["method"] == ["fedprox"] and result.config["rounds"] == 1
    with pytest.raises(fedftg.UserError, match="^preset: paper-cifar10-cpu has .* groups"):
        fedftg.run(preset="paper-cifar10-cpu", out=str(tmp_path / "p"))
    with pytest.raises(fedftg.UserError, match=r"c.toml: roundz: unknown setting"):
        toml.write_text("roundz = 3\n")
        fedftg.run(config=toml)
    assert not (tmp_path / "p").exists()
