"""Client methods: identities between methods, term gradients, state updates, aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedftg.data.batches import DeviceArrays, augment, epoch_batches
from fedftg.fl.aggregation import weighted_average
from fedftg.fl.client import ClientMethod, LocalContext, LocalSpec, detached_state, train_local
from fedftg.fl.selection import select_clients
from fedftg.methods.feddyn import FedDyn
from fedftg.methods.fedprox import FedProx
from fedftg.methods.moon import Moon, moon_contrastive
from fedftg.methods.scaffold import Scaffold


class TinyNet(nn.Module):
    """A minimal classifier with the package's features/classifier split and BatchNorm."""

    def __init__(self, d_in: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.classifier = nn.Linear(8, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _data(n: int = 40, seed: int = 0) -> DeviceArrays:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, size=n)
    return DeviceArrays(x, y, (0.5,), (0.25,))


def _train(method: ClientMethod, model: nn.Module, ctx: LocalContext, seed: int = 1, **kw):
    data = _data()
    spec = LocalSpec(lr=0.1, epochs=2, batch_size=8, weight_decay=1e-3, clip=10.0, **kw)
    gen = torch.Generator().manual_seed(seed)
    return train_local(model, data, torch.arange(len(data)), method, ctx, spec, gen)


def _ctx(model: nn.Module, method: ClientMethod, **kw) -> LocalContext:
    """A context whose global state is the model's state when first seen (its init)."""
    if not hasattr(model, "test_init_state"):
        model.test_init_state = detached_state(model)
    init = model.test_init_state
    return LocalContext(
        global_state={k: v.clone() for k, v in init.items()},
        client_state=method.init_client_state(model),
        server_state=method.init_server_state(model),
        **kw,
    )


def _assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _states_differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k].float(), b[k].float()) for k in a)


def test_fedprox_with_zero_mu_equals_fedavg():
    torch.manual_seed(0)
    model = TinyNet()
    base = ClientMethod()
    r_avg = _train(base, model, _ctx(model, base))
    prox = FedProx(mu=0.0)
    r_prox = _train(prox, model, _ctx(model, prox))
    _assert_states_close(r_avg.state, r_prox.state)
    prox_on = FedProx(mu=10.0)
    assert _states_differ(r_avg.state, _train(prox_on, model, _ctx(model, prox_on)).state)


def test_fedprox_pulls_towards_global():
    torch.manual_seed(0)
    model = TinyNet()
    g = _ctx(model, ClientMethod()).global_state

    def dist(state):
        return sum(((state[n] - g[n]) ** 2).sum() for n, _ in model.named_parameters())

    free = _train(ClientMethod(), model, _ctx(model, ClientMethod()))
    prox = FedProx(mu=1.0)
    held = _train(prox, model, _ctx(model, prox))
    assert dist(held.state) < dist(free.state)


def test_scaffold_with_zero_controls_and_one_round_equals_fedavg():
    torch.manual_seed(0)
    model = TinyNet()
    base, sc = ClientMethod(), Scaffold(server_lr=1.0)
    ra = [_train(base, model, _ctx(model, base), seed=s) for s in (1, 2)]
    ctx_sc = [_ctx(model, sc) for _ in range(2)]
    rs = [_train(sc, model, c, seed=s) for c, s in zip(ctx_sc, (1, 2), strict=True)]
    for a, s in zip(ra, rs, strict=True):
        _assert_states_close(a.state, s.state)
    g = ctx_sc[0].global_state
    server_state = sc.init_server_state(model)
    agg_avg = base.aggregate(g, ra, {}, num_clients=2)
    agg_sc = sc.aggregate(g, rs, server_state, num_clients=2)
    _assert_states_close(agg_avg, agg_sc)
    # control variates were updated: c = mean of the clients' new c_k
    assert any(float(v.abs().sum()) > 0 for v in server_state.values())


