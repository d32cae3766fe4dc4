"""The FTG/FedDF step's settings beyond the paper (issue 33): the BatchNorm-statistics loss on
the generator, the generator's moving average, the pooled BatchNorm statistics; each against
a hand computation, and each off by default (the step stays the authors')."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clirun import run_cli
from fedftg.config import RunConfig, fingerprint
from fedftg.fl.ensemble import class_weights
from fedftg.models import build_model
from fedftg.models.bn_stats import (
    bn_gap_recorder,
    bn_statistics_gap,
    load_pooled_statistics,
    pooled_statistics,
)
from fedftg.models.stacked import ReloadingModels, StackedModels
from fedftg.plugins.distill import EMA, ema_update, sample_labels
from fedftg.plugins.feddf import FedDFServer
from fedftg.plugins.ftg import FTGServer
from fedftg.plugins.specs.feddf import FedDFSettings
from fedftg.plugins.specs.ftg import FTGSettings

COUNTS = np.array(
    [
        [30, 0, 5, 0, 0, 0, 0, 0, 0, 9],
        [0, 20, 5, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 8, 8, 8, 8, 0, 0],
    ]
)


def _clients(k: int = 3, name: str = "cnn-bn") -> list[nn.Module]:
    """K models with different weights and BatchNorm statistics (as tests/test_stacked.py)."""
    out = []
    for j in range(k):
        torch.manual_seed(j)
        net = build_model(name, 1, 8, 10)
        net.train()
        with torch.no_grad():
            net(torch.randn(16, 1, 8, 8) * (1 + j))
        out.append(net.eval())
    return out


def _student(name: str = "cnn-bn") -> nn.Module:
    torch.manual_seed(11)
    return build_model(name, 1, 8, 10).eval()


def _server(plugin: str = "ftg", **kw) -> FTGServer:
    common = dict(batch_size=12, nz=8, ngf=8, **kw)
    if plugin == "ftg":
        return FTGServer(FTGSettings(iterations=3, student_steps=3, **common).validate(), 10, 1, 8)
    cfg = FedDFSettings(gen_steps=3, student_steps=3, **common).validate()
    return FedDFServer(cfg, 10, 1, 8)


def _rounds(server: FTGServer, student: nn.Module, teachers, n: int = 2) -> dict[str, float]:
    for r in range(n):
        metrics = server.step(student, teachers, COUNTS, r, torch.Generator().manual_seed(r))
    return metrics


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, b[k]) for k, v in a.items())


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------ BatchNorm-statistics gap


def _hand_gap(x: torch.Tensor, mean: list[float], var: list[float]) -> float:
    """DeepInversion's r_feature by loops: per channel over batch and pixels, biased var."""
    sq_mean = sq_var = 0.0
    for c in range(x.shape[1]):
        vals = [float(v) for v in x[:, c].flatten()]
        m = sum(vals) / len(vals)
        v = sum((u - m) ** 2 for u in vals) / len(vals)
        sq_mean += (m - mean[c]) ** 2
        sq_var += (v - var[c]) ** 2
    return math.sqrt(sq_var) + math.sqrt(sq_mean)


def test_bn_gap_of_two_batchnorm_layers_against_a_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2)).eval()
    stats = {0: ([0.5, -1.0], [2.0, 0.25]), 1: ([0.1, 0.3], [1.5, 0.8])}
    with torch.no_grad():
        for i, (m, v) in stats.items():
            net[i].running_mean.copy_(torch.tensor(m))
            net[i].running_var.copy_(torch.tensor(v))
    x = torch.randn(3, 2, 2, 2) * 1.7 + 0.4
    # the second layer's input is the first's output: (x - m) / sqrt(v + eps) (weight 1, bias 0)
    m0, v0 = (torch.tensor(s).view(1, 2, 1, 1) for s in stats[0])
    h = (x - m0) / torch.sqrt(v0 + net[0].eps)
    want = _hand_gap(x, *stats[0]) + _hand_gap(h, *stats[1])
    with bn_gap_recorder(net) as gaps, torch.no_grad():
        net(x)
    assert len(gaps) == 2
    assert float(sum(gaps)) == pytest.approx(want, rel=1e-5)
    assert float(bn_statistics_gap(x, *map(torch.tensor, stats[0]))) == pytest.approx(
        _hand_gap(x, *stats[0]), rel=1e-5
    )
    with bn_gap_recorder(net) as gaps:
        pass
    net(x)  # the hooks are gone after the context
    assert gaps == []


