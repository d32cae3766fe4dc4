"""Your own model and data by import path: ``fedftg run --model mypkg.nets:make_net
--dataset mypkg.data:load``, recorded in config.json and part of the settings a rerun must
match; each bad path one ``error:`` line with nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest

from clirun import run_cli
from fedftg.data.partition import SCHEMES
from fedftg.data.sources import DATASETS
from fedftg.errors import UserError
from fedftg.models import MODELS
from fedftg.tables import import_object, import_path_of, is_import_path

TINY = ["--rounds", "1", "--clients", "3", "--local-steps", "2", "--participation", "1"]

MODULE = '''
"""A user's module: a BatchNorm network, its factory and data loaders."""
import numpy as np
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, width=6):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.features(x))


def make_net(**sizes):
    return Net(sizes["in_channels"], sizes["num_classes"], width=4)


def make_wide(in_channels, num_classes):
    return Net(in_channels, num_classes, width=8)


def load():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (120, 1, 8, 8), dtype=np.uint8)
    xt = rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    return x, rng.integers(0, 3, 120), xt, rng.integers(0, 3, 30)


def not_square():
    x, y, xt, yt = load()
    return x[..., :7], y, xt[..., :7], yt


NOT_A_LOADER = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The module above as ``usernets`` on sys.path; the tables' registrations (an import
    path registers itself on first use) end with the test."""
    for table in (DATASETS, MODELS, SCHEMES):
        monkeypatch.setattr(table, "_entries", table.entries())
    (tmp_path / "usernets.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usernets", raising=False)
    yield "usernets"
    sys.modules.pop("usernets", None)


def test_a_model_and_a_dataset_by_import_path_run_and_are_part_of_the_run(
    user_module, tmp_path, capsys
):
    out = tmp_path / "run"
    paths = ["--model", "usernets:make_net", "--dataset", "usernets:load"]
    args = ["run", *TINY, "--quiet", "--method", "fedavg,moon", "--out", str(out), *paths]
    code, _, err = run_cli(capsys, args)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["dataset"]) == ("usernets:make_net", "usernets:load")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"fedavg", "moon"}
    # another model is another run: the directory refuses it rather than resume silently
    other = [*args[:-4], "--model", "usernets:make_wide", "--dataset", "usernets:load"]
    code, _, err = run_cli(capsys, other)
    assert code == 2 and "holds a run with other settings" in err and "model" in err


def test_a_class_by_import_path_gets_the_size_keywords_it_takes(user_module):
    from fedftg.models import build_model

    net = build_model("usernets:Net", 3, 8, 5)  # Net(in_channels=3, num_classes=5)
    assert net.classifier.out_features == 5 and net.body[0].in_channels == 3
    assert type(net).__module__ == "usernets"


@pytest.mark.parametrize(
    ("flag", "path", "message"),
    [
        ("--model", "nosuchpkg.nets:make", "model: cannot import 'nosuchpkg.nets:make': No module"),
        ("--model", "usernets:missing", "model: cannot import 'usernets:missing': usernets has no"),
        ("--model", "usernets:NOT_A_LOADER", "'usernets:NOT_A_LOADER' is a int, not an nn.Module"),
        ("--dataset", "usernets:NOT_A_LOADER", "is a int, not a function returning the data"),
        ("--dataset", "usernets:not_square", "x_train has shape (120, 1, 8, 7); expected square"),
        ("--dataset", "usernets:make_net", "usernets:make_net"),  # a factory is no loader
    ],
)
def test_a_bad_import_path_is_one_error_line_and_writes_nothing(
    user_module, tmp_path, capsys, flag, path, message
):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, ["run", *TINY, flag, path, "--out", str(out)])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists() and stdout == ""


def test_an_import_path_is_accepted_unimported_where_no_model_is_needed(capsys):
    """Light commands (--print-config) take the path without importing the module."""
    args = ["run", "--print-config", "--model", "nosuchpkg.nets:make", "--dataset", "a.b:c"]
    code, out, err = run_cli(capsys, args)
    assert code == 0, err
    assert json.loads(out)["model"] == "nosuchpkg.nets:make"
    assert "nosuchpkg" not in sys.modules
    code, _, err = run_cli(capsys, ["run", "--print-config", "--model", "no_colon"])
    assert code == 2 and "model: unknown value 'no_colon'; use one of cnn" in err


def test_import_paths_name_objects_both_ways():
    assert is_import_path("pkg.mod:attr.sub") and is_import_path("m:f")
    assert not any(map(is_import_path, ["cnn", "pkg.mod", ":f", "m:", "m:f g", "python:<x>"]))
    assert import_object("model", "fedftg.models.cnn:CNN").__name__ == "CNN"
    from fedftg.models.cnn import CNN

    assert import_path_of(CNN) == "fedftg.models.cnn:CNN"
    assert import_path_of(lambda: 0) is None  # "<lambda>" imports nothing

    def local() -> None: ...

    assert import_path_of(local) is None
    with pytest.raises(UserError, match="dataset: cannot import 'fedftg:nothing'"):
        import_object("dataset", "fedftg:nothing")


@pytest.mark.processes
def test_a_flower_federation_resolves_the_same_import_paths(user_module, tmp_path, monkeypatch):
    """The ServerApp and the ClientApps import the user's module in their own processes."""
    from flower_federation import available, running

    if not available():
        pytest.skip("flower-superlink is not installed")
    pythonpath = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(pythonpath))
    out = tmp_path / "flower"
    settings = {
        "clients": 3,
        "participation": 1.0,
        "rounds": 1,
        "local-epochs": 1,
        "method": "fedavg,moon",
        "model": "usernets:make_net",
        "dataset": "usernets:load",
        "out": str(out),
    }
    with running(tmp_path / "fed", nodes=3, simulation=True) as fed:
        proc = fed.run(" ".join(f"{k}={json.dumps(v)}" for k, v in settings.items()), nodes=3)
        assert fed.status(proc.stdout)["status"] == "finished:completed", proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["dataset"]) == ("usernets:make_net", "usernets:load")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and set(summary["methods"]) == {"fedavg", "moon"}


@pytest.mark.parametrize(
    ("flag", "hint"),
    [
        ("--model", "resnet18-gn, an import path module:attr"),
        ("--dataset", "imagefolder, an import path module:attr"),
        ("--partition", "shards, flwr:<Partitioner> (Flower Datasets)"),
    ],
)
def test_an_unknown_name_error_offers_every_kind_of_value_the_setting_takes(
    capsys, monkeypatch, flag, hint
):
    if flag == "--partition" and importlib.util.find_spec("flwr_datasets") is not None:
        # a scheme made earlier in this process is valid but not listed: the same message
        # (the scheme it makes ends with the test, as in tests/test_flwr_partition.py)
        monkeypatch.setattr(SCHEMES, "_entries", SCHEMES.entries())
        assert run_cli(capsys, ["run", "--print-config", flag, "flwr:IidPartitioner"])[0] == 0
    code, _, err = run_cli(capsys, ["run", "--print-config", flag, "bogus"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].endswith(hint), lines
    assert lines[0].startswith(f"error: {flag[2:]}: unknown value 'bogus'; use one of ")
