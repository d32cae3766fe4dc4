"""flowerftg: the model, the data (non-IID splits of scikit-learn's 8x8 digits), training."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


class Net(nn.Module):
    """A small CNN for 8x8 grey images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits, standardised (zero mean, unit variance: the scale FTG's generator
    produces), in a fixed shuffled order."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean()) / x.std()
    order = np.random.default_rng(0).permutation(len(y))
    xs = torch.tensor(x[order], dtype=torch.float32).view(-1, *INPUT_SHAPE)
    return xs, torch.tensor(y[order], dtype=torch.long)


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out test set: the last 297 digits."""
    x, y = _digits()
    return x[1500:], y[1500:]


@cache
def load_data(partition_id: int, num_partitions: int, alpha: float = 0.5):
    """Client ``partition_id``'s training data: a Dirichlet(alpha) label split of the first
    1500 digits (small alpha: each client holds few classes)."""
    x, y = _digits()
    x, y = x[:1500], y[:1500]
    rng = np.random.default_rng(42)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y.numpy() == c)
        cuts = (np.cumsum(rng.dirichlet([alpha] * num_partitions)) * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts[:-1])):
            parts[k].extend(part.tolist())
    mine = torch.tensor(sorted(parts[partition_id]), dtype=torch.long)
    return x[mine], y[mine]


def train(net: nn.Module, x, y, epochs: int, lr: float, proximal_mu: float = 0.0) -> float:
    """Local SGD (batch 32); a proximal term when ``proximal_mu`` > 0 (FedProx). Mean loss."""
    start = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            prox = sum(((p - s) ** 2).sum() for p, s in zip(net.parameters(), start, strict=True))
            opt.zero_grad()
            (loss + proximal_mu / 2 * prox).backward()
            opt.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else 0.0


@torch.no_grad()
def test(net: nn.Module, x, y) -> tuple[float, float]:
    """(loss, accuracy) on ``x``, ``y``."""
    net.eval()
    logits = net(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
