"""FedFTG's server step: data-free fine-tuning of the aggregated model (Zhang et al. 2022).

After aggregation, a conditional generator G(z, y) is trained to produce *hard* samples,
on which the global model (student) disagrees most with the participating clients'
ensemble (teacher) while staying classifiable by each client (fidelity) and diverse; the
student is then distilled from the class-level weighted ensemble on those samples. The
maths is in pure functions below; `FTGServer` runs the authors' schedule with them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedftg.methods.specs.ftg import FTGConfig
from fedftg.models.bn_stats import load_pooled_statistics
from fedftg.models.generator import ConditionalGenerator
from fedftg.models.stacked import Teachers, as_teachers
from fedftg.precision import autocast, upcast
from fedftg.seeding import derive_seed

# ----------------------------------------------------------------------- pure maths


def sample_labels(
    class_counts: np.ndarray | torch.Tensor,
    iterations: int,
    batch_size: int,
    gen: torch.Generator,
    mode: str = "customized",
) -> torch.Tensor:
    """Labels for the I iterations of a round, as an (I, B) LongTensor.

    customized (the paper's "customized label sampling"): the I*B slots are filled in
    proportion to the participants' class counts. As in the authors' code, slot ranges
    come from the floored cumulative proportions, so every slot is filled and each class
    gets its floor share give or take one; a class nobody holds gets no slot. The slots
    are shuffled and cut into I batches. uniform (the ablation): every slot draws a class
    uniformly from all classes.
    """
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    total = iterations * batch_size
    num_classes = counts.numel()
    if mode == "uniform":
        labels = torch.randint(0, num_classes, (total,), generator=gen, device=gen.device)
        return labels.view(iterations, batch_size).cpu()
    if mode != "customized":
        raise ValueError(f"unknown label sampling {mode!r}")
    if counts.sum() <= 0:
        raise ValueError("customized label sampling needs at least one sample")
    bounds = torch.floor(torch.cumsum(counts / counts.sum(), 0) * total).long()
    bounds[-1] = total
    sizes = torch.diff(bounds, prepend=torch.zeros(1, dtype=torch.long))
    labels = torch.repeat_interleave(torch.arange(num_classes), sizes)
    perm = torch.randperm(total, generator=gen, device=gen.device).cpu()
    return labels[perm].view(iterations, batch_size)


def class_weights(counts: np.ndarray | torch.Tensor, mode: str = "class") -> torch.Tensor:
    """Teacher weights alpha_k^c, shape (K, C).

    class (the paper's class-level ensemble): alpha_k^c = n_k^c / (n^c + 1e-6), so for a
    class c the clients that hold it share the vote by their amount of c and a client
    without c has no say. uniform (the ablation): 1/K everywhere.
    """
    n = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
    if mode == "uniform":
        return torch.full_like(n, 1.0 / n.shape[0])
    if mode != "class":
        raise ValueError(f"unknown ensemble {mode!r}")
    return n / (n.sum(dim=0, keepdim=True) + 1e-6)


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


def diversity_loss(
    z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Diversity term exp(-mean over pairs (i, j) of [mean((z_i - z_j)^2) * mean|x_i - x_j|]).

    Without ``labels``: all B*B pairs, the diagonal included, as in the authors' code
    (inputs far apart in noise space should give images far apart). With ``labels``: only
    pairs of distinct samples that share a label, so that images of different classes, which
    differ anyway, cannot satisfy the term while each class collapses to one image
    (1.0, no gradient, when no two samples share a label).
    """
    b = z.shape[0]
    dz = torch.cdist(z.reshape(b, -1), z.reshape(b, -1), p=2).pow(2) / z[0].numel()
    flat = x.reshape(b, -1)
    dx = torch.cdist(flat, flat, p=1) / flat.shape[1]
    if labels is None:
        return torch.exp(-(dz * dx).mean())
    same = labels.view(-1, 1) == labels.view(1, -1)
    same.fill_diagonal_(False)
    if not bool(same.any()):
        return (dz * dx).sum() * 0.0 + 1.0
    return torch.exp(-(dz * dx)[same].mean())


def ensemble_target(teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Teacher distribution p_b = sum_k w_kb softmax(t_k(x_b)); logits (K,B,C), weights (K,B)."""
    return (weights.unsqueeze(-1) * F.softmax(teacher_logits, dim=-1)).sum(dim=0)


def distill_loss(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy averaged over batch AND classes (the authors' scaling, CE / C)."""
    return -(target * F.log_softmax(student_logits, dim=1)).mean()


def within_class_distance(x: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean L1 distance (per pixel) between samples that share a label; None without pairs.

    A collapse detector: a generator that ignores its noise gives the same image for every
    z of a class, and this falls to 0, while the diversity term (which mostly sees pairs of
    different classes) barely moves.
    """
    flat = x.detach().float().reshape(x.shape[0], -1)
    dist = torch.cdist(flat, flat, p=1) / flat.shape[1]
    same = labels.view(-1, 1) == labels.view(1, -1)
    same.fill_diagonal_(False)
    if not bool(same.any()):
        return None
    return float(dist[same].mean())


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * model`` for every floating parameter and
    buffer, in place; integer buffers (BatchNorm's step counters) are copied."""
    mine = dict(average.named_parameters()) | dict(average.named_buffers())
    theirs = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, a in mine.items():
        b = theirs[name].detach()
        if a.is_floating_point():
            a.mul_(decay).add_(b, alpha=1.0 - decay)
        else:
            a.copy_(b)


# ---------------------------------------------------------------------- the server step


EMA = "ema."  # the prefix of the generator's moving average in a server's state


@contextmanager
def kept_buffers(model: nn.Module, keep: bool) -> Iterator[None]:
    """On exit, put back ``model``'s buffers (BatchNorm running statistics) when ``keep``.

    The student steps run in train mode, which re-estimates those statistics on generated
    samples (the authors' code keeps them); keeping the aggregate's instead leaves the
    step's change to the weights alone.
    """
    if not keep:
        yield
        return
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved, strict=True):
                b.copy_(v)


class FTGServer:
    """Runs FedFTG's server step each round; owns the generator, which persists.

    ``cfg.impl`` picks the implementation of the same maths: "fast" holds the teachers as
    one stacked copy, evaluates them in one batched call, skips the student's weight
    gradients during generator steps (they are discarded) and computes the samples and the
    teacher target once per iteration (the generator is frozen and the teachers in eval
    mode during the student steps, so they are the same in all I_d steps); "reference"
    follows the authors' loop structure: a teacher's weights reloaded before each forward,
    samples and target recomputed in each student step.
    """

    def __init__(
        self,
        cfg: FTGConfig,
        num_classes: int,
        channels: int,
        image_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        precision: str = "fp32",
    ) -> None:
        if cfg.nz is None:  # follow the dataset; the caller's settings stay as they are
            cfg = dataclasses.replace(cfg)
            cfg.resolve(num_classes)
        self.cfg = cfg
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.precision = precision
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "generator"))
            self.generator = ConditionalGenerator(
                cfg.nz, num_classes, channels, image_size, cfg.ngf
            ).to(self.device)

        # the moving average of the generator that draws the student's samples (gen_ema)
        self.gen_ema: ConditionalGenerator | None = None
        if cfg.gen_ema > 0:
            self.gen_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's parameters and BatchNorm buffers (and, with ``gen_ema``, its
        moving average's under ``ema.``)."""
        out = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}
        if self.gen_ema is not None:
            ema = self.gen_ema.state_dict()
            out.update({f"{EMA}{k}": v.detach().clone() for k, v in ema.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state_dict` output; with ``gen_ema``, a state saved without the
        moving average starts it from the loaded generator."""
        if self.gen_ema is None:
            self.generator.load_state_dict(state)
            return
        own = {k: v for k, v in state.items() if not k.startswith(EMA)}
        self.generator.load_state_dict(own)
        ema = {k[len(EMA) :]: v for k, v in state.items() if k.startswith(EMA)}
        self.gen_ema.load_state_dict(ema or own)

    def sampler(self) -> ConditionalGenerator:
        """The generator the student's samples come from: the moving average with
        ``gen_ema``, else the generator itself."""
        return self.generator if self.gen_ema is None else self.gen_ema

    def _generator_stepped(self) -> None:
        """After each generator step: move the average (``gen_ema``) toward it."""
        if self.gen_ema is not None:
            ema_update(self.gen_ema, self.generator, self.cfg.gen_ema)

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(self.generator.embed_y.weight.dtype)

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _diversity(self, z: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The diversity term over the pairs ``cfg.diversity`` names."""
        return diversity_loss(z, x, y if self.cfg.diversity == "same_label" else None)

    def _teachers(self, teachers: Teachers | Sequence[nn.Module]) -> Teachers:
        return as_teachers(teachers, self.cfg.impl)

    def step(
        self,
        student: nn.Module,
        teachers: Teachers | Sequence[nn.Module],
        counts: np.ndarray,
        round_idx: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """Fine-tune ``student`` in place from ``teachers`` with label histograms ``counts``.

        ``teachers`` are the participants' models (modules, or a teacher set from
        `fedftg.models.stacked`). The student is left in eval mode, with its BatchNorm
        statistics re-estimated on generated samples or, with ``bn_stats="aggregate"``,
        as they came, or with ``"pooled"`` the teachers' pooled by sample count
        (`fedftg.models.bn_stats.pooled_statistics`). Returns the round's mean loss terms.
        """
        with kept_buffers(student, self.cfg.bn_stats != "generated"):
            out = self._fine_tune(student, teachers, counts, round_idx, generator)
        if self.cfg.bn_stats == "pooled":
            nets = self._teachers(teachers)
            sizes = torch.as_tensor(np.asarray(counts).sum(axis=1), dtype=torch.float64)
            load_pooled_statistics(student, [nets.state(j) for j in range(len(nets))], sizes)
        return out

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
                cfg.batch_size, cfg.nz, generator=generator, device=generator.device
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

    @torch.no_grad()
    def generate(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Generated images (normalised scale) of labels ``y``, from the generator the
        student learns from (`sampler`) in eval mode (its running statistics are read, not
        updated); its train/eval mode is restored."""
        z = torch.randn(len(y), self.cfg.nz, generator=generator, device=generator.device).to(
            self.device
        )
        net = self.sampler()
        was_training = net.training
        net.eval()
        try:
            return net(z, self._onehot(y.to(self.device)))
        finally:
            net.train(was_training)

    def sample_images(
        self, per_class: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` generated images of every class (normalised scale) and labels."""
        y = torch.arange(self.num_classes).repeat_interleave(per_class).to(self.device)
        return self.generate(y, generator), y
