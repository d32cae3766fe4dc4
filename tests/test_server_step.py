"""`fedftg.ServerStep`: FedFTG's and FedDF's server step for any FL loop, equal to the
engine's own step, on any model that gives logits, with its state across calls, and a
`UserError` naming each bad input."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedftg
from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.data.sources import load_dataset
from fedftg.engine.server import ServerRunner
from fedftg.engine.setup import initial_state
from fedftg.errors import UserError
from fedftg.fl.client import LocalResult
from fedftg.models import build_model
from fedftg.server_step import ServerStep

SHAPE = (1, 8, 8)
FAST = {"iterations": 1, "batch_size": 16, "student_steps": 2, "ngf": 16}
DF_FAST = {"gen_steps": 2, "student_steps": 2, "batch_size": 16, "ngf": 16}


def _near(state: dict[str, torch.Tensor], k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """K states near ``state`` (seeded noise on the floating-point entries)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            n: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for n, v in state.items()
        }
        for _ in range(k)
    ]


def _counts(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 30, (k, 10))


@pytest.mark.parametrize(
    ("plugin", "model", "options"),
    [
        ("ftg", "cnn", FAST),
        ("df", "cnn", DF_FAST),
        ("ftg", "cnn-bn", {**FAST, "bn_loss": 1.0, "gen_ema": 0.5, "bn_stats": "pooled"}),
    ],
)
def test_server_step_equals_the_engines_own_step(plugin, model, options):
    seed = 3
    cfg = RunConfig(
        clients=3, participation=1.0, seed=seed, method=[f"fedavg+{plugin}"], model=model
    ).validate()
    for name, value in options.items():
        setattr(cfg.sections[plugin], name, value)
    ds = load_dataset("digits")
    init = initial_state(cfg, ds)
    states, counts = _near(init, 3, seed), _counts(3, seed)
    test = DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std)
    runner = ServerRunner(cfg, ds, test, init, "fedavg", plugin, torch.device("cpu"))
    results = [
        LocalResult(state=copy.deepcopy(s), num_samples=int(c.sum()), steps=1, loss=1.0)
        for s, c in zip(states, counts, strict=True)
    ]
    st = runner.state
    aggregate = runner.method.aggregate(st.global_state, results, st.server_state, cfg.clients)
    record = runner.server_update(results, list(counts), time.perf_counter())
    expected = runner.state.global_state

    step = fedftg.ServerStep(
        plugin,
        model=lambda: build_model(model, *SHAPE[:2], 10),
        num_classes=10,
        input_shape=SHAPE,
        settings=cfg.sections[plugin],
        seed=seed,
    )
    tuned, metrics = step(aggregate, states, counts)
    assert set(tuned) == set(expected)
    assert any(not torch.equal(tuned[k], aggregate[k]) for k in tuned)  # it fine-tuned
    for name in expected:
        assert torch.equal(tuned[name], expected[name]), name
    assert metrics == {k.removeprefix(f"{plugin}_"): v for k, v in record.plugin.items()}
    for name, value in step.state_dict()["plugin"].items():  # the same generator afterwards
        assert torch.equal(value, runner.plugin.state_dict()[name]), name


class TinyNet(nn.Module):
    """A model with BatchNorm and no features/classifier split: only forward gives logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _step(plugin: str = "ftg", **kw) -> ServerStep:
    settings = kw.pop("settings", FAST if plugin == "ftg" else DF_FAST)
    torch.manual_seed(0)
    return ServerStep(
        plugin, model=TinyNet, num_classes=10, input_shape=SHAPE, settings=settings, **kw
    )


def _round(seed: int = 1, k: int = 3):
    torch.manual_seed(0)
    init = TinyNet().state_dict()
    return init, _near(init, k, seed), _counts(k, seed)


@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_any_model_with_logits_is_fine_tuned_and_the_generator_persists(plugin):
    aggregate, states, counts = _round()
    step = _step(plugin)
    before = step.state_dict()
    first, metrics = step(aggregate, states, counts)
    assert step.round == 1
    assert metrics and all(np.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(first[k], aggregate[k]) for k in first)
    after = step.state_dict()
    assert any(not torch.equal(before["plugin"][k], after["plugin"][k]) for k in after["plugin"])
    second, _ = step(first, states, counts)
    # a fresh step loaded from the state continues exactly: the generator and the counter
    again = _step(plugin)
    again.load_state_dict(after)
    assert again.round == 1
    resumed, _ = again(first, states, counts)
    for name, value in second.items():
        assert torch.equal(value, resumed[name]), name


def test_the_round_keys_the_random_stream_and_numpy_float64_inputs_are_cast():
    aggregate, states, counts = _round()
    counted, _ = _step()(aggregate, states, counts)
    told, _ = _step()(aggregate, states, counts, round=0)
    other, _ = _step()(aggregate, states, counts, round=1)
    as_numpy = [{k: v.double().numpy() for k, v in s.items()} for s in states]
    cast, _ = _step()(aggregate, as_numpy, torch.as_tensor(counts))
    for name, value in counted.items():
        assert torch.equal(value, told[name])
        assert torch.equal(value, cast[name])
    assert any(not torch.equal(counted[k], other[k]) for k in counted)


def _nan_entry(state):
    return {**state, "head.bias": torch.full((10,), float("nan"))}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda a, s, c: (a, [*s[:2], {**s[2], "extra": torch.zeros(1)}], c),
            r"client_states\[2\]: model has other keys",
        ),
        (
            lambda a, s, c: ({**a, "head.bias": torch.zeros(3)}, s, c),
            r"aggregate_state: model entry head.bias has shape \(3,\), not \(10,\)",
        ),
        (
            lambda a, s, c: (a, [_nan_entry(s[0]), *s[1:]], c),
            r"client_states\[0\]: model entry head.bias holds NaN or Inf",
        ),
        (lambda a, s, c: (a, s, c[:2]), r"label_counts: expected shape \(3, 10\)"),
        (lambda a, s, c: (a, s, -c), "label_counts: has negative counts"),
        (lambda a, s, c: (a, s, c * np.nan), "label_counts: holds NaN or Inf"),
        (lambda a, s, c: (a, s, c * 0), "label_counts: is empty"),
        (lambda a, s, c: (a, s, c.astype(str)), "label_counts: expected numbers"),
        (lambda a, s, c: (a, [], c[:0]), "client_states: empty"),
        (lambda a, s, c: (a, s[0], c), "client_states: expected a list"),
        (lambda a, s, c: ([1, 2], s, c), "aggregate_state: expected a state dict"),
    ],
)
def test_each_bad_round_input_is_a_user_error_naming_it(change, message):
    aggregate, states, counts = _round()
    step = _step()
    generator = step.state_dict()
    with pytest.raises(UserError, match=message):
        step(*change(aggregate, states, counts))
    assert step.round == 0  # nothing stepped
    for name, value in step.state_dict()["plugin"].items():
        assert torch.equal(value, generator["plugin"][name])


class NoLogits(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NoVmap(TinyNet):
    """A forward that reads a value out of a weight: fine alone, not under vmap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float(self.head.bias.detach().abs().max() + 1)


