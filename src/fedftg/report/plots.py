"""Figures of a run: accuracy curves per method and grids of generated samples."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedftg.report.files import atomic_write  # noqa: E402


def save_figure(fig: Any, path: str | Path) -> Path:
    """Atomically save a matplotlib figure as PNG and close it."""
    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot_curves(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test accuracy against round, one line per method, from metrics.jsonl records."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.get("test_acc") is not None:
            series[r["method"]].append((r["round"], r["test_acc"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


# A generator whose images of one class differ, pixel for pixel, by less than a tenth of
# what real images of one class differ by draws what reads as one image per class: real
# digits differ by about 0.44 (normalised scale, 8x8; measured on 8 test images a class),
# so the line is at 0.044, that is 0.044 x std 0.376 x 255 = about 4 grey levels of 255 a
# pixel on average, a difference the eye does not see in a grid of small images.
COLLAPSE_RATIO = 0.1


def spread_note(spread: float | None, real: float | None, dataset: str) -> str:
    """The line under a sample grid: the images' within-class spread against real images'
    (`fedftg.plugins.ftg.within_class_distance`), and in words when it has collapsed."""
    if spread is None:
        return "within-class spread: not measured (one image per class)"
    text = f"within-class spread {spread:.3f}"
    if not real:
        return text
    text += f" (real {dataset} images: {real:.3f}, {100 * spread / real:.0f} %)"
    if spread < COLLAPSE_RATIO * real:
        text += ": the generator has collapsed to about one image per class"
    return text


def sample_figure(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    title: str = "",
    note: str = "",
) -> Any:
    """The figure of `plot_samples` (kept apart so that tests can read its text)."""
    classes = sorted(set(int(c) for c in labels))
    per_row = max(int(np.sum(labels == c)) for c in classes)
    fig, axes = plt.subplots(
        len(classes), per_row, figsize=(per_row * 0.8, len(classes) * 0.8), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for row, c in enumerate(classes):
        axes[row, 0].set_title(class_names[c], fontsize=6, loc="left")
        for col, img in enumerate(images[labels == c]):
            shown = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
            axes[row, col].imshow(
                np.clip(shown, 0, 1), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1
            )
    heading = "\n".join([title, *textwrap.wrap(note, 70)]) if title or note else ""
    if heading:
        fig.suptitle(heading, fontsize=7)
    lines = heading.count("\n") + 1 if heading else 0
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.14 * lines / fig.get_figheight()))
    return fig


def plot_samples(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    path: str | Path,
    title: str = "",
    note: str = "",
) -> Path:
    """A grid of images (N, C, H, W) in [0, 1], one row per class, under ``title`` and
    ``note`` (e.g. the method, round and dataset, and `spread_note`)."""
    return save_figure(sample_figure(images, labels, class_names, title, note), path)
