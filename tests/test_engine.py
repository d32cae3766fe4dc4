"""End-to-end simulation on the embedded digits: every method learns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedftg.config import RunConfig
from fedftg.engine.clients import label_histogram
from fedftg.engine.evaluate import evaluate, evaluate_ensemble, evaluate_reference
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.setup import prepare
from fedftg.models.stacked import StackedModels

METHODS = ["fedavg", "fedprox", "scaffold", "feddyn", "moon"]


@pytest.fixture(scope="module")
def setup():
    cfg = RunConfig(
        clients=5, participation=1.0, rounds=3, local_epochs=3, alpha=0.5, seed=3, method=METHODS
    ).validate()
    return prepare(cfg)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_beats_the_initial_model(setup, method):
    runner = MethodRunner(setup, method, None)
    init_acc, _ = evaluate(setup.new_model(), setup.test)
    for _ in range(3):
        record = runner.run_round()
    assert record["round"] == 3
    assert record["test_acc"] > init_acc + 0.3, (init_acc, record["test_acc"])


def test_methods_share_partition_init_and_selection(setup):
    a = MethodRunner(setup, "fedavg", None)
    b = MethodRunner(setup, "fedprox", None)
    for k, v in a.state.global_state.items():
        assert torch.equal(v, b.state.global_state[k])
    assert int(setup.partition.counts.sum()) == len(setup.dataset.train_y)


def test_uploaded_histogram_matches_partition_counts(setup):
    for k, idx in enumerate(setup.client_indices):
        hist = label_histogram(setup.train.y[idx], setup.dataset.num_classes)
        np.testing.assert_array_equal(hist, setup.partition.counts[k])


def test_evaluate_matches_a_plain_loop(setup):
    model = setup.new_model()
    acc, loss = evaluate(model, setup.test, batch_size=97)
    model.eval()
    with torch.no_grad():
        x, y = setup.test.batch(torch.arange(len(setup.test)))
        logits = model(x)
        ref_acc = float((logits.argmax(1) == y).float().mean())
        ref_loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert acc == pytest.approx(ref_acc) and loss == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("name", ["cnn", "cnn-bn"])
@pytest.mark.parametrize("batch_size", [1000, 300, 97])
def test_evaluate_equals_the_reference_bit_for_bit(name, batch_size):
    """The fast evaluation (inference mode, sliced and chunked batches, the CNN's pool)
    gives the reference's accuracy and loss to the last bit, on CIFAR-10 shapes."""
    from fedftg.data.batches import DeviceArrays
    from fedftg.models import build_model
    from fedftg.models.cnn import MaxPool2x2

    rng = np.random.default_rng(0)
    data = DeviceArrays(
        rng.integers(0, 256, (1234, 3, 32, 32), dtype=np.uint8),
        rng.integers(0, 10, 1234),
        (0.49, 0.48, 0.45),
        (0.25, 0.24, 0.26),
    )
    torch.manual_seed(1)
    model = build_model(name, 3, 32, 10)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # spread the logits
    model.train()
    reference = build_model(name, 3, 32, 10)
    reference.load_state_dict(model.state_dict())
    for i, layer in enumerate(reference.body):  # the reference: torch's own pool
        if isinstance(layer, MaxPool2x2):
            reference.body[i] = torch.nn.MaxPool2d(2)
    got = evaluate(model, data, batch_size)
    want = evaluate_reference(reference, data, batch_size)
    assert got == want, (got, want)
    assert 0.05 < got[0] < 0.5
    assert model.training  # the mode is restored


@pytest.mark.parametrize("method", [*METHODS])
def test_ftg_plugs_into_every_client_method(setup, method):
    plain = MethodRunner(setup, method, None)
    tuned = MethodRunner(setup, method, "ftg")
    r_plain = plain.run_round()
    r_tuned = tuned.run_round()
    assert r_tuned["ftg_loss_gen"] == r_tuned["ftg_loss_gen"]  # finite, reported
    assert "acc_before_server" in r_tuned and r_tuned["server_s"] > 0
    # aggregation is identical, the server step then changes the model
    assert r_tuned["acc_before_server"] == pytest.approx(r_plain["test_acc"])
    changed = any(
        not torch.equal(v, plain.state.global_state[k])
        for k, v in tuned.state.global_state.items()
        if v.is_floating_point()
    )
    assert changed


def test_scaffold_ftg_keeps_the_pre_step_aggregate_by_default(setup):
    runners = {
        ref: MethodRunner(
            dataclasses.replace(setup, cfg=setup.cfg.override({"scaffold.reference": ref})),
            "scaffold",
            "ftg",
        )
        for ref in ("aggregate", "sent")
    }
    first = {ref: r.run_round() for ref, r in runners.items()}
    # round 1 is the same; the authors' choice keeps the aggregate from before the FTG step
    assert first["aggregate"]["test_acc"] == first["sent"]["test_acc"]
    kept = runners["aggregate"].state.server_state
    names = [n for n in kept if not n.startswith("ref.")]
    assert sorted(k for k in kept if k.startswith("ref.")) == sorted("ref." + n for n in names)
    assert not any(k.startswith("ref.") for k in runners["sent"].state.server_state)
    sent = runners["aggregate"].state.global_state
    assert any(not torch.equal(kept["ref." + n], sent[n]) for n in names)
    # so the control variates of round 2 differ
    for r in runners.values():
        r.run_round()
    a, b = (runners[ref].state.server_state for ref in ("aggregate", "sent"))
    assert any(not torch.allclose(a[n], b[n]) for n in names)
    plain = MethodRunner(setup, "scaffold", None)
    plain.run_round()
    assert not any(k.startswith("ref.") for k in plain.state.server_state)


def test_scaffold_variate_lr_initial_divides_by_the_undecayed_lr(setup):
    cfg = dataclasses.replace(setup.cfg, lr_decay=0.5)
    runners = {
        v: MethodRunner(
            dataclasses.replace(setup, cfg=cfg.override({"scaffold.variate_lr": v})),
            "scaffold",
            None,
        )
        for v in ("round", "initial")
    }
    rounds = {v: [r.run_round()["test_acc"] for _ in range(2)] for v, r in runners.items()}
    c = {v: r.state.server_state for v, r in runners.items()}
    # round 1 trains at the undecayed lr, so both agree until the control variates act
    assert rounds["round"][0] == rounds["initial"][0]
    # round 2 trains at lr * 0.5; with every client taking part c is the mean of the new c_k,
    # (w_ref - w_k) / (steps * lr_div), so dividing by the initial lr halves it
    for n in c["round"]:
        torch.testing.assert_close(c["initial"][n], 0.5 * c["round"][n], rtol=1e-4, atol=1e-7)
    assert any(float(t.abs().sum()) > 0 for t in c["round"].values())


def test_feddf_plugin_runs(setup):
    runner = MethodRunner(setup, "fedavg", "df")
    record = runner.run_round()
    assert record["df_loss_distill"] > 0 and 0 <= record["test_acc"] <= 1


def test_histogram_noise_is_laplace_per_client_and_fixed_across_rounds(setup):
    labels = setup.train.y[setup.client_indices[0]]
    exact = label_histogram(labels, 10)
    a = label_histogram(labels, 10, epsilon=0.5, seed=1, client=0)
    b = label_histogram(labels, 10, epsilon=0.5, seed=1, client=0)
    c = label_histogram(labels, 10, epsilon=0.5, seed=1, client=1)
    np.testing.assert_array_equal(a, b)  # drawn once per client: no extra leakage per round
    assert not np.array_equal(a, c) and (a >= 0).all()
    assert not np.array_equal(a, exact)
    many = np.stack([label_histogram(labels, 10, 0.5, seed=s, client=0) for s in range(400)])
    positive = exact > 5  # away from the clip at 0 the noise is centred, scale 1/eps = 2
    assert abs((many - exact)[:, positive].mean()) < 0.3
    assert 2.2 < (many - exact)[:, positive].std() < 3.4  # Laplace std = sqrt(2) * 2


def _trained_models(setup, k: int) -> list[torch.nn.Module]:
    models = []
    for j in range(k):
        torch.manual_seed(j)
        m = setup.new_model()
        for p in m.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        models.append(m)
    return models


def test_ensemble_accuracy_matches_a_plain_loop(setup):
    models = _trained_models(setup, 3)
    hist = np.array(
        [
            [30, 0, 5, 1, 0, 0, 9, 2, 0, 4],
            [0, 8, 5, 0, 0, 7, 0, 2, 1, 0],
            [1, 1, 0, 9, 0, 3, 0, 0, 6, 2],
        ]
    )
    got = evaluate_ensemble(StackedModels.from_modules(models), hist, setup.test, batch_size=97)
    x, y = setup.test.batch(torch.arange(len(setup.test)))
    with torch.no_grad():
        probs = np.stack([torch.softmax(m.eval()(x), 1).numpy() for m in models])
    share = hist / (hist.sum(0, keepdims=True) + 1e-6)
    uniform = probs.mean(0).argmax(1)
    by_class = (share[:, None, :] * probs).sum(0).argmax(1)
    assert got["ensemble_acc"] == pytest.approx(float((uniform == y.numpy()).mean()))
    assert got["class_ensemble_acc"] == pytest.approx(float((by_class == y.numpy()).mean()))
    # class 4 is held by nobody: the class-level teacher never predicts it
    assert not (by_class == 4).any()


def test_ensemble_of_one_model_repeated_is_that_model(setup):
    model = _trained_models(setup, 1)[0]
    acc, _ = evaluate(model, setup.test)
    hist = np.array([[5] * 10, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    got = evaluate_ensemble(StackedModels.from_modules([model, model]), hist, setup.test)
    assert got["ensemble_acc"] == pytest.approx(acc)
    assert got["class_ensemble_acc"] == pytest.approx(acc)


def test_eval_ensemble_records_without_changing_training(setup):
    plain = MethodRunner(setup, "fedavg", "ftg")
    probing = dataclasses.replace(setup, cfg=dataclasses.replace(setup.cfg, eval_ensemble=True))
    probed = MethodRunner(probing, "fedavg", "ftg")
    a, b = plain.run_round(), probed.run_round()
    assert "ensemble_acc" not in a
    assert a["test_acc"] == b["test_acc"] and a["acc_before_server"] == b["acc_before_server"]
    # heterogeneous clients: the ensemble knows more than their average after 3 local epochs
    assert b["ensemble_acc"] > b["acc_before_server"]
    assert 0 < b["class_ensemble_acc"] <= 1
