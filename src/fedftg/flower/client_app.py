"""Flower ClientApp: local training with any fedftg client method, on this node's partition.

The node's partition id comes from its node config (``partition-id``: set by Flower's
simulation, or by ``flower-supernode --node-config "partition-id=3"``). The node keeps only
its own samples; its method state (SCAFFOLD's c_k, FedDyn's gradient, MOON's previous
model) lives in the node's Context state between rounds. The training code is the same
`train_local` as the in-process simulator's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.data.partition import Partition
from fedftg.data.sources import Dataset, load_dataset
from fedftg.engine.checkpoint import config_fingerprint
from fedftg.engine.clients import client_task, label_histogram, local_spec, train_clients
from fedftg.engine.setup import client_half, client_method, resolve_device, split_clients
from fedftg.errors import UserError
from fedftg.fl.client import LocalContext
from fedftg.flower.common import (
    CLIENT_STATE_KEY,
    config_from_json,
    from_record,
    int_entry,
    report_user_errors,
    to_record,
    use_run_threads,
)
from fedftg.models import build_model

log = logging.getLogger("flwr")

app = ClientApp()


@dataclass
class NodeData:
    """One node's own training samples, resident on its device."""

    train: DeviceArrays
    indices: torch.Tensor
    histogram: list[int]
    dataset: Dataset


_DATASETS: dict[str, tuple[Dataset, Partition]] = {}
_NODES: dict[tuple[str, int], NodeData] = {}


def node_data(cfg: RunConfig, pid: int) -> NodeData:
    """This node's samples; the dataset and its split are loaded once per process.

    A process may serve several simulated nodes (Flower's simulation runs nodes in a few
    workers), so the decoded dataset is kept per process, and each node keeps only its
    own samples on the device.
    """
    key = config_fingerprint(cfg.to_dict())
    if (key, pid) not in _NODES:
        if key not in _DATASETS:
            _DATASETS.clear()  # one experiment at a time per process
            _NODES.clear()
            ds = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
            _DATASETS[key] = (ds, split_clients(cfg, ds))
        ds, part = _DATASETS[key]
        if not 0 <= pid < cfg.clients:
            raise UserError(
                f"node config: partition-id {pid} is outside 0..{cfg.clients - 1} "
                f"(the run has {cfg.clients} clients)"
            )
        own = part.client_indices[pid]
        device = resolve_device(cfg.device)
        train = DeviceArrays(ds.train_x[own], ds.train_y[own], ds.mean, ds.std, device)
        hist = label_histogram(
            train.y, ds.num_classes, cfg.histogram_epsilon, cfg.seed, pid
        ).tolist()
        _NODES[(key, pid)] = NodeData(train, torch.arange(len(own), device=device), hist, ds)
    return _NODES[(key, pid)]


def partition_id(context: Context) -> int:
    """This node's partition id from its node config (a `UserError` if missing or bad)."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise UserError(
            "node config has no partition-id "
            '(flower-supernode --node-config "partition-id=K num-partitions=N")'
        )
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise UserError(f"node config: partition-id must be an integer >= 0, got {value!r}")
    return int(value)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds."""
    with report_user_errors(log):
        return _query(msg, context)


def _query(msg: Message, context: Context) -> Message:
    content = RecordDict({"info": ConfigRecord({"partition-id": partition_id(context)})})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the received global model.

    A bad node config ends this reply with one logged ``error:`` line (the server logs
    the node as not answering), not a traceback.
    """
    with report_user_errors(log):
        return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    cfg = config_from_json(str(config["run"]))
    use_run_threads(cfg)
    round_idx = int_entry(config, "round")
    base = str(config["base"])
    pid = partition_id(context)
    data = node_data(cfg, pid)
    ds = data.dataset
    device = data.train.y.device
    model = build_model(cfg.model, ds.channels, ds.image_size, ds.num_classes).to(device)
    method = client_method(cfg, base)
    state_key = f"{CLIENT_STATE_KEY}-{config['method']!s}"
    if state_key in context.state:
        client_state = from_record(context.state.array_records[state_key], device)
    else:
        client_state = method.init_client_state(model)
    ctx = LocalContext(
        global_state=from_record(msg.content.array_records["global"], device),
        client_state=client_state,
        server_state=from_record(msg.content.array_records["server"], device),
        num_clients=cfg.clients,
    )
    spec = local_spec(cfg, ds, round_idx)
    half, payload = None, {}
    if "plugin" in msg.content:  # a plug-in with a client half (FedGen): its loss term
        half = client_half(cfg, str(config["plugin"]), ds, device)
        payload = from_record(msg.content.array_records["plugin"], device)
    labels = data.train.y[data.indices]
    task = client_task(
        cfg, ds.num_classes, model, half, payload, labels, data.indices, ctx, round_idx, pid, spec
    )
    (result,) = train_clients(model, data.train, method, [task], spec)
    context.state[state_key] = to_record(ctx.client_state)
    metrics = MetricRecord(
        {
            "num-examples": result.num_samples,
            "loss": result.loss,
            "steps": result.steps,
            "partition-id": pid,
            "histogram": data.histogram,
        }
    )
    if result.plugin_loss is not None:  # FedGen's term, logged apart from the loss
        metrics["plugin-loss"] = result.plugin_loss
    content = RecordDict(
        {
            "model": to_record(result.state),
            "upload": ArrayRecord(_cpu(result.upload)),
            "metrics": metrics,
        }
    )
    return Message(content=content, reply_to=msg)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}
