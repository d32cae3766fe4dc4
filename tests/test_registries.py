"""The tables of datasets, models and partition schemes: docs/architecture.md's recipes
("Adding a dataset / a model / a partition scheme"), each proven by registering a new one
here and running it end to end on the embedded digits, and bad registrations refused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clirun import run_cli
from fedftg.bench import BenchSettings, synthetic_dataset
from fedftg.data.partition import SCHEMES, dealt, partition_labels, register_scheme
from fedftg.data.sources import (
    DATASETS,
    Dataset,
    dataset_classes,
    load_dataset,
    load_digits,
    register_dataset,
    shaped_datasets,
)
from fedftg.errors import UserError
from fedftg.models import MODELS, build_model, register_model

TINY = ["--rounds", "1", "--clients", "3", "--local-steps", "2", "--participation", "1"]


@pytest.fixture(autouse=True)
def _own_tables(monkeypatch):
    """Registrations made by a test end with it (each table is a copy for the test)."""
    for table in (DATASETS, MODELS, SCHEMES):
        monkeypatch.setattr(table, "_entries", table.entries())


def _help(capsys) -> str:
    code, out, _ = run_cli(capsys, ["run", "--help"])
    assert code == 0
    return " ".join(out.split())  # argparse wraps lines


def _run(capsys, tmp_path: Path, args: list[str]) -> tuple[dict, dict]:
    """`fedftg run ARGS` in-process: (config.json, summary.json) of its run directory."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, ["run", *TINY, "--quiet", "--out", str(out), *args])
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    return config, json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------- datasets


def _five_digits(root: Path, download: bool) -> Dataset:
    """The embedded digits 0 to 4, mirrored left to right: a dataset fedftg lacks."""
    d = load_digits()
    train, test = d.train_y < 5, d.test_y < 5
    return Dataset(
        "five-digits",
        np.ascontiguousarray(d.train_x[train, :, :, ::-1]),
        d.train_y[train],
        np.ascontiguousarray(d.test_x[test, :, :, ::-1]),
        d.test_y[test],
        d.classes[:5],
        d.mean,
        d.std,
    )


def test_a_registered_dataset_is_a_choice_and_runs_end_to_end(tmp_path, capsys):
    assert "five-digits" not in _help(capsys)
    register_dataset(
        "five-digits", _five_digits, num_classes=5, channels=1, image_size=8, note="0-4 mirrored"
    )
    assert "imagefolder, five-digits (0-4 mirrored)" in _help(capsys)
    assert dataset_classes("five-digits") == 5
    assert shaped_datasets()["five-digits"] == (1, 8, 5)
    config, summary = _run(capsys, tmp_path, ["--dataset", "five-digits", "--method", "fedftg"])
    assert config["dataset"] == "five-digits"
    assert 0 <= summary["methods"]["fedftg"]["final_acc"] <= 1
    bench = BenchSettings("round", dataset="five-digits", clients=2, samples_per_client=4)
    assert synthetic_dataset(bench.validate()).train_x.shape == (8, 1, 8, 8)


def test_a_dataset_that_is_its_data_dir_needs_one(tmp_path, capsys):
    seen = []

    def load(root: Path, download: bool) -> Dataset:
        seen.append((root, download))
        return load_digits()

    register_dataset("my-folder", load, count_classes=lambda path: 10, data_dir="a folder")
    code, _, err = run_cli(capsys, ["run", "--dataset", "my-folder"])
    assert (
        code == 2 and err == "error: data_dir: the my-folder dataset needs --data-dir (a folder)\n"
    )
    assert dataset_classes("my-folder") is None  # no folder given: unknown until loaded
    assert dataset_classes("my-folder", tmp_path) == 10
    assert load_dataset("my-folder", tmp_path, download=False).name == "digits"
    assert seen == [(tmp_path, False)]


# ------------------------------------------------------------------------------- models


class TinyNet(nn.Module):
    """A one-hidden-layer perceptron with fedftg's `features` / `classifier` split."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 32), nn.ReLU()
        )
        self.classifier = nn.Linear(32, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_a_registered_model_is_a_choice_and_runs_end_to_end(tmp_path, capsys):
    register_model("tiny-mlp", TinyNet, note="for tests")
    assert "resnet18-gn, tiny-mlp (for tests)" in _help(capsys)
    # MOON reads the features, FedGen the classifier: the contract both rely on
    config, summary = _run(capsys, tmp_path, ["--model", "tiny-mlp", "--method", "moon,fedgen"])
    assert config["model"] == "tiny-mlp"
    assert set(summary["methods"]) == {"moon", "fedgen"}
    assert isinstance(build_model("tiny-mlp", 1, 8, 10), TinyNet)


# ---------------------------------------------------------------------- partition schemes


@dataclass(frozen=True)
class RoundRobinSettings:
    samples_per_client: int | None = None


def _round_robin(
    labels: np.ndarray, num_classes: int, k: int, s: RoundRobinSettings, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled samples dealt to the clients in turn (the ``samples_per_client`` each)."""
    perm = rng.permutation(len(labels))[: dealt(len(labels), k, s.samples_per_client)]
    return [perm[j::k] for j in range(k)]


