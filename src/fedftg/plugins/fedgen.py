"""FedGen (Zhu, Hong, Zhou, ICML 2021): a feature-space generator that regularises clients.

Each round the server trains a conditional generator G(y, eps) -> feature so that the
participating clients' classifier heads, weighted per label by how much of that label each
client saw, classify G(y, eps) as y (plus a diversity term and an optional adversarial
term against a student head). The generator is sent to the clients, which add two terms to
their local loss: a KL term pulling their predictions on real data toward their own head's
prediction on G(y) for the batch's labels, and a cross-entropy term on G(y') for labels y'
drawn from the federation's labels. The server's model is plain FedAvg: FedGen changes
what clients learn, not the aggregate.

Everything here is pure maths over tensors, faithful to the authors' code
(FLAlgorithms/servers/serverpFedGen.py, FLAlgorithms/users/userpFedGen.py); the
differences are listed in docs/notes/2026-12-02-fedgen.md. All randomness comes from
explicit ``torch.Generator`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedftg.fl.aggregation import State
from fedftg.fl.client import LocalSpec, Term, classifier_head
from fedftg.fl.plugin import PluginEnv
from fedftg.models import build_model
from fedftg.models.feature_generator import (
    FeatureGenerator,
    generator_dims,
)
from fedftg.models.stacked import Teachers
from fedftg.plugins.distill import diversity_loss
from fedftg.precision import upcast
from fedftg.seeding import derive_seed

if TYPE_CHECKING:
    from fedftg.plugins.specs.fedgen import FedGenSettings


def build_generator(
    cfg: FedGenSettings,
    channels: int,
    num_classes: int,
    feature_dim: int,
    seed: int = 0,
) -> FeatureGenerator:
    """The round-0 generator, initialised from ``(seed, "fedgen-generator")`` (global RNG
    untouched); sizes from the authors' entry for ``channels`` unless ``cfg`` sets them."""
    hidden, noise = generator_dims(channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "fedgen-generator"))
        return FeatureGenerator(
            num_classes,
            feature_dim,
            noise_dim=cfg.noise_dim or noise,
            hidden_dim=cfg.hidden_dim or hidden,
            embedding=cfg.embedding,
            noise=cfg.noise,
            output=cfg.output,
        )


def generator_optimizer(generator: FeatureGenerator, cfg: FedGenSettings) -> torch.optim.Adam:
    """The generator's Adam, created once and kept across rounds (its moments persist)."""
    return torch.optim.Adam(
        generator.parameters(),
        lr=cfg.ensemble_lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=cfg.ensemble_weight_decay,
    )


# ---------------------------------------------------------------------- server maths