def test_bn_gap_of_the_teacher_sets_is_each_teachers_own_and_zero_without_batchnorm():
    nets = _clients()
    x = torch.randn(5, 1, 8, 8)
    for teachers in (StackedModels.from_modules(nets), ReloadingModels.from_modules(nets)):
        logits, gaps = teachers.all_with_bn_gap(x)
        torch.testing.assert_close(logits, teachers.all(x))
        for j, net in enumerate(nets):
            with bn_gap_recorder(net) as mine:
                want_logits = net(x)
            one_logits, one_gap = teachers.one_with_bn_gap(j, x)
            torch.testing.assert_close(one_logits, want_logits, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(one_gap, sum(mine), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gaps[j], sum(mine), rtol=1e-5, atol=1e-6)
    plain = StackedModels.from_modules(_clients(name="cnn"))
    assert float(plain.one_with_bn_gap(0, x)[1]) == 0.0
    assert torch.equal(plain.all_with_bn_gap(x)[1], torch.zeros(3))


def _first_draw(plugin: str, server: FTGServer, counts: np.ndarray):
    """The labels and noise of the step's first generator step (round 0, seed 0)."""
    gen = torch.Generator().manual_seed(0)
    b = server.cfg.batch_size
    if plugin == "ftg":
        y = sample_labels(counts.sum(0), server.cfg.iterations, b, gen)[0]
    else:
        y = sample_labels((counts.sum(0) > 0).astype(np.float64), 1, b, gen)[0]
    z = torch.randn(b, server.cfg.nz, generator=gen)
    return z, y


def _one_step_server(plugin: str, gen_lr: float) -> FTGServer:
    """A step of one generator step with the BatchNorm loss as the generator's only term
    (FedDF keeps its cross-entropy) and one student step."""
    quiet = dict(lambda_dis=0.0, gen_steps=1, student_steps=1, gen_lr=gen_lr, bn_loss=2.0)
    if plugin == "ftg":
        cfg = FTGSettings(iterations=1, lambda_cls=0.0, hard_mining=False, **quiet)
        return FTGServer(replace(cfg, batch_size=12, nz=8, ngf=8).validate(), 10, 1, 8)
    cfg = FedDFSettings(**quiet)
    return FedDFServer(replace(cfg, batch_size=12, nz=8, ngf=8).validate(), 10, 1, 8)


def _gaps(plugin: str, server: FTGServer, teachers, counts) -> torch.Tensor:
    """Each teacher's gap on the first generator step's batch, from the current generator."""
    z, y = _first_draw(plugin, server, counts)
    with torch.no_grad():
        x = copy.deepcopy(server.generator).train()(z, F.one_hot(y, 10).float())
        return StackedModels.from_modules(teachers).all_with_bn_gap(x)[1], y


@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_bn_loss_weighs_each_teachers_gap_on_the_generated_batch(plugin):
    """FedFTG: teacher k's step adds its gap times its mean class-level weight on the batch;
    FedDF: the mean over the teachers. A learning rate of 1e-12 keeps the generator the same
    through FedFTG's K steps, so each sees the first batch."""
    teachers = _clients(3)
    server = _one_step_server(plugin, gen_lr=1e-12)
    gaps, y = _gaps(plugin, server, teachers, COUNTS)
    metrics = server.step(_student(), teachers, COUNTS, 0, torch.Generator().manual_seed(0))
    if plugin == "ftg":
        weights = class_weights(COUNTS)[:, y].mean(dim=1)  # (K,)
        assert not torch.allclose(weights, torch.ones(3))  # so the weighting is visible
        want = float((gaps * weights).mean())  # the round's mean over its K steps
        assert metrics["loss_gen"] == pytest.approx(2.0 * metrics["loss_bn"], rel=1e-6)
    else:
        want = float(gaps.mean())
    assert metrics["loss_bn"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_bn_loss_step_lowers_the_gap_on_its_batch(plugin):
    teachers = _clients(1)
    counts = COUNTS[:1]
    server = _one_step_server(plugin, gen_lr=1e-3)
    before, _ = _gaps(plugin, server, teachers, counts)
    server.step(_student(), teachers, counts, 0, torch.Generator().manual_seed(0))
    after, _ = _gaps(plugin, server, teachers, counts)
    assert float(after) < float(before)


@pytest.mark.parametrize("name", ["cnn", pytest.param("resnet18-gn", marks=pytest.mark.slow)])
def test_the_batchnorm_options_leave_a_model_without_batchnorm_as_the_authors_step(name):
    """bn_loss and bn_stats=pooled (the robust preset's setting) act on BatchNorm layers
    only: on a model without them (GroupNorm ResNet-18, where the authors' step already
    wins) the step is the authors' to the bit, so they cannot break it there."""
    teachers = _clients(name=name)
    out = []
    for options in ({}, {"bn_loss": 1.0}, {"bn_stats": "pooled"}):
        student = _student(name)
        server = _server(**options)
        metrics = _rounds(server, student, teachers, n=1)
        out.append((student.state_dict(), server.state_dict(), metrics))
    for state, gen, _ in out[1:]:
        assert not _differs(out[0][0], state) and not _differs(out[0][1], gen)
    assert out[1][2]["loss_bn"] == 0.0


# ------------------------------------------------------------------ generator average


def test_ema_update_follows_its_formula():
    torch.manual_seed(0)
    avg, model = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        model.running_mean.normal_()
        model.num_batches_tracked.fill_(7)
    before = copy.deepcopy(avg.state_dict())
    ema_update(avg, model, 0.75)
    for name, value in avg.state_dict().items():
        if name == "num_batches_tracked":
            assert int(value) == 7
        else:
            want = 0.75 * before[name] + 0.25 * model.state_dict()[name]
            torch.testing.assert_close(value, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_gen_ema_averages_after_every_generator_step(plugin, monkeypatch):
    """The average equals the recursion a <- D a + (1 - D) g over the generator states
    after each of its steps, starting from the initial generator."""
    decay = 0.6
    server = _server(plugin, gen_ema=decay)
    average = {k: v.clone() for k, v in server.generator.state_dict().items()}
    stepped = server._generator_stepped
    n_steps = []

    def record() -> None:
        for k, v in server.generator.state_dict().items():
            average[k] = decay * average[k] + (1 - decay) * v if v.is_floating_point() else v
        n_steps.append(1)
        stepped()

    monkeypatch.setattr(server, "_generator_stepped", record)
    _rounds(server, _student(), _clients(), n=1)
    assert len(n_steps) == (3 * 3 if plugin == "ftg" else 3)  # I * K, or FedDF's steps
    for k, v in server.gen_ema.state_dict().items():
        torch.testing.assert_close(v, average[k], rtol=1e-5, atol=1e-6)
    assert _differs(server.gen_ema.state_dict(), server.generator.state_dict())


def test_gen_ema_draws_the_students_samples_only():
    """With one iteration the generator trains as by default (its steps come before any
    student step), while the student learns from the average's samples."""
    teachers = _clients()
    out = {}
    for decay in (0.0, 0.9):
        cfg = FTGSettings(iterations=1, student_steps=3, batch_size=12, nz=8, ngf=8, gen_ema=decay)
        server = FTGServer(cfg.validate(), 10, 1, 8)
        student = _student()
        server.step(student, teachers, COUNTS, 0, torch.Generator().manual_seed(0))
        out[decay] = student.state_dict(), server.generator.state_dict(), server
    (s0, g0, plain), (s9, g9, averaged) = out[0.0], out[0.9]
    assert not _differs(g0, g9)
    assert _differs(s0, s9)
    y = torch.arange(4)
    want = copy.deepcopy(averaged.gen_ema).eval()
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 8, generator=gen)
    with torch.no_grad():
        expected = want(z, F.one_hot(y, 10).float())
    assert torch.equal(averaged.generate(y, torch.Generator().manual_seed(3)), expected)
    assert set(plain.state_dict()) == set(g0)  # off: the state is the generator's alone


def test_gen_ema_is_in_the_state_and_a_state_without_it_still_loads():
    teachers = _clients()
    server = _server(gen_ema=0.8)
    _rounds(server, _student(), teachers, n=1)
    state = server.state_dict()
    assert {k for k in state if k.startswith(EMA)} == {
        EMA + k for k in server.generator.state_dict()
    }
    clone = _server(gen_ema=0.8)
    clone.load_state_dict(state)
    a, b = _student(), _student()
    server.step(a, teachers, COUNTS, 1, torch.Generator().manual_seed(5))
    clone.step(b, teachers, COUNTS, 1, torch.Generator().manual_seed(5))
    assert not _differs(a.state_dict(), b.state_dict())
    # a state written without the average (gen_ema off, or before it existed)
    old = {k: v for k, v in state.items() if not k.startswith(EMA)}
    late = _server(gen_ema=0.8)
    late.load_state_dict(old)
    assert not _differs(late.gen_ema.state_dict(), late.generator.state_dict())
    assert not _differs(late.generator.state_dict(), old)


# ------------------------------------------------------------------- generator reset


@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_gen_reset_restarts_the_generator_at_its_rounds_only(plugin, monkeypatch):
    """With K = 2 the step of rounds 2 and 4 (0-based) starts from the generator that the
    run's seed and the round give, with its average equal to it; the others carry on."""
    server = _server(plugin, gen_reset=2, gen_ema=0.5)
    fine_tune = server._fine_tune
    entry: dict[int, tuple[dict, dict]] = {}

    def record(student, teachers, counts, round_idx, generator):
        entry[round_idx] = (
            copy.deepcopy(server.generator.state_dict()),
            copy.deepcopy(server.gen_ema.state_dict()),
        )
        return fine_tune(student, teachers, counts, round_idx, generator)

    monkeypatch.setattr(server, "_fine_tune", record)
    student, teachers = _student(), _clients()
    after = []
    for r in range(5):
        server.step(student, teachers, COUNTS, r, torch.Generator().manual_seed(r))
        after.append(copy.deepcopy(server.generator.state_dict()))
    initial = _server(plugin).generator.state_dict()
    assert not _differs(entry[0][0], initial)
    for r in (1, 3):
        assert not _differs(entry[r][0], after[r - 1]), r
    for r in (2, 4):
        fresh = _server(plugin)
        fresh.reset_generator(r)
        assert not _differs(entry[r][0], fresh.generator.state_dict()), r
        assert not _differs(entry[r][1], entry[r][0]), r
        assert _differs(entry[r][0], after[r - 1]) and _differs(entry[r][0], initial), r
    assert _differs(entry[2][0], entry[4][0])


def test_gen_reset_makes_the_step_independent_of_the_carried_generator():
    """At a reset round the step's result does not depend on the generator state a resumed
    run loaded; at other rounds it does."""
    teachers = _clients()
    carried = _server(gen_reset=3)
    _rounds(carried, _student(), teachers, n=1)
    results = {}
    for name, state in (("carried", carried.state_dict()), ("initial", None)):
        for r in (1, 3):
            server = _server(gen_reset=3)
            if state is not None:
                server.load_state_dict(state)
            student = _student()
            server.step(student, teachers, COUNTS, r, torch.Generator().manual_seed(9))
            results[name, r] = student.state_dict()
    assert not _differs(results["carried", 3], results["initial", 3])
    assert _differs(results["carried", 1], results["initial", 1])


# --------------------------------------------------------- pooled BatchNorm statistics


def test_pooled_statistics_are_those_of_the_pooled_data():
    torch.manual_seed(0)
    parts = [torch.randn(n, 3) * s + m for n, s, m in ((40, 1.0, 0.0), (10, 2.0, 3.0))]
    means = torch.stack([p.mean(0) for p in parts])
    variances = torch.stack([p.var(0, correction=0) for p in parts])
    mean, var = pooled_statistics(means, variances, torch.tensor([40.0, 10.0]))
    data = torch.cat(parts)
    torch.testing.assert_close(mean, data.mean(0))
    torch.testing.assert_close(var, data.var(0, correction=0))
    # by hand on one channel: weights 0.8 / 0.2, means 0 / 3, variances 1 / 4
    m, v = pooled_statistics(
        torch.tensor([[0.0], [3.0]]), torch.tensor([[1.0], [4.0]]), torch.tensor([4.0, 1.0])
    )
    assert float(m) == pytest.approx(0.6)
    assert float(v) == pytest.approx(0.8 * 1 + 0.2 * (4 + 9) - 0.36)


@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_bn_stats_pooled_keeps_the_weights_of_the_step_and_pools_the_teachers(plugin):
    teachers = _clients()
    states = {}
    for mode in ("generated", "pooled"):
        student = _student()
        _rounds(_server(plugin, bn_stats=mode), student, teachers, n=1)
        states[mode] = student
    gen, pooled = states["generated"], states["pooled"]
    for (name, v), w in zip(gen.named_parameters(), pooled.parameters(), strict=True):
        assert torch.equal(v, w), name
    sizes = torch.tensor(COUNTS.sum(1), dtype=torch.float64)
    expected = copy.deepcopy(pooled)
    load_pooled_statistics(expected, [t.state_dict() for t in teachers], sizes)
    bn = [n for n, m in pooled.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn
    for name in bn:
        for stat in ("running_mean", "running_var"):
            got = pooled.state_dict()[f"{name}.{stat}"]
            torch.testing.assert_close(got, expected.state_dict()[f"{name}.{stat}"])
            assert not torch.equal(got, gen.state_dict()[f"{name}.{stat}"])
        layer = [t.get_submodule(name) for t in teachers]
        n = COUNTS.sum(1) / COUNTS.sum()
        mean = sum(w * t.running_mean for w, t in zip(n, layer, strict=True))
        torch.testing.assert_close(pooled.get_submodule(name).running_mean, mean.float())
    assert int(pooled.state_dict()[f"{bn[0]}.num_batches_tracked"]) == int(
        _student().state_dict()[f"{bn[0]}.num_batches_tracked"]
    )  # the aggregate's counter, as with bn_stats=aggregate


# ---------------------------------------------------------------- defaults and paths

# today's step (before these settings existed), float64, 2 rounds, cnn-bn: sum of the
# student's state, sum of its absolute values, sum of the generator's state
GOLDEN = {
    "ftg": (139.9919542675358, 5372.758694418944, 144.99073939755925, 0.7826996755521249),
    "df": (145.64833624291575, 5378.187402045675, 96.76149182290864, 2.3040200041618544),
}


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_every_new_setting_at_its_default_is_todays_step(plugin, impl, float64):
    student = _student()
    server = _server(plugin, impl=impl, bn_loss=0.0, gen_ema=0.0, bn_stats="generated", gen_reset=0)
    metrics = _rounds(server, student, _clients())
    state = student.state_dict().values()
    got = (
        sum(float(v.double().sum()) for v in state),
        sum(float(v.double().abs().sum()) for v in state),
        sum(float(v.double().sum()) for v in server.state_dict().values()),
        metrics["loss_gen" if plugin == "ftg" else "loss_cls"],
    )
    assert got == pytest.approx(GOLDEN[plugin], rel=1e-7)
    assert "loss_bn" not in metrics and server.gen_ema is None


OPTIONS = {"bn_loss": 2.0, "gen_ema": 0.7, "bn_stats": "pooled"}


# The two loop structures sum in different orders, and which order a kernel takes depends on
# the CPU's vector width: the largest difference on any weight or generator entry, measured
# on one machine with torch's AVX2 and AVX-512 kernels, is 0.8-1.5e-10 without the reset and
# 1.6-2.6e-10 with it (its fresh generator takes larger steps). 1e-10 failed on AVX-512.
ATOL = 1e-9


@pytest.mark.parametrize("reset", [0, 1])
@pytest.mark.parametrize("plugin", ["ftg", "df"])
def test_fast_step_equals_reference_with_every_option_on(plugin, reset, float64):
    """As tests/test_stacked.py for the default: same student, generator (and its average)
    and losses from the stacked teachers and the authors' loop structure."""
    teachers = _clients()
    out = []
    for impl in ("fast", "reference"):
        student = _student()
        server = _server(plugin, impl=impl, gen_reset=reset, **OPTIONS)
        metrics = _rounds(server, student, teachers)
        out.append((metrics, student.state_dict(), server.state_dict()))
    (m_fast, s_fast, g_fast), (m_ref, s_ref, g_ref) = out
    assert m_fast.keys() == m_ref.keys() and "loss_bn" in m_fast
    for key in m_ref:
        assert m_fast[key] == pytest.approx(m_ref[key], rel=1e-9, abs=1e-12), key
    for a, b in ((s_fast, s_ref), (g_fast, g_ref)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=ATOL)
    assert any(k.startswith(EMA) for k in g_fast)


# ------------------------------------------------------------- settings and fingerprint


def test_new_settings_are_fingerprinted_and_older_run_directories_still_match():
    base = RunConfig(method=["fedavg", "fedftg"]).validate().resolve().to_dict()
    older = copy.deepcopy(base)
    for key in ("bn_loss", "gen_ema", "gen_reset"):  # a config.json from before they existed
        del older["ftg"][key]
        del older["df"][key]
    assert fingerprint(older) == fingerprint(base)
    changes = (("bn_loss", 1.0), ("gen_ema", 0.9), ("bn_stats", "pooled"), ("gen_reset", 1))
    for key, value in changes:
        changed = copy.deepcopy(base)
        changed["ftg"][key] = value
        assert fingerprint(changed) != fingerprint(base), key


def test_flags_are_checked_with_one_error_line(tmp_path, capsys):
    for flag, value, phrase in (
        ("--ftg-gen-ema", "1", "ftg.gen_ema: must be in [0, 1)"),
        ("--ftg-bn-loss", "-1", "ftg.bn_loss: must be a finite number >= 0"),
        ("--df-bn-stats", "mixture", "df.bn_stats: unknown value"),
        ("--ftg-gen-reset", "-1", "ftg.gen_reset: must be"),
        ("--df-gen-reset", "1.5", "df.gen_reset: expected an integer"),
    ):
        args = ["run", "--method", "fedftg,feddf", flag, value, "--out", str(tmp_path)]
        code, _, err = run_cli(capsys, args)
        assert code == 2
        assert err.count("error: ") == 1 and phrase in err and "Traceback" not in err, err
