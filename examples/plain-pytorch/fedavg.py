"""FedAvg in plain PyTorch on non-IID 8x8 digits; --ftg adds FedFTG's server step."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from fedftg import ServerStep


class Net(nn.Module):
    """A small CNN with BatchNorm for 8x8 grey images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def split(y: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list:
    """Per-class Dirichlet(alpha) proportions over the clients (small alpha: non-IID)."""
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
        for k, part in enumerate(np.split(idx, cuts)):
            parts[k] += part.tolist()
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Local SGD, batch 32."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()


def average(states: list[dict], sizes: list[int]) -> dict:
    """The sample-weighted average of the clients' states (BatchNorm buffers included)."""
    w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    mean = {k: sum(wi * s[k].float() for wi, s in zip(w, states, strict=True)) for k in states[0]}
    return {k: v.to(states[0][k].dtype) for k, v in mean.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ftg", action="store_true", help="add FedFTG's server step")
    parser.add_argument("--ftg-iterations", type=int, default=10)
    parser.add_argument("--save", help="write the final model's state dict here")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean()) / x.std(), dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    rng = np.random.default_rng(0)
    order = torch.tensor(rng.permutation(len(y)))
    (x_test, y_test), x, y = (x[order[1500:]], y[order[1500:]]), x[order[:1500]], y[order[:1500]]
    parts = split(y.numpy(), 5, 0.3, rng)  # 5 clients
    model = Net()
    if args.ftg:  # FedFTG, line 1 of 3: the server step (it keeps its generator across rounds)
        step = ServerStep("ftg", model=model, num_classes=10, input_shape=(1, 8, 8),
                          settings={"iterations": args.ftg_iterations})  # fmt: skip
    for r in range(args.rounds):
        states, counts = [], []
        for part in parts:
            local = copy.deepcopy(model)
            train(local, x[part], y[part], epochs=2)
            states.append(local.state_dict())
            counts.append(torch.bincount(y[part], minlength=10))  # FedFTG, line 2: label counts
        state = average(states, [len(part) for part in parts])
        if args.ftg:  # FedFTG, line 3: fine-tune the average
            state, _ = step(state, states, torch.stack(counts))
        model.load_state_dict(state)
        with torch.no_grad():
            acc = float((model.eval()(x_test).argmax(1) == y_test).float().mean())
        print(f"round {r + 1}: test accuracy {acc:.3f}")
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
