"""Models: shapes for every input kind, the features/classifier split, learning, the generator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedftg.errors import UserError
from fedftg.models import MODEL_NAMES, ConditionalGenerator, build_model, count_parameters

SHAPES = [(1, 8), (1, 28), (3, 32)]


@pytest.mark.parametrize("name", MODEL_NAMES)
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


@pytest.mark.parametrize("name", MODEL_NAMES)
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
