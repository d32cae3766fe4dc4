"""FedFTG's server step: data-free fine-tuning of the aggregated model (Zhang et al. 2022).

After aggregation, a conditional generator G(z, y) is trained to produce *hard* samples,
on which the global model (student) disagrees most with the participating clients'
ensemble (teacher) while staying classifiable by each client (fidelity) and diverse; the
student is then distilled from the class-level weighted ensemble on those samples. The
maths is in pure functions below; `FTGServer` runs the authors' schedule with them, on
the generator machinery it shares with FedDF (`fedftg.plugins.distill`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedftg.fl.ensemble import class_weights
from fedftg.models.stacked import Teachers
from fedftg.plugins.distill import GeneratorDistiller, sample_labels, within_class_distance
from fedftg.precision import upcast

if TYPE_CHECKING:
    from fedftg.plugins.specs.ftg import FTGSettings

# ----------------------------------------------------------------------- pure maths


def md_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sample_weights: torch.Tensor,
    distance: str = "l1",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Hard-sample mining term: minus the weighted student-teacher gap (teacher detached).

    Minimising it pushes the generator toward samples where the student disagrees with the
    teacher. l1 (authors' code): -mean_b(w_b * mean_c |s - t|). kl (an option, as in
    third-party re-implementations): -mean_b(w_b * T^2 * KL(softmax(t/T) || softmax(s/T))).
    """
    t = teacher_logits.detach()
    if distance == "l1":
        gap = (student_logits - t).abs().mean(dim=1)
    elif distance == "kl":
        log_s = F.log_softmax(student_logits / temperature, dim=1)
        log_t = F.log_softmax(t / temperature, dim=1)
        gap = (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature**2
    else:
        raise ValueError(f"unknown md distance {distance!r}")
    return -(sample_weights * gap).mean()


def cls_loss(
    teacher_logits: torch.Tensor, labels: torch.Tensor, sample_weights: torch.Tensor
) -> torch.Tensor:
    """Fidelity term: the teacher should classify G(z, y) as y.

    The authors multiply the batch-mean cross-entropy by the per-sample weights and then
    average, which equals CE * mean(w); that is what is computed here.
    """
    return F.cross_entropy(teacher_logits, labels) * sample_weights.mean()


def ensemble_target(teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Teacher distribution p_b = sum_k w_kb softmax(t_k(x_b)); logits (K,B,C), weights (K,B)."""
    return (weights.unsqueeze(-1) * F.softmax(teacher_logits, dim=-1)).sum(dim=0)


def distill_loss(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy averaged over batch AND classes (the authors' scaling, CE / C)."""
    return -(target * F.log_softmax(student_logits, dim=1)).mean()


# ---------------------------------------------------------------------- the server step


class FTGServer(GeneratorDistiller):
    """Runs FedFTG's server step each round; owns the generator, which persists.

    ``cfg.impl`` picks the implementation of the same maths: "fast" holds the teachers as
    one stacked copy, evaluates them in one batched call, skips the student's weight
    gradients during generator steps (they are discarded) and computes the samples and the
    teacher target once per iteration (the generator is frozen and the teachers in eval
    mode during the student steps, so they are the same in all I_d steps); "reference"
    follows the authors' loop structure: a teacher's weights reloaded before each forward,
    samples and target recomputed in each student step.
    """

    cfg: FTGSettings

    def _fine_tune(
        self,
        student: nn.Module,
        teachers: Teachers | Sequence[nn.Module],
        counts: np.ndarray,
        round_idx: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """FedFTG's server step proper (see `step`)."""
        cfg, dev = self.cfg, self.device
        fast = cfg.impl == "fast"
        nets = self._teachers(teachers)
        k = len(nets)
        decay = cfg.lr_decay**round_idx
        opt_g = torch.optim.Adam(
            self.generator.parameters(), lr=cfg.gen_lr * decay, betas=(0.9, 0.999)
        )
        opt_s = torch.optim.SGD(
            student.parameters(),
            lr=cfg.student_lr * decay,
            momentum=0.0,
            weight_decay=cfg.student_weight_decay,
        )
        counts_t = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
        alpha = class_weights(counts_t, cfg.ensemble).to(dev)  # (K, C)
        labels = sample_labels(
            counts_t.sum(0).numpy(), cfg.iterations, cfg.batch_size, generator, cfg.label_sampling
        ).to(dev)
        sums = dict.fromkeys(("loss_md", "loss_cls", "loss_dis", "loss_gen", "loss_distill"), 0.0)
        bn_on = cfg.bn_loss > 0
        if bn_on:
            sums["loss_bn"] = 0.0
        n_gen = 0
        grad_flags = [p.requires_grad for p in student.parameters()]
        for it in range(cfg.iterations):
            y = labels[it]
            z = torch.randn(
                cfg.batch_size, self.nz, generator=generator, device=generator.device
            ).to(dev)
            onehot = self._onehot(y)
            w = alpha[:, y]  # (K, B): teacher k's weight on each sample
            # generator: one Adam step per participating client, in turn
            student.eval()
            if fast:
                student.requires_grad_(False)
            self.generator.train()
            for _ in range(cfg.gen_steps):
                for j in range(k):
                    with self._autocast():
                        x = self.generator(z, onehot)
                        if bn_on:
                            t, gap = nets.one_with_bn_gap(j, x)
                            t = upcast(t)
                        else:
                            t = upcast(nets.one(j, x))
                        s = upcast(student(x))
                    x = upcast(x)
                    l_md = (
                        md_loss(s, t, w[j], cfg.md_distance, cfg.temperature)
                        if cfg.hard_mining
                        else x.new_zeros(())
                    )
                    l_cls = cls_loss(t, y, w[j])
                    l_dis = self._diversity(z, x, y)
                    loss = l_md + cfg.lambda_cls * l_cls + cfg.lambda_dis * l_dis / k
                    if bn_on:
                        l_bn = gap * w[j].mean()  # by its class-level weights, as l_cls
                        loss = loss + cfg.bn_loss * l_bn
                        sums["loss_bn"] += float(l_bn.detach())
                    opt_g.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_g.step()
                    self._generator_stepped()
                    n_gen += 1
                    sums["loss_md"] += float(l_md.detach())
                    sums["loss_cls"] += float(l_cls.detach())
                    sums["loss_dis"] += float(l_dis.detach())
                    sums["loss_gen"] += float(loss.detach())
            for p, flag in zip(student.parameters(), grad_flags, strict=True):
                p.requires_grad_(flag)
            # student: distil the weighted teacher ensemble on G's samples
            self.generator.eval()
            sampler = self.sampler().eval()
            student.train()
            for d in range(cfg.student_steps):
                if d == 0 or not fast:
                    with torch.no_grad(), self._autocast():
                        x = sampler(z, onehot)
                        target = ensemble_target(upcast(nets.all(x)), w)
                with self._autocast():
                    s = upcast(student(x))
                loss = distill_loss(s, target)
                opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt_s.step()
                sums["loss_distill"] += float(loss.detach())
        student.eval()
        out = {key: v / max(n_gen, 1) for key, v in sums.items() if key != "loss_distill"}
        out["loss_distill"] = sums["loss_distill"] / (cfg.iterations * cfg.student_steps)
        spread = within_class_distance(x, y)
        if spread is not None:
            out["sample_spread"] = spread
        return out
