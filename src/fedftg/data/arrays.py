"""A user's own data as fedftg's arrays: the one conversion from what a researcher has.

Accepted (`user_arrays`): a tuple ``(x_train, y_train, x_test, y_test)`` of NumPy arrays or
torch tensors, images NCHW (or NHW for one channel, square), uint8 (kept as they are) or
floating point (kept exact as float32); integer labels in 0..C-1, with C the given
``num_classes`` or the largest label + 1. Or a pair ``(train, test)`` of map-style torch
``Dataset``s whose items are ``(image, label)``. Anything else, and every breach (a wrong
shape or dtype, a label out of range, a non-finite pixel), is one `UserError` naming it.
Torch is never imported here: tensors are recognised by their ``detach`` method.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedftg.errors import UserError

WHERE = "dataset"
NAMES = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Arrays:
    """Checked train and test arrays: images (N, C, H, H) uint8 or float32, labels int64
    in 0..num_classes-1."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def user_arrays(data: Any, num_classes: int | None = None) -> Arrays:
    """``data`` in one of the accepted forms (module docstring), checked and converted."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(map(_map_style, data)):
        data = (*_materialise(data[0], "train"), *_materialise(data[1], "test"))
    if not isinstance(data, (tuple, list)) or len(data) != 4:
        raise UserError(
            f"{WHERE}: expected (x_train, y_train, x_test, y_test) arrays or tensors, or a "
            f"(train, test) pair of torch Datasets; got {_describe(data)}"
        )
    x_train, y_train, x_test, y_test = (_numpy(v, n) for v, n in zip(data, NAMES, strict=True))
    x_train, x_test = _images(x_train, "x_train"), _images(x_test, "x_test")
    if x_test.shape[1:] != x_train.shape[1:] or x_test.dtype != x_train.dtype:
        raise UserError(
            f"{WHERE}: x_test is {x_test.dtype} {_shape(x_test)} images, x_train "
            f"{x_train.dtype} {_shape(x_train)}: they must match"
        )
    y_train, y_test = _labels(y_train, "y_train", x_train), _labels(y_test, "y_test", x_test)
    if len(y_train) == 0:
        raise UserError(f"{WHERE}: x_train holds no images")
    top = int(max(y_train.max(), y_test.max(initial=0)))
    classes = top + 1 if num_classes is None else num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise UserError(f"num_classes: expected an integer >= 2, got {classes!r}")
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        bad = y[(y < 0) | (y >= classes)]
        if len(bad):
            raise UserError(f"{WHERE}: {name} has label {int(bad[0])}, outside 0..{classes - 1}")
    return Arrays(x_train, y_train, x_test, y_test, classes)


def arrays_digest(arrays: Sequence[np.ndarray], num_classes: int) -> str:
    """The sha256 (hex) of the arrays' dtypes, shapes and bytes and the class count: the
    identity of a user's data in a run's settings."""
    h = hashlib.sha256(str(num_classes).encode())
    for x in arrays:
        h.update(f"{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()


def _map_style(obj: Any) -> bool:
    """A map-style dataset (``len`` and ``[i]``) that is not itself an array or tensor."""
    return (
        hasattr(obj, "__getitem__")
        and hasattr(obj, "__len__")
        and not isinstance(obj, (np.ndarray, tuple, list))
        and not hasattr(obj, "detach")
    )


def _materialise(ds: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a map-style ``(image, label)`` dataset, stacked."""
    images, labels = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(
                f"{WHERE}: the {split} Dataset's item {i} is {_describe(item)}, not an "
                "(image, label) pair"
            )
        images.append(_numpy(item[0], f"the {split} Dataset's image {i}"))
        labels.append(_numpy(item[1], f"the {split} Dataset's label {i}"))
    if not images:
        return np.zeros((0,)), np.zeros((0,), dtype=np.int64)
    shapes = {x.shape for x in images}
    if len(shapes) > 1:
        raise UserError(f"{WHERE}: the {split} Dataset's images differ in shape: {sorted(shapes)}")
    return np.stack(images), np.stack(labels)


def _numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (int, float, np.generic, Sequence)) and not isinstance(value, str):
        return np.asarray(value)
    raise UserError(f"{WHERE}: {name} is {_describe(value)}, not an array or tensor")


def _images(x: np.ndarray, name: str) -> np.ndarray:
    """NHW -> N1HW; uint8 kept, floating point as float32; square and finite."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[2] != x.shape[3] or x.shape[2] < 1:
        raise UserError(
            f"{WHERE}: {name} has shape {_shape(x)}; expected square images NCHW (or NHW)"
        )
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{WHERE}: {name} is {x.dtype}; images must be uint8 or floating point")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{WHERE}: {name} holds NaN or infinite values")
    return x


def _labels(y: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{WHERE}: {name} is {y.dtype}; labels must be integers")
    if y.shape != (len(x),):
        raise UserError(
            f"{WHERE}: {name} has shape {_shape(y)}; expected ({len(x)},), one label per image"
        )
    return y.astype(np.int64)


def _shape(x: np.ndarray) -> str:
    return "(" + ", ".join(map(str, x.shape)) + ")"


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
