"""The cross-device peer workload as a plain Flower app (Message API, FedAvg), timed.

`flwr run benchmarks/peer <connection>` on a simulation SuperLink with
``num-supernodes=<clients>``; benchmarks/peer_crossdevice.py drives it. The ClientApp
trains the re-declared CNN on its partition as Flower's PyTorch template does (model built
per message, SGD, one local epoch); the ServerApp runs FedAvg with central evaluation on
the test images after each round and writes to ``out`` (JSON): the time at the end of
each central evaluation (``marks``, the first one before round 1) and each evaluation's
``eval_s``, and the CPU seconds used so far by this process and its descendants (the Ray
workers that run the clients) at each mark (``cpu_marks``). Round r's time is marks[r] -
marks[r - 1]: the cohort's training, aggregation and the evaluation.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from workload import CNN, client_tensors, test_tensors, tree_cpu_s

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """One epoch of SGD on this node's partition from the received model."""
    cfg = context.run_config
    torch.set_num_threads(1)
    x, y = client_tensors(int(cfg["seed"]), int(context.node_config["partition-id"]),
                          int(cfg["samples"]))  # fmt: skip
    model = CNN()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    batch = int(cfg["batch"])
    order = torch.randperm(len(y))
    for start in range(0, len(y), batch):
        idx = order[start : start + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over ``per-round`` of ``clients`` nodes, central evaluation each round."""
    cfg = context.run_config
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg["seed"]))
    x, y = test_tensors(int(cfg["seed"]), int(cfg["test-samples"]))
    model = CNN()
    marks: list[float] = []
    cpu_marks: list[float] = []  # CPU seconds of this process and its Ray workers
    eval_s: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for s in range(0, len(y), int(cfg["eval-batch"])):
                logits = model(x[s : s + int(cfg["eval-batch"])])
                loss += float(F.cross_entropy(logits, y[s : s + len(logits)], reduction="sum"))
                correct += int((logits.argmax(1) == y[s : s + len(logits)]).sum())
        marks.append(time.perf_counter())
        cpu_marks.append(tree_cpu_s())
        eval_s.append(marks[-1] - start)
        return MetricRecord({"accuracy": correct / len(y), "loss": loss / len(y)})

    clients = int(cfg["clients"])
    strategy = FedAvg(
        fraction_train=int(cfg["per-round"]) / clients,
        fraction_evaluate=0.0,
        min_train_nodes=int(cfg["per-round"]),
        min_available_nodes=clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=1 + int(cfg["rounds"]),
        evaluate_fn=evaluate,
    )
    out = str(cfg["out"])
    with open(out + ".tmp", "w") as f:
        json.dump({"marks": marks, "cpu_marks": cpu_marks, "eval_s": eval_s}, f)
    os.replace(out + ".tmp", out)
