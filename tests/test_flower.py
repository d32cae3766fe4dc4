"""Flower: the simulation equals the in-process simulator (FedGen's client term included);
malformed replies are rejected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, MetricRecord, RecordDict  # noqa: E402

from fedftg.cli import main  # noqa: E402
from fedftg.config import RunConfig  # noqa: E402
from fedftg.data.batches import DeviceArrays  # noqa: E402
from fedftg.data.sources import load_dataset  # noqa: E402
from fedftg.engine.simulation import ServerRunner, initial_state  # noqa: E402
from fedftg.flower.common import config_from_run_config, from_record, to_record  # noqa: E402
from fedftg.flower.strategy import FedFTGStrategy  # noqa: E402


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_flower_simulation_equals_in_process_simulator(tmp_path, capsys):
    from flwr.simulation import run_simulation

    from fedftg.flower.client_app import app as client_app
    from fedftg.flower.server_app import build_server_app

    common = dict(
        clients=3,
        participation=1.0,
        rounds=2,
        local_epochs=1,
        seed=5,
        method=["fedavg+ftg", "scaffold", "fedgen"],
    )
    cfg = RunConfig(out=str(tmp_path / "flower"), **common).validate()
    cfg.ftg.iterations = 2
    cfg.fedgen.ensemble_epochs = 5  # FedGen's generator travels to the clients in round 2
    run_simulation(
        build_server_app(cfg, node_wait=30),
        client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    main(
        [
            "run",
            "--clients",
            "3",
            "--participation",
            "1",
            "--rounds",
            "2",
            "--local-epochs",
            "1",
            "--seed",
            "5",
            "--method",
            "fedavg+ftg,scaffold,fedgen",
            "--ftg-iterations",
            "2",
            "--fedgen-ensemble-epochs",
            "5",
            "--out",
            str(tmp_path / "local"),
            "--quiet",
        ]
    )
    capsys.readouterr()
    fl, lo = (
        _records(tmp_path / "flower" / "metrics.jsonl"),
        _records(tmp_path / "local" / "metrics.jsonl"),
    )
    assert [(r["method"], r["round"]) for r in fl] == [(r["method"], r["round"]) for r in lo]
    for a, b in zip(fl, lo, strict=True):
        # same selection, data, batches and maths; only float rounding may differ (SIMD
        # reductions depend on memory alignment), and FedFTG's 50 SGD steps amplify it
        assert a["clients"] == b["clients"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.01)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["methods"]["scaffold"]["rounds"] == 2


@pytest.fixture(scope="module")
def strategy():
    cfg = RunConfig(clients=3, method=["fedavg"]).validate()
    ds = load_dataset("digits")
    test = DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std)
    runner = ServerRunner(
        cfg, ds, test, initial_state(cfg, ds), "fedavg", None, torch.device("cpu")
    )
    return FedFTGStrategy(runner, "fedavg", "fedavg", {0: 11, 1: 12, 2: 13}, min_replies=2)


def _good(strategy, **changes):
    state = {k: v.clone() for k, v in strategy.runner.state.global_state.items()}
    metrics = {
        "num-examples": 30,
        "loss": 0.5,
        "steps": 3,
        "partition-id": 0,
        "histogram": [3] * 10,
    }
    metrics.update(changes.pop("metrics", {}))
    for k, v in changes.pop("state", {}).items():
        state[k] = v
    return RecordDict(
        {
            "model": ArrayRecord(state),
            "upload": ArrayRecord(changes.get("upload", {})),
            "metrics": MetricRecord(metrics),
        }
    )


def test_scaffold_clients_receive_the_pre_step_aggregate(monkeypatch):
    import types

    import fedftg.flower.strategy as strategy_module

    # a Message needs a running Flower app; the content is what this test is about
    monkeypatch.setattr(strategy_module, "Message", lambda **kw: types.SimpleNamespace(**kw))
    cfg = RunConfig(clients=3, participation=1.0, method=["scaffold+ftg"]).validate()
    ds = load_dataset("digits")
    test = DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std)
    runner = ServerRunner(
        cfg, ds, test, initial_state(cfg, ds), "scaffold", "ftg", torch.device("cpu")
    )
    strat = FedFTGStrategy(runner, "scaffold+ftg", "scaffold", {0: 11, 1: 12, 2: 13})
    aggregate = {k: v + 1.0 for k, v in runner.state.global_state.items()}
    runner.method.note_server_step(aggregate, runner.state.server_state)
    messages = list(strat.configure_train(2, to_record(runner.state.global_state), None, None))
    assert len(messages) == 3
    server = from_record(messages[0].content["server"])
    names = [n for n, _ in runner.model.named_parameters()]
    assert sorted(k for k in server if k.startswith("ref.")) == sorted("ref." + n for n in names)
    for n in names:
        torch.testing.assert_close(server["ref." + n], aggregate[n])


def test_valid_reply_is_accepted(strategy):
    assert strategy.check_content(_good(strategy)) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"state": {"classifier.bias": torch.zeros(3)}}, "shape"),
        ({"state": {"classifier.bias": torch.full((10,), float("nan"))}}, "NaN"),
        ({"state": {"classifier.weight": torch.full((10, 512), float("inf"))}}, "NaN or Inf"),
        ({"metrics": {"histogram": [3] * 9}}, "10 classes"),
        ({"metrics": {"histogram": [-3] + [3] * 9}}, "negative"),
        ({"metrics": {"histogram": [1] * 10}}, "add up"),
        ({"upload": {"x": torch.tensor([float("nan")])}}, "upload"),
    ],
)
def test_malformed_replies_are_rejected(strategy, change, reason):
    problem = strategy.check_content(_good(strategy, **change))
    assert problem is not None and reason in problem


def test_missing_parts_are_rejected(strategy):
    content = _good(strategy)
    del content["upload"]
    assert "upload" in strategy.check_content(content)
    content = _good(strategy)
    content["model"] = ArrayRecord({"w": torch.zeros(2)})
    assert "keys" in strategy.check_content(content)


def test_run_config_maps_onto_the_cli_config():
    cfg = config_from_run_config(
        {
            "dataset": "digits",
            "clients": 4,
            "method": "fedavg,fedftg",
            "ftg-iterations": 3,
            "ftg.nz": 16,
            "local-epochs": 2,
        }
    )
    assert cfg.clients == 4 and cfg.method == ["fedavg", "fedftg"] and cfg.local_epochs == 2
    assert cfg.ftg.iterations == 3 and cfg.ftg.nz == 16
    from fedftg.errors import UserError

    with pytest.raises(UserError, match="alpha"):
        config_from_run_config({"alpha": -1.0})
    with pytest.raises(UserError, match="bogus"):
        config_from_run_config({"bogus": 1})
    assert np.isfinite(cfg.alpha)


def test_flower_server_resumes_from_its_checkpoint(tmp_path):
    import shutil

    from flwr.simulation import run_simulation

    from fedftg.flower.client_app import app as client_app
    from fedftg.flower.server_app import build_server_app

    def simulate(out, resume):
        cfg = RunConfig(
            clients=2,
            participation=1.0,
            rounds=3,
            local_epochs=1,
            seed=2,
            method=["fedavg+ftg"],
            out=str(out),
        ).validate()
        cfg.ftg.iterations = 2
        run_simulation(
            build_server_app(cfg, node_wait=30, resume=resume),
            client_app,
            num_supernodes=2,
            backend_config={"client_resources": {"num_cpus": 1}},
        )

    full = tmp_path / "full"
    simulate(full, resume=False)
    crashed = tmp_path / "crashed"  # as if the server died after round 2
    crashed.mkdir()
    shutil.copyfile(full / "checkpoint.pt.prev", crashed / "checkpoint.pt")
    shutil.copyfile(full / "metrics.jsonl", crashed / "metrics.jsonl")
    simulate(crashed, resume=True)
    a, b = _records(full / "metrics.jsonl"), _records(crashed / "metrics.jsonl")
    assert [r["round"] for r in b] == [1, 2, 3]
    assert b[:2] == a[:2]  # kept from before the crash
    assert b[2]["test_loss"] == pytest.approx(a[2]["test_loss"], rel=1e-4)
    assert b[2]["ftg_loss_gen"] == pytest.approx(a[2]["ftg_loss_gen"], rel=1e-3)
