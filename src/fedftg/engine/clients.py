"""The client side of a round, for both engines: a client's local hyper-parameters, its
label histogram (and its privacy noise), its plug-in term, and its local update from its
own random stream (`client_task`, `train_clients`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.data.sources import Dataset
from fedftg.fl.client import (
    ClientMethod,
    LocalContext,
    LocalResult,
    LocalSpec,
    Term,
    train_local,
)
from fedftg.fl.plugin import ClientHalf
from fedftg.fl.vectorised import train_local_vmap
from fedftg.seeding import numpy_rng, torch_rng


def label_histogram(
    labels: torch.Tensor, num_classes: int, epsilon: float = 0.0, seed: int = 0, client: int = 0
) -> np.ndarray:
    """A client's label counts: what it uploads beside its model for FedFTG.

    With ``epsilon > 0`` the counts are released through the Laplace mechanism (scale
    1/epsilon per class: one sample changes one count by one), rounded and clipped at 0.
    The noise is drawn once per client (keyed by seed and client id), so uploading it every
    round reveals nothing more than the first upload: the whole run is epsilon-DP for the
    label histogram.
    """
    counts = torch.bincount(labels, minlength=num_classes).cpu().numpy().astype(np.int64)
    if epsilon <= 0:
        return counts
    noise = numpy_rng(seed, "histogram", client).laplace(0.0, 1.0 / epsilon, num_classes)
    return np.maximum(0, np.rint(counts + noise)).astype(np.int64)


def local_spec(cfg: RunConfig, ds: Dataset, round_idx: int) -> LocalSpec:
    """Local hyper-parameters of round ``round_idx`` (0-based), with the decayed lr."""
    if cfg.augment == "auto":
        aug = ds.channels == 3 and ds.image_size == 32
    else:
        aug = cfg.augment == "on"
    return LocalSpec(
        lr=cfg.lr * cfg.lr_decay**round_idx,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        clip=cfg.clip,
        augment=aug,
        precision=cfg.precision,
    )


def plugin_term(
    half: ClientHalf,
    model: nn.Module,
    payload: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    cfg: RunConfig,
    round_idx: int,
    client: int,
    spec: LocalSpec,
) -> Term | None:
    """Client ``client``'s loss term from a plug-in's client half, from its exact label
    counts and its own random stream: one place, so that both engines draw the same."""
    exact = label_histogram(labels, num_classes)
    rng = torch_rng(cfg.seed, "plugin-local", round_idx, client, device=labels.device)
    return half.term(model, payload, exact, round_idx, spec, rng)


@dataclass
class ClientTask:
    """One selected client's local update of a round, ready to train: its samples, its
    method context, its own random stream and its plug-in term."""

    client: int
    indices: torch.Tensor
    ctx: LocalContext
    gen: torch.Generator
    term: Term | None


def client_task(
    cfg: RunConfig,
    num_classes: int,
    model: nn.Module,
    half: ClientHalf | None,
    payload: dict[str, torch.Tensor],
    labels: torch.Tensor,
    indices: torch.Tensor,
    ctx: LocalContext,
    round_idx: int,
    client: int,
    spec: LocalSpec,
) -> ClientTask:
    """Client ``client``'s update of round ``round_idx`` (0-based): the one place both
    engines set it up, so its random streams (batches, augmentation, plug-in draws) are
    keyed the same way in-process and on a Flower node."""
    gen = torch_rng(cfg.seed, "local", round_idx, client, device=labels.device)
    term = None
    if half is not None:
        term = plugin_term(half, model, payload, labels, num_classes, cfg, round_idx, client, spec)
    return ClientTask(client, indices, ctx, gen, term)


def train_clients(
    model: nn.Module,
    train: DeviceArrays,
    method: ClientMethod,
    tasks: list[ClientTask],
    spec: LocalSpec,
    vectorise: bool = False,
) -> list[LocalResult]:
    """Run the clients' local updates: together (`train_local_vmap`) when ``vectorise``,
    else one after another (the reference); both give each client the same result."""
    if vectorise:
        return train_local_vmap(
            model,
            train,
            [t.indices for t in tasks],
            method,
            [t.ctx for t in tasks],
            spec,
            [t.gen for t in tasks],
            [t.term for t in tasks],
        )
    return [train_local(model, train, t.indices, method, t.ctx, spec, t.gen, t.term) for t in tasks]