def test_scaffold_control_variate_update_formula():
    torch.manual_seed(0)
    model = TinyNet()
    sc = Scaffold()
    ctx = _ctx(model, sc)
    res = _train(sc, model, ctx)
    for n, _ in model.named_parameters():
        expected = (ctx.global_state[n] - res.state[n]) / (res.steps * 0.1)
        torch.testing.assert_close(ctx.client_state[n], expected)
        torch.testing.assert_close(res.upload["delta_c." + n], expected)


def test_scaffold_variate_lr_replaces_the_rounds_lr_in_the_update():
    torch.manual_seed(0)
    model = TinyNet()
    runs = {}
    for variate_lr in (None, 0.4):
        sc = Scaffold(variate_lr=variate_lr)
        ctx = _ctx(model, sc)
        runs[variate_lr] = (ctx, _train(sc, model, ctx))
    (ctx_r, res_r), (ctx_i, res_i) = runs[None], runs[0.4]
    for n, _ in model.named_parameters():
        # the same local training (lr 0.1), only the divisor of c_k's update differs
        torch.testing.assert_close(res_i.state[n], res_r.state[n])
        expected = (ctx_i.global_state[n] - res_i.state[n]) / (res_i.steps * 0.4)
        torch.testing.assert_close(ctx_i.client_state[n], expected)
        torch.testing.assert_close(ctx_i.client_state[n], ctx_r.client_state[n] * 0.25)
    with pytest.raises(ValueError, match="variate_lr"):
        Scaffold(variate_lr=0.0)


def _scaffold_after_plugin_step(reference: str):
    """A SCAFFOLD client trained from a 'sent' model that a server step moved away from the
    aggregate: the method, the aggregate, the context and the training result."""
    torch.manual_seed(0)
    model = TinyNet()
    sc = Scaffold(server_lr=0.5, reference=reference)
    ctx = _ctx(model, sc)
    aggregate = {k: v.clone() for k, v in ctx.global_state.items()}
    for n, _ in model.named_parameters():  # the plug-in's change: the sent model differs
        ctx.global_state[n] = ctx.global_state[n] + 0.05 * torch.randn_like(ctx.global_state[n])
    sc.note_server_step(aggregate, ctx.server_state)
    return sc, model, aggregate, ctx, _train(sc, model, ctx)


@pytest.mark.parametrize("reference", ["aggregate", "sent"])
def test_scaffold_reference_after_a_server_step(reference):
    sc, model, aggregate, ctx, res = _scaffold_after_plugin_step(reference)
    names = [n for n, _ in model.named_parameters()]
    kept = sorted(k for k in ctx.server_state if k.startswith("ref."))
    # the authors' SCAFFOLD+FTG keeps the pre-step aggregate of the parameters (no buffers)
    assert kept == (sorted("ref." + n for n in names) if reference == "aggregate" else [])
    ref = aggregate if reference == "aggregate" else ctx.global_state
    for n in names:
        expected = (ref[n] - res.state[n]) / (res.steps * 0.1)
        torch.testing.assert_close(ctx.client_state[n], expected)
    # the server's step of size 0.5 starts from the same reference
    agg = sc.aggregate(ctx.global_state, [res], ctx.server_state, num_clients=1)
    for n in names:
        torch.testing.assert_close(agg[n], ref[n] + 0.5 * (res.state[n] - ref[n]))
        torch.testing.assert_close(ctx.server_state[n], ctx.client_state[n])
    assert not torch.allclose(aggregate[names[0]], ctx.global_state[names[0]])


def test_methods_without_pre_step_state_ignore_the_server_step():
    torch.manual_seed(0)
    model = TinyNet()
    for method in (ClientMethod(), FedProx(0.1), FedDyn(0.01), Moon(1.0, 0.5)):
        server_state = method.init_server_state(model)
        before = {k: v.clone() for k, v in server_state.items()}
        method.note_server_step(detached_state(model), server_state)
        _assert_states_close(server_state, before)


