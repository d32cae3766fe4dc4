"""FedFTG's conditional generator G(z, y): noise and a one-hot label to an image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalGenerator(nn.Module):
    """Noise and label embeddings -> (2*ngf, s, s) -> two upsampling conv stages -> image.

    s = ceil(image_size / 4); the output is resized to ``image_size`` when 4*s differs. The
    last layer is a BatchNorm without affine parameters after tanh, as in the authors'
    generator, so outputs are on the scale of normalised data.
    """

    def __init__(
        self, nz: int, num_classes: int, channels: int, image_size: int, ngf: int = 64
    ) -> None:
        super().__init__()
        self.nz, self.num_classes, self.image_size = nz, num_classes, image_size
        self.side = max(1, math.ceil(image_size / 4))
        area = ngf * self.side * self.side
        self.ngf = ngf
        self.embed_z = nn.Linear(nz, area)
        self.embed_y = nn.Linear(num_classes, area)
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.conv1 = nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(2 * ngf)
        self.conv2 = nn.Conv2d(2 * ngf, ngf, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(ngf)
        self.conv3 = nn.Conv2d(ngf, channels, 3, 1, 1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
        b, s = z.shape[0], self.side
        h = torch.cat(
            [
                self.embed_z(z).view(b, self.ngf, s, s),
                self.embed_y(y_onehot).view(b, self.ngf, s, s),
            ],
            dim=1,
        )
        h = F.interpolate(self.bn0(h), scale_factor=2)
        h = F.leaky_relu(self.bn1(self.conv1(h)), 0.2)
        h = F.interpolate(h, scale_factor=2)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)
        h = torch.tanh(self.conv3(h))
        if h.shape[-1] != self.image_size:
            h = F.interpolate(
                h, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return self.bn_out(h)
