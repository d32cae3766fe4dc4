"""FedFTG's server step: each piece against hand computations, ablations, and its effect."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedftg.errors import UserError
from fedftg.fl.ensemble import class_weights
from fedftg.plugins.distill import diversity_loss, sample_labels, within_class_distance
from fedftg.plugins.feddf import FedDFServer
from fedftg.plugins.ftg import (
    FTGServer,
    cls_loss,
    distill_loss,
    ensemble_target,
    md_loss,
)
from fedftg.plugins.specs.feddf import FedDFSettings
from fedftg.plugins.specs.ftg import FTGSettings

C = 4


class Net(nn.Module):
    """A tiny conv classifier with BatchNorm and the package's features/classifier split."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(24, C)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.features(x))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------- label sampling


def test_customized_labels_exact_proportions_and_absent_class():
    labels = sample_labels(np.array([30, 10, 0, 60]), 2, 50, _gen())
    assert labels.shape == (2, 50)
    assert torch.bincount(labels.flatten(), minlength=4).tolist() == [30, 10, 0, 60]


def test_customized_labels_fill_every_slot_and_never_sample_absent_classes():
    counts = np.array([7, 0, 3, 0, 11])
    labels = sample_labels(counts, 10, 50, _gen(1))
    hist = torch.bincount(labels.flatten(), minlength=5)
    assert int(hist.sum()) == 500 and hist[1] == 0 and hist[3] == 0
    expected = counts / counts.sum() * 500
    assert (hist.numpy() - expected).__abs__().max() <= 1
    assert not torch.equal(labels, sample_labels(counts, 10, 50, _gen(2)))  # shuffled by seed


def test_uniform_labels_cover_all_classes():
    labels = sample_labels(np.array([1, 0, 0, 0]), 10, 50, _gen(), mode="uniform")
    assert set(labels.flatten().tolist()) == {0, 1, 2, 3}


# ------------------------------------------------------------------- class weights


def test_class_weights_sum_to_one_over_holders_and_zero_without_class():
    counts = np.array([[5, 0, 1], [15, 0, 0], [0, 0, 3]])
    w = class_weights(counts)
    torch.testing.assert_close(w.sum(0)[[0, 2]], torch.ones(2), atol=1e-6, rtol=0)
    assert float(w[:, 1].sum()) == 0.0
    assert float(w[1, 2]) == 0.0 and float(w[2, 0]) == 0.0
    assert float(w[0, 0]) == pytest.approx(0.25, abs=1e-6)
    torch.testing.assert_close(class_weights(counts, "uniform"), torch.full((3, 3), 1 / 3))


# -------------------------------------------------------------------- loss terms


def test_md_loss_l1_and_kl_against_loops():
    torch.manual_seed(0)
    s, t, w = torch.randn(3, C), torch.randn(3, C), torch.tensor([0.2, 0.5, 1.0])
    expected = -sum(float(w[b]) * float((s[b] - t[b]).abs().mean()) for b in range(3)) / 3
    assert float(md_loss(s, t, w)) == pytest.approx(expected, rel=1e-6)
    temp = 2.0
    kl = 0.0
    for b in range(3):
        p = F.softmax(t[b] / temp, 0)
        q = F.softmax(s[b] / temp, 0)
        kl += float(w[b]) * float((p * (p.log() - q.log())).sum()) * temp**2
    assert float(md_loss(s, t, w, "kl", temp)) == pytest.approx(-kl / 3, rel=1e-5)


def test_md_loss_does_not_push_gradients_into_the_teacher():
    s = torch.randn(3, C, requires_grad=True)
    t = torch.randn(3, C, requires_grad=True)
    md_loss(s, t, torch.ones(3)).backward()
    assert t.grad is None and s.grad is not None


def test_cls_loss_is_batch_ce_times_mean_weight():
    torch.manual_seed(1)
    t, y, w = torch.randn(5, C), torch.tensor([0, 1, 2, 3, 0]), torch.rand(5)
    ce = sum(-float(F.log_softmax(t[b], 0)[y[b]]) for b in range(5)) / 5
    assert float(cls_loss(t, y, w)) == pytest.approx(ce * float(w.mean()), rel=1e-6)


