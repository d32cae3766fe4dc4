"""Evaluation on the test split: the global model (`evaluate`, with its simple reference
`evaluate_reference`) and the round's client models used together (`evaluate_ensemble`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedftg.data.batches import DeviceArrays, eval_batches
from fedftg.fl.ensemble import class_weights
from fedftg.models.stacked import Teachers

# images per forward in `evaluate` on the CPU: activations of a few hundred 32x32 images stay
# in the cache (a forward of the CNN over 2000 CIFAR-shaped images, 1 thread: 2.9 s in
# chunks of 250 against 3.9 s in one batch of 1000)
CPU_EVAL_CHUNK = 250


def eval_chunk(device: torch.device, batch_size: int) -> int:
    """How many images `evaluate` passes through the model at once within a batch."""
    return min(batch_size, CPU_EVAL_CHUNK) if device.type == "cpu" else batch_size


@torch.inference_mode()
def evaluate(model: nn.Module, data: DeviceArrays, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode over the whole split.

    Equal bit for bit to `evaluate_reference` (tests/test_engine.py): the loss is summed
    per batch of ``batch_size`` as there, but without autograd bookkeeping, with the
    images sliced instead of gathered, and each batch's logits computed in cache-sized
    chunks (an eval-mode forward treats every image on its own, so chunking does not
    change a logit).
    """
    was_training = model.training
    model.eval()
    chunk = eval_chunk(data.y.device, batch_size)
    n = len(data)
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        parts = [
            model(data.normalise(data.x[s : min(s + chunk, end)])) for s in range(start, end, chunk)
        ]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        y = data.y[start:end]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(n, 1), loss_sum / max(n, 1)


@torch.no_grad()
def evaluate_reference(
    model: nn.Module, data: DeviceArrays, batch_size: int = 1000
) -> tuple[float, float]:
    """The simple evaluation `evaluate` must equal: one forward per gathered batch."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for idx in eval_batches(len(data), batch_size, data.y.device):
        x, y = data.batch(idx)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = max(len(data), 1)
    return correct / n, loss_sum / n


@torch.no_grad()
def evaluate_ensemble(
    teachers: Teachers, histograms: np.ndarray, data: DeviceArrays, batch_size: int = 1000
) -> dict[str, float]:
    """Test accuracy of the round's client models used together, before any server step.

    ensemble_acc: argmax of the clients' mean softmax. class_ensemble_acc: class c scores
    sum_k alpha_k^c softmax_c(t_k(x)) with FedFTG's class-level weights, i.e. the teacher
    that FedFTG distils from, used as a classifier. Their lead over the aggregated model is
    the knowledge averaging lost: what a server-side distillation step can hope to recover.
    """
    weights = {
        "ensemble_acc": class_weights(histograms, "uniform"),
        "class_ensemble_acc": class_weights(histograms, "class"),
    }
    weights = {k: w.to(data.y.device) for k, w in weights.items()}
    correct = dict.fromkeys(weights, 0)
    for idx in eval_batches(len(data), batch_size, data.y.device):
        x, y = data.batch(idx)
        probs = F.softmax(teachers.all(x).float(), dim=-1)  # (K, B, C)
        for key, w in weights.items():
            pred = (w.unsqueeze(1) * probs).sum(dim=0).argmax(dim=1)
            correct[key] += int((pred == y).sum())
    n = max(len(data), 1)
    return {k: c / n for k, c in correct.items()}
