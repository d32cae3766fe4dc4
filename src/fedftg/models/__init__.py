"""Models: classifiers with a `features` / `classifier` split, and FedFTG's generator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedftg.errors import UserError

if TYPE_CHECKING:
    from torch import nn

MODEL_NAMES = ("cnn", "cnn-bn", "resnet18", "resnet18-gn")


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The classifier ``name`` for (in_channels, image_size, image_size) inputs."""
    # the architectures load torch: imported here, so MODEL_NAMES (config, CLI) does not
    from fedftg.models.cnn import CNN
    from fedftg.models.norm import batch_norm, group_norm
    from fedftg.models.resnet import ResNet18

    if name == "cnn":
        return CNN(in_channels, image_size, num_classes)
    if name == "cnn-bn":
        return CNN(in_channels, image_size, num_classes, norm=batch_norm)
    if name == "resnet18":
        return ResNet18(in_channels, num_classes)
    if name == "resnet18-gn":
        return ResNet18(in_channels, num_classes, norm=group_norm)
    raise UserError(f"model: unknown model {name!r}; use one of {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def __getattr__(name: str) -> Any:
    """`ConditionalGenerator`, loaded (with torch) on first use."""
    if name == "ConditionalGenerator":
        from fedftg.models.generator import ConditionalGenerator

        return ConditionalGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL_NAMES", "ConditionalGenerator", "build_model", "count_parameters"]
