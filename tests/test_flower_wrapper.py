"""FTG inside any Flower app: `FTGStrategy` around Flower's own strategies, the label
histogram mod, reply screening, and the example app under `flwr run`."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedftg.config import RunConfig  # noqa: E402
from fedftg.data.batches import DeviceArrays  # noqa: E402
from fedftg.data.sources import load_dataset  # noqa: E402
from fedftg.engine.clients import label_histogram
from fedftg.engine.server import ServerRunner
from fedftg.engine.setup import initial_state
from fedftg.errors import UserError  # noqa: E402
from fedftg.fl.client import LocalResult
from fedftg.flower import (  # noqa: E402
    FTGStrategy,
    add_label_histogram,
    label_histogram_mod,
    plugin_settings,
)
from fedftg.flower.ftg import HISTOGRAM_KEY  # noqa: E402
from fedftg.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "flower-ftg"
SHAPE = (1, 8, 8)


def _meta(node: int, kind: str = "train") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node}",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )


def _reply(node: int, state, n: int, hist) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.clone() for k, v in state.items()}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
        }
    )
    if hist is not None:
        content[HISTOGRAM_KEY] = ConfigRecord({"counts": list(hist)})
    return Message(content=content, metadata=_meta(node))


def _clients(k: int = 3, seed: int = 0, model: str = "cnn"):
    """K client models near a seeded initial CNN, their sizes and label histograms."""
    cfg = RunConfig(seed=seed, model=model).validate()
    init = initial_state(cfg, load_dataset("digits"))
    gen = torch.Generator().manual_seed(seed)
    states = [
        {
            n: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for n, v in init.items()
        }
        for _ in range(k)
    ]
    rng = np.random.default_rng(seed)
    hists = [[int(v) for v in rng.integers(0, 30, 10)] for _ in range(k)]
    sizes = [sum(h) for h in hists]
    return init, states, sizes, hists


def _zip(*lists):
    return enumerate(zip(*lists, strict=True))


FAST = {"iterations": 1, "batch_size": 16, "student_steps": 2, "ngf": 16}


def _wrapper(strategy=None, model: str = "cnn", **kw) -> FTGStrategy:
    settings = kw.pop("settings", FAST)
    return FTGStrategy(
        strategy or FedAvg(),
        model=lambda: build_model(model, 1, 8, 10),
        num_classes=10,
        input_shape=SHAPE,
        settings=settings,
        **kw,
    )


# ------------------------------------------------------------- the same maths as fedftg's


# the settings beyond the paper, on a BatchNorm model where each of them acts
BEYOND = {"bn_loss": 1.0, "gen_ema": 0.5, "bn_stats": "pooled"}


@pytest.mark.parametrize(
    ("plugin", "model", "options"),
    [("ftg", "cnn", {}), ("df", "cnn", {}), ("ftg", "cnn-bn", BEYOND), ("df", "cnn-bn", BEYOND)],
)
def test_wrapper_around_fedavg_equals_fedftgs_own_server_step(plugin, model, options):
    seed = 3
    init, states, sizes, hists = _clients(seed=seed, model=model)
    cfg = RunConfig(
        clients=3, participation=1.0, seed=seed, method=[f"fedavg+{plugin}"], model=model
    )
    cfg = cfg.validate()
    df = {"gen_steps": 3, "student_steps": 3, "batch_size": 16, "ngf": 16}
    steps = {"ftg": FAST, "df": df}[plugin]
    for name, value in {**steps, **options}.items():
        setattr(cfg.sections[plugin], name, value)
    ds = load_dataset("digits")
    test = DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std)
    runner = ServerRunner(cfg, ds, test, init, "fedavg", plugin, torch.device("cpu"))
    results = [
        LocalResult(state=copy.deepcopy(s), num_samples=n, steps=1, loss=1.0)
        for s, n in zip(states, sizes, strict=True)
    ]
    record = runner.server_update(results, [np.asarray(h) for h in hists], time.perf_counter())
    expected = runner.state.global_state

    wrapper = _wrapper(plugin=plugin, settings=cfg.sections[plugin], seed=seed, model=model)
    replies = [_reply(10 + j, s, n, h) for j, (s, n, h) in _zip(states, sizes, hists)]
    arrays, metrics = wrapper.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    assert set(got) == set(expected)
    plain = FedAvg().aggregate_train(1, replies)[0].to_torch_state_dict()
    assert max(float((got[k] - plain[k]).abs().max()) for k in got) > 1e-4  # it fine-tuned
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4)
    assert metrics[f"{plugin}-teachers"] == 3
    assert metrics[f"{plugin}-loss-distill"] == pytest.approx(record[f"{plugin}_loss_distill"])
    if options:
        assert metrics[f"{plugin}-loss-bn"] == pytest.approx(record[f"{plugin}_loss_bn"])
        assert any(k.startswith("ema.") for k in wrapper.state_dict())
    for name, value in wrapper.state_dict().items():  # the same generator afterwards
        torch.testing.assert_close(value, runner.plugin.state_dict()[name], atol=2e-5, rtol=1e-4)


def test_generator_persists_across_rounds_and_through_its_state():
    _, states, sizes, hists = _clients()
    replies = [_reply(j, s, n, h) for j, (s, n, h) in _zip(states, sizes, hists)]
    first = _wrapper()
    before = first.state_dict()
    first.aggregate_train(1, replies)
    after = first.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    again = _wrapper()
    again.load_state_dict(after)
    a, _ = first.aggregate_train(2, replies)
    b, _ = again.aggregate_train(2, replies)
    for name, value in a.to_torch_state_dict().items():
        torch.testing.assert_close(value, b.to_torch_state_dict()[name])


def test_gen_reset_restarts_the_strategys_generator_at_its_rounds():
    """``gen_reset`` in `FTGStrategy`: Flower's round 2 (index 1) starts from a fresh
    generator whatever the wrapper carried, so a wrapper that never stepped gives the same
    model; without the reset it does not."""
    _, states, sizes, hists = _clients()
    replies = [_reply(j, s, n, h) for j, (s, n, h) in _zip(states, sizes, hists)]
    out = {}
    for reset in (0, 1):
        settings = {**FAST, "gen_reset": reset}
        first = _wrapper(settings=settings)
        first.aggregate_train(1, replies)
        a, _ = first.aggregate_train(2, replies)
        b, _ = _wrapper(settings=settings).aggregate_train(2, replies)
        a, b = a.to_torch_state_dict(), b.to_torch_state_dict()
        out[reset] = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert out[1] == 0.0 and out[0] > 1e-4, out


# ------------------------------------------------------------------ rejected replies


def _bad_shape(state):
    return {**state, "classifier.bias": torch.zeros(3)}


def _nan_model(state):
    return {**state, "classifier.bias": torch.full_like(state["classifier.bias"], float("nan"))}


@pytest.mark.parametrize(
    ("model_change", "hist", "reason", "aggregated"),
    [
        (None, None, "no label histogram", True),
        (None, [3] * 9, "9 classes", True),
        (None, [-1] + [3] * 9, "negative", True),
        (None, [float("nan")] + [3.0] * 9, "NaN or Inf", True),
        (None, [float("inf")] + [3.0] * 9, "NaN or Inf", True),
        (None, [0] * 10, "empty", True),
        (_bad_shape, [3] * 10, "shape", False),
        (_nan_model, [3] * 10, "NaN or Inf", False),
    ],
)
def test_each_bad_reply_is_logged_once_and_is_no_teacher(
    caplog, model_change, hist, reason, aggregated
):
    _, states, sizes, hists = _clients(k=4)
    bad_state = model_change(states[3]) if model_change else states[3]
    replies = [_reply(j, s, n, h) for j, (s, n, h) in _zip(states, sizes, hists)]
    replies[3] = _reply(3, bad_state, sizes[3], hist)
    wrapper = _wrapper()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = wrapper.aggregate_train(1, replies)
    lines = [r.getMessage() for r in caplog.records if "not a teacher" in r.getMessage()]
    assert len(lines) == 1 and "node 3" in lines[0] and reason in lines[0]
    assert len(wrapper.rejected) == 1 and reason in wrapper.rejected[0]
    assert metrics["ftg-teachers"] == 3 and arrays is not None
    # the same step from the three good replies alone; the wrapped strategy averages the
    # bad one only if its model fits
    reference = _wrapper()
    kept = replies if aggregated else replies[:3]
    inner = FedAvg().aggregate_train(1, kept)[0]
    teachers = reference._screen(1, replies[:3])[1]
    tuned = reference._step(1, inner, teachers, MetricRecord())
    for name, value in tuned.to_torch_state_dict().items():
        torch.testing.assert_close(arrays.to_torch_state_dict()[name], value)


def test_too_few_valid_teachers_skips_the_step_but_keeps_the_round(caplog):
    _, states, sizes, hists = _clients(k=3)
    replies = [_reply(j, s, n, h) for j, (s, n, h) in _zip(states, sizes, hists)]
    replies[0] = _reply(0, states[0], sizes[0], None)
    wrapper = _wrapper(min_teachers=3)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = wrapper.aggregate_train(1, replies)
    assert any("fewer than 3: ftg step skipped" in r.getMessage() for r in caplog.records)
    assert metrics["ftg-skipped"] == 1 and metrics["ftg-teachers"] == 2
    assert "ftg-loss-distill" not in metrics
    plain = FedAvg().aggregate_train(1, replies)[0].to_torch_state_dict()
    for name, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(value, plain[name])  # FedAvg's round, unchanged


def test_fedavgm_keeps_the_fine_tuned_model_as_its_current_one():
    _, states, sizes, hists = _clients()
    replies = [_reply(j, s, n, h) for j, (s, n, h) in _zip(states, sizes, hists)]
    inner = FedAvgM(server_momentum=0.9)
    wrapper = _wrapper(inner)
    inner.current_arrays = ArrayRecord({k: v.clone() for k, v in states[0].items()})
    arrays, _ = wrapper.aggregate_train(1, replies)
    assert inner.current_arrays is arrays


# ------------------------------------------------------------------------ settings


def test_settings_take_every_accepted_spelling_and_are_validated():
    assert plugin_settings("ftg", {"ftg-gen-lr": 0.5, "iterations": 3}).gen_lr == 0.5
    assert plugin_settings("ftg", {"ftg.iterations": 4}).iterations == 4
    assert plugin_settings("df", {"gen-steps": 7}).gen_steps == 7
    with pytest.raises(UserError, match="ftg.iterations"):
        plugin_settings("ftg", {"iterations": 0})
    with pytest.raises(UserError, match="unknown setting"):
        plugin_settings("ftg", {"lr": 0.1})
    with pytest.raises(UserError, match="unknown value 'fedgen'"):
        plugin_settings("fedgen")
    with pytest.raises(UserError, match="input_shape"):
        FTGStrategy(FedAvg(), model=lambda: build_model("cnn", 1, 8, 10), num_classes=10,
                    input_shape=(1, 8, 6))  # fmt: skip


# ------------------------------------------------------------------------- the mod


def _context(partition: int = 2) -> Context:
    return Context(
        run_id=1,
        node_id=77,
        node_config={"partition-id": partition, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


@pytest.mark.parametrize("epsilon", [0.0, 1.0])
def test_mod_attaches_the_histogram_to_train_replies_only(epsilon):
    labels = torch.tensor([0, 1, 1, 3, 3, 3, 9])
    mod = label_histogram_mod(lambda ctx: labels, 10, epsilon=epsilon, seed=5)

    def call_next(msg, ctx):
        content = RecordDict({"metrics": MetricRecord({"num-examples": 7})})
        return Message(content=content, metadata=_meta(77, msg.metadata.message_type))

    train = mod(Message(content=RecordDict(), metadata=_meta(0, "train")), _context(), call_next)
    counts = train.content[HISTOGRAM_KEY]["counts"]
    assert counts == list(label_histogram(labels, 10, epsilon, 5, 2))  # keyed by partition
    if epsilon == 0:
        assert counts == [1, 2, 0, 3, 0, 0, 0, 0, 0, 1]
    evaluate = mod(
        Message(content=RecordDict(), metadata=_meta(0, "evaluate")), _context(), call_next
    )
    assert HISTOGRAM_KEY not in evaluate.content


def test_noised_histogram_needs_a_seed_and_labels_in_range():
    with pytest.raises(UserError, match="seed"):
        label_histogram_mod(lambda ctx: [0], 10, epsilon=1.0)
    with pytest.raises(UserError, match="epsilon"):
        label_histogram_mod(lambda ctx: [0], 10, epsilon=float("nan"), seed=1)
    with pytest.raises(UserError, match="labels"):
        add_label_histogram(RecordDict(), [0, 10], 10)


# ------------------------------------------------- around FedProx and FedAdam, learning


class LocalGrid:
    """Flower's Grid for in-process tests: each message goes straight to a ClientApp."""

    def __init__(self, app, nodes: int, run_config: dict) -> None:
        self.app = app
        self.contexts = {
            100 + k: Context(
                run_id=1,
                node_id=100 + k,
                node_config={"partition-id": k, "num-partitions": nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for k in range(nodes)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


@pytest.fixture
def example(monkeypatch):
    """The example app's modules, importable, inside a Flower task identity."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)
    from flowerftg import client_app, server_app, task

    return client_app, server_app, task


def test_example_saves_its_model_where_its_readme_says(example, tmp_path):
    _, server_app, _ = example
    assert server_app.model_path("") is None
    assert server_app.model_path(str(tmp_path / "m.pt")) == tmp_path / "m.pt"
    with pytest.raises(ValueError, match="absolute"):  # it would land in the SuperLink's cwd
        server_app.model_path("final_model.pt")
    readme = (EXAMPLE / "README.md").read_text()
    runs = _joined(readme)
    assert len(runs) == 3 and all("model-path='$PWD/final_model.pt'" in r for r in runs)
    assert "saved to `final_model.pt` in this folder" in readme


def _joined(text: str) -> list[str]:
    """The shell commands of ``text`` that start with `flwr run`, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.startswith("flwr run")]


@pytest.mark.parametrize(
    "inner",
    [
        lambda: FedProx(proximal_mu=0.01, min_train_nodes=3, fraction_evaluate=0.0),
        lambda: FedAdam(eta=0.01, min_train_nodes=3, fraction_evaluate=0.0),
    ],
    ids=["fedprox", "fedadam"],
)
def test_wrapper_runs_and_learns_around_flower_strategies(example, inner):
    client_app, server_app, task = example
    torch.manual_seed(0)
    strategy = FTGStrategy(
        inner(),
        model=task.Net,
        num_classes=task.NUM_CLASSES,
        input_shape=task.INPUT_SHAPE,
        settings={"iterations": 3, "ngf": 16},
        evaluate_fn=server_app.central_evaluate,
    )
    result = strategy.start(
        grid=LocalGrid(client_app.app, 3, {"local-epochs": 2}),
        initial_arrays=ArrayRecord(task.Net().state_dict()),
        train_config=ConfigRecord({"lr": 0.05}),
        num_rounds=2,
        evaluate_fn=server_app.central_evaluate,
    )
    accuracy = [float(result.evaluate_metrics_serverapp[r]["accuracy"]) for r in (0, 1, 2)]
    assert accuracy[2] > 0.3 and accuracy[2] > accuracy[0] + 0.15  # chance is 0.1
    for r in (1, 2):
        train = result.train_metrics_clientapp[r]
        assert train["ftg-teachers"] == 3 and np.isfinite(train["ftg-loss-gen"])
        assert {"ftg-before-accuracy", "ftg-after-accuracy"} <= set(train)
    assert train["ftg-after-accuracy"] == pytest.approx(accuracy[2])
    assert strategy.rejected == []


# -------------------------------------------------------- the example under `flwr run`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"the simulation SuperLink did not listen on {port}")


@pytest.mark.processes
def test_example_app_runs_two_rounds_with_flwr_run_in_simulation(tmp_path):
    bin_dir = Path(sys.executable).parent
    flwr = shutil.which("flwr", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if flwr is None or shutil.which("flower-superlink", path=str(Path(flwr).parent)) is None:
        pytest.skip("flwr is not on PATH")
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (tmp_path / "superlink.log").open("w")
    link = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_port(port, link)
        model = tmp_path / "model.pt"
        overrides = f"num-server-rounds=2 local-epochs=1 ftg-iterations=2 model-path='{model}'"
        run = subprocess.run(
            [flwr, "run", str(EXAMPLE), "sim", "--stream",
             "--federation-config", "num-supernodes=3",
             "--run-config", overrides],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        try:
            link.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)
            link.wait(timeout=15)
        log.close()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "[ROUND 2/2]" in output, output[-3000:]
    assert "ftg-loss-gen" in output and "ftg-after-accuracy" in output, output[-3000:]
    assert f"final model saved to {model}" in output, output[-3000:]
    state = torch.load(model, weights_only=True)
    assert set(state) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                          "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # fmt: skip