def test_a_registered_scheme_is_a_choice_and_runs_end_to_end(tmp_path, capsys):
    register_scheme("round-robin", _round_robin, RoundRobinSettings, note="in turn")
    assert "shards, round-robin (in turn)" in _help(capsys)
    args = ["--partition", "round-robin", "--samples-per-client", "20"]
    code, out, _ = run_cli(
        capsys, ["partition", *args, "--clients", "3", "--heatmap", str(tmp_path / "h.png")]
    )
    sizes = [int(line.split()[1]) for line in out.splitlines()[1:4]]
    assert code == 0 and sizes == [20, 20, 20]
    config, summary = _run(capsys, tmp_path, [*args, "--method", "fedavg"])
    assert config["partition"] == "round-robin" and summary["methods"]["fedavg"]["rounds"] == 1
    labels = np.arange(30) % 3
    a = partition_labels(labels, 3, 3, "round-robin", RoundRobinSettings(), seed=1)
    b = partition_labels(labels, 3, 3, "round-robin", RoundRobinSettings(), seed=1)
    assert all(
        np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices, strict=True)
    )
    assert a.counts.sum() == 30


# --------------------------------------------------------------------- bad registrations


def _digits(root: Path, download: bool) -> Dataset:
    return load_digits()


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (lambda: register_dataset("mnist", _digits), "dataset named 'mnist' is already"),
        (lambda: register_model("cnn", TinyNet), "model named 'cnn' is already"),
        (
            lambda: register_scheme("iid", _round_robin, RoundRobinSettings),
            "scheme named 'iid' is already",
        ),
        (lambda: register_dataset("my data", _digits), "without spaces or commas"),
        (lambda: register_model("", TinyNet), "non-empty"),
        (lambda: register_dataset("x", "digits"), "loader 'digits' is not callable"),
        (lambda: register_dataset("x", _digits, channels=1), "channels and image_size together"),
        (lambda: register_dataset("x", _digits, num_classes=0), "num_classes must be"),
        (
            lambda: register_dataset("x", _digits, num_classes=10, count_classes=len),
            "not both",
        ),
        (lambda: register_model("x", "TinyNet"), "factory 'TinyNet' is not callable"),
        (lambda: register_scheme("x", _round_robin, dict), "not a dataclass"),
        (lambda: register_scheme("x", None, RoundRobinSettings), "not callable"),
    ],
)
def test_a_bad_registration_is_refused_and_leaves_the_table_alone(register, message):
    before = (DATASETS.names(), MODELS.names(), SCHEMES.names())
    with pytest.raises(UserError, match=message):
        register()
    assert (DATASETS.names(), MODELS.names(), SCHEMES.names()) == before


class NoFeatures(nn.Module):
    """A classifier with a plain forward and no features / classifier split."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NoForward(nn.Module):
    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_channels * image_size * image_size, num_classes)


class WrongHead(TinyNet):
    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(in_channels, image_size, num_classes)
        self.classifier = nn.Sequential(nn.Linear(32, num_classes))


@pytest.mark.parametrize(
    ("factory", "method", "message"),
    [
        (NoForward, "fedavg", "NoForward whose forward fails on a (2, 1, 8, 8) batch"),
        (NoFeatures, "moon", "NoFeatures without a features(x) method, which moon needs"),
        (WrongHead, "fedavg,fedgen", "not an nn.Linear to 10 classes, which fedgen needs"),
        (
            lambda c, s, k: TinyNet(c, s, k + 1),
            "fedavg",
            "forward gives (2, 11) for a batch of 2, not (2, 10) logits",
        ),
        (lambda c, s, k: "a net", "fedavg", "built a str, not a torch.nn.Module"),
    ],
)
def test_a_model_breaking_the_contract_is_one_error_line(
    factory, method, message, tmp_path, capsys
):
    register_model("broken", factory)
    out = tmp_path / "run"
    args = ["run", *TINY, "--model", "broken", "--method", method, "--out", str(out)]
    code, _, err = run_cli(capsys, args)
    assert code == 2 and err.startswith("error: model: 'broken' built a") and message in err
    assert err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("factory", [NoFeatures, WrongHead])
def test_a_model_without_the_split_runs_the_methods_that_do_not_read_it(factory, tmp_path, capsys):
    register_model("plain", factory)
    _, summary = _run(capsys, tmp_path, ["--model", "plain", "--method", "fedavg,fedftg,fedprox"])
    assert set(summary["methods"]) == {"fedavg", "fedftg", "fedprox"}


def test_a_dataset_unlike_its_declaration_is_refused_when_loaded():
    register_dataset("not-28", _digits, num_classes=10, channels=1, image_size=28)
    with pytest.raises(
        UserError, match="'not-28' is registered with image_size 28, but its loader"
    ):
        load_dataset("not-28")
    register_dataset("not-a-dataset", lambda root, download: load_digits().train_x)
    with pytest.raises(UserError, match="returned a ndarray, not a Dataset"):
        load_dataset("not-a-dataset")


def test_a_scheme_with_the_wrong_number_of_parts_is_refused():
    one_part = lambda labels, c, k, s, rng: [np.arange(len(labels))]  # noqa: E731
    register_scheme("one-part", one_part, RoundRobinSettings)
    with pytest.raises(UserError, match="'one-part' gave 1 parts for 3 clients"):
        partition_labels(np.arange(30) % 3, 3, 3, "one-part", RoundRobinSettings(), seed=0)


@dataclass(frozen=True)
class ClassesSettings:
    classes_per_client: int = 2


def test_a_scheme_reading_a_setting_the_config_lacks_is_one_error_line(tmp_path, capsys):
    register_scheme("by-classes", _round_robin, ClassesSettings)
    code, _, err = run_cli(
        capsys, ["run", *TINY, "--partition", "by-classes", "--out", str(tmp_path)]
    )
    assert code == 2
    assert (
        err
        == "error: partition: scheme 'by-classes' reads 'classes_per_client', which is not given\n"
    )
