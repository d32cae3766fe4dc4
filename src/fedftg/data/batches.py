"""Data on the device: uint8 tensors, batched normalisation and augmentation, index batches.

Images stay uint8 on the training device (float32 images of a user's own data stay
float32); a batch is gathered by index, converted and normalised in one tensor operation,
and augmented (horizontal flip, 4-pixel pad + random crop) for the whole batch at once. No
per-sample Python.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class DeviceArrays:
    """A split's images and labels resident on ``device``, with its normalisation.

    ``x`` is uint8 (``mean`` and ``std`` on the [0, 1] pixel scale) or float32 (``mean``
    and ``std`` on the images' own scale: they are normalised as they are).
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: str | torch.device = "cpu",
    ) -> None:
        self.x = torch.as_tensor(np.ascontiguousarray(x), device=device)
        self.y = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
        shape = (1, len(mean), 1, 1)
        # x_norm = (x/255 - mean) / std == x * scale + shift (float images: x, not x/255)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
        self._scale = 1.0 / (255.0 * std_t) if self.x.dtype == torch.uint8 else 1.0 / std_t
        self._shift = -mean_t / std_t

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images and labels at ``idx``."""
        return self.normalise(self.x[idx]), self.y[idx]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float32 (B, C, H, W) -> float32 normalised with the dataset's mean and
        std."""
        return x.float() * self._scale + self._shift


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip (p=0.5), then with p=0.5 a random crop after zero padding.

    As in the FedFTG authors' CIFAR pipeline. Padding is applied to the normalised image
    with zeros, matching a pad of the normalised tensor.
    """
    b, _, h, w = x.shape
    dev = x.device
    flip = torch.rand(b, generator=gen, device=gen.device).to(dev) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    do_crop = torch.rand(b, generator=gen, device=gen.device).to(dev) < 0.5
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=gen, device=gen.device).to(dev)
    off = torch.where(do_crop.view(1, b), off, torch.full_like(off, pad))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = off[0].view(b, 1) + torch.arange(h, device=dev).view(1, h)
    cols = off[1].view(b, 1) + torch.arange(w, device=dev).view(1, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    # (B, H, W, C) after advanced indexing on dims 0, 2, 3
    out = padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def epoch_batches(
    indices: torch.Tensor, batch_size: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """One shuffled pass over ``indices`` in batches (the last one may be smaller).

    A client without samples gets no batches (and consumes no randomness).
    """
    if len(indices) == 0:
        return
    perm = torch.randperm(len(indices), generator=gen, device=gen.device).to(indices.device)
    shuffled = indices[perm]
    starts = list(range(0, len(shuffled), batch_size))
    if len(starts) > 1 and len(shuffled) - starts[-1] == 1:
        starts.pop()  # a lone last sample joins the previous batch (BatchNorm needs B > 1)
    ends = starts[1:] + [len(shuffled)]
    for start, end in zip(starts, ends, strict=True):
        yield shuffled[start:end]


def step_batches(
    indices: torch.Tensor, batch_size: int, steps: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Exactly ``steps`` batches, reshuffling after each full pass (none without samples)."""
    if len(indices) == 0:
        return
    done = 0
    while done < steps:
        for idx in epoch_batches(indices, batch_size, gen):
            yield idx
            done += 1
            if done == steps:
                return


def eval_batches(n: int, batch_size: int, device: str | torch.device) -> Iterator[torch.Tensor]:
    """Consecutive index batches covering 0..n-1."""
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(start + batch_size, n), device=device)
