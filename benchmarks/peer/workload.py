"""The cross-device peer workload for pfl-research and Flower: data and model, torch only.

fedftg's `cnn` re-declared (conv5x5(32)-ReLU-pool-conv5x5(64)-ReLU-pool-fc512-ReLU-fc(C),
'same' padding, torch's own max pool) and seeded random uint8 images of CIFAR-10's shape,
normalised once per client. Imported by `flower_app.py` and `pfl_run.py`; fedftg's side
(benchmarks/peer_crossdevice.py) uses fedftg's own model and data path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHANNELS, SIZE, CLASSES = 3, 32, 10
MEAN, STD = 0.5, 0.25  # the normalisation of the synthetic images (on the [0, 1] scale)


class CNN(nn.Module):
    """fedftg's `cnn` (models/cnn.py) for 3x32x32 inputs, with nn.MaxPool2d."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(CHANNELS, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (SIZE // 4) ** 2, 512),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(512, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def images(seed: int, key: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded random uint8 images of CIFAR-10's shape and their labels; ``key`` is a
    client id, or -1 for the test set."""
    rng = np.random.default_rng([seed, key + 1])
    x = rng.integers(0, 256, (n, CHANNELS, SIZE, SIZE), dtype=np.uint8)
    return x, rng.integers(0, CLASSES, n, dtype=np.int64)


def normalised(x: np.ndarray) -> torch.Tensor:
    """uint8 images as the float32 tensor the model sees."""
    return (torch.from_numpy(x).float() / 255.0 - MEAN) / STD


def client_tensors(seed: int, client: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``client``'s normalised images and labels."""
    x, y = images(seed, client, samples)
    return normalised(x), torch.from_numpy(y)


def test_tensors(seed: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised test images and labels."""
    x, y = images(seed, -1, samples)
    return normalised(x), torch.from_numpy(y)


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process ``root`` (default: this one) and
    all its live descendants, from /proc (Linux): Flower's simulation runs its clients in
    Ray worker processes below the ServerApp's, so this counts them too."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
    root = os.getpid() if root is None else root
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [c for c, pp in parent.items() if pp == pid]
    return total
