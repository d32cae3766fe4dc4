"""Vectorised local training (`train_local_vmap`) against the sequential `train_local`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.setup import client_method, prepare
from fedftg.fl.client import (
    ClientMethod,
    LocalContext,
    LocalResult,
    LocalSpec,
    Term,
    combine_terms,
    detached_state,
    train_local,
)
from fedftg.fl.vectorised import train_local_vmap
from fedftg.methods.moon import Moon
from fedftg.models import build_model
from test_methods import TinyNet

METHODS = ["fedavg", "fedprox", "scaffold", "feddyn", "moon"]


def _data(n: int, channels: int, size: int, classes: int, seed: int = 0) -> DeviceArrays:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
    y = rng.integers(0, classes, size=n)
    return DeviceArrays(x, y, (0.5,) * channels, (0.25,) * channels)


def _method(name: str) -> ClientMethod:
    # strong terms, so a wrong per-client anchor or correction shows
    cfg = RunConfig().override({"fedprox.mu": 0.5, "feddyn.alpha": 0.3, "moon.mu": 1.0})
    return client_method(cfg, name)


def _contexts(model: nn.Module, method: ClientMethod, n: int, seed: int) -> list[LocalContext]:
    """Contexts with non-trivial, different per-client states (fresh tensors each call)."""
    gen = torch.Generator().manual_seed(seed)
    init = detached_state(model)

    def noisy(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        return {
            k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()
        }

    server = noisy(method.init_server_state(model), 0.1)
    out = []
    for k in range(n):
        if isinstance(method, Moon):  # the first client has no previous model yet
            client = {} if k == 0 else noisy(init, 0.2)
        else:
            client = noisy(method.init_client_state(model), 0.1)
        out.append(LocalContext(init, client, dict(server), num_clients=n))
    return out


def _both_paths(
    model: nn.Module,
    data: DeviceArrays,
    sizes: list[int],
    method: ClientMethod,
    spec: LocalSpec,
    extra=None,
) -> tuple[list[LocalResult], list[LocalResult], list[LocalContext], list[LocalContext]]:
    """Sequential and vectorised results (and contexts) from the same starting point;
    ``extra(k)``, if given, makes client k's plug-in term (fresh for each path)."""
    starts = np.cumsum([0, *sizes])
    idxs = [torch.arange(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    ctx_seq = _contexts(model, method, len(sizes), seed=7)
    ctx_vec = _contexts(model, method, len(sizes), seed=7)

    def extras() -> list[Term | None]:
        return [extra(k) if extra else None for k in range(len(sizes))]

    seq = [
        train_local(model, data, idx, method, ctx, spec, torch.Generator().manual_seed(10 + k), e)
        for k, (idx, ctx, e) in enumerate(zip(idxs, ctx_seq, extras(), strict=True))
    ]
    model.load_state_dict(ctx_seq[0].global_state)
    gens = [torch.Generator().manual_seed(10 + k) for k in range(len(sizes))]
    vec = train_local_vmap(model, data, idxs, method, ctx_vec, spec, gens, extras())
    return seq, vec, ctx_seq, ctx_vec


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = max(1.0, float(a[k].abs().max())) if a[k].numel() else 1.0
        torch.testing.assert_close(b[k], a[k], atol=atol * scale, rtol=0, msg=k)


def _assert_same(seq, vec, ctx_seq, ctx_vec, atol: float = 1e-5) -> None:
    assert len(seq) == len(vec)
    for a, b, ca, cb in zip(seq, vec, ctx_seq, ctx_vec, strict=True):
        assert (a.steps, a.num_samples) == (b.steps, b.num_samples)
        assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-6)
        _close(a.state, b.state, atol)  # parameters and BatchNorm buffers
        _close(a.upload, b.upload, atol)
        _close(ca.client_state, cb.client_state, atol)  # `finish` hooks ran on the right state


@pytest.mark.parametrize("method", METHODS)
def test_vmap_matches_sequential_with_ragged_clients(method):
    """Unequal sizes: 4, 2 and 6 steps per epoch, ragged last batches, momentum, clipping."""
    torch.manual_seed(0)
    model = TinyNet()
    data = _data(100, 1, 4, 3)
    spec = LocalSpec(
        lr=0.1, epochs=2, batch_size=8, weight_decay=1e-3, momentum=0.9, clip=0.5, augment=True
    )
    # 30 -> 8,8,8,6; 17 -> 8,9 (a lone last sample joins); 45 -> 8,8,8,8,8,5 per epoch
    seq, vec, ctx_seq, ctx_vec = _both_paths(model, data, [30, 17, 45], _method(method), spec)
    assert [r.steps for r in seq] == [8, 4, 12]
    _assert_same(seq, vec, ctx_seq, ctx_vec)
    # the test can fail: clipping is active here, and a client's result is its own
    assert not torch.allclose(vec[0].state["classifier.weight"], vec[1].state["classifier.weight"])
    spec_free = dataclasses.replace(spec, clip=0.0)
    unclipped = _both_paths(model, data, [30], _method(method), spec_free)[0]
    free = unclipped[0].state["classifier.weight"]
    assert not torch.allclose(free, seq[0].state["classifier.weight"])


@pytest.mark.parametrize(
    "method,name", [("fedavg", "cnn"), ("scaffold", "cnn"), ("moon", "cnn"), ("feddyn", "cnn-bn")]
)
def test_vmap_matches_sequential_on_the_cnn(method, name):
    """The package's CNN (and its BatchNorm variant) at the digits' 8x8 size, with fixed local
    steps and augmentation."""
    torch.manual_seed(1)
    model = build_model(name, 1, 8, 10)
    data = _data(60, 1, 8, 10)
    spec = LocalSpec(lr=0.05, steps=3, batch_size=10, weight_decay=1e-3, clip=1.0, augment=True)
    seq, vec, ctx_seq, ctx_vec = _both_paths(model, data, [25, 20, 15], _method(method), spec)
    _assert_same(seq, vec, ctx_seq, ctx_vec)


def test_vmap_matches_sequential_on_resnet18():
    """ResNet-18 (BatchNorm2d everywhere) at 32x32: 2 clients, the second with a ragged batch."""
    torch.manual_seed(2)
    model = build_model("resnet18", 3, 32, 10)
    data = _data(11, 3, 32, 10)
    spec = LocalSpec(lr=0.05, epochs=1, batch_size=4, momentum=0.9, clip=5.0)
    seq, vec, ctx_seq, ctx_vec = _both_paths(model, data, [4, 7], _method("fedavg"), spec)
    assert [r.steps for r in seq] == [1, 2]
    _assert_same(seq, vec, ctx_seq, ctx_vec, atol=1e-4)


def _synthetic_plugin_term(k: int, classes: int = 3, dim: int = 8) -> Term:
    """A plug-in-like client term, FedGen's shape: the classifier head on features drawn
    per step from the term's own stream, with labels drawn too, weighted per client."""
    rng = torch.Generator().manual_seed(100 + k)

    def prepare(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "z": torch.randn(5, dim, generator=rng),
            "labels": torch.randint(0, classes, (5,), generator=rng),
        }

    def fn(params, client, shared, feats, logits, batch):
        head = F.linear(batch["z"], params["classifier.weight"], params["classifier.bias"])
        return client["w"] * F.cross_entropy(head, batch["labels"])

    return Term(fn, client={"w": torch.tensor(0.5 + k)}, prepare=prepare)


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "moon"])
def test_a_plug_in_term_composes_with_the_method_term_in_both_paths(method):
    torch.manual_seed(4)
    model = TinyNet()
    init = detached_state(model)
    data = _data(60, 1, 4, 3)
    spec = LocalSpec(lr=0.1, epochs=2, batch_size=8, momentum=0.9, clip=0.5)
    runs = _both_paths(model, data, [20, 13, 27], _method(method), spec, _synthetic_plugin_term)
    _assert_same(*runs)
    model.load_state_dict(init)
    plain = _both_paths(model, data, [20, 13, 27], _method(method), spec)[0]
    for a, b in zip(plain, runs[0], strict=True):  # the term did change the training
        assert not torch.allclose(a.state["classifier.weight"], b.state["classifier.weight"])
    # the plug-in draws from its own stream: the method's batches are the same as without it
    model.load_state_dict(init)
    ctx = _contexts(model, _method(method), 1, seed=7)[0]
    states = []
    for term in (None, _synthetic_plugin_term(0)):
        gen = torch.Generator().manual_seed(3)
        train_local(model, data, torch.arange(20), _method(method), ctx, spec, gen, term)
        states.append(gen.get_state())
    assert torch.equal(*states)


