"""Flower, driven by `flwr run` on a local simulation SuperLink: it equals the in-process
simulator (FedGen's client term included) and resumes; malformed replies are rejected; a
bad setting ends the run as failed with one `error:` line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, MetricRecord, RecordDict  # noqa: E402

from fedftg.cli import main  # noqa: E402
from fedftg.config import RunConfig, load_config_file  # noqa: E402
from fedftg.data.batches import DeviceArrays  # noqa: E402
from fedftg.data.sources import load_dataset  # noqa: E402
from fedftg.engine.server import ServerRunner  # noqa: E402
from fedftg.engine.setup import initial_state  # noqa: E402
from fedftg.flower.common import config_from_run_config, from_record, to_record  # noqa: E402
from fedftg.flower.server_app import FLOWER_KEYS  # noqa: E402
from fedftg.flower.strategy import MethodStrategy  # noqa: E402
from flower_federation import APP, available, running  # noqa: E402


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """A SuperLink in simulation mode (3 simulated SuperNodes per `flwr run` by default)."""
    if not available():
        pytest.skip("flower-superlink is not installed")
    with running(tmp_path_factory.mktemp("flower"), nodes=3, simulation=True) as fed:
        yield fed


def _app_config() -> dict:
    """The app's ``[tool.flwr.app.config]``: every key `--run-config` may override."""
    return load_config_file(APP / "pyproject.toml")["tool"]["flwr"]["app"]["config"]


def _toml(value) -> str:
    return json.dumps(value)  # str, bool, int and float are written alike in TOML


def _run_config(settings: dict) -> str:
    """Settings as `flwr run --run-config` text."""
    return " ".join(f"{k}={_toml(v)}" for k, v in settings.items())


def _flwr_run(fed, settings: dict, nodes: int, status: str = "finished:completed") -> str:
    """`flwr run` the app with ``settings``; check Flower's status of the run; its log."""
    proc = fed.run(_run_config(settings), nodes=nodes)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]  # flwr 1.42 returns 0 even for failed runs
    assert fed.status(proc.stdout)["status"] == status, output[-3000:]
    return output


