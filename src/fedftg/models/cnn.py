"""The CNN of the FedAvg paper (McMahan et al. 2017), sized for any square input >= 4 px,
optionally with a normalisation layer after each conv (BatchNorm, to study the server step
on a BatchNorm student as the authors' ResNet-18 is one, at a fraction of its cost)."""

from __future__ import annotations

import torch
from torch import nn

from fedftg.models.norm import Norm


class CNN(nn.Module):
    """conv5x5(32)-pool-conv5x5(64)-pool-fc512-fc(C); 'same' padding keeps small inputs valid."""

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, norm: Norm | None = None
    ) -> None:
        super().__init__()
        side = image_size // 4

        def conv(cin: int, cout: int) -> list[nn.Module]:
            # without a norm the layer indices (and so the state-dict keys) are the plain CNN's
            extra = [] if norm is None else [norm(cout)]
            layers = [nn.Conv2d(cin, cout, 5, padding=2), *extra]
            return [*layers, nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.body = nn.Sequential(
            *conv(in_channels, 32),
            *conv(32, 64),
            nn.Flatten(),
            nn.Linear(64 * side * side, 512),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d representation before the classifier."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
