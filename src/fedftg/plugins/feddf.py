"""FedDF-style data-free ensemble distillation, as the FedFTG authors run it as a baseline.

The generator is trained on the averaged teacher's cross-entropy plus diversity (no hard
sample mining, no class weighting); then the student takes KL steps toward the uniform
average of the teachers' predictions on generated samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedftg.models.stacked import Teachers
from fedftg.plugins.distill import GeneratorDistiller, sample_labels
from fedftg.precision import upcast

if TYPE_CHECKING:
    from fedftg.plugins.specs.feddf import FedDFSettings


def kl_distill_loss(
    student_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(target || softmax(s / T)), mean over the batch."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_s, target, reduction="batchmean") * temperature**2


class FedDFServer(GeneratorDistiller):
    """Server step of the FedDF baseline, on the generator machinery it shares with FedFTG."""

    cfg: FedDFSettings

    def _fine_tune(
        self,
        student: nn.Module,
        teachers: Teachers | Sequence[nn.Module],
        counts: np.ndarray,
        round_idx: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        cfg = self.cfg
        decay = cfg.lr_decay**round_idx
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.gen_lr * decay)
        opt_s = torch.optim.SGD(
            student.parameters(),
            lr=cfg.student_lr * decay,
            weight_decay=cfg.student_weight_decay,
        )
        held = np.asarray(counts).sum(axis=0) > 0  # uniform over the classes present
        gen_sum = dis_sum = kl_sum = bn_sum = 0.0
        bn_on = cfg.bn_loss > 0
        nets = self._teachers(teachers)
        student.eval()
        self.generator.train()
        for _ in range(cfg.gen_steps):
            z, y = self._draw(held, generator)
            with self._autocast():
                x = self.generator(z, self._onehot(y))
                if bn_on:
                    logits, gaps = nets.all_with_bn_gap(x)
                    mean_logits = upcast(logits).mean(0)
                else:
                    mean_logits = upcast(nets.all(x)).mean(0)
            l_ce = F.cross_entropy(mean_logits, y)
            l_dis = self._diversity(z, upcast(x), y)
            loss = l_ce + cfg.lambda_dis * l_dis
            if bn_on:
                l_bn = gaps.mean()  # the teachers' uniform average, as their logits
                loss = loss + cfg.bn_loss * l_bn
                bn_sum += float(l_bn.detach())
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            self._generator_stepped()
            gen_sum += float(l_ce.detach())
            dis_sum += float(l_dis.detach())
        self.generator.eval()
        sampler = self.sampler().eval()
        student.train()
        for _ in range(cfg.student_steps):
            z, y = self._draw(held, generator)
            with torch.no_grad(), self._autocast():
                x = sampler(z, self._onehot(y))
                probs = F.softmax(upcast(nets.all(x)) / cfg.temperature, dim=-1).mean(0)
            with self._autocast():
                s = upcast(student(x))
            loss = kl_distill_loss(s, probs, cfg.temperature)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            kl_sum += float(loss.detach())
        student.eval()
        out = {
            "loss_cls": gen_sum / cfg.gen_steps,
            "loss_dis": dis_sum / cfg.gen_steps,
            "loss_distill": kl_sum / cfg.student_steps,
        }
        if bn_on:
            out["loss_bn"] = bn_sum / cfg.gen_steps
        return out

    def _draw(
        self, held: np.ndarray, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        counts = held.astype(np.float64)
        y = sample_labels(counts, 1, self.cfg.batch_size, generator, "customized")[0]
        z = torch.randn(self.cfg.batch_size, self.nz, generator=generator, device=generator.device)
        return z.to(self.device), y.to(self.device)
