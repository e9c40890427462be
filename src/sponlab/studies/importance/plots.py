"""Figures of the activation/gradient importance analysis and of SAE training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import cm

from sponlab.io.figures import plt, save_figure  # common selects the Agg backend first
from sponlab.studies.importance.importance import ImportanceScores


def plot_layer(
    vectors: Mapping[str, np.ndarray], title: str, path: Path, xlabel: str = "dimension"
) -> Path:
    """One layer: per aggregation a histogram and the value of every dimension; with two
    aggregations also their per-dimension scatter (how far mean and mean_abs rank alike)."""
    names = list(vectors)
    cols = 3 if len(names) == 2 else 2
    # fixed margins instead of constrained layout: ~3x faster, and there is one figure per layer
    fig, axes = plt.subplots(
        len(names), cols, figsize=(4.0 * cols, 2.8 * len(names)), squeeze=False
    )
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.88, wspace=0.35, hspace=0.45)
    for row, name in enumerate(names):
        v = vectors[name]
        axes[row, 0].hist(v, bins=60, color="C0", histtype="stepfilled")
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_xlabel(f"{name} importance")
        axes[row, 0].set_ylabel("dimensions")
        axes[row, 1].scatter(np.arange(v.size), v, s=2, color="C1")
        axes[row, 1].set_xlabel(xlabel)
        axes[row, 1].set_ylabel(name)
    if cols == 3:
        a, b = (vectors[n] for n in names)
        axes[0, 2].scatter(a, b, s=3, alpha=0.6)
        axes[0, 2].set_xlabel(names[0])
        axes[0, 2].set_ylabel(names[1])
        axes[0, 2].set_title(f"Pearson r = {_corr(a, b):.3f}", fontsize=9)
        axes[1, 2].axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_all_layers(vectors: Mapping[int, np.ndarray], title: str, path: Path) -> Path:
    """All layers: percentile bands per layer (left) and the sorted profile of each layer (right)."""
    layers = sorted(vectors)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    q = np.array([np.percentile(vectors[i], [1, 25, 50, 75, 99]) for i in layers])  # [L, 5]
    left.fill_between(layers, q[:, 0], q[:, 4], alpha=0.2, label="1-99%")
    left.fill_between(layers, q[:, 1], q[:, 3], alpha=0.4, label="25-75%")
    left.plot(layers, q[:, 2], "k.-", label="median")
    left.plot(layers, [vectors[i].max() for i in layers], "r.", ms=4, label="max")
    left.set_xlabel("layer")
    left.set_ylabel("importance")
    left.legend(fontsize=8)
    colors = cm.viridis(np.linspace(0, 1, len(layers)))
    for color, layer in zip(colors, layers, strict=True):
        v = np.sort(vectors[layer])[::-1]
        right.plot(np.linspace(0, 1, v.size), v, color=color, lw=0.8)
    right.set_xlabel("rank (fraction of dimensions)")
    right.set_ylabel("importance (sorted)")
    right.set_yscale("symlog", linthresh=1e-2)
    bar = fig.colorbar(
        cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(min(layers), max(layers))), ax=right
    )
    bar.set_label("layer")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_comparison(
    first: Mapping[int, np.ndarray],
    second: Mapping[int, np.ndarray],
    names: Sequence[str],
    title: str,
    path: Path,
) -> Path:
    """Two aggregations over all layers: per-layer Pearson and Spearman correlation, and the
    pooled per-dimension scatter coloured by layer."""
    layers = sorted(first)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    left.plot(layers, [_corr(first[i], second[i]) for i in layers], "o-", label="Pearson")
    left.plot(
        layers,
        [_corr(_ranks(first[i]), _ranks(second[i])) for i in layers],
        "s--",
        label="Spearman",
    )
    left.set_xlabel("layer")
    left.set_ylabel(f"corr({names[0]}, {names[1]})")
    left.set_ylim(-1.05, 1.05)
    left.legend(fontsize=8)
    colors = cm.viridis(np.linspace(0, 1, len(layers)))
    for color, layer in zip(colors, layers, strict=True):
        right.scatter(first[layer], second[layer], s=1, color=color, alpha=0.4)
    right.set_xlabel(names[0])
    right.set_ylabel(names[1])
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_sae_training(histories: Mapping[int, Mapping[str, Sequence[float]]], path: Path) -> Path:
    """Reconstruction MSE and L0 per training step, one line per layer."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for layer, hist in sorted(histories.items()):
        mse = np.asarray(hist["mse"])
        left.plot(mse / mse[0], label=f"layer {layer}")
        right.plot(hist["l0"], label=f"layer {layer}")
    left.set_xlabel("step")
    left.set_ylabel("reconstruction MSE / first step")
    left.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("L0 (active features per token)")
    right.set_yscale("log")
    left.legend(fontsize=8)
    return save_figure(fig, path)


def _ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v)).astype(np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def plot_variants(
    fig_dir: Path,
    variants: Sequence[ImportanceScores],
    layer_figures: bool = True,
    xlabel: str = "dimension",
) -> list[Path]:
    """All figures of one features' variants of one pass.

    - ``<stem>_all_layers.png`` for every variant;
    - ``layers/<aggregate_by>_norm-<norm>/layer_<i>.png``: every aggregation of that layer, for the
      first normalisation only (the others rescale the same vector: identical shapes);
    - ``<aggregate_by>_compare_norm-<norm>.png`` when both ``mean`` and ``mean_abs`` were computed.
    """
    paths = []
    groups: dict[tuple[str, str, float | None], list[ImportanceScores]] = {}
    for v in variants:
        groups.setdefault((v.aggregate_by, v.normalize, v.power), []).append(v)
        title = f"{v.features}: {v.stem}"
        paths.append(plot_all_layers(v.vectors, title, fig_dir / f"{v.stem}_all_layers.png"))
    for (aggregate_by, norm, power), group in groups.items():
        suffix = f"norm-{norm}" if power is None else f"norm-{norm}_pow-{power:g}"
        if layer_figures and norm == variants[0].normalize:
            for layer in sorted(group[0].vectors):
                paths.append(
                    plot_layer(
                        {v.aggregation: v.vectors[layer] for v in group},
                        f"{group[0].features} {aggregate_by}, layer {layer} ({suffix})",
                        fig_dir / "layers" / f"{aggregate_by}_{suffix}" / f"layer_{layer}.png",
                        xlabel,
                    )
                )
        if len(group) == 2:
            first, second = group
            paths.append(
                plot_comparison(
                    first.vectors,
                    second.vectors,
                    (first.aggregation, second.aggregation),
                    f"{first.features} {aggregate_by}: {first.aggregation} vs "
                    f"{second.aggregation} ({suffix})",
                    fig_dir / f"{aggregate_by}_compare_{suffix}.png",
                )
            )
    return paths
