"""Figures of a run: accuracy curves per method and grids of generated samples."""

from __future__ import annotations

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


def plot_samples(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path
) -> Path:
    """A grid of images (N, C, H, W) in [0, 1], one row per class."""
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
    fig.tight_layout()
    return save_figure(fig, path)
