"""Stacked teachers and the fast server steps against their simple reference paths."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedftg.models import build_model
from fedftg.models.stacked import ReloadingModels, StackedModels, as_teachers
from fedftg.plugins.feddf import FedDFServer
from fedftg.plugins.ftg import FTGServer
from fedftg.plugins.specs.feddf import FedDFSettings
from fedftg.plugins.specs.ftg import FTGSettings


def _clients(name: str, k: int, channels: int, size: int) -> list[torch.nn.Module]:
    """K models of one architecture with different weights and BatchNorm statistics."""
    out = []
    for j in range(k):
        torch.manual_seed(j)
        net = build_model(name, channels, size, 10)
        net.train()
        with torch.no_grad():
            net(torch.randn(16, channels, size, size) * (1 + j))  # distinct running stats
        out.append(net.eval())
    return out


@pytest.mark.parametrize(
    "name,channels,size", [("cnn", 1, 8), ("cnn-bn", 1, 8), ("resnet18", 3, 32)]
)
def test_stacked_models_match_the_modules(name, channels, size):
    nets = _clients(name, 3, channels, size)
    stacked = StackedModels.from_modules(nets)
    reload = ReloadingModels.from_modules(nets)
    x = torch.randn(5, channels, size, size)
    with torch.no_grad():
        want = torch.stack([n(x) for n in nets])
        assert len(stacked) == len(reload) == 3
        torch.testing.assert_close(stacked.all(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reload.all(x), want, rtol=0, atol=0)
        for j in range(3):
            torch.testing.assert_close(stacked.one(j, x), want[j], rtol=1e-5, atol=1e-6)


def test_stacked_one_model_is_differentiable_in_its_input_and_copies_nothing():
    nets = _clients("cnn", 2, 1, 8)
    stacked = StackedModels.from_modules(nets)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    stacked.one(1, x).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    nets[1](ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)
    view = stacked.state(1)
    name = next(iter(stacked.params))
    assert view[name].data_ptr() != stacked.params[name].data_ptr()  # a slice, not the base
    assert (
        view[name].untyped_storage().data_ptr() == stacked.params[name].untyped_storage().data_ptr()
    )
    assert as_teachers(stacked) is stacked
    assert isinstance(as_teachers(nets, "reference"), ReloadingModels)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _server_pair(cls, cfg_cls, **kw):
    common = dict(batch_size=12, nz=8, ngf=8, **kw)
    fast = cls(cfg_cls(impl="fast", **common).validate(), 10, 3, 32, seed=0)
    ref = cls(cfg_cls(impl="reference", **common).validate(), 10, 3, 32, seed=0)
    return fast, ref


@pytest.mark.parametrize(
    "cls,cfg_cls,kw,model",
    [
        (FTGServer, FTGSettings, {"iterations": 3, "student_steps": 3}, "cnn-bn"),
        (FedDFServer, FedDFSettings, {"gen_steps": 3, "student_steps": 3}, "cnn"),
    ],
)
def test_fast_server_step_equals_reference(cls, cfg_cls, kw, model, float64):
    """Same student, generator, losses from the fast and the authors'-structure paths.

    In float64: the generator's conv biases feed BatchNorm, so their true gradient is zero
    and Adam turns float32 rounding noise in it into full-size steps that shift the
    running means; float32 results of two correct implementations drift apart there.
    The students are small CNNs (FedFTG's with BatchNorm, so BatchNorm teachers and a
    train-mode BatchNorm student are covered): student steps on a ResNet-18 in train mode
    amplify float64 summation-order differences (BatchNorm over near-constant channels of
    generated inputs), to ~1e-4 within a few FedDF steps and, on an Intel Xeon, to ~5e-7
    relative within two FedFTG rounds, so the outcome would depend on the CPU's kernels.
    """
    teachers = _clients(model, 3, 3, 32)
    counts = np.array(
        [
            [30, 0, 5, 0, 0, 0, 0, 0, 0, 9],
            [0, 20, 5, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 8, 8, 8, 8, 0, 0],
        ]
    )
    torch.manual_seed(11)
    student = build_model(model, 3, 32, 10).eval()
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    fast, ref = _server_pair(cls, cfg_cls, **kw)
    for r in range(2):
        m_fast = fast.step(a, teachers, counts, r, torch.Generator().manual_seed(r))
        m_ref = ref.step(b, teachers, counts, r, torch.Generator().manual_seed(r))
    for key in m_ref:
        assert m_fast[key] == pytest.approx(m_ref[key], rel=1e-9, abs=1e-12), key
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")
    for (k, v), w in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")
    moved = any(
        not torch.allclose(v, w)
        for v, w in zip(a.state_dict().values(), student.state_dict().values(), strict=True)
    )
    assert moved


def test_bf16_server_step_runs_and_differs_from_fp32():
    teachers = _clients("cnn", 2, 1, 8)
    counts = np.array([[5, 5, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 5, 5, 0, 0, 0, 0, 0, 0]])
    results = []
    for precision in ("fp32", "bf16"):
        cfg = FTGSettings(iterations=2, student_steps=2, batch_size=8, nz=8, ngf=8).validate()
        server = FTGServer(cfg, 10, 1, 8, seed=0, precision=precision)
        torch.manual_seed(3)
        student = build_model("cnn", 1, 8, 10)
        m = server.step(student, teachers, counts, 0, torch.Generator().manual_seed(0))
        assert all(np.isfinite(v) for v in m.values())
        results.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert not torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], results[1], rtol=0.05, atol=0.05)
