"""The partition heatmap: clients x classes sample counts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedftg.report.plots import plt, save_figure


def save_partition_heatmap(
    counts: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of the (clients, classes) count matrix; annotated when small."""
    k, c = counts.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * c + 2), max(3, min(0.25 * k + 1.5, 14))))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(c))
    ax.set_xticklabels(
        class_names if class_names is not None else [str(j) for j in range(c)],
        rotation=90,
        fontsize=7,
    )
    if k <= 30 and c <= 20:
        for i in range(k):
            for j in range(c):
                ax.text(
                    j,
                    i,
                    str(int(counts[i, j])),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if counts[i, j] < counts.max() / 2 else "black",
                )
    fig.colorbar(im, ax=ax, label="samples")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
