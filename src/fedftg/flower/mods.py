"""Client side of `fedftg.flower.ftg.FTGStrategy`: the label histogram in the train reply.

FedFTG's server step needs each client's label counts beside its model (they weight the
teachers per class and set the classes the generator draws). `label_histogram_mod` is a
Flower mod that adds them to every successful train reply; `add_label_histogram` does the
same from inside a ClientApp's train function. With ``epsilon > 0`` the counts are released
through the Laplace mechanism exactly as ``fedftg run --histogram-epsilon`` does
(`fedftg.engine.clients.label_histogram`): the noise is drawn once per client from
``(seed, client)``, so repeated uploads reveal nothing more than the first. Keep that seed
on the clients: a server that knows it can subtract the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedftg.engine.clients import label_histogram
from fedftg.errors import UserError
from fedftg.flower.ftg import HISTOGRAM_KEY

LabelsFn = Callable[[Context], Any]
# Flower's mod signature, spelled out: its aliases live in flwr.clientapp.typing, which
# Flower does not document as public
ClientAppCallable = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, ClientAppCallable], Message]


def add_label_histogram(
    content: RecordDict,
    labels: Any,
    num_classes: int,
    *,
    epsilon: float = 0.0,
    seed: int | None = None,
    client: int = 0,
) -> RecordDict:
    """Put the label counts of ``labels`` (the client's training labels, any int array) into
    a train reply's ``content`` (``content["label-histogram"]["counts"]``); returns it.

    ``epsilon > 0`` adds Laplace noise keyed by ``seed`` (required then, private to the
    clients) and ``client`` (this client's id, e.g. its partition id)."""
    _check_noise(epsilon, seed)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        low, high = int(y.min()), int(y.max())
        raise UserError(f"labels: must lie in [0, {num_classes}), got {low}..{high}")
    counts = label_histogram(y, num_classes, float(epsilon), seed or 0, client)
    content[HISTOGRAM_KEY] = ConfigRecord({"counts": [int(v) for v in counts]})
    return content


def label_histogram_mod(
    labels: LabelsFn,
    num_classes: int,
    *,
    epsilon: float = 0.0,
    seed: int | None = None,
) -> Mod:
    """A Flower mod that attaches the client's label histogram to its train replies.

    ``labels(context)`` returns the client's training labels (it is called for each train
    message; cache the data as the ClientApp does). The client id that keys the noise is
    ``node_config["partition-id"]``, else the node id. Use it as
    ``ClientApp(mods=[label_histogram_mod(...)])`` or ``@app.train(mods=[...])``.
    """
    _check_noise(epsilon, seed)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
            return reply
        client = int(context.node_config.get("partition-id", context.node_id))
        add_label_histogram(
            reply.content, labels(context), num_classes, epsilon=epsilon, seed=seed, client=client
        )
        return reply

    return mod


def _check_noise(epsilon: float, seed: int | None) -> None:
    """The Laplace settings are a finite ``epsilon >= 0`` and, for noise, a seed."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise UserError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise UserError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
    if epsilon > 0 and seed is None:
        raise UserError("seed: a noised histogram needs a seed the clients keep to themselves")
