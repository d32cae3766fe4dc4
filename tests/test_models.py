"""Models: shapes for every input kind, the features/classifier split, learning, the generator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedftg.errors import UserError
from fedftg.models import MODELS, ConditionalGenerator, build_model, count_parameters

SHAPES = [(1, 8), (1, 28), (3, 32)]


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_shapes_and_features_split(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, size, 10).eval()
    x = torch.randn(3, channels, size, size)
    feats = model.features(x)
    assert feats.shape == (3, 512)
    out = model(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, model.classifier(feats))


@pytest.mark.parametrize("name", MODELS.names())
def test_can_learn_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 32, 4)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    first = None
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


def test_same_seed_same_init():
    torch.manual_seed(5)
    a = build_model("cnn", 3, 32, 10)
    torch.manual_seed(5)
    b = build_model("cnn", 3, 32, 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_resnet18_matches_torchvision_size_and_norms():
    assert count_parameters(build_model("resnet18", 3, 32, 10)) == 11_181_642
    bn = build_model("resnet18", 3, 32, 10)
    gn = build_model("resnet18-gn", 3, 32, 10)
    assert any("running_mean" in n for n, _ in bn.named_buffers())
    assert not list(gn.buffers())


def test_cnn_bn_adds_batchnorm_and_the_plain_cnn_keeps_its_keys():
    plain, bn = build_model("cnn", 1, 28, 10), build_model("cnn-bn", 1, 28, 10)
    assert list(plain.state_dict()) == [
        f"{m}.{p}" for m in ("body.0", "body.3", "body.7", "classifier") for p in ("weight", "bias")
    ]  # checkpoints of the plain CNN stay loadable
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 2
    assert count_parameters(bn) == count_parameters(plain) + 2 * (32 + 64)


def test_unknown_model():
    with pytest.raises(UserError, match="vgg"):
        build_model("vgg", 3, 32, 10)


@pytest.mark.parametrize(("channels", "size"), [*SHAPES, (3, 20)])
def test_generator_shapes_and_conditioning(channels, size):
    torch.manual_seed(0)
    g = ConditionalGenerator(16, 10, channels, size, ngf=8)
    z = torch.randn(4, 16)
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    out = g(z, y)
    assert out.shape == (4, channels, size, size) and torch.isfinite(out).all()
    g.eval()
    y2 = F.one_hot(torch.tensor([5, 6, 7, 8]), 10).float()
    assert not torch.allclose(g(z, y), g(z, y2))


def test_generator_gradients_reach_both_embeddings():
    g = ConditionalGenerator(16, 10, 1, 8, ngf=8)
    out = g(torch.randn(4, 16), F.one_hot(torch.arange(4), 10).float())
    out.square().mean().backward()
    assert g.embed_z.weight.grad.abs().sum() > 0 and g.embed_y.weight.grad.abs().sum() > 0


def _pool_inputs() -> list[torch.Tensor]:
    """Random maps with exact ties (rounded values, zeros after a ReLU), +-inf and NaN."""
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 4, (4, 5, 8, 6), generator=g).float()
    special = torch.randn(2, 3, 6, 6, generator=g)
    special[0, 0, 0, 1], special[0, 1, 2, 3], special[1, 2, 5, 5] = float("inf"), -float("inf"), 0.0
    special[1, 0, 3, 2] = float("nan")
    relu = torch.relu(torch.randn(3, 32, 32, 32, generator=g))
    return [ties, special, relu, torch.randn(2, 4, 7, 9, generator=g)]  # the last: odd sides


@pytest.mark.parametrize("grad", [False, True])
def test_maxpool2x2_equals_maxpool2d_bit_for_bit(grad):
    from fedftg.models.cnn import MaxPool2x2

    for x in _pool_inputs():
        with torch.set_grad_enabled(grad):
            got, want = MaxPool2x2()(x), torch.nn.MaxPool2d(2)(x)
        assert got.shape == want.shape
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        assert torch.equal(got.isnan(), want.isnan())


def test_maxpool2x2_gradient_goes_to_the_first_maximum_as_maxpool2d():
    from fedftg.models.cnn import MaxPool2x2

    x = _pool_inputs()[0]  # many exact ties in each window
    grads = []
    for pool in (MaxPool2x2(), torch.nn.MaxPool2d(2)):
        leaf = x.clone().requires_grad_(True)
        (pool(leaf) * torch.arange(1.0, 1 + 4 * 5 * 4 * 3).view(4, 5, 4, 3)).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("name", ["cnn", "cnn-bn"])
def test_cnn_logits_equal_those_with_torch_maxpool(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 32, 10).eval()
    plain = build_model(name, 3, 32, 10).eval()
    plain.load_state_dict(model.state_dict())
    for i, layer in enumerate(plain.body):
        if type(layer).__name__ == "MaxPool2x2":
            plain.body[i] = torch.nn.MaxPool2d(2)
    x = torch.randn(64, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), plain(x))
