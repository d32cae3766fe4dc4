"""Your own network and data, for ``fedftg run --model examples.mynets:SmallNet --dataset
examples.mynets:load`` (from the repository's root) or ``fedftg.run(model=SmallNet, ...)``.

Any ``nn.Module`` whose ``forward(x)`` gives (B, num_classes) logits serves every method;
the ``features`` / ``classifier`` split below also serves MOON and FedGen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SmallNet(nn.Module):
    """Two convolutions with BatchNorm, global pooling and a linear head; it takes the
    sizes it needs by keyword (fedftg passes those among in_channels, image_size and
    num_classes that the signature names)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): scikit-learn's 8x8 digits as float images in
    [0, 1] (N, 1, 8, 8) and integer labels; stands for the arrays you have."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]
