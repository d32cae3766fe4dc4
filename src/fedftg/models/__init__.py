"""Models: classifiers with a `features` / `classifier` split, and FedFTG's generator."""

from __future__ import annotations

from torch import nn

from fedftg.errors import UserError
from fedftg.models.cnn import CNN
from fedftg.models.generator import ConditionalGenerator
from fedftg.models.norm import batch_norm, group_norm
from fedftg.models.resnet import ResNet18

MODEL_NAMES = ("cnn", "cnn-bn", "resnet18", "resnet18-gn")


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The classifier ``name`` for (in_channels, image_size, image_size) inputs."""
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


__all__ = ["MODEL_NAMES", "ConditionalGenerator", "build_model", "count_parameters"]
