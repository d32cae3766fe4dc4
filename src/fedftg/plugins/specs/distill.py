"""The settings FedFTG's and FedDF's data-free server steps share (not a plug-in itself:
`fedftg.plugins.specs.ftg` and `fedftg.plugins.specs.feddf` extend them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from fedftg.settings import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Check,
    Settings,
    at_least,
    below,
    setting,
)

if TYPE_CHECKING:
    from fedftg.fl.plugin import PluginEnv
    from fedftg.plugins.distill import GeneratorDistiller

S = TypeVar("S", bound="GeneratorDistiller")  # a server class built by `distill_server`


def distill_setting(default, help_text, **meta):
    """A setting of the data-free server steps; they existed in the first run directories,
    so they are fingerprinted whatever the run's methods (`fedftg.settings`)."""
    return setting(default, help_text, always_hashed=True, **meta)


@dataclass
class DistillSettings(Settings):
    """Settings shared by the data-free server steps (FedFTG and FedDF)."""

    gen_steps: int = distill_setting(
        1,
        "generator steps I_g per iteration (one Adam step per client each)",
        check=at_least(0, integer=True),
    )
    student_steps: int = distill_setting(5, "student steps I_d per iteration", check=POSITIVE_INT)
    batch_size: int = distill_setting(
        50,
        "synthetic batch B",
        check=Check(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2 (BatchNorm)"),
    )
    nz: int | None = distill_setting(
        None,
        "generator noise size; by default it follows the dataset, as the authors': 100 for "
        "up to 10 classes (CIFAR-10), 256 for more (CIFAR-100)",
        check=POSITIVE_INT,
        optional=True,
    )
    ngf: int = distill_setting(64, "generator width", check=POSITIVE_INT)
    gen_lr: float = distill_setting(0.01, "generator Adam learning rate", check=POSITIVE)
    student_lr: float = distill_setting(
        0.1,
        "student SGD learning rate (0: keep the weights, only re-estimate BatchNorm "
        "statistics on generated samples, a control)",
        check=NON_NEGATIVE,
    )
    lr_decay: float = distill_setting(
        0.998, "per-round decay of both learning rates", check=POSITIVE
    )
    student_weight_decay: float = distill_setting(1e-3, "student weight decay", check=NON_NEGATIVE)
    lambda_dis: float = distill_setting(1.0, "diversity weight", check=NON_NEGATIVE)
    temperature: float = distill_setting(1.0, "distillation temperature", check=POSITIVE)
    diversity: str = distill_setting(
        "all",
        "pairs the diversity term counts: all B x B (authors) or same_label",
        choices=("all", "same_label"),
        before="all",
    )
    impl: str = distill_setting(
        "fast",
        "fast, or reference: the authors' loop structure (same results, slower)",
        choices=("fast", "reference"),
    )
    bn_stats: str = distill_setting(
        "generated",
        "the student's BatchNorm statistics after the step: generated "
        "(re-estimated on generated samples, authors), aggregate (those it came with) or "
        "pooled (beyond the paper: the mixture of the round's teachers' running statistics "
        "weighted by sample count, whose variance keeps the spread between the clients' "
        "means that averaging drops; no extra pass)",
        choices=("generated", "aggregate", "pooled"),
        before="generated",
    )
    bn_loss: float = setting(
        0.0,
        "beyond the paper, 0 = off: weight W of a BatchNorm-statistics loss on the "
        "generator (DeepInversion/DENSE): at each teacher BatchNorm layer, the L2 gaps of "
        "the generated batch's mean and variance to the teacher's running ones, summed "
        "over layers, each teacher's weighted by its class-level weights on the batch, "
        "taken from the teacher pass the generator step already runs; it keeps the "
        "samples in the statistics the clients' data gave; 0 for a model without BatchNorm",
        check=NON_NEGATIVE,
        before=0.0,
    )
    gen_ema: float = setting(
        0.0,
        "beyond the paper, 0 = off: decay D of an exponential moving average of the "
        "generator's weights and buffers, updated after every generator step, that draws "
        "the samples the student learns from (the generator itself trains as before); a "
        "slowly moving sampler against the generator collapsing and the student forgetting "
        "(DFRD); kept in the server's state",
        check=below(1),
        before=0.0,
    )

    gen_reset: int = setting(
        0,
        "beyond the paper, 0 = off: every K rounds (rounds K+1, 2K+1, ...; 1 = every round) "
        "the generator, and its moving average, restart from fresh weights drawn from the "
        "run's seed and the round before the step trains them; a persistent generator "
        "collapses to about one image per class within a few rounds at CPU sizes, and a "
        "fresh one starts diverse; no extra cost",
        check=at_least(0, integer=True),
        before=0,
    )

    def resolve(self, num_classes: int) -> None:
        if self.nz is None:
            self.nz = default_nz(num_classes)


def default_nz(num_classes: int) -> int:
    """The authors' generator noise size: 100 for CIFAR-10, 256 for CIFAR-100 (by classes)."""
    return 100 if num_classes <= 10 else 256


def distill_server(server: type[S], s: DistillSettings, env: PluginEnv) -> S:
    """A data-free server step (FedFTG's or FedDF's) built for the run's data and device."""
    return server(
        s,
        env.num_classes,
        env.channels,
        env.image_size,
        device=env.device,
        seed=env.seed,
        precision=env.precision,
    )