def label_weights(
    counts: np.ndarray | torch.Tensor, prior: float = 1.0, min_samples: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label teacher weights (K, C) and the qualified labels (Q,) from counts (K, C).

    With m = counts + prior, weight[k, c] = m[k, c] / sum_k m[k, c] (clients share each
    label's vote by their amount of it; 0 where a label has no mass at all), and label c is
    qualified, i.e. drawn for the generator, when max_k m[k, c] > min_samples. With the
    authors' prior 1 and threshold 1 that is "some participant has at least one".
    """
    m = torch.as_tensor(counts, dtype=torch.float32) + prior
    total = m.sum(dim=0, keepdim=True)
    weights = torch.where(total > 0, m / total.clamp_min(1e-30), torch.zeros_like(m))
    qualified = torch.nonzero(m.max(dim=0).values > min_samples).flatten()
    return weights, qualified


def sample_uniform(labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` labels drawn uniformly with replacement from ``labels`` (on its device)."""
    idx = torch.randint(len(labels), (n,), generator=gen, device=gen.device)
    return labels[idx.to(labels.device)]


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits (K, B, C) of K linear heads, weight (K, C, D) and bias (K, C), on (B, D)."""
    return torch.einsum("bd,kcd->kbc", features, weight) + bias.unsqueeze(1)


def teacher_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k mean_b weights[k, y_b] * CE(logits[k, b], y_b); logits (K, B, C), weights (K, C).

    Each sample's cross-entropy under teacher k is weighted by k's share of its label. The
    authors multiply a (B,) loss by a (B, 1) weight, which broadcasts to (B, B) and so
    computes mean(CE) * mean(weight) per teacher instead; this is the per-sample weighting
    their code was written for (see the note).
    """
    k, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(k * b, c), y.repeat(k), reduction="none").view(k, b)
    return (weights[:, y] * ce).mean(dim=1).sum()


def ensemble_logits(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The teachers' label-weighted logit sum (B, C): sum_k weights[k, y_b] * logits[k, b]."""
    return (weights[:, y].unsqueeze(-1) * logits).sum(dim=0)


def student_kl(student_logits: torch.Tensor, ensemble: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ensemble) || softmax(student)) summed and divided by B * C (the element
    mean of the authors' ``F.kl_div`` call with its default reduction)."""
    return kl_sum(ensemble, student_logits) / student_logits.numel()


def kl_sum(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(softmax(target_logits) || softmax(logits)), from log-softmaxes
    (no log of a zero probability; vmap-friendly, unlike ``F.kl_div``, which PyTorch
    runs one client at a time under vmap)."""
    log_p = F.log_softmax(target_logits, dim=-1)
    return (log_p.exp() * (log_p - F.log_softmax(logits, dim=-1))).sum()


def generator_loss(
    features: torch.Tensor,
    eps: torch.Tensor,
    y: torch.Tensor,
    heads_weight: torch.Tensor,
    heads_bias: torch.Tensor,
    weights: torch.Tensor,
    cfg: FedGenSettings,
    student_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
) -> State:
    """The generator's objective on one batch, and its terms (all 0-dim tensors).

    loss = ensemble_alpha * teacher - ensemble_beta * student + ensemble_eta * diversity,
    with ``teacher`` = `teacher_loss` of the K heads on G's ``features`` (B, D) for labels
    ``y``, ``student`` = `student_kl` of the student head against the teachers'
    `ensemble_logits` (the generator seeks features where they disagree; only computed
    when a student head is given, and only in the loss when ensemble_beta > 0) and
    ``diversity`` = the authors' DiversityLoss: exp(-mean over all pairs of
    mean((eps_i - eps_j)^2) * mean|f_i - f_j|), on the noise, not the label input.
    """
    logits = head_logits(features, heads_weight, heads_bias)
    teacher = teacher_loss(logits, y, weights)
    diversity = diversity_loss(eps, features)
    loss = cfg.ensemble_alpha * teacher + cfg.ensemble_eta * diversity
    student = features.new_zeros(())
    if student_weight is not None and student_bias is not None:
        s = F.linear(features, student_weight, student_bias)
        student = student_kl(s, ensemble_logits(logits, y, weights))
        if cfg.ensemble_beta > 0:
            loss = loss - cfg.ensemble_beta * student
    elif cfg.ensemble_beta > 0:
        raise ValueError("ensemble_beta > 0 needs the student head")
    return {"loss": loss, "teacher": teacher, "student": student, "diversity": diversity}


def train_generator(
    generator: FeatureGenerator,
    optimizer: torch.optim.Optimizer,
    heads_weight: torch.Tensor,
    heads_bias: torch.Tensor,
    counts: np.ndarray | torch.Tensor,
    cfg: FedGenSettings,
    round_idx: int,
    batch_size: int,
    gen: torch.Generator,
    student_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
) -> dict[str, float]:
    """One round of the authors' generator training, in place; returns the mean terms.

    ``heads_weight`` (K, C, D) and ``heads_bias`` (K, C) are the participants' classifier
    heads after local training (e.g. a `StackedModels`' ``classifier.weight`` /
    ``classifier.bias``), ``counts`` (K, C) their label counts, ``batch_size`` the clients'
    local batch size (used unless ``cfg.batch_size`` is set). ``optimizer`` is the
    generator's persistent Adam (`generator_optimizer`); its lr is set to
    ensemble_lr * lr_decay**round_idx, which is what the authors' ExponentialLR, stepped
    after each round, gives. Each of the ``cfg.generator_steps`` steps draws labels
    uniformly from the qualified ones, then noise, from ``gen``, in train mode (BatchNorm
    on batch statistics, running statistics updated). The generator is left in eval mode,
    as the clients use it.
    """
    if cfg.ensemble_beta > 0 and (student_weight is None or student_bias is None):
        raise ValueError("ensemble_beta > 0 needs the student head")
    device = heads_weight.device
    bs = cfg.batch_size or batch_size
    weights, qualified = label_weights(counts, cfg.label_count_prior, cfg.min_samples_per_label)
    if len(qualified) == 0:
        raise ValueError("no label is qualified: the participants' label counts are empty")
    weights, qualified = weights.to(device), qualified.to(device)
    lr = cfg.ensemble_lr * cfg.lr_decay**round_idx
    for group in optimizer.param_groups:
        group["lr"] = lr
    heads_weight, heads_bias = heads_weight.detach(), heads_bias.detach()
    if student_weight is not None and student_bias is not None:
        student_weight, student_bias = student_weight.detach(), student_bias.detach()
    generator.train()
    sums = dict.fromkeys(
        ("loss", "teacher", "student", "diversity"), torch.zeros((), device=device)
    )
    steps = cfg.generator_steps
    for _ in range(steps):
        y = sample_uniform(qualified, bs, gen)
        eps = generator.sample_noise(bs, gen)
        terms = generator_loss(
            generator(y, eps),
            eps,
            y,
            heads_weight,
            heads_bias,
            weights,
            cfg,
            student_weight,
            student_bias,
        )
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        sums = {key: v + terms[key].detach() for key, v in sums.items()}
    generator.eval()
    out = {f"gen_{key}": float(v) / max(steps, 1) for key, v in sums.items()}
    out["gen_lr"] = lr
    out["gen_qualified_labels"] = float(len(qualified))
    return out


# ---------------------------------------------------------------------- client maths


@dataclass(frozen=True)
class ClientCoefficients:
    """The weights of a client's two generative terms at one local step."""

    latent: float  # on the latent KL term (generative_beta this round)
    teacher: float  # on the teacher CE term (generative_alpha this round * gen_ratio)

    @property
    def active(self) -> bool:
        """Whether the regulariser is on (when off, nothing needs generating)."""
        return self.latent > 0 or self.teacher > 0


def generative_schedule(init: float, decay: float, floor: float, round_idx: int) -> float:
    """init * decay**round_idx, floored at ``floor`` (the authors' exp_lr_scheduler with
    lr_decay_epoch 1); a zero ``init`` stays zero, so a term can be switched off."""
    return max(min(floor, init), init * decay**round_idx)


def client_coefficients(
    cfg: FedGenSettings, round_idx: int, local_epoch: int, batch_size: int
) -> ClientCoefficients:
    """The coefficients at local epoch ``local_epoch`` (0-based) of round ``round_idx``.

    Zero in round 0 (no generator has been trained yet) and from local epoch
    ``cfg.early_stop`` on; else generative_beta and generative_alpha on their per-round
    schedule, the latter times gen_ratio = gen_batch_size / ``batch_size`` (the client's
    local batch size; 1 when gen_batch_size is None), which rebalances the generated batch
    against the real one.
    """
    if round_idx == 0 or local_epoch >= cfg.early_stop:
        return ClientCoefficients(0.0, 0.0)
    alpha = generative_schedule(
        cfg.generative_alpha, cfg.generative_decay, cfg.generative_floor, round_idx
    )
    beta = generative_schedule(
        cfg.generative_beta, cfg.generative_decay, cfg.generative_floor, round_idx
    )
    return ClientCoefficients(
        latent=beta, teacher=alpha * cfg.generated_batch(batch_size) / batch_size
    )


@torch.no_grad()
def prepare_client_inputs(
    generator: FeatureGenerator,
    y: torch.Tensor,
    available_labels: torch.Tensor,
    gen_batch_size: int,
    gens: torch.Generator | Sequence[torch.Generator],
) -> State:
    """The frozen generator's outputs one client step needs, computed without autograd.

    For a batch with labels ``y`` (B,) and one ``gens`` generator: ``latent_features``
    (B, D) = G(y, eps), ``teacher_labels`` (gen_batch_size,) drawn uniformly from
    ``available_labels`` and ``teacher_features`` (gen_batch_size, D) = G of those, drawn in
    that order (noise, labels, noise). For K clients at once, ``y`` is (K, B) and ``gens``
    one generator per client: each client draws from its own in the same order and the
    outputs gain a leading K dimension (the generator runs once for all; in eval mode its
    BatchNorm reads running statistics, so samples do not interact). The generator's
    train/eval mode is restored.
    """
    stacked = y.dim() == 2
    ys = y if stacked else y.unsqueeze(0)
    gen_list = [gens] if isinstance(gens, torch.Generator) else list(gens)
    if len(gen_list) != ys.shape[0]:
        raise ValueError("prepare_client_inputs needs one generator per client")
    k, b = ys.shape
    eps_latent, labels, eps_teacher = [], [], []
    for g in gen_list:
        eps_latent.append(generator.sample_noise(b, g))
        labels.append(sample_uniform(available_labels, gen_batch_size, g))
        eps_teacher.append(generator.sample_noise(gen_batch_size, g))
    device = generator.out.weight.device
    teacher_labels = torch.stack(labels).to(device)
    was_training = generator.training
    generator.eval()
    try:
        latent = generator(ys.reshape(-1).to(device), torch.cat(eps_latent))
        teacher = generator(teacher_labels.reshape(-1), torch.cat(eps_teacher))
    finally:
        generator.train(was_training)
    out = {
        "latent_features": latent.view(k, b, -1),
        "teacher_features": teacher.view(k, gen_batch_size, -1),
        "teacher_labels": teacher_labels,
    }
    return out if stacked else {key: v[0] for key, v in out.items()}


def client_terms(
    weight: torch.Tensor, bias: torch.Tensor, logits: torch.Tensor, inputs: State
) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's two generative terms, unweighted: (latent KL, teacher CE).

    ``weight`` (C, D) and ``bias`` (C,) are the client's classifier head being trained,
    ``logits`` (B, C) its logits on the real batch, ``inputs`` from `prepare_client_inputs`.
    latent = KL(p || softmax(logits)) averaged over the batch, with p = softmax of the
    head on G(y) for the batch's own labels, detached (a target: only the real logits get
    its gradient). teacher = mean CE of the head on G(y') against y' (its gradient reaches
    the head only). Pure and free of data-dependent branching: works under
    `torch.func.vmap` over clients (stacked heads, logits and inputs).
    """
    target_logits = F.linear(inputs["latent_features"], weight.detach(), bias.detach())
    latent = kl_sum(upcast(target_logits), upcast(logits)) / logits.shape[0]
    gen_logits = upcast(F.linear(inputs["teacher_features"], weight, bias))
    teacher = F.cross_entropy(gen_logits, inputs["teacher_labels"])
    return latent, teacher


def client_loss(
    weight: torch.Tensor,
    bias: torch.Tensor,
    logits: torch.Tensor,
    inputs: State,
    coeffs: ClientCoefficients,
) -> torch.Tensor:
    """What FedGen adds to a client's cross-entropy at one step:
    coeffs.latent * latent + coeffs.teacher * teacher (see `client_terms`)."""
    latent, teacher = client_terms(weight, bias, logits, inputs)
    return coeffs.latent * latent + coeffs.teacher * teacher


# ---------------------------------------------------------------------- the plug-in


def seen_label_counts(
    counts: np.ndarray, local_epochs: int, local_steps: int | None, batch_size: int
) -> np.ndarray:
    """The labels each client trained on this round, from its label histogram (K, C).

    Local training passes over all of a client's samples once per epoch, so with epochs
    that is ``local_epochs`` times the histogram, exactly; with a fixed number of local
    steps it is the histogram times the passes those steps make (steps * batch / samples),
    the expected count."""
    counts = np.asarray(counts, dtype=np.float64)
    if local_steps is None:
        return counts * local_epochs
    held = counts.sum(axis=1, keepdims=True).clip(min=1.0)
    return counts * (local_steps * batch_size / held)


def new_generator(cfg: FedGenSettings, env: PluginEnv) -> FeatureGenerator:
    """The run's round-0 generator, sized for the model's representation, on its device."""
    template = build_model(env.model, env.channels, env.image_size, env.num_classes)
    dim = classifier_head(template).in_features
    generator = build_generator(cfg, env.channels, env.num_classes, dim, env.seed)
    return generator.to(env.device)


class FedGenServer:
    """FedGen's server side: trains the generator each round on the participants' heads.

    The aggregate is left as the client method made it (FedGen regularises the clients,
    not the global model). The generator, its Adam state and the labels seen in the
    clients' uploads so far persist across rounds and are checkpointed.
    """

    def __init__(self, cfg: FedGenSettings, env: PluginEnv) -> None:
        self.cfg, self.env = cfg, env
        self.generator = new_generator(cfg, env)
        self.optimizer = generator_optimizer(self.generator, cfg)
        self.known = torch.zeros(env.num_classes, dtype=torch.bool)

    def step(
        self,
        student: nn.Module,
        teachers: Teachers,
        counts: np.ndarray,
        round_idx: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        counts = np.asarray(counts)
        self.known |= torch.as_tensor(counts.sum(axis=0) > 0)
        if cfg.label_counts == "seen":
            counts = seen_label_counts(counts, env.local_epochs, env.local_steps, env.batch_size)
        states = [teachers.state(j) for j in range(len(teachers))]
        heads_w = torch.stack([s["classifier.weight"] for s in states])
        heads_b = torch.stack([s["classifier.bias"] for s in states])
        student_w = student_b = None
        if cfg.ensemble_beta > 0:
            head = classifier_head(student)
            student_w, student_b = head.weight, head.bias
        return train_generator(
            self.generator,
            self.optimizer,
            heads_w,
            heads_b,
            counts,
            cfg,
            round_idx,
            env.batch_size,
            generator,
            student_w,
            student_b,
        )

    def client_payload(self, round_idx: int) -> State:
        """The generator's weights and BatchNorm statistics (``g.<name>``) and the labels
        the clients draw generated labels from (``labels``: every label some client has
        reported holding so far)."""
        payload = {"g." + k: v.detach() for k, v in self.generator.state_dict().items()}
        payload["labels"] = torch.nonzero(self.known).flatten()
        return payload

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": {k: v.detach().clone() for k, v in self.generator.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "known": self.known.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.known = state["known"].to(torch.bool).cpu().clone()


class FedGenClient:
    """FedGen's client half: the generator from the round's payload regularises the head."""

    def __init__(self, cfg: FedGenSettings, env: PluginEnv) -> None:
        self.cfg, self.env = cfg, env
        self.generator = new_generator(cfg, env).eval()

    def term(
        self,
        model: nn.Module,
        payload: State,
        histogram: np.ndarray,
        round_idx: int,
        spec: LocalSpec,
        rng: torch.Generator,
    ) -> Term | None:
        """`client_loss` as a term; None in round 0 (no generator trained yet), when the
        coefficients are zero, or before any label is known."""
        cfg = self.cfg
        labels = payload.get("labels")
        if labels is None or len(labels) == 0:
            return None
        if not client_coefficients(cfg, round_idx, 0, spec.batch_size).active:
            return None
        self.generator.load_state_dict({k[2:]: v for k, v in payload.items() if k.startswith("g.")})
        generator = self.generator
        labels = labels.to(generator.out.weight.device)
        held = max(int(np.sum(histogram)), 1)
        drawn = [0]  # samples trained on so far this round: gives the local epoch
        gen_batch = cfg.generated_batch(spec.batch_size)

        def prepare(x: torch.Tensor, y: torch.Tensor) -> State:
            epoch = drawn[0] // held
            drawn[0] += len(y)
            coeffs = client_coefficients(cfg, round_idx, epoch, spec.batch_size)
            inputs = prepare_client_inputs(generator, y, labels, gen_batch, rng)
            inputs["latent_weight"] = torch.tensor(coeffs.latent, device=y.device)
            inputs["teacher_weight"] = torch.tensor(coeffs.teacher, device=y.device)
            return inputs

        return Term(_client_term, prepare=prepare)


def _client_term(
    params: State,
    client: State,
    shared: State,
    feats: torch.Tensor | None,
    logits: torch.Tensor,
    batch: State,
) -> torch.Tensor:
    """FedGen's term in a client's loss, weighted by the step's coefficients (`Term.fn`)."""
    latent, teacher = client_terms(
        params["classifier.weight"], params["classifier.bias"], logits, batch
    )
    return batch["latent_weight"] * latent + batch["teacher_weight"] * teacher
