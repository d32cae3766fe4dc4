"""The cross-device peer workload on pfl-research (FedAvg, SimulatedBackend), timed.

Run with a Python that has `pfl` (e.g. /work/venvs/<name>/bin/python) by
benchmarks/peer_crossdevice.py, which passes the workload's sizes. Prints one JSON object:
``warmup_s`` (the first central iteration: local training only, as pfl evaluates from the
second on), then per timed round ``round_s`` (local training of the cohort, aggregation,
central evaluation), its CPU seconds ``cpu_s`` and ``eval_s`` (the central evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import CNN, client_tensors, test_tensors, tree_cpu_s  # noqa: E402


class PflCNN(CNN):
    """The CNN with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        self.eval() if eval else self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict:
        from pfl.metrics import Weighted

        self.eval() if eval else self.train()
        logits = self(x)
        loss = float(F.cross_entropy(logits, y, reduction="sum"))
        correct = int((logits.argmax(1) == y).sum())
        return {"loss": Weighted(loss, len(y)), "accuracy": Weighted(correct, len(y))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("clients", 1000), ("samples", 50), ("per-round", 50), ("rounds", 3),
                          ("batch", 10), ("test-samples", 10_000), ("eval-batch", 1000),
                          ("seed", 0), ("threads", 1)]:  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    data = {k: list(client_tensors(args.seed, k, args.samples)) for k in range(args.clients)}
    train = FederatedDataset.from_slices(
        data, get_user_sampler("minimize_reuse", list(range(args.clients)))
    )
    test = Dataset(raw_data=list(test_tensors(args.seed, args.test_samples)))
    net = PflCNN()
    model = PyTorchModel(
        net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    marks: list[float] = []
    cpu_marks: list[float] = []
    eval_s: list[float] = []

    class TimedEvaluation(CentralEvaluationCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            start = time.perf_counter()
            out = super().after_central_iteration(
                aggregate_metrics, model, central_iteration=central_iteration
            )
            if central_iteration > 0:
                eval_s.append(time.perf_counter() - start)
            return out

    class Stopwatch(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            marks.append(time.perf_counter())
            cpu_marks.append(tree_cpu_s())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            marks.append(time.perf_counter())
            cpu_marks.append(tree_cpu_s())
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=1 + args.rounds,
            evaluation_frequency=1,
            train_cohort_size=args.per_round,
            val_cohort_size=None,
        ),
        backend=SimulatedBackend(training_data=train, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=1, local_learning_rate=args.lr, local_batch_size=args.batch
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=args.eval_batch),
        callbacks=[
            TimedEvaluation(test, NNEvalHyperParams(local_batch_size=args.eval_batch)),
            Stopwatch(),
        ],
    )
    rounds, cpu = list(np.diff(marks)), list(np.diff(cpu_marks))
    result = {"warmup_s": rounds[0], "round_s": rounds[1:], "cpu_s": cpu[1:], "eval_s": eval_s}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
