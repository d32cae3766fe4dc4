"""flowerftg: a Flower ClientApp (PyTorch); the mod adds the label histogram FTG needs."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedftg.flower import label_histogram_mod
from flowerftg.task import NUM_CLASSES, Net, load_data, test, train


def partition(context: Context):
    """This node's training data, from its node config."""
    cfg = context.node_config
    return load_data(int(cfg["partition-id"]), int(cfg["num-partitions"]))


def train_labels(context: Context) -> torch.Tensor:
    return partition(context)[1]


# FTG: send this client's label counts with every train reply
app = ClientApp(mods=[label_histogram_mod(train_labels, NUM_CLASSES)])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received model on the local data."""
    torch.manual_seed(int(context.node_config["partition-id"]))
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = partition(context)
    config = msg.content["config"]
    loss = train(
        model,
        x,
        y,
        epochs=int(context.run_config["local-epochs"]),
        lr=float(config["lr"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = partition(context)
    loss, acc = test(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