def test_diversity_loss_equals_double_loop():
    torch.manual_seed(2)
    z, x = torch.randn(6, 5), torch.randn(6, 1, 3, 3)
    total = 0.0
    for i in range(6):
        for j in range(6):
            total += float(((z[i] - z[j]) ** 2).mean()) * float((x[i] - x[j]).abs().mean())
    assert float(diversity_loss(z, x)) == pytest.approx(math.exp(-total / 36), rel=1e-5)
    xg = x.clone().requires_grad_(True)
    diversity_loss(z, xg).backward()
    assert torch.isfinite(xg.grad).all()


def test_same_label_diversity_only_counts_pairs_that_share_a_label():
    torch.manual_seed(3)
    z, x = torch.randn(6, 5), torch.randn(6, 1, 3, 3)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j and y[i] == y[j]]
    total = sum(
        float(((z[i] - z[j]) ** 2).mean()) * float((x[i] - x[j]).abs().mean()) for i, j in pairs
    )
    got = float(diversity_loss(z, x, y))
    assert got == pytest.approx(math.exp(-total / len(pairs)), rel=1e-5)
    assert got != pytest.approx(float(diversity_loss(z, x)), rel=1e-3)
    # separating the classes does not help it; spreading a class does
    shifted = x + 5.0 * y.view(-1, 1, 1, 1)
    assert float(diversity_loss(z, shifted, y)) == pytest.approx(got, rel=1e-5)
    assert float(diversity_loss(z, shifted)) < float(diversity_loss(z, x))
    # no two samples share a label: a constant without gradient
    xg = x[:3].clone().requires_grad_(True)
    lone = diversity_loss(z[:3], xg, torch.tensor([0, 1, 2]))
    lone.backward()
    assert float(lone.detach()) == 1.0 and float(xg.grad.abs().sum()) == 0.0


def test_within_class_distance_by_hand_and_zero_at_collapse():
    x = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 2.0], [5.0, 5.0]]).view(4, 1, 1, 2)
    y = torch.tensor([0, 0, 1, 2])
    assert within_class_distance(x, y) == pytest.approx(2.0)  # only pair (0, 1): (1 + 3) / 2
    y3 = torch.tensor([0, 0, 0, 1])
    pairs = [(0, 1, 2.0), (0, 2, 2.0), (1, 2, 1.0)]
    assert within_class_distance(x, y3) == pytest.approx(sum(d for *_, d in pairs) / 3)
    collapsed = torch.ones(4, 1, 1, 2)
    assert within_class_distance(collapsed, y3) == 0.0
    assert within_class_distance(x, torch.arange(4)) is None