def test_scaffold_correction_term_gradient_is_c_minus_ck():
    torch.manual_seed(0)
    model = TinyNet()
    sc = Scaffold()
    ctx = _ctx(model, sc)
    for n, p in model.named_parameters():
        ctx.server_state[n] = torch.randn_like(p)
        ctx.client_state[n] = torch.randn_like(p)
    term = sc.begin(model, ctx)
    x = torch.randn(4, 1, 4, 4)
    term(dict(model.named_parameters()), model.features(x), None, {"x": x}).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ctx.server_state[n] - ctx.client_state[n])


def test_feddyn_term_gradient():
    torch.manual_seed(0)
    model = TinyNet()
    dyn = FedDyn(alpha=0.3)
    ctx = _ctx(model, dyn)
    for n, p in model.named_parameters():
        ctx.client_state[n] = torch.randn_like(p)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    term = dyn.begin(model, ctx)
    x = torch.randn(4, 1, 4, 4)
    term(dict(model.named_parameters()), model.features(x), None, {"x": x}).backward()
    for n, p in model.named_parameters():
        expected = -ctx.client_state[n] + 0.3 * (p.detach() - ctx.global_state[n])
        torch.testing.assert_close(p.grad, expected)


def test_feddyn_state_and_server_update():
    torch.manual_seed(0)
    model = TinyNet()
    dyn = FedDyn(alpha=0.5)
    ctx = _ctx(model, dyn)
    res = _train(dyn, model, ctx)
    g = ctx.global_state
    for n, _ in model.named_parameters():
        torch.testing.assert_close(ctx.client_state[n], -0.5 * (res.state[n] - g[n]))
    server = dyn.init_server_state(model)
    new = dyn.aggregate(g, [res], server, num_clients=4)
    for n, _ in model.named_parameters():
        h = -0.5 / 4 * (res.state[n] - g[n])
        torch.testing.assert_close(server[n], h)
        torch.testing.assert_close(new[n], res.state[n] - h / 0.5)
    for n, v in new.items():  # BatchNorm buffers are averaged, not corrected
        if n.endswith("running_mean"):
            torch.testing.assert_close(v, res.state[n])


def test_moon_contrastive_matches_formula_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    zp, zn = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    tau = 0.5
    loss = moon_contrastive(z, zp, zn, tau)
    manual = 0.0
    for i in range(5):
        cp = float(z[i].detach() @ zp[i] / (z[i].detach().norm() * zp[i].norm())) / tau
        cn = float(z[i].detach() @ zn[i] / (z[i].detach().norm() * zn[i].norm())) / tau
        manual += -np.log(np.exp(cp) / (np.exp(cp) + np.exp(cn)))
    assert float(loss.detach()) == pytest.approx(manual / 5, rel=1e-10)
    assert torch.autograd.gradcheck(lambda a: moon_contrastive(a, zp, zn, tau), (z,))


def test_moon_term_zero_mu_equals_fedavg_and_keeps_previous_model():
    torch.manual_seed(0)
    model = TinyNet()
    base = ClientMethod()
    ra = _train(base, model, _ctx(model, base))
    moon0 = Moon(mu=0.0, tau=0.5)
    ctx = _ctx(model, moon0)
    rm = _train(moon0, model, ctx)
    _assert_states_close(ra.state, rm.state)
    _assert_states_close(ctx.client_state, rm.state)  # previous local model is stored
    moon = Moon(mu=5.0, tau=0.5)
    ctx2 = _ctx(model, moon)
    ctx2.client_state.update({k: v + 0.5 for k, v in rm.state.items()})
    assert _states_differ(ra.state, _train(moon, model, ctx2).state)


def test_weighted_average_weights_and_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(7)}
    out = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([4.0, 5.0]))
    assert int(out["n"]) == 7
    with pytest.raises(ValueError):
        weighted_average([a, b], [0, 0])