def test_combined_terms_add_up_on_their_own_inputs():
    a = Term(
        lambda p, c, s, f, lg, b: (p["w"] * c["u"]).sum() + b["x"].sum(),
        client={"u": torch.ones(2)},
    )
    b = Term(
        lambda p, c, s, f, lg, b: (p["w"] * s["v"]).sum() * b["e"].sum(),
        shared={"v": torch.full((2,), 3.0)},
        prepare=lambda x, y: {"e": y.float()},
    )
    both = combine_terms(a, None, b)
    params, x, y = {"w": torch.tensor([1.0, 2.0])}, torch.ones(3), torch.tensor([1, 2, 3])
    batch = both.inputs(x, y)
    assert set(batch) == {"x", "y", "1.e"}
    total = both(params, None, None, batch)
    assert float(total) == pytest.approx(3.0 + 3.0 + 9.0 * 6.0)
    assert combine_terms(None, a) is a and combine_terms(None) is None


def test_vmap_rejects_mismatched_inputs():
    model = TinyNet()
    ctxs = _contexts(model, ClientMethod(), 2, seed=0)
    with pytest.raises(ValueError):
        train_local_vmap(
            model,
            _data(8, 1, 4, 3),
            [torch.arange(4)],
            ClientMethod(),
            ctxs,
            LocalSpec(lr=0.1),
            [torch.Generator()],
        )


