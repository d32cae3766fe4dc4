"""FedGen's maths: each loss against numpy, the schedules, vmap over clients, the server step."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from fedftg.data.sources import shaped_datasets
from fedftg.errors import UserError
from fedftg.models import build_model
from fedftg.models.feature_generator import FeatureGenerator, generator_dims
from fedftg.models.stacked import StackedModels
from fedftg.plugins.fedgen import (
    ClientCoefficients,
    build_generator,
    client_coefficients,
    client_loss,
    client_terms,
    ensemble_logits,
    generative_schedule,
    generator_loss,
    generator_optimizer,
    head_logits,
    label_weights,
    prepare_client_inputs,
    sample_uniform,
    student_kl,
    teacher_loss,
    train_generator,
)
from fedftg.plugins.specs.fedgen import FedGenSettings


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np_log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=-1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))


def _t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)


# -------------------------------------------------------------------------- generator


def test_generator_dims_follow_the_authors_entries():
    dims = {name: generator_dims(shape[0]) for name, shape in shaped_datasets().items()}
    mnist, cifar = (256, 32), (512, 64)
    assert dims == {
        "digits": mnist,
        "mnist": mnist,
        "fmnist": mnist,
        "cifar10": cifar,
        "cifar100": cifar,
    }
    assert generator_dims(1) == mnist and generator_dims(3) == cifar  # image folders


@pytest.mark.parametrize("name", ["cnn", "cnn-bn", "resnet18", "resnet18-gn"])
def test_generated_features_feed_every_models_classifier(name):
    model = build_model(name, 3, 32, 10)
    d = model.classifier.in_features
    g = build_generator(FedGenSettings(), 3, 10, d, seed=0)
    y = torch.arange(10)
    feats = g(y, g.sample_noise(10, _gen()))
    assert feats.shape == (10, d)
    assert model.classifier(feats).shape == (10, 10)


def test_generator_layers_noise_and_output():
    g = FeatureGenerator(5, 7, noise_dim=3, hidden_dim=4)
    # one-hot input: Linear(3 + 5, 4), BatchNorm1d(4), ReLU, Linear(4, 7)
    assert g.hidden[0].in_features == 8 and isinstance(g.hidden[1], torch.nn.BatchNorm1d)
    eps = g.sample_noise(1000, _gen())
    assert eps.shape == (1000, 3) and eps.min() >= 0 and eps.max() < 1  # uniform, as torch.rand
    assert g(torch.arange(5).repeat(200), eps).min() >= 0  # relu output
    raw = FeatureGenerator(5, 7, noise_dim=3, hidden_dim=4, output="none")
    assert raw(torch.arange(5).repeat(200), eps).min() < 0
    emb = FeatureGenerator(5, 7, noise_dim=3, hidden_dim=4, embedding=True)
    assert emb.hidden[0].in_features == 6 and emb.embed.weight.shape == (5, 3)
    normal = FeatureGenerator(5, 7, noise_dim=3, hidden_dim=4, noise="normal")
    assert normal.sample_noise(1000, _gen()).min() < 0


def test_build_generator_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_generator(FedGenSettings(), 1, 10, 512, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_generator(FedGenSettings(), 1, 10, 512, seed=4)
    c = build_generator(FedGenSettings(), 1, 10, 512, seed=5)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.out.weight, c.out.weight)
    assert a.noise_dim == 32 and a.hidden[0].out_features == 256
    sized = build_generator(FedGenSettings(noise_dim=8, hidden_dim=16), 1, 10, 512)
    assert sized.noise_dim == 8 and sized.hidden[0].out_features == 16


# ----------------------------------------------------------------------- server maths


def test_label_weights_with_the_prior_and_qualified_labels():
    counts = np.array([[3, 0, 0, 5], [1, 0, 2, 0]])
    w, q = label_weights(counts, prior=1.0, min_samples=1.0)
    m = counts + 1.0  # [[4, 1, 1, 6], [2, 1, 3, 1]]
    np.testing.assert_allclose(w.numpy(), m / m.sum(0), rtol=1e-6)
    np.testing.assert_allclose(w.numpy()[:, 1], [0.5, 0.5])
    assert q.tolist() == [0, 2, 3]  # label 1: nobody has it (max 1 is not > 1)


def test_label_weights_without_prior_zero_for_empty_labels():
    w, q = label_weights(np.array([[1, 0, 4], [0, 0, 2]]), prior=0.0, min_samples=1.0)
    np.testing.assert_allclose(w.numpy(), [[1, 0, 4 / 6], [0, 0, 2 / 6]], rtol=1e-6)
    assert q.tolist() == [2]  # a single sample of label 0 is not > 1


def test_uniform_sampling_draws_only_the_given_labels_evenly():
    labels = torch.tensor([1, 3])
    draws = sample_uniform(labels, 4000, _gen())
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5) < 0.05
    assert torch.equal(draws, sample_uniform(labels, 4000, _gen()))


def test_head_logits_teacher_loss_and_ensemble_by_hand():
    rng = np.random.default_rng(0)
    k, b, c, d = 2, 3, 4, 5
    feats, wt, bs = rng.normal(size=(b, d)), rng.normal(size=(k, c, d)), rng.normal(size=(k, c))
    y = np.array([0, 2, 2])
    weights = np.array([[0.25, 0.5, 0.9, 0.0], [0.75, 0.5, 0.1, 1.0]])
    logits = head_logits(_t(feats), _t(wt), _t(bs))
    ref_logits = np.stack([feats @ wt[j].T + bs[j] for j in range(k)])
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-5, atol=1e-5)
    ce = -np.take_along_axis(_np_log_softmax(ref_logits), y[None, :, None], axis=2)[..., 0]
    want = sum(np.mean(weights[j, y] * ce[j]) for j in range(k))
    got = teacher_loss(logits, torch.tensor(y), _t(weights))
    assert got.item() == pytest.approx(want, rel=1e-5)
    # not the authors' (B,) * (B, 1) broadcast, mean(CE) * mean(w), which differs here
    broadcast = sum(np.mean(ce[j]) * np.mean(weights[j, y]) for j in range(k))
    assert abs(broadcast - want) > 1e-3
    ens = ensemble_logits(logits, torch.tensor(y), _t(weights))
    want_ens = sum(weights[j, y][:, None] * ref_logits[j] for j in range(k))
    np.testing.assert_allclose(ens.numpy(), want_ens, rtol=1e-5, atol=1e-5)


def test_student_kl_is_the_element_mean_of_the_kl_terms():
    s = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = np.array([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    log_q, log_p = _np_log_softmax(s), _np_log_softmax(t)
    want = (np.exp(log_p) * (log_p - log_q)).sum() / s.size
    assert student_kl(_t(s), _t(t)).item() == pytest.approx(want, rel=1e-5)


def _toy_server(seed: int = 0, k: int = 3, c: int = 4, d: int = 6):
    rng = np.random.default_rng(seed)
    heads_w = _t(rng.normal(size=(k, c, d)))
    heads_b = _t(rng.normal(size=(k, c)) * 0.1)
    counts = np.array([[30, 0, 5, 0], [0, 20, 20, 0], [2, 0, 0, 10]])[:k, :c]
    return heads_w, heads_b, counts


def test_generator_loss_combines_the_terms_with_the_authors_coefficients():
    rng = np.random.default_rng(1)
    hw, hb, counts = _toy_server()
    feats, eps = rng.normal(size=(4, 6)), rng.uniform(size=(4, 3))
    y = torch.tensor([0, 1, 2, 2])
    weights, _ = label_weights(counts)
    sw, sb = _t(rng.normal(size=(4, 6))), _t(rng.normal(size=4))
    cfg = FedGenSettings(ensemble_alpha=2.0, ensemble_beta=0.5, ensemble_eta=3.0)
    out = generator_loss(_t(feats), _t(eps), y, hw, hb, weights, cfg, sw, sb)
    # the diversity term by a double loop over all B*B pairs, diagonal included
    pairs = [
        np.mean((eps[i] - eps[j]) ** 2) * np.mean(np.abs(feats[i] - feats[j]))
        for i in range(4)
        for j in range(4)
    ]
    assert out["diversity"].item() == pytest.approx(np.exp(-np.mean(pairs)), rel=1e-5)
    logits = head_logits(_t(feats), hw, hb)
    assert out["teacher"].item() == pytest.approx(teacher_loss(logits, y, weights).item())
    want = 2.0 * out["teacher"] - 0.5 * out["student"] + 3.0 * out["diversity"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["student"].item() > 0
    # beta = 0 (the default): the student term is reported but not in the loss
    off = generator_loss(_t(feats), _t(eps), y, hw, hb, weights, FedGenSettings(), sw, sb)
    assert off["loss"].item() == pytest.approx((off["teacher"] + off["diversity"]).item())
    with pytest.raises(ValueError, match="student"):
        generator_loss(_t(feats), _t(eps), y, hw, hb, weights, cfg)


def _server_run(seed: int, rounds: int, cfg: FedGenSettings):
    hw, hb, counts = _toy_server()
    torch.manual_seed(0)
    g = FeatureGenerator(4, 6, noise_dim=3, hidden_dim=16)
    opt = generator_optimizer(g, cfg)
    gen = _gen(seed)
    logs = [train_generator(g, opt, hw, hb, counts, cfg, t, 8, gen) for t in range(rounds)]
    return g, opt, logs


def test_train_generator_is_deterministic_for_a_seeded_generator():
    cfg = FedGenSettings(ensemble_lr=1e-2)
    g1, _, logs1 = _server_run(7, 2, cfg)
    g2, _, logs2 = _server_run(7, 2, cfg)
    g3, _, _ = _server_run(8, 2, cfg)
    assert logs1 == logs2
    for key, v in g1.state_dict().items():
        assert torch.equal(v, g2.state_dict()[key])
    assert not torch.equal(g1.out.weight, g3.out.weight)


def test_train_generator_decreases_the_teacher_loss_and_follows_the_schedule():
    cfg = FedGenSettings(ensemble_lr=1e-2)
    hw, hb, counts = _toy_server()
    weights, qualified = label_weights(counts)
    probe = _gen(99)
    y = sample_uniform(qualified, 64, probe)
    torch.manual_seed(0)
    g = FeatureGenerator(4, 6, noise_dim=3, hidden_dim=16)
    eps = g.sample_noise(64, probe)

    def probe_loss() -> float:
        probe_g = copy.deepcopy(g).train()  # batch statistics, as in training
        with torch.no_grad():
            return teacher_loss(head_logits(probe_g(y, eps), hw, hb), y, weights).item()

    start = probe_loss()
    opt = generator_optimizer(g, cfg)
    gen = _gen(0)
    logs = [train_generator(g, opt, hw, hb, counts, cfg, t, 8, gen) for t in range(4)]
    assert probe_loss() < 0.5 * start
    assert logs[-1]["gen_teacher"] < logs[0]["gen_teacher"]
    assert not g.training  # left in eval mode for the clients
    # lr of round t is ensemble_lr * 0.98**t; Adam's state persists over the rounds
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.98**3)
    assert logs[2]["gen_lr"] == pytest.approx(1e-2 * 0.98**2)
    assert float(opt.state[g.out.weight]["step"]) == 4 * cfg.generator_steps == 200
    assert logs[0]["gen_qualified_labels"] == 4.0


def test_train_generator_draws_only_qualified_labels_and_its_batch_size():
    cfg = FedGenSettings(ensemble_epochs=5, batch_size=6)
    hw, hb, _ = _toy_server()
    counts = np.array([[4, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0]])
    seen = []
    g = FeatureGenerator(4, 6, noise_dim=3, hidden_dim=16)
    forward = g.forward

    def spy(y, eps):
        seen.append(y.clone())
        return forward(y, eps)

    g.forward = spy
    train_generator(g, generator_optimizer(g, cfg), hw, hb, counts, cfg, 0, 32, _gen())
    assert len(seen) == cfg.generator_steps == 5
    assert all(len(y) == 6 and set(y.tolist()) <= {0, 2} for y in seen)


def test_train_generator_with_a_student_uses_it():
    cfg = FedGenSettings(ensemble_beta=1.0, ensemble_epochs=5)
    hw, hb, counts = _toy_server()
    torch.manual_seed(0)
    g = FeatureGenerator(4, 6, noise_dim=3, hidden_dim=16)
    with pytest.raises(ValueError, match="student"):
        train_generator(g, generator_optimizer(g, cfg), hw, hb, counts, cfg, 0, 8, _gen())
    h = copy.deepcopy(g)
    log = train_generator(
        h, generator_optimizer(h, cfg), hw, hb, counts, cfg, 0, 8, _gen(), hw[0] * 0.5, hb[0]
    )
    plain = copy.deepcopy(g)
    train_generator(
        plain,
        generator_optimizer(plain, cfg),
        hw,
        hb,
        counts,
        replace(cfg, ensemble_beta=0.0),
        0,
        8,
        _gen(),
    )
    assert log["gen_student"] > 0
    assert not torch.equal(h.out.weight, plain.out.weight)


def test_train_generator_takes_the_heads_of_stacked_client_models():
    torch.manual_seed(0)
    models = [build_model("cnn", 1, 8, 10) for _ in range(2)]
    stacked = StackedModels.from_modules(models)
    hw, hb = stacked.params["classifier.weight"], stacked.params["classifier.bias"]
    assert hw.shape == (2, 10, 512) and hb.shape == (2, 10)
    before = hw.clone()
    cfg = FedGenSettings(ensemble_epochs=5)
    g = build_generator(cfg, 1, 10, 512)
    counts = np.array([[5, 5, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 3, 9]])
    log = train_generator(g, generator_optimizer(g, cfg), hw, hb, counts, cfg, 0, 16, _gen())
    assert log["gen_qualified_labels"] == 4.0 and np.isfinite(log["gen_loss"])
    assert torch.equal(stacked.params["classifier.weight"], before)
    # the generated features give the same logits through a client's own classifier
    feats = g(torch.arange(10), g.sample_noise(10, _gen()))
    torch.testing.assert_close(head_logits(feats, hw, hb)[1], models[1].classifier(feats))


# ----------------------------------------------------------------------- client maths


def test_generative_schedule_values():
    assert generative_schedule(10.0, 0.98, 1e-4, 0) == 10.0
    assert generative_schedule(10.0, 0.98, 1e-4, 1) == pytest.approx(9.8)
    assert generative_schedule(10.0, 0.98, 1e-4, 10) == pytest.approx(10 * 0.98**10)
    assert generative_schedule(10.0, 0.98, 1e-4, 500) == pytest.approx(10 * 0.98**500)
    assert 10 * 0.98**600 < 1e-4
    assert generative_schedule(10.0, 0.98, 1e-4, 600) == 1e-4
    assert generative_schedule(0.0, 0.98, 1e-4, 3) == 0.0


def test_client_coefficients_round_zero_early_stop_and_gen_ratio():
    cfg = FedGenSettings(gen_batch_size=32)
    assert client_coefficients(cfg, 0, 0, 32) == ClientCoefficients(0.0, 0.0)
    assert not client_coefficients(cfg, 0, 0, 32).active
    c = client_coefficients(cfg, 3, 0, 64)
    assert c.latent == pytest.approx(10 * 0.98**3)
    assert c.teacher == pytest.approx(10 * 0.98**3 * 32 / 64)
    assert c.active
    assert client_coefficients(cfg, 3, 19, 32).active
    assert not client_coefficients(cfg, 3, 20, 32).active
    beta1 = client_coefficients(replace(cfg, generative_beta=1.0), 2, 0, 32)
    assert beta1.latent == pytest.approx(0.98**2) and beta1.teacher == pytest.approx(9.604)
    # by default the generated batch is the local batch: gen_ratio 1
    assert FedGenSettings().generated_batch(50) == 50 and cfg.generated_batch(50) == 32
    assert client_coefficients(FedGenSettings(), 1, 0, 50).teacher == pytest.approx(9.8)


def _client_case(seed: int = 0, b: int = 5, bg: int = 4, c: int = 3, d: int = 6):
    rng = np.random.default_rng(seed)
    w, bias = rng.normal(size=(c, d)), rng.normal(size=c)
    logits = rng.normal(size=(b, c))
    inputs = {
        "latent_features": _t(np.abs(rng.normal(size=(b, d)))),
        "teacher_features": _t(np.abs(rng.normal(size=(bg, d)))),
        "teacher_labels": torch.tensor(rng.integers(0, c, size=bg)),
    }
    return _t(w), _t(bias), _t(logits), inputs


def test_client_terms_by_hand():
    w, bias, logits, inp = _client_case()
    wn, bn, ln = w.numpy(), bias.numpy(), logits.numpy()
    log_p = _np_log_softmax(inp["latent_features"].numpy() @ wn.T + bn)
    log_q = _np_log_softmax(ln)
    want_latent = (np.exp(log_p) * (log_p - log_q)).sum() / ln.shape[0]
    gen_logp = _np_log_softmax(inp["teacher_features"].numpy() @ wn.T + bn)
    yt = inp["teacher_labels"].numpy()
    want_teacher = -gen_logp[np.arange(len(yt)), yt].mean()
    latent, teacher = client_terms(w, bias, logits, inp)
    assert latent.item() == pytest.approx(want_latent, rel=1e-5)
    assert teacher.item() == pytest.approx(want_teacher, rel=1e-5)
    coeffs = ClientCoefficients(latent=2.0, teacher=0.25)
    total = client_loss(w, bias, logits, inp, coeffs)
    assert total.item() == pytest.approx(2.0 * want_latent + 0.25 * want_teacher, rel=1e-5)


def test_client_latent_target_is_detached():
    w, bias, logits, inp = _client_case()
    w.requires_grad_(True)
    logits.requires_grad_(True)
    latent, _ = client_terms(w, bias, logits, inp)
    gw, gl = torch.autograd.grad(latent, (w, logits), allow_unused=True)
    assert gw is None or torch.count_nonzero(gw) == 0
    # d KL(p || softmax(l)) / dl = (softmax(l) - p) / B
    p = torch.softmax(inp["latent_features"] @ w.detach().T + bias, dim=1)
    want = (torch.softmax(logits.detach(), dim=1) - p) / logits.shape[0]
    torch.testing.assert_close(gl, want)


def test_client_loss_under_vmap_equals_the_per_client_loop():
    cases = [_client_case(seed) for seed in range(3)]
    w, bias, logits = (torch.stack([case[i] for case in cases]) for i in range(3))
    inputs = {key: torch.stack([case[3][key] for case in cases]) for key in cases[0][3]}
    coeffs = ClientCoefficients(latent=10 * 0.98, teacher=10 * 0.98 * 0.5)

    def f(w_, b_, l_, inp_):
        return client_loss(w_, b_, l_, inp_, coeffs)

    batched = vmap(f)(w, bias, logits, inputs)
    looped = torch.stack([f(*case) for case in cases])
    torch.testing.assert_close(batched, looped)
    # gradients with respect to the heads and the logits agree too
    g_batched = vmap(grad(f, argnums=(0, 1, 2)))(w, bias, logits, inputs)
    for j, case in enumerate(cases):
        g_loop = grad(f, argnums=(0, 1, 2))(*case)
        for a, b in zip(g_batched, g_loop, strict=True):
            torch.testing.assert_close(a[j], b)


def test_prepare_client_inputs_draws_from_its_generator_and_stacks_clients():
    torch.manual_seed(0)
    g = FeatureGenerator(5, 7, noise_dim=3, hidden_dim=8)
    g.train()
    available = torch.tensor([0, 2, 4])
    y = torch.tensor([[1, 1, 3], [0, 2, 2], [4, 4, 4]])
    one = [prepare_client_inputs(g, y[j], available, 4, _gen(j)) for j in range(3)]
    assert g.training  # mode restored
    assert one[0]["latent_features"].shape == (3, 7)
    assert one[0]["teacher_features"].shape == (4, 7)
    assert not one[0]["latent_features"].requires_grad
    for inp in one:
        assert set(inp["teacher_labels"].tolist()) <= {0, 2, 4}
    stacked = prepare_client_inputs(g, y, available, 4, [_gen(j) for j in range(3)])
    for key in one[0]:
        torch.testing.assert_close(stacked[key], torch.stack([inp[key] for inp in one]))
    # the features are G's eval-mode outputs for the noise drawn first, then labels, noise
    gen = _gen(1)
    eps = g.sample_noise(3, gen)
    labels = sample_uniform(available, 4, gen)
    eps2 = g.sample_noise(4, gen)
    g.eval()
    with torch.no_grad():
        torch.testing.assert_close(one[1]["latent_features"], g(y[1], eps))
        torch.testing.assert_close(one[1]["teacher_labels"], labels)
        torch.testing.assert_close(one[1]["teacher_features"], g(labels, eps2))
    with pytest.raises(ValueError, match="one generator per client"):
        prepare_client_inputs(g, y, available, 4, [_gen(0)])


# ------------------------------------------------------------------------- validation


def test_defaults_validate():
    cfg = FedGenSettings().validate()
    assert cfg.generator_steps == 50


@pytest.mark.parametrize(
    "field,value",
    [
        ("ensemble_lr", 0.0),
        ("ensemble_lr", float("nan")),
        ("lr_decay", -1.0),
        ("generative_decay", 0.0),
        ("ensemble_weight_decay", -0.1),
        ("ensemble_alpha", -1.0),
        ("ensemble_beta", -1.0),
        ("ensemble_eta", float("inf")),
        ("label_count_prior", -1.0),
        ("min_samples_per_label", -1.0),
        ("generative_alpha", -1.0),
        ("generative_beta", -1.0),
        ("generative_floor", -1e-4),
        ("ensemble_epochs", -1),
        ("ensemble_epochs", 2.5),
        ("early_stop", -1),
        ("n_teacher_iters", 0),
        ("gen_batch_size", 0),
        ("gen_batch_size", 2.0),
        ("batch_size", 1),
        ("batch_size", True),
        ("noise_dim", 0),
        ("hidden_dim", "big"),
        ("embedding", 1),
        ("label_counts", "all"),
        ("noise", "gaussian"),
        ("output", "tanh"),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(UserError, match=f"^{field}:"):
        replace(FedGenSettings(), **{field: value}).validate()


# ---------------------------------------------------------------- the plug-in, in runs

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from fedftg.config import RunConfig  # noqa: E402
from fedftg.engine.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from fedftg.engine.inprocess import MethodRunner  # noqa: E402
from fedftg.engine.setup import prepare  # noqa: E402
from fedftg.plugins.fedgen import seen_label_counts  # noqa: E402


def test_seen_label_counts_by_hand():
    counts = np.array([[3, 1], [0, 4]])
    assert np.array_equal(seen_label_counts(counts, 2, None, 10), [[6, 2], [0, 8]])
    # 3 steps of 2 over 4 samples: 1.5 passes
    assert np.allclose(seen_label_counts(counts, 1, 3, 2), [[4.5, 1.5], [0, 6]])


@pytest.fixture(scope="module")
def digits():
    cfg = RunConfig(
        clients=4, participation=1.0, local_epochs=1, rounds=3, method=["fedprox+fedgen"]
    ).validate()
    cfg.fedgen.ensemble_epochs = 10
    return prepare(cfg)


def test_fedgen_trains_its_generator_and_leaves_the_aggregate_alone(digits):
    runner = MethodRunner(digits, "fedprox", "fedgen")
    plain = MethodRunner(digits, "fedprox", None)
    first, base = runner.run_round(), plain.run_round()
    # round 0: no generator yet, so the clients train as FedProx does; the step only
    # trains the generator, so the model sent is FedProx's aggregate
    assert first["train_loss"] == base["train_loss"] and first["test_acc"] == base["test_acc"]
    assert "acc_before_server" not in first and first["fedgen_gen_teacher"] > 0
    g1 = {k: v.clone() for k, v in runner.plugin.generator.state_dict().items()}
    payload = runner.client_payload()
    assert set(payload["labels"].tolist()) == set(np.flatnonzero(digits.partition.counts.sum(0)))
    second, base2 = runner.run_round(), plain.run_round()
    assert second["train_loss"] != base2["train_loss"]  # the clients' term is on
    # train_loss stays the clients' own loss (cross-entropy and FedProx's term, of the
    # size FedProx's is); the generative term is logged beside it, from round 2 on
    assert "train_plugin_loss" not in first and second["train_plugin_loss"] > 0
    assert abs(second["train_loss"] - base2["train_loss"]) < 0.5 * base2["train_loss"]
    g2 = runner.plugin.generator.state_dict()
    assert any(not torch.equal(g1[k], g2[k]) for k in g1)  # it persisted and kept learning


def test_fedgen_vectorised_clients_equal_sequential(digits):
    results = {}
    for mode in ("sequential", "vmap"):
        setup = dataclasses.replace(digits, cfg=digits.cfg.override({"client_batching": mode}))
        runner = MethodRunner(setup, "fedprox", "fedgen")
        results[mode] = [runner.run_round() for _ in range(2)]
    for a, b in zip(results["sequential"], results["vmap"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=2e-3)


def test_fedgen_state_survives_a_checkpoint(digits, tmp_path):
    straight = MethodRunner(digits, "fedavg", "fedgen")
    records = [straight.run_round() for _ in range(3)]
    first = MethodRunner(digits, "fedavg", "fedgen")
    for _ in range(2):
        first.run_round()
    save_checkpoint(tmp_path / "c.pt", {"state": first.checkpoint_state()})
    resumed = MethodRunner(digits, "fedavg", "fedgen")
    resumed.restore(read_checkpoint(tmp_path / "c.pt")["state"])
    third = resumed.run_round()
    keys = ("test_acc", "test_loss", "train_loss", "fedgen_gen_loss")
    assert [third[k] for k in keys] == [records[2][k] for k in keys]


@pytest.mark.processes
def test_fedgen_kill_9_and_resume_gives_identical_metrics(tmp_path):
    args = [sys.executable, "-m", "fedftg.cli", "run", "--method", "fedgen", "--rounds", "4"]
    args += ["--clients", "4", "--local-epochs", "1", "--fedgen-ensemble-epochs", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def metrics(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["round"], r["test_acc"], r["train_loss"], r["fedgen_gen_loss"]) for r in rows]

    ref = tmp_path / "ref"
    subprocess.run([*args, "--out", str(ref)], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    log = out / "metrics.jsonl"
    while (not log.exists() or len(log.read_text().splitlines()) < 2) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = len(log.read_text().splitlines())
    if done >= 4:
        pytest.skip("the run finished before it could be killed")
    subprocess.run([*args, "--out", str(out)], check=True, env=env, capture_output=True)
    assert metrics(out) == metrics(ref)
