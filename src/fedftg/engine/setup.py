"""What every method of one run shares and what a run builds from its settings: the
data and its partition on the device, the seeded initial model, the client method and the
plug-in's halves (from `fedftg.registry`). Both engines build from here, so an experiment
sees the same data, partition and initial model in-process and on Flower."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedftg import registry
from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.data.partition import Partition, partition_labels, scheme_settings
from fedftg.data.sources import Dataset, load_dataset
from fedftg.errors import UserError
from fedftg.fl.aggregation import State
from fedftg.fl.client import (
    ClientMethod,
    detached_state,
)
from fedftg.fl.plugin import ClientHalf, PluginEnv, ServerPlugin
from fedftg.models import build_model, check_split
from fedftg.seeding import derive_seed


@dataclass
class Setup:
    """What every method of one experiment shares."""

    cfg: RunConfig
    dataset: Dataset
    partition: Partition
    train: DeviceArrays
    test: DeviceArrays
    client_indices: list[torch.Tensor]
    init_state: State
    device: torch.device

    def new_model(self) -> nn.Module:
        d = self.dataset
        model = build_model(self.cfg.model, d.channels, d.image_size, d.num_classes)
        model.load_state_dict(self.init_state)
        return model.to(self.device)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; an unavailable accelerator is a `UserError`."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {name} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device: mps requested but it is not available")
    return torch.device(name)


def split_clients(cfg: RunConfig, ds: Dataset) -> Partition:
    """The configured partition of ``ds``'s training set (deterministic by seed)."""
    if cfg.clients > len(ds.train_y):
        raise UserError(
            f"clients: {cfg.clients} clients but only {len(ds.train_y)} training samples"
        )
    settings = scheme_settings(cfg.partition, vars(cfg))
    return partition_labels(
        ds.train_y, ds.num_classes, cfg.clients, cfg.partition, settings, seed=cfg.seed
    )


def initial_state(cfg: RunConfig, ds: Dataset) -> State:
    """The seeded initial global model, the same for every method and engine; checked to
    have what the run's methods need of it (`check_model_for`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        init = build_model(cfg.model, ds.channels, ds.image_size, ds.num_classes)
    check_model_for(cfg, init, ds.num_classes)
    return detached_state(init)


def check_model_for(cfg: RunConfig, model: nn.Module, num_classes: int) -> None:
    """A `UserError` naming the method if a method of the run reads the representation
    (MOON, FedGen: `reads_features` on their specs) and ``model`` lacks the ``features`` /
    ``classifier`` split (every model has passed `fedftg.models.check_contract`)."""
    for display, base, plugin in cfg.methods():
        if registry.method(base).reads_features or (
            plugin is not None and registry.plugin(plugin).reads_features
        ):
            check_split(cfg.model, model, num_classes, display)


def prepare(cfg: RunConfig) -> Setup:
    """Load data, partition it and build the initial model (seeded)."""
    return setup_from_dataset(cfg, load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download))


def setup_from_dataset(cfg: RunConfig, ds: Dataset) -> Setup:
    """Partition an already loaded dataset, put it on the device, build the initial model.

    The setup's config is ``cfg`` with the settings that follow the data resolved for it."""
    cfg = cfg.copy().resolve(ds.num_classes)
    device = resolve_device(cfg.device)
    part = split_clients(cfg, ds)
    return Setup(
        cfg=cfg,
        dataset=ds,
        partition=part,
        train=DeviceArrays(ds.train_x, ds.train_y, ds.mean, ds.std, device),
        test=DeviceArrays(ds.test_x, ds.test_y, ds.mean, ds.std, device),
        client_indices=[
            torch.as_tensor(ix, dtype=torch.long, device=device) for ix in part.client_indices
        ],
        init_state=initial_state(cfg, ds),
        device=device,
    )


def client_method(cfg: RunConfig, base: str) -> ClientMethod:
    """The configured client method ``base`` (from `fedftg.registry`)."""
    spec = registry.method(base)
    return spec.build(cfg.sections.get(base) if spec.settings else None, cfg)


def plugin_env(cfg: RunConfig, ds: Dataset, device: torch.device) -> PluginEnv:
    """What a plug-in of this run is built from besides its settings."""
    return PluginEnv(
        num_classes=ds.num_classes,
        channels=ds.channels,
        image_size=ds.image_size,
        device=device,
        seed=cfg.seed,
        precision=cfg.precision,
        model=cfg.model,
        dataset=cfg.dataset,
        batch_size=cfg.batch_size,
        local_epochs=cfg.local_epochs,
        local_steps=cfg.local_steps,
    )


def server_plugin(
    cfg: RunConfig, name: str | None, ds: Dataset, device: torch.device
) -> ServerPlugin | None:
    """The server side of the configured plug-in ``name`` (None for plain aggregation)."""
    if name is None:
        return None
    return registry.plugin(name).server(cfg.sections[name], plugin_env(cfg, ds, device))


def client_half(
    cfg: RunConfig, name: str | None, ds: Dataset, device: torch.device
) -> ClientHalf | None:
    """The client half of plug-in ``name``, if it has one (see `fedftg.fl.plugin`)."""
    factory = None if name is None else registry.plugin(name).client
    if name is None or factory is None:
        return None
    return factory(cfg.sections[name], plugin_env(cfg, ds, device))