def test_ensemble_target_and_distill_loss():
    torch.manual_seed(3)
    logits, w = torch.randn(2, 3, C), torch.tensor([[0.25, 1.0, 0.0], [0.75, 0.0, 1.0]])
    p = ensemble_target(logits, w)
    manual = w[0, :, None] * F.softmax(logits[0], 1) + w[1, :, None] * F.softmax(logits[1], 1)
    torch.testing.assert_close(p, manual)
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    s = torch.randn(3, C)
    expected = -sum(float((p[b] * F.log_softmax(s[b], 0)).sum()) for b in range(3)) / (3 * C)
    assert float(distill_loss(s, p)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------- server step


def _trained_teachers() -> tuple[list[nn.Module], np.ndarray]:
    """Two teachers that each know half the classes (a non-IID pair)."""
    torch.manual_seed(0)
    teachers, counts = [], np.array([[40, 40, 0, 0], [0, 0, 40, 40]])
    for k in range(2):
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(30):
            y = torch.randint(0, 2, (32,)) + 2 * k
            x = torch.randn(32, 1, 8, 8) * 0.3 + y.view(-1, 1, 1, 1).float() - 1.5
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        teachers.append(net)
    return teachers, counts


def _server(**kw) -> FTGServer:
    cfg = FTGSettings(iterations=4, student_steps=3, batch_size=16, nz=8, ngf=8, **kw).validate()
    return FTGServer(cfg, C, 1, 8, seed=0)


def _divergence(server: FTGServer, student, teachers, counts) -> float:
    """Mean KL(weighted ensemble || student) on fresh generated samples (fixed seed)."""
    gen = _gen(123)
    y = sample_labels(counts.sum(0), 1, 64, gen)[0]
    x = server.generate(y, gen)
    student.eval()
    with torch.no_grad():
        w = class_weights(counts)[:, y]
        p = ensemble_target(torch.stack([t(x) for t in teachers]), w)
        return float(F.kl_div(F.log_softmax(student(x), 1), p, reduction="batchmean"))


def test_step_moves_student_toward_ensemble_and_leaves_teachers_alone():
    teachers, counts = _trained_teachers()
    before_teachers = [copy.deepcopy(t.state_dict()) for t in teachers]
    torch.manual_seed(9)
    student = Net()
    server = _server()
    server.step(student, teachers, counts, 0, _gen(0))  # warm up the generator
    before = _divergence(server, student, teachers, counts)
    for r in range(1, 4):
        metrics = server.step(student, teachers, counts, r, _gen(r))
    after = _divergence(server, student, teachers, counts)
    assert after < 0.7 * before, (before, after)
    for t, saved in zip(teachers, before_teachers, strict=True):
        for k, v in t.state_dict().items():
            assert torch.equal(v, saved[k])
        assert not t.training
    assert set(metrics) >= {"loss_md", "loss_cls", "loss_dis", "loss_gen", "loss_distill"}
    assert metrics["sample_spread"] > 0  # batch 50 over few classes: same-label pairs exist


@pytest.mark.parametrize("training", [True, False])
def test_generate_reads_the_generator_in_eval_mode_and_leaves_it_as_it_was(training):
    teachers, counts = _trained_teachers()
    server = _server()
    server.step(Net(), teachers, counts, 0, _gen(0))  # running statistics away from init
    server.generator.train(training)
    before = copy.deepcopy(server.generator.state_dict())
    y = torch.tensor([0, 1, 2, 2, 1, 0, 3, 3])
    x = server.generate(y, _gen(7))
    gen = _gen(7)
    z = torch.randn(len(y), server.cfg.nz, generator=gen)
    with torch.no_grad():
        ref = copy.deepcopy(server.generator).eval()(z, F.one_hot(y, C).float())
    assert torch.equal(x, ref)
    assert server.generator.training is training
    for k, v in server.generator.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_generator_state_persists_across_rounds_and_checkpoints():
    teachers, counts = _trained_teachers()
    server = _server()
    student = Net()
    s0 = server.state_dict()
    server.step(student, teachers, counts, 0, _gen(0))
    s1 = server.state_dict()
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert any("running_mean" in k for k in s1)
    clone = _server()
    clone.load_state_dict(s1)
    for k in s1:
        assert torch.equal(clone.state_dict()[k], s1[k])
    # the next round continues from the carried state: same result from the clone
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    server.step(a, teachers, counts, 1, _gen(5))
    clone.step(b, teachers, counts, 1, _gen(5))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    fresh = _server()
    c = copy.deepcopy(student)
    fresh.step(c, teachers, counts, 1, _gen(5))
    assert any(
        not torch.equal(v, w)
        for v, w in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def _run(student_seed: int = 4, **kw):
    teachers, counts = _trained_teachers()
    torch.manual_seed(student_seed)
    student = Net()
    server = _server(**kw)
    metrics = server.step(student, teachers, counts, 0, _gen(0))
    return student, server, metrics


def test_same_seed_same_result():
    a, _, _ = _run()
    b, _, _ = _run()
    assert all(
        torch.equal(v, w)
        for v, w in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "ablation",
    [
        {"hard_mining": False},
        {"label_sampling": "uniform"},
        {"ensemble": "uniform"},
        {"md_distance": "kl"},
        {"diversity": "same_label"},
    ],
)
def test_each_ablation_changes_the_computation(ablation):
    base_student, base_server, base_m = _run()
    student, server, m = _run(**ablation)
    gen_differs = any(
        not torch.equal(v, w)
        for v, w in zip(
            base_server.state_dict().values(), server.state_dict().values(), strict=True
        )
    )
    assert gen_differs
    if "hard_mining" in ablation:
        assert m["loss_md"] == 0.0 and base_m["loss_md"] < 0.0


def test_student_lr_zero_only_re_estimates_batchnorm_statistics():
    """The BatchNorm-only control: weights stay, running statistics follow G's samples."""
    torch.manual_seed(4)
    before = Net()  # the student _run starts from
    student, server, _ = _run(student_lr=0.0)
    trained, _, _ = _run()
    for (name, v), w, t in zip(
        student.state_dict().items(),
        before.state_dict().values(),
        trained.state_dict().values(),
        strict=True,
    ):
        if "running" in name:
            assert not torch.equal(v, w), name  # re-estimated on generated samples
        elif "num_batches" not in name:
            assert torch.equal(v, w), name  # weights untouched
            assert not torch.equal(t, w), name  # which the default step does change
    assert any(
        not torch.equal(v, w)
        for v, w in zip(server.state_dict().values(), _server().state_dict().values(), strict=True)
    )
    with pytest.raises(UserError, match="student_lr"):
        FTGSettings(student_lr=-0.1).validate()


@pytest.mark.parametrize("server_cls", ["ftg", "df"])
def test_bn_stats_aggregate_keeps_the_statistics_and_changes_only_them(server_cls):
    """bn_stats="aggregate": the step's weights as with the default, the statistics as given."""
    teachers, counts = _trained_teachers()
    torch.manual_seed(4)
    start = Net()
    results = {}
    for mode in ("generated", "aggregate"):
        if server_cls == "ftg":
            server = _server(bn_stats=mode)
        else:
            cfg = FedDFSettings(gen_steps=3, student_steps=3, batch_size=16, nz=8, ngf=8)
            server = FedDFServer(replace(cfg, bn_stats=mode).validate(), C, 1, 8, seed=0)
        student = copy.deepcopy(start)
        server.step(student, teachers, counts, 0, _gen(0))
        results[mode] = dict(student.named_parameters()), dict(student.named_buffers())
    (w_gen, b_gen), (w_agg, b_agg) = results["generated"], results["aggregate"]
    for name, v in start.named_parameters():
        assert torch.equal(w_gen[name], w_agg[name]), name
        assert not torch.equal(w_agg[name], v), name
    for name, v in start.named_buffers():
        assert torch.equal(b_agg[name], v), name
        if "running" in name:
            assert not torch.equal(b_gen[name], v), name
    with pytest.raises(UserError, match="bn_stats"):
        FTGSettings(bn_stats="real").validate()


def test_feddf_moves_student_toward_teacher_average():
    teachers, counts = _trained_teachers()
    torch.manual_seed(9)
    student = Net()
    cfg = FedDFSettings(gen_steps=10, student_steps=15, batch_size=16, nz=8, ngf=8).validate()
    server = FedDFServer(cfg, C, 1, 8, seed=0)

    def kl_to_average() -> float:
        gen = _gen(77)
        y = torch.randint(0, C, (64,), generator=gen)
        z = torch.randn(64, 8, generator=gen)
        with torch.no_grad():
            x = copy.deepcopy(server.generator).eval()(z, F.one_hot(y, C).float())
            p = torch.stack([F.softmax(t(x), 1) for t in teachers]).mean(0)
            student.eval()
            return float(F.kl_div(F.log_softmax(student(x), 1), p, reduction="batchmean"))

    server.step(student, teachers, counts, 0, _gen(0))
    before = kl_to_average()
    server.step(student, teachers, counts, 1, _gen(1))
    server.step(student, teachers, counts, 2, _gen(2))
    assert kl_to_average() < before


def test_feddf_same_label_diversity_changes_the_generator():
    teachers, counts = _trained_teachers()
    states = []
    for diversity in ("all", "same_label"):
        cfg = FedDFSettings(
            gen_steps=3, student_steps=1, batch_size=16, nz=8, ngf=8, diversity=diversity
        ).validate()
        server = FedDFServer(cfg, C, 1, 8, seed=0)
        torch.manual_seed(9)
        server.step(Net(), teachers, counts, 0, _gen(0))
        states.append(server.state_dict())
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    with pytest.raises(UserError, match="diversity"):
        FedDFSettings(diversity="pairs").validate()