def test_a_model_that_fails_under_vmap_needs_the_reference_loop():
    args = {"model": NoVmap, "num_classes": 10, "input_shape": SHAPE}
    with pytest.raises(UserError, match="model: forward fails under torch.func.vmap"):
        ServerStep("ftg", **args)
    aggregate, states, counts = _round()
    step = ServerStep("ftg", **args, settings={**FAST, "impl": "reference"})
    tuned, _ = step(aggregate, states, counts)
    assert any(not torch.equal(tuned[k], aggregate[k]) for k in tuned)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"plugin": "fedgen"}, "plugin: unknown value 'fedgen'; use one of ftg, df"),
        ({"model": NoLogits}, r"model: the NoLogits whose forward gives \(2, 256\) for a batch"),
        ({"model": nn.Linear(3, 10)}, r"model: the Linear whose forward fails on a \(2, 1, 8, 8\)"),
        ({"model": "cnn"}, "model: expected a torch.nn.Module"),
        ({"num_classes": 1}, "num_classes: must be an integer >= 2"),
        ({"input_shape": (1, 8, 6)}, "input_shape: the generator makes square inputs"),
        ({"input_shape": (8, 8)}, r"input_shape: must be \(channels, side, side\)"),
        ({"settings": {"iterations": 0}}, "iterations"),
        ({"settings": {"no_such": 1}}, "no_such"),
        ({"precision": "fp8"}, "precision: unknown value 'fp8'"),
    ],
)
def test_each_bad_construction_is_a_user_error_naming_it(kw, message):
    args = {"plugin": "ftg", "model": TinyNet, "num_classes": 10, "input_shape": SHAPE}
    args.update(kw)
    with pytest.raises(UserError, match=message):
        ServerStep(args.pop("plugin"), **args)


def test_a_foreign_state_is_refused():
    with pytest.raises(UserError, match=r"state: expected ServerStep.state_dict\(\) output"):
        _step().load_state_dict(_step().state_dict()["plugin"])


# ------------------------------------------------------------ the plain-PyTorch example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain-pytorch"


def _example(tmp_path: Path, *flags: str) -> dict[str, torch.Tensor]:
    """The example's final model after one round (with ``flags``), from a fresh process."""
    out = tmp_path / f"model{len(flags)}.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(fedftg.__file__).parents[1])}
    args = [sys.executable, str(EXAMPLE / "fedavg.py"), "--rounds", "1", "--save", str(out)]
    done = subprocess.run(
        [*args, *flags], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("round 1: test accuracy 0.")
    return torch.load(out, weights_only=True)


@pytest.mark.processes
def test_the_plain_pytorch_example_runs_and_its_three_lines_change_the_model(tmp_path):
    source = (EXAMPLE / "fedavg.py").read_text()
    assert len(source.splitlines()) < 100  # plain PyTorch but for the one import
    assert [s for s in source.splitlines() if "fedftg" in s] == ["from fedftg import ServerStep"]
    assert [n for n in range(1, 4) if f"FedFTG, line {n}" in source] == [1, 2, 3]
    plain = _example(tmp_path)
    tuned = _example(tmp_path, "--ftg", "--ftg-iterations", "1")
    assert set(plain) == set(tuned)
    assert any(not torch.equal(plain[k], tuned[k]) for k in plain)
