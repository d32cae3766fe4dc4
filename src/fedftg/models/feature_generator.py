"""FedGen's generator in feature space (Zhu, Hong, Zhou, ICML 2021).

G(y, eps) maps a label and a noise vector to a D-dimensional feature vector, the input of a
classifier's last linear layer (``model.classifier`` in fedftg). It never produces images:
the server trains it so that the clients' heads classify its outputs as their label, and
the clients use its outputs as extra (feature, label) pairs for their heads.

The layer stack is the authors' (FLAlgorithms/trainmodel/generator.py, ``Generator``):
[eps, onehot(y)] (or [eps, embedding(y)]) -> Linear -> BatchNorm1d -> ReLU -> Linear(D).
The noise is uniform on [0, 1) as their ``torch.rand`` draw (their comment and the paper
say Gaussian; ``noise="normal"`` gives that). fedftg's representations all end in a ReLU
(the CNN's fc layer, ResNet-18's pooled ReLU output), so ``output="relu"`` (the default
here) keeps the generated features in the set real features live in; ``output="none"`` is
the authors' literal last layer, which suited their network, whose representation is the
output of a linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (hidden_dim, noise_dim) of the authors' GENERATORCONFIGS entries (utils/model_config.py):
# 'mnist' (256, 32 latent, 1 channel, 10 classes, noise 32), 'cifar' (512, 32, 3, 10, 64).
# Their latent_dim (32) is their network's representation size; ours is the model's D.
AUTHORS_GENERATOR_DIMS = {"mnist": (256, 32), "cifar": (512, 64)}


def generator_dims(channels: int) -> tuple[int, int]:
    """(hidden_dim, noise_dim) for images of ``channels`` channels, from the authors'
    nearest entry: 'mnist' for single-channel datasets (digits, mnist, fmnist, a grey image
    folder), 'cifar' for colour ones (cifar10, cifar100, which has no entry of its own)."""
    return AUTHORS_GENERATOR_DIMS["mnist" if channels == 1 else "cifar"]


class FeatureGenerator(nn.Module):
    """G(y, eps) -> (B, feature_dim): FedGen's conditional generator of representations."""

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        noise_dim: int = 32,
        hidden_dim: int = 256,
        embedding: bool = False,
        noise: str = "uniform",
        output: str = "relu",
    ) -> None:
        super().__init__()
        self.num_classes, self.feature_dim, self.noise_dim = num_classes, feature_dim, noise_dim
        self.noise, self.output = noise, output
        # a learned label embedding of the noise's size, or the one-hot label
        self.embed = nn.Embedding(num_classes, noise_dim) if embedding else None
        in_dim = noise_dim + (noise_dim if embedding else num_classes)
        self.hidden = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU()
        )
        self.out = nn.Linear(hidden_dim, feature_dim)

    def sample_noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` noise vectors (n, noise_dim) drawn from ``gen``, on the generator's device."""
        shape = (n, self.noise_dim)
        if self.noise == "uniform":
            eps = torch.rand(shape, generator=gen, device=gen.device)
        else:
            eps = torch.randn(shape, generator=gen, device=gen.device)
        return eps.to(self.out.weight.device)

    def forward(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Features of labels ``y`` (B,) for noise ``eps`` (B, noise_dim)."""
        if self.embed is not None:
            label = self.embed(y)
        else:
            label = F.one_hot(y, self.num_classes).to(eps.dtype)
        h = self.out(self.hidden(torch.cat([eps, label], dim=1)))
        return F.relu(h) if self.output == "relu" else h