@pytest.mark.parametrize("clients", [1, 3, 50])
def test_weighted_average_equals_one_stack_bit_for_bit(clients):
    """The CPU's blockwise average (tensors larger than a block, a partial last block)
    gives exactly the one-stack tensordot of the reference."""
    from fedftg.fl.aggregation import CPU_AVERAGE_BLOCK, weighted_average_reference

    g = torch.Generator().manual_seed(clients)
    shapes = {"fc": (512, 100), "conv": (64, 32, 5, 5), "odd": (CPU_AVERAGE_BLOCK * 2 + 7,)}
    states = [
        {k: torch.randn(shape, generator=g) * 3 for k, shape in shapes.items()}
        for _ in range(clients)
    ]
    weights = torch.randint(1, 500, (clients,), generator=g).tolist()
    got, want = weighted_average(states, weights), weighted_average_reference(states, weights)
    for k, shape in shapes.items():
        assert got[k].shape == shape
        assert torch.equal(got[k], want[k]), k


def test_all_finite_spots_nan_and_inf_but_not_an_overflowing_sum():
    from fedftg.engine.server import all_finite

    big = torch.full((10,), 3e38)  # finite, but its sum overflows to inf
    assert all_finite({"w": big, "n": torch.tensor(3)})
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.ones(100)
        w[57] = bad
        assert not all_finite({"a": torch.zeros(3), "w": w})


def test_select_clients_fixed_and_bernoulli():
    s1 = select_clients(100, 0.1, "fixed", seed=3, round_idx=5)
    assert len(s1) == 10 and len(set(s1.tolist())) == 10
    np.testing.assert_array_equal(s1, select_clients(100, 0.1, "fixed", 3, 5))
    assert not np.array_equal(s1, select_clients(100, 0.1, "fixed", 3, 6))
    sizes = [len(select_clients(100, 0.1, "bernoulli", 3, t)) for t in range(200)]
    assert min(sizes) >= 1 and 8 < np.mean(sizes) < 12 and len(set(sizes)) > 3
    assert len(select_clients(5, 0.001, "bernoulli", 0, 0)) == 1


def _augment_reference(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample loop with the same random draws as the batched `augment`."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    crop = torch.rand(b, generator=gen) < 0.5
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    out = torch.empty_like(x)
    for i in range(b):
        img = x[i].flip(-1) if flip[i] else x[i]
        if crop[i]:
            padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
            img = padded[:, off[0, i] : off[0, i] + h, off[1, i] : off[1, i] + w]
        out[i] = img
    return out


def test_batched_augment_matches_per_sample_reference():
    x = torch.randn(64, 3, 8, 8)
    fast = augment(x, torch.Generator().manual_seed(4))
    ref = _augment_reference(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(fast, ref)
    assert not torch.equal(fast, x)


def test_epoch_batches_cover_all_and_never_leave_a_single_sample():
    idx = torch.arange(101)
    batches = list(epoch_batches(idx, 10, torch.Generator().manual_seed(0)))
    assert sorted(torch.cat(batches).tolist()) == list(range(101))
    assert min(len(b) for b in batches) > 1


def test_local_steps_option_runs_exact_number_of_steps():
    torch.manual_seed(0)
    model = TinyNet()
    res = _train(ClientMethod(), model, _ctx(model, ClientMethod()), steps=13)
    assert res.steps == 13


def test_a_client_without_samples_trains_no_steps():
    from fedftg.data.batches import step_batches

    empty = torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    assert list(epoch_batches(empty, 8, gen)) == []
    assert list(step_batches(empty, 8, 5, gen)) == []
    model = TinyNet()
    ctx = _ctx(model, ClientMethod())
    spec = LocalSpec(lr=0.1, epochs=2, batch_size=8)
    result = train_local(model, _data(), empty, ClientMethod(), ctx, spec, gen)
    assert result.steps == 0 and result.num_samples == 0
    for k, v in result.state.items():
        assert torch.equal(v, ctx.global_state[k])