@pytest.mark.processes
def test_flower_simulation_equals_in_process_simulator(simulation, tmp_path, capsys):
    common = {
        "clients": 3,
        "participation": 1.0,
        "rounds": 2,
        "local-epochs": 1,
        "seed": 5,
        "method": "fedavg+ftg,scaffold,fedgen",
        "model": "cnn-bn",  # BatchNorm, so that the FTG settings beyond the paper all act
        "ftg-iterations": 2,
        "ftg-bn-loss": 1.0,
        "ftg-gen-ema": 0.5,
        "ftg-bn-stats": "pooled",
        "fedgen-ensemble-epochs": 5,  # FedGen's generator travels to the clients in round 2
    }
    flower = {**common, "node-wait": 30.0, "out": str(tmp_path / "flower")}
    _flwr_run(simulation, flower, nodes=3)
    flags = [x for k, v in common.items() for x in (f"--{k}", str(v))]
    main(["run", *flags, "--out", str(tmp_path / "local"), "--quiet"])
    capsys.readouterr()
    fl, lo = (
        _records(tmp_path / "flower" / "metrics.jsonl"),
        _records(tmp_path / "local" / "metrics.jsonl"),
    )
    assert [(r["method"], r["round"]) for r in fl] == [(r["method"], r["round"]) for r in lo]
    for a, b in zip(fl, lo, strict=True):
        # same selection, data, batches and maths; only float rounding may differ (SIMD
        # reductions depend on memory alignment), and FedFTG's 50 SGD steps amplify it.
        # With BatchNorm and the options on, round 1's step turns a 1e-7 difference of the
        # uploads into 2e-5 of the model, which round 2's clients and step amplify to about
        # 1 % (in-process, fast against reference, the same maths in another float order,
        # differ by 2e-4 to 8e-4 in round 2 from 3e-7 after round 1); a generator or its
        # average lost between rounds would put round 2's BatchNorm loss back near
        # round 1's (1.9 against 1.1)
        late_ftg = a["round"] > 1 and a["method"].endswith("ftg")
        loose = 2e-2 if late_ftg else None
        assert a["clients"] == b["clients"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=loose or 1e-4), (a, b)
        assert ("train_plugin_loss" in a) == ("train_plugin_loss" in b)
        if "train_plugin_loss" in a:
            assert a["train_plugin_loss"] == pytest.approx(b["train_plugin_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=loose or 1e-3)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.05 if late_ftg else 0.01)
        assert ("ftg_loss_bn" in a) == ("ftg_loss_bn" in b) == a["method"].endswith("ftg")
        if "ftg_loss_bn" in b:
            # summed over the generator's steps, which carry round 1's float-order difference
            # too: 1.16e-4 apart on an AVX-512 machine (1e-4 failed there)
            assert a["ftg_loss_bn"] == pytest.approx(b["ftg_loss_bn"], rel=loose or 1e-3)
    assert [r["round"] for r in fl if "train_plugin_loss" in r] == [2]  # FedGen's round 2
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
    return MethodStrategy(runner, "fedavg", "fedavg", {0: 11, 1: 12, 2: 13}, min_replies=2)


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


def test_a_plug_in_loss_travels_beside_the_loss(strategy):
    from types import SimpleNamespace

    reply = SimpleNamespace(content=_good(strategy, metrics={"plugin-loss": 22.5}))
    _, result, _ = strategy._parse(reply)  # noqa: SLF001
    assert (result.loss, result.plugin_loss) == (0.5, 22.5)
    _, plain, _ = strategy._parse(SimpleNamespace(content=_good(strategy)))  # noqa: SLF001
    assert plain.plugin_loss is None


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
    strat = MethodStrategy(runner, "scaffold+ftg", "scaffold", {0: 11, 1: 12, 2: 13})
    aggregate = {k: v + 1.0 for k, v in runner.state.global_state.items()}
    runner.method.note_server_step(aggregate, runner.state.server_state)
    messages = list(strat.configure_train(2, to_record(runner.state.global_state), None, None))
    assert len(messages) == 3
    server = from_record(messages[0].content["server"])
    names = [n for n, _ in runner.model.named_parameters()]
    assert sorted(k for k in server if k.startswith("ref.")) == sorted("ref." + n for n in names)
    for n in names:
        torch.testing.assert_close(server["ref." + n], aggregate[n])


def test_rejected_counts_per_round_and_the_summary_keeps_why():
    from types import SimpleNamespace

    from fedftg.engine.records import NO_FINITE_UPLOAD, SKIPPED, TRAINED

    cfg = RunConfig(clients=3, method=["fedavg"]).validate()
    ds = load_dataset("digits")
    test = DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std)
    runner = ServerRunner(
        cfg, ds, test, initial_state(cfg, ds), "fedavg", None, torch.device("cpu")
    )
    strat = MethodStrategy(runner, "fedavg", "fedavg", {0: 11, 1: 12, 2: 13}, min_replies=2)
    nan = {"classifier.bias": torch.full((10,), float("nan"))}

    def reply(pid, **change):
        content = _good(strat, metrics={"partition-id": pid}, **change)
        return SimpleNamespace(content=content, has_error=lambda: False)

    first = strat.round_record(1, [reply(0), reply(1), reply(2, state=nan)])
    assert (first.outcome, first["clients"], first["rejected"]) == (TRAINED, 2, 1)
    second = strat.round_record(2, [reply(0), reply(1)])
    assert second["rejected"] == 0  # this round's, not the run's
    third = strat.round_record(3, [reply(0), reply(1, state=nan)])  # 1 valid < min-replies
    assert third.outcome == SKIPPED and third["skipped"] and third["rejected"] == 1
    assert runner.state.round == 3 and runner.diverged is None
    last = strat.round_record(4, [reply(0, state=nan), reply(1, state=nan)])
    assert last.outcome == NO_FINITE_UPLOAD and last["rejected"] == 2
    assert last["status"] == "diverged" and last["lr"] == pytest.approx(cfg.lr * cfg.lr_decay**3)
    summary = runner.summary().to_dict()
    assert summary["status"] == "diverged" and summary["diverged_round"] == 4
    assert summary["rejected"] == 4 and summary["rejections"][0].startswith("round 1: ")


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


def test_flower_options_default_as_fedftg_run_does():
    import inspect

    from fedftg.engine.run import run_experiment

    defaults = inspect.signature(run_experiment).parameters
    for name in ("resume", "fresh", "keep_checkpoint", "on_divergence"):
        assert FLOWER_KEYS[name.replace("_", "-")] == defaults[name].default


def test_flower_app_defaults_are_the_cli_defaults():
    """The in-process comparisons above rely on it: only rounds and method differ."""
    settings = {k: v for k, v in _app_config().items() if k not in FLOWER_KEYS}
    flower = config_from_run_config(settings).to_dict()
    cli = RunConfig().validate().resolve().to_dict()
    differ = {k for k in flower.keys() | cli.keys() if flower.get(k) != cli.get(k)}
    assert differ == {"rounds", "method"}


@pytest.mark.processes
def test_flower_server_resumes_from_its_checkpoint(simulation, tmp_path):
    import shutil

    def simulate(out, resume, seed=2, status="finished:completed"):
        settings = {
            "clients": 2,
            "participation": 1.0,
            "rounds": 2,
            "local-epochs": 1,
            "seed": seed,
            "method": "fedavg+ftg",
            "ftg-iterations": 2,
            "node-wait": 30.0,
            "out": str(out),
            "resume": resume,
            "keep-checkpoint": True,  # the full run's .prev plays the crashed server's file
        }
        return _flwr_run(simulation, settings, nodes=2, status=status)

    full = tmp_path / "full"
    simulate(full, resume=False)
    crashed = tmp_path / "crashed"  # as if the server died after round 1
    crashed.mkdir()
    shutil.copyfile(full / "checkpoint.pt.prev", crashed / "checkpoint.pt")
    shutil.copyfile(full / "metrics.jsonl", crashed / "metrics.jsonl")
    simulate(crashed, resume=True)
    a, b = _records(full / "metrics.jsonl"), _records(crashed / "metrics.jsonl")
    assert [r["round"] for r in b] == [1, 2]
    assert b[:1] == a[:1]  # kept from before the crash
    assert b[1]["test_loss"] == pytest.approx(a[1]["test_loss"], rel=1e-4)
    assert b[1]["ftg_loss_gen"] == pytest.approx(a[1]["ftg_loss_gen"], rel=1e-3)

    # a checkpoint written with other settings: one error line, a failed run, no traceback
    output = simulate(crashed, resume=True, seed=3, status="finished:failed")
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1, output[-3000:]  # the wording is run_federation's
    assert "Traceback" not in output


@pytest.mark.processes
def test_a_diverging_flower_run_stops_with_one_error_line_and_strict_json(simulation, tmp_path):
    settings = {
        "clients": 2,
        "participation": 1.0,
        "rounds": 2,
        "local-epochs": 1,
        "lr": 1e6,
        "method": "fedavg",
        "node-wait": 30.0,
        "out": str(tmp_path / "nan"),
    }
    output = _flwr_run(simulation, settings, nodes=2, status="finished:failed")
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "fedavg diverged at round" in errors[0], output[-3000:]
    assert "Traceback" not in output
    summary = json.loads(
        (tmp_path / "nan" / "summary.json").read_text(), parse_constant=_refuse_constant
    )
    assert summary["methods"]["fedavg"]["status"] == "diverged"

    settings.update({"out": str(tmp_path / "on"), "on-divergence": "continue"})
    _flwr_run(simulation, settings, nodes=2)  # completes, the method marked diverged
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["methods"]["fedavg"]["status"] == "diverged"


@pytest.mark.processes
def test_fewer_supernodes_than_clients_fails_naming_the_missing_partitions(simulation, tmp_path):
    out = tmp_path / "short"
    settings = {
        "clients": 4,
        "participation": 1.0,
        "rounds": 1,
        "local-epochs": 1,
        "method": "fedavg",
        "node-wait": 3.0,
        "out": str(out),
    }
    output = _flwr_run(simulation, settings, nodes=2, status="finished:failed")
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "no SuperNode holds partition 2-3 of 4" in errors[0], output
    assert not (out / "metrics.jsonl").exists() and not (out / "summary.json").exists()


def test_missing_partitions_and_their_ranges():
    from fedftg.flower.server_app import id_ranges, missing_partitions

    assert missing_partitions({0: 11, 2: 12, 5: 13}, 7) == [1, 3, 4, 6]
    assert missing_partitions({0: 1, 1: 2}, 2) == []
    assert id_ranges([1, 3, 4, 6]) == "1, 3-4, 6" and id_ranges([5, 6, 7, 8, 9]) == "5-9"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(logging.Formatter().format(record).splitlines())


@pytest.fixture
def flwr_log():
    """The lines logged on Flower's logger (formatted as Flower's handlers would)."""
    handler = _Records()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"resume": "yes"}, "resume"),
        ({"min-replies": 0}, "min-replies"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_run_config_is_one_error_line_and_a_failed_app(flwr_log, change, reason):
    from flwr.app import Context

    from fedftg.flower.common import ReportedError
    from fedftg.flower.server_app import main as server_main

    run_config = {**_app_config(), **change}
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(ReportedError, match=reason) as caught:
        server_main(None, context)  # fails before it talks to any node
    assert [line for line in flwr_log if line.startswith("error: ")] == [f"error: {caught.value}"]
    # what Flower does with an exception leaving the ServerApp: no traceback follows
    logging.getLogger("flwr").error("ServerApp raised an exception", exc_info=caught.value)
    assert flwr_log[-1] == "ServerApp raised an exception"
    assert not any("Traceback" in line for line in flwr_log)


def test_node_without_partition_id_is_one_error_line(flwr_log):
    from flwr.app import Context

    from fedftg.flower.client_app import query
    from fedftg.flower.common import ReportedError

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ReportedError, match="partition-id"):
        query(None, context)
    assert len([line for line in flwr_log if line.startswith("error: ")]) == 1


