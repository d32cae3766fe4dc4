"""FedGen's settings and spec (implementation: `fedftg.plugins.fedgen`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedftg.errors import UserError
from fedftg.fl.specs import PluginSpec
from fedftg.settings import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Settings,
    at_least,
    setting,
)

if TYPE_CHECKING:
    from fedftg.fl.plugin import PluginEnv
    from fedftg.plugins.fedgen import FedGenClient, FedGenServer

# the generator's noise distribution and output layer (`fedftg.models.feature_generator`)
GENERATOR_NOISE = ("uniform", "normal")
GENERATOR_OUTPUTS = ("relu", "none")

# what a client's label counts are: the labels of the batches it trained on this round
# (the authors' user.label_counts), or its data set's label histogram
LABEL_COUNTS = ("seen", "dataset")


_OPTIONAL_INT = at_least(1, integer=True)


@dataclass
class FedGenSettings(Settings):
    """FedGen settings; defaults are the authors' (RUNCONFIGS['mnist'], main.py, serverbase)."""

    # server: generator training, once per round
    ensemble_lr: float = setting(3e-4, "generator Adam learning rate", check=POSITIVE)
    ensemble_weight_decay: float = setting(1e-2, "generator Adam weight decay", check=NON_NEGATIVE)
    lr_decay: float = setting(0.98, "per-round decay of the generator lr", check=POSITIVE)
    ensemble_epochs: int = setting(
        50,
        "generator steps per round, in loops of n_teacher_iters",
        check=at_least(0, integer=True),
    )
    n_teacher_iters: int = setting(5, "generator steps per loop", check=POSITIVE_INT)
    batch_size: int | None = setting(
        None,
        "generator batch (default: the clients' local batch size, as the authors)",
        check=at_least(2, integer=True),
        optional=True,
    )
    ensemble_alpha: float = setting(1.0, "weight of the teacher term", check=NON_NEGATIVE)
    ensemble_beta: float = setting(
        0.0, "weight of the adversarial student term (0: off, authors)", check=NON_NEGATIVE
    )
    ensemble_eta: float = setting(1.0, "weight of the diversity term", check=NON_NEGATIVE)
    label_count_prior: float = setting(
        1.0, "added to every client's count of every label", check=NON_NEGATIVE
    )
    min_samples_per_label: float = setting(
        1.0,
        "a label is generated when some client's (prior + count) exceeds this",
        check=NON_NEGATIVE,
    )
    label_counts: str = setting(
        "seen",
        "a client's label counts: seen (the labels of the batches it trained on this round, "
        "authors) or dataset (its label histogram)",
        choices=LABEL_COUNTS,
    )
    # client: the regulariser
    generative_alpha: float = setting(
        10.0, "client weight of the teacher CE on generated features", check=NON_NEGATIVE
    )
    generative_beta: float = setting(
        10.0, "client weight of the latent KL on the batch's labels", check=NON_NEGATIVE
    )
    generative_decay: float = setting(
        0.98, "per-round decay of both client weights", check=POSITIVE
    )
    generative_floor: float = setting(
        1e-4, "floor of the decayed client weights", check=NON_NEGATIVE
    )
    gen_batch_size: int | None = setting(
        None,
        "labels a client draws per step (default: its local batch size)",
        check=_OPTIONAL_INT,
        optional=True,
    )
    early_stop: int = setting(
        20,
        "regularise in the first early_stop local epochs only",
        check=at_least(0, integer=True),
    )
    # generator architecture (None: from the authors' entry for the dataset)
    noise_dim: int | None = setting(
        None,
        "generator noise size (default: the authors' for the dataset)",
        check=_OPTIONAL_INT,
        optional=True,
    )
    hidden_dim: int | None = setting(
        None,
        "generator hidden width (default: the authors' for the dataset)",
        check=_OPTIONAL_INT,
        optional=True,
    )
    embedding: bool = setting(False, "a learned label embedding instead of the one-hot label")
    noise: str = setting(
        "uniform", "noise distribution: uniform (authors) or normal", choices=GENERATOR_NOISE
    )
    output: str = setting(
        "relu",
        "generator output: relu (fedftg's features are post-ReLU) or none (authors')",
        choices=GENERATOR_OUTPUTS,
    )

    def check(self) -> None:
        if not isinstance(self.embedding, bool):
            raise UserError(f"embedding: must be true or false, got {self.embedding!r}")

    def generated_batch(self, batch_size: int) -> int:
        """Labels a client draws per step for the teacher CE, given its local batch size."""
        return self.gen_batch_size or batch_size

    @property
    def generator_steps(self) -> int:
        """Generator steps per round: ``ensemble_epochs // n_teacher_iters`` loops of
        ``n_teacher_iters`` steps (50 with the defaults)."""
        return (self.ensemble_epochs // self.n_teacher_iters) * self.n_teacher_iters


def _server(s: FedGenSettings, env: PluginEnv) -> FedGenServer:
    from fedftg.plugins.fedgen import FedGenServer

    return FedGenServer(s, env)


def _client(s: FedGenSettings, env: PluginEnv) -> FedGenClient:
    from fedftg.plugins.fedgen import FedGenClient

    return FedGenClient(s, env)


PLUGIN = PluginSpec(
    name="fedgen",
    summary="FedGen: a server-trained feature generator regularises the clients' heads",
    settings=FedGenSettings,
    server=_server,
    client=_client,
    alias="fedgen",
    fine_tunes=False,
    order=30,
    reads_features=True,
)