@pytest.mark.parametrize("vectorised", [False, True])
def test_bf16_runs_finite_and_differs_from_fp32(vectorised):
    torch.manual_seed(3)
    model = build_model("cnn", 1, 8, 10)
    data = _data(40, 1, 8, 10)
    method = _method("fedprox")

    def run(precision: str) -> list[LocalResult]:
        spec = LocalSpec(lr=0.05, epochs=1, batch_size=10, clip=1.0, precision=precision)
        seq, vec, *_ = _both_paths(model, data, [20, 20], method, spec)
        return vec if vectorised else seq

    fp32, bf16 = run("fp32"), run("bf16")
    for a, b in zip(fp32, bf16, strict=True):
        assert np.isfinite(b.loss) and b.steps == a.steps
        assert all(torch.isfinite(v.float()).all() for v in b.state.values())
        assert b.loss != a.loss
        assert not torch.equal(a.state["classifier.weight"], b.state["classifier.weight"])
        # bf16 is an approximation of the same training, not something else
        torch.testing.assert_close(
            b.state["classifier.weight"], a.state["classifier.weight"], atol=0.05, rtol=0
        )


@pytest.fixture(scope="module")
def digits_setup():
    cfg = RunConfig(
        clients=4, participation=1.0, rounds=2, local_epochs=1, alpha=0.5, seed=5, momentum=0.5
    ).validate()
    return prepare(cfg)


@pytest.mark.parametrize("method", ["scaffold", "moon"])
def test_engine_vmap_round_matches_sequential(digits_setup, method):
    """Two rounds of the simulator: same test accuracy and loss either way."""
    records = {}
    for mode in ("sequential", "vmap"):
        cfg = dataclasses.replace(digits_setup.cfg, client_batching=mode)
        runner = MethodRunner(dataclasses.replace(digits_setup, cfg=cfg), method, None)
        assert runner._vectorise_clients() == (mode == "vmap")
        records[mode] = [runner.run_round() for _ in range(2)]
    for a, b in zip(records["sequential"], records["vmap"], strict=True):
        # float summation order may flip at most one borderline test sample
        one_sample = 1.0 / len(digits_setup.test)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=1.01 * one_sample)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_engine_auto_batching_is_sequential_on_cpu(digits_setup):
    runner = MethodRunner(digits_setup, "fedavg", None)
    assert digits_setup.cfg.client_batching == "auto"
    assert runner._vectorise_clients() is (digits_setup.device.type == "cuda")


def _constant_plugin_term(k: int) -> Term:
    """A plug-in term of constant value 2 + k: it adds to the loss but not to the gradient,
    so training is exactly as without it and only the logging can tell."""

    def fn(params, client, shared, feats, logits, batch):
        return client["c"]

    return Term(fn, client={"c": torch.tensor(2.0 + k)})


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_train_loss_leaves_out_the_plug_in_term_which_is_logged_apart(method):
    torch.manual_seed(5)
    model = TinyNet()
    init = detached_state(model)
    data = _data(60, 1, 4, 3)
    spec = LocalSpec(lr=0.1, epochs=1, batch_size=8, momentum=0.9)
    sizes = [20, 13]
    seq, vec, _, _ = _both_paths(model, data, sizes, _method(method), spec, _constant_plugin_term)
    model.load_state_dict(init)
    plain_seq, plain_vec, _, _ = _both_paths(model, data, sizes, _method(method), spec)
    for k in range(len(sizes)):
        assert plain_seq[k].plugin_loss is None and plain_vec[k].plugin_loss is None
        assert seq[k].loss == plain_seq[k].loss  # the method's own loss, as without a plug-in
        assert vec[k].loss == pytest.approx(plain_vec[k].loss, rel=1e-6)
        assert seq[k].plugin_loss == pytest.approx(2.0 + k)
        assert vec[k].plugin_loss == pytest.approx(2.0 + k)