@pytest.mark.processes
def test_the_documented_flower_config_step_can_run_twice(tmp_path):
    """docs/usage.md's step that adds the `deploy` connection keeps config.toml valid."""
    import re
    import subprocess

    usage = (APP.parent / "docs" / "usage.md").read_text()
    step = re.search(r"^flwr config list.*?^TOML$", usage, re.S | re.M)
    assert step is not None, "the config step is no longer in docs/usage.md"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for _ in range(2):
        proc = subprocess.run(
            ["bash", "-euc", step.group(0)], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "home" / "config.toml").read_text()
    assert text.count("[superlink.deploy]") == 1
    superlink = load_config_file(tmp_path / "home" / "config.toml")["superlink"]
    assert superlink["deploy"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert superlink["default"] == "local" and "local" in superlink  # Flower's own kept


class _Called(Exception):
    """Stops an app right where it applied the thread plan."""


def test_flower_apps_run_on_the_runs_thread_plan(monkeypatch):
    from types import SimpleNamespace

    from flwr.app import Context

    import fedftg.flower.client_app as client_app
    import fedftg.flower.server_app as server_app
    from fedftg.flower.common import config_to_json, use_run_threads

    before = torch.get_num_threads()
    try:
        use_run_threads(RunConfig(threads=1).validate())
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray sets it from num-cpus
        use_run_threads(RunConfig().validate())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

    seen = []

    def record(cfg):
        seen.append(cfg.threads)
        raise _Called

    monkeypatch.setattr(client_app, "use_run_threads", record)
    monkeypatch.setattr(server_app, "use_run_threads", record)
    cfg = RunConfig(clients=3, threads=3, method=["fedavg"]).validate()
    config = {"run": config_to_json(cfg), "round": 0, "base": "fedavg", "method": "fedavg"}
    msg = SimpleNamespace(content=SimpleNamespace(config_records={"config": config}))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(_Called):
        client_app._train(msg, context)  # noqa: SLF001
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**_app_config(), "threads": 2},
    )
    with pytest.raises(_Called):
        server_app.main(None, context)
    assert seen == [3, 2]
