"""Figures of the layer analysis as the layer-analysis notebook draws them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sponlab.io.figures import plt, save_figure  # common selects the Agg backend first

Rows = Sequence[Mapping[str, Any]]


def plot_bias_stats(rows: Rows, title: str, path: Path) -> Path:
    """2 x 2 bars per layer: L2 (with its mean), mean (sign-coloured), std, max |b|."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    layers = [r["layer"] for r in rows]
    l2 = [r["l2"] for r in rows]
    axes[0, 0].bar(layers, l2, color="steelblue")
    axes[0, 0].axhline(float(np.mean(l2)), color="red", ls="--", label="mean")
    axes[0, 0].legend(fontsize=7)
    means = [r["mean"] for r in rows]
    axes[0, 1].bar(layers, means, color=["green" if m > 0 else "red" for m in means])
    axes[0, 1].axhline(0, color="k", lw=0.5)
    axes[1, 0].bar(layers, [r["std"] for r in rows], color="orange")
    axes[1, 1].bar(layers, [r["max_abs"] for r in rows], color="purple")
    labels = ("L2 norm", "mean bias", "std", "max |bias|")
    for ax, label in zip(axes.flat, labels, strict=True):
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_drift_importance(
    ranked: Sequence[int],
    percent: Mapping[int, float],
    cumulative: Sequence[float],
    targets: Sequence[float],
    title: str,
    path: Path,
) -> Path:
    """Layers sorted by drift importance (%), and the cumulative importance with the targets."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    colors = plt.cm.RdYlGn(np.linspace(0.8, 0.2, len(ranked)))
    left.bar([str(layer) for layer in ranked], [percent[layer] for layer in ranked], color=colors)
    left.set_xlabel("layer (sorted by importance)")
    left.set_ylabel("importance (% of drift removed)")
    left.tick_params(axis="x", rotation=90, labelsize=7)
    right.plot(range(1, len(cumulative) + 1), cumulative, "b-o", ms=4)
    for target, color in zip(targets, ("red", "darkorange", "gold"), strict=False):
        right.axhline(100 * target, color=color, ls="--", label=f"{target:.0%}")
    right.set_xlabel("number of layers (most important first)")
    right.set_ylabel("cumulative importance (%)")
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_top_bottom(
    vectors: Mapping[int, np.ndarray],
    top: Sequence[int],
    bottom: Sequence[int],
    title: str,
    path: Path,
) -> Path:
    """Bias histograms of the three most (top row) and least (bottom row) important layers."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True, squeeze=False)
    for row, (layers, color, kind) in enumerate(
        ((top, "green", "high"), (bottom, "orange", "low"))
    ):
        for col in range(3):
            ax = axes[row, col]
            if col >= len(layers):
                ax.axis("off")
                continue
            b = vectors[layers[col]]
            ax.hist(b, bins=50, color=color, alpha=0.7, edgecolor="black")
            ax.axvline(0, color="red", ls="--")
            ax.set_title(
                f"layer {layers[col]} ({kind} importance)\nμ={b.mean():.4f}, σ={b.std():.4f}",
                fontsize=9,
            )
            ax.set_xlabel("bias value")
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
