"""Models: classifiers with a `features` / `classifier` split, and FedFTG's generator.

The classifiers a run can name (``--model``) are the table `MODELS`; `register_model` adds
one. Its factory imports the architecture (and torch) when called, so the table, the
config and the CLI help load without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedftg.errors import UserError
from fedftg.tables import Table

if TYPE_CHECKING:
    from torch import nn

# (in_channels, image_size, num_classes) -> the classifier, freshly initialised
ModelFactory = Callable[[int, int, int], "nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered classifier: its factory; ``note`` follows the name in the ``--model`` help.

    The contract of what ``build`` returns (checked by `build_model`): an ``nn.Module`` with
    ``features(x) -> (B, D)`` and ``classifier``, an ``nn.Linear(D, num_classes)``, whose
    ``forward(x)`` is ``classifier(features(x))``. Local training calls the two halves (the
    terms of MOON and FedGen read the features), FedGen's generator feeds the classifier.
    """

    name: str
    build: ModelFactory
    note: str = ""


MODELS: Table[ModelSpec] = Table("model", "model")


def register_model(name: str, build: ModelFactory, *, note: str = "") -> ModelSpec:
    """Make classifier ``name`` a valid ``--model``: ``build(in_channels, image_size,
    num_classes)`` returns a new module honouring `ModelSpec`'s contract. Import torch and
    the architecture inside ``build``, not where you register it. A taken name or a
    factory that is not callable is a `UserError`."""
    if not callable(build):
        raise UserError(f"model: cannot register {name!r}: its factory {build!r} is not callable")
    return MODELS.add(name, ModelSpec(name, build, note))


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The classifier ``name`` for (in_channels, image_size, image_size) inputs."""
    model = MODELS.get(name).build(in_channels, image_size, num_classes)
    check_contract(name, model, num_classes)
    return model


def check_contract(name: str, model: Any, num_classes: int) -> None:
    """Raise `UserError` unless ``model`` has ``features`` and a ``classifier`` linear layer
    to ``num_classes`` outputs (`ModelSpec`)."""
    from torch import nn

    where = f"model: {name!r} built a {type(model).__name__}"
    if not isinstance(model, nn.Module):
        raise UserError(f"{where}, not a torch.nn.Module")
    if not callable(getattr(model, "features", None)):
        raise UserError(f"{where} without a features(x) method")
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        raise UserError(f"{where} whose classifier is not an nn.Linear to {num_classes} classes")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def __getattr__(name: str) -> Any:
    """`ConditionalGenerator`, loaded (with torch) on first use."""
    if name == "ConditionalGenerator":
        from fedftg.models.generator import ConditionalGenerator

        return ConditionalGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -------------------------------------------------------------------- the built-in models


def _cnn(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    from fedftg.models.cnn import CNN

    return CNN(in_channels, image_size, num_classes)


def _cnn_bn(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The same CNN with BatchNorm after each convolution."""
    from fedftg.models.cnn import CNN
    from fedftg.models.norm import batch_norm

    return CNN(in_channels, image_size, num_classes, norm=batch_norm)


def _resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    from fedftg.models.resnet import ResNet18

    return ResNet18(in_channels, num_classes)


def _resnet18_gn(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-18 with GroupNorm instead of BatchNorm."""
    from fedftg.models.norm import group_norm
    from fedftg.models.resnet import ResNet18

    return ResNet18(in_channels, num_classes, norm=group_norm)


register_model("cnn", _cnn)
register_model("cnn-bn", _cnn_bn)
register_model("resnet18", _resnet18)
register_model("resnet18-gn", _resnet18_gn)

__all__ = [
    "MODELS",
    "ConditionalGenerator",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "register_model",
]
