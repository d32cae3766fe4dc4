"""Models: classifiers with a `features` / `classifier` split, and FedFTG's generator.

The classifiers a run can name (``--model``) are the table `MODELS`; `register_model` adds
one. Its factory imports the architecture (and torch) when called, so the table, the
config and the CLI help load without torch. An import path (``mypkg.nets:make_net``)
names an ``nn.Module`` subclass or a factory of the user's (`keyword_factory`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedftg.errors import UserError
from fedftg.tables import Table, call_user

if TYPE_CHECKING:
    from torch import nn

# (in_channels, image_size, num_classes) -> the classifier, freshly initialised
ModelFactory = Callable[[int, int, int], "nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered classifier: its factory; ``note`` follows the name in the ``--model`` help.

    The contract of what ``build`` returns (checked by `build_model`): an ``nn.Module``
    whose ``forward(x)`` gives (B, num_classes) logits. A method that reads the
    representation (MOON's term, FedGen's generator, which feeds the classifier) also needs
    the split (`check_split`): ``features(x) -> (B, D)`` and ``classifier``, an
    ``nn.Linear(D, num_classes)``, with ``forward(x) == classifier(features(x))``.
    """

    name: str
    build: ModelFactory
    note: str = ""


def _resolve(path: str, obj: Any) -> ModelSpec:
    """The entry of an imported model: an ``nn.Module`` subclass or a factory."""
    if not callable(obj):
        raise UserError(
            f"model: {path!r} is a {type(obj).__name__}, not an nn.Module class or a factory"
        )
    return ModelSpec(path, keyword_factory(obj, path))


MODELS: Table[ModelSpec] = Table("model", "model", _resolve)

SIZE_KEYWORDS = ("in_channels", "image_size", "num_classes")


def keyword_factory(make: Callable[..., Any], name: str) -> ModelFactory:
    """A `ModelFactory` calling a user's class or factory ``make`` (the model ``name``)
    with the keywords among `SIZE_KEYWORDS` its signature accepts (all three when it takes
    ``**kwargs``), so that ``MyNet(num_classes=10)`` and ``make_net(**sizes)`` both fit;
    an exception it raises is a `UserError` naming it."""
    try:
        params = list(inspect.signature(make).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): call it bare
        params = []
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    wanted = [k for k in SIZE_KEYWORDS if takes_any or k in named]

    def build(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        sizes = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
        return call_user("model", name, make, **{k: sizes[k] for k in wanted})

    return build


def register_model(name: str, build: ModelFactory, *, note: str = "") -> ModelSpec:
    """Make classifier ``name`` a valid ``--model``: ``build(in_channels, image_size,
    num_classes)`` returns a new module honouring `ModelSpec`'s contract. Import torch and
    the architecture inside ``build``, not where you register it. A taken name or a
    factory that is not callable is a `UserError`."""
    if not callable(build):
        raise UserError(f"model: cannot register {name!r}: its factory {build!r} is not callable")
    return MODELS.add(name, ModelSpec(name, build, note))


# (entry, in_channels, image_size, num_classes) whose forward `check_contract` has run
_CHECKED: set[tuple[ModelSpec, int, int, int]] = set()


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The classifier ``name`` for (in_channels, image_size, image_size) inputs."""
    spec = MODELS.get(name)
    model = spec.build(in_channels, image_size, num_classes)
    key = (spec, in_channels, image_size, num_classes)
    check_contract(name, model, num_classes, (in_channels, image_size, image_size), key)
    return model


def model_device(model: Any) -> Any:
    """The device of ``model``'s first parameter (``"cpu"`` for a model without any)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else "cpu"


def check_contract(
    name: str,
    model: Any,
    num_classes: int,
    input_shape: tuple[int, int, int] | None = None,
    key: tuple[ModelSpec, int, int, int] | None = None,
    where: str | None = None,
) -> None:
    """Raise `UserError` unless ``model`` is an ``nn.Module`` whose forward maps a batch of
    two ``input_shape`` images (when given, on the model's device) to (2, num_classes)
    logits (`ModelSpec`). The dry forward runs in eval mode without gradients (no BatchNorm
    statistic and no random draw changes), once per ``key``. ``where`` replaces the
    message's opening (``model: 'name' built a Net``)."""
    from torch import nn

    where = where or f"model: {name!r} built a {type(model).__name__}"
    if not isinstance(model, nn.Module):
        raise UserError(f"{where}, not a torch.nn.Module")
    if input_shape is None or (key is not None and key in _CHECKED):
        return
    import torch

    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape, device=model_device(model)))
    except Exception as exc:  # the user's forward may fail in any way
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"{where} whose forward fails on a (2, {', '.join(map(str, input_shape))}) "
            f"batch: {text}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"{where} whose forward gives {got} for a batch of 2, not (2, {num_classes}) logits"
        )
    if key is not None:
        _CHECKED.add(key)


def check_split(name: str, model: nn.Module, num_classes: int, needed_by: str) -> None:
    """Raise `UserError` unless ``model`` has ``features(x)`` and a ``classifier``
    ``nn.Linear`` to ``num_classes`` outputs: what ``needed_by`` (a method of the run that
    reads the representation) needs (`ModelSpec`)."""
    from torch import nn

    where = f"model: {name!r} built a {type(model).__name__}"
    if not callable(getattr(model, "features", None)):
        raise UserError(f"{where} without a features(x) method, which {needed_by} needs")
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        raise UserError(
            f"{where} whose classifier is not an nn.Linear to {num_classes} classes, "
            f"which {needed_by} needs"
        )


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
    "check_contract",
    "check_split",
    "count_parameters",
    "keyword_factory",
    "register_model",
]
