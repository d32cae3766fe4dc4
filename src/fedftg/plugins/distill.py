"""What FedFTG's and FedDF's data-free server steps share: the conditional generator that
persists across rounds (and its moving average), label and noise draws, the diversity
term, the collapse measure, and the handling of the student's BatchNorm statistics.

Each step subclasses `GeneratorDistiller` and writes its own `_fine_tune` (how the
generator and the student are trained); the maths shared by both are the pure functions
below.
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

from fedftg.models.bn_stats import load_pooled_statistics
from fedftg.models.generator import ConditionalGenerator
from fedftg.models.stacked import Teachers, as_teachers
from fedftg.plugins.specs.distill import DistillSettings, default_nz
from fedftg.precision import autocast
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


# ----------------------------------------------------------- the shared server step


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


class GeneratorDistiller:
    """A data-free server step built on a conditional generator, which persists across
    rounds: FedFTG's (`fedftg.plugins.ftg.FTGServer`) and FedDF's
    (`fedftg.plugins.feddf.FedDFServer`) subclass it and write `_fine_tune`.

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
        cfg: DistillSettings,
        num_classes: int,
        channels: int,
        image_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        precision: str = "fp32",
    ) -> None:
        # the noise size follows the dataset when unset; the caller's settings stay as they are
        self.nz = cfg.nz if cfg.nz is not None else default_nz(num_classes)
        self.cfg = cfg if cfg.nz is not None else dataclasses.replace(cfg, nz=self.nz)
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.precision = precision
        self.seed = seed
        self._shape = (channels, image_size)
        self.generator = self._fresh_generator(derive_seed(seed, "generator"))

        # the moving average of the generator that draws the student's samples (gen_ema)
        self.gen_ema: ConditionalGenerator | None = None
        if cfg.gen_ema > 0:
            self.gen_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def _fresh_generator(self, seed: int) -> ConditionalGenerator:
        """A newly initialised generator whose weights come from ``seed`` alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ConditionalGenerator(self.nz, self.num_classes, *self._shape, self.cfg.ngf)
        return net.to(self.device)

    def _reset_due(self, round_idx: int) -> bool:
        """Whether round ``round_idx`` (0-based) starts from a fresh generator (``gen_reset``)."""
        k = self.cfg.gen_reset
        return k > 0 and round_idx > 0 and round_idx % k == 0

    def reset_generator(self, round_idx: int) -> None:
        """Restart the generator (and its moving average) from weights drawn from the run's
        seed and ``round_idx``: the same fresh weights in every engine and on resume."""
        fresh = self._fresh_generator(derive_seed(self.seed, "generator", round_idx))
        self.generator.load_state_dict(fresh.state_dict())
        if self.gen_ema is not None:
            self.gen_ema.load_state_dict(fresh.state_dict())

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
        if self._reset_due(round_idx):
            self.reset_generator(round_idx)
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
        """The step proper: train the generator, then the student from it (see `step`)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Generated images (normalised scale) of labels ``y``, from the generator the
        student learns from (`sampler`) in eval mode (its running statistics are read, not
        updated); its train/eval mode is restored."""
        z = torch.randn(len(y), self.nz, generator=generator, device=generator.device).to(
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
