"""Figures of the interpret and layer-importance stages (what SPON biases encode, where they matter)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sponlab.io.figures import plt, save_figure  # common selects the Agg backend first
from sponlab.model.sites import PROJECTIONS, Site

Rows = Sequence[Mapping[str, Any]]


def _modules(rows_or_sites) -> list[str]:
    present = {r.module if isinstance(r, Site) else r["module"] for r in rows_or_sites}
    return [m for m in PROJECTIONS if m in present]


def _grid(count: int, cols: int, width: float, height: float):
    rows = max(1, -(-count // cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows), squeeze=False, constrained_layout=True
    )
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes.flat


def plot_bias_heatmap(
    vectors: Mapping[Site, torch.Tensor], dims: int, title: str, path: Path
) -> Path:
    """Per module: bias values as layers x first ``dims`` dimensions (symmetric colour scale)."""
    modules = _modules(vectors)
    dims = min(dims, max(v.numel() for v in vectors.values()))
    fig, axes = _grid(len(modules), min(len(modules), 4), 3.6, 3.2)
    for ax, module in zip(axes, modules, strict=False):
        sites = sorted((s for s in vectors if s.module == module), key=lambda s: s.layer)
        layers = [s.layer for s in sites]
        grid = np.full((max(layers) + 1, dims), np.nan)
        for site in sites:
            v = vectors[site][:dims].numpy()
            grid[site.layer, : v.size] = v
        vmax = float(np.nanpercentile(np.abs(grid), 99)) or 1e-12
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(module, fontsize=9)
        ax.set_xlabel(f"dimension (first {dims})")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_bias_histograms(vectors: Mapping[Site, torch.Tensor], title: str, path: Path) -> Path:
    """One histogram per layer of all its bias values, coloured by module."""
    layers = sorted({s.layer for s in vectors})
    modules = _modules(vectors)
    fig, axes = _grid(len(layers), 6, 2.2, 1.7)
    for ax, layer in zip(axes, layers, strict=False):
        values = [vectors[Site(layer, m)].numpy() for m in modules if Site(layer, m) in vectors]
        labels = [m for m in modules if Site(layer, m) in vectors]
        ax.hist(values, bins=40, histtype="step", label=labels)
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=5)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_layer_norms(layer_rows: Rows, title: str, path: Path) -> Path:
    """Bias L2 per layer, absolute and relative to the dense activation scale."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    layers = [r["layer"] for r in layer_rows]
    left.bar(layers, [r["l2"] for r in layer_rows], color="C0")
    left.set_ylabel("||b|| (all sites of the layer)")
    right.bar(layers, [r["l2_rel"] for r in layer_rows], color="C1")
    right.set_ylabel("||b|| / ||dense output|| (RMS ratio)")
    for ax in (left, right):
        ax.set_xlabel("layer")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


ALIGNMENT_PANELS = (
    ("cos_global", "cos(b, E[dense - TEAL]) at the site", True),
    ("cos_local", "cos(b, W E[x - S(x)]) (own mask only)", True),
    ("cos_dense_mean", "cos(b, raw dense mean output)", True),
    ("max_abs_cos_pc", "max |cos(b, PC_k)| (centred PCA)", False),
)


def plot_alignment(rows: Rows, title: str, path: Path) -> Path:
    """Cosines by layer per module; dashed: chance level of |cos| for a random direction."""
    modules = _modules(rows)
    fig, axes = _grid(len(ALIGNMENT_PANELS), 2, 5.2, 3.3)
    for ax, (key, label, signed) in zip(axes, ALIGNMENT_PANELS, strict=False):
        if key not in rows[0]:
            ax.axis("off")
            continue
        for i, module in enumerate(modules):
            sub = [r for r in rows if r["module"] == module]
            x = [r["layer"] for r in sub]
            ax.plot(x, [r[key] for r in sub], ".-", color=f"C{i}", label=module, lw=1)
            chance = [r["chance_abs_cos"] for r in sub]
            ax.plot(x, chance, ":", color=f"C{i}", lw=0.8)
            if signed:
                ax.plot(x, [-c for c in chance], ":", color=f"C{i}", lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{title}  (dotted: random-direction chance level)", fontsize=10)
    return save_figure(fig, path)


def plot_shift(test_rows: Rows, prompt_rows: Mapping[str, Rows], title: str, path: Path) -> Path:
    """Relative hidden-state shift vs dense per layer (TEAL-only vs TEAL+SPON) and drift reduction.

    ``test_rows``/``prompt_rows[category]``: rows with index, teal_rel, spon_rel, drift_reduction.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    x = [r["index"] for r in test_rows]
    left.plot(x, [r["teal_rel"] for r in test_rows], "C3.-", label="TEAL-only (test)")
    left.plot(x, [r["spon_rel"] for r in test_rows], "C2.-", label="TEAL+SPON (test)")
    right.plot(x, [r["drift_reduction"] for r in test_rows], "k.-", label="test blocks")
    for i, (category, rows) in enumerate(prompt_rows.items()):
        px = [r["index"] for r in rows]
        left.plot(px, [r["teal_rel"] for r in rows], color="C3", alpha=0.25, lw=0.8)
        left.plot(px, [r["spon_rel"] for r in rows], color="C2", alpha=0.25, lw=0.8)
        right.plot(px, [r["drift_reduction"] for r in rows], color=f"C{i}", lw=0.9, label=category)
    left.set_ylabel("||h - h_dense|| / ||h_dense|| (per token)")
    left.set_xlabel("hidden state (0 = embeddings, i = output of layer i-1)")
    left.legend(fontsize=7, title="faint: prompt categories", title_fontsize=7)
    right.axhline(0, color="k", lw=0.5)
    right.set_ylabel("drift reduction 1 - spon/teal")
    right.set_xlabel("hidden state")
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_prompt_effects(rows: Rows, path: Path) -> Path:
    """KL to dense per prompt category: TEAL-only vs TEAL+SPON of each analysed config."""
    categories = list(dict.fromkeys(r["category"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(categories) + 3, 3.8), constrained_layout=True)
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = {r["category"]: r["kl"] for r in rows if r["variant"] == variant}
        ax.bar(
            np.arange(len(categories)) + i * width,
            [values.get(c, np.nan) for c in categories],
            width,
            label=variant,
        )
    ax.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories)
    ax.set_ylabel("KL(dense || variant) per token")
    ax.legend(fontsize=7)
    ax.set_title("Prompt categories: KL to the dense model", fontsize=10)
    return save_figure(fig, path)


def plot_similarity(
    names: Sequence[str],
    matrix: np.ndarray,
    chance: float,
    per_layer: Mapping[str, Rows],
    path: Path,
) -> Path:
    """Mean cosine of biases on shared sites between configs, and per layer for chosen pairs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    image = left.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    left.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    left.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            left.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    left.set_title(f"mean cos on shared sites (chance |cos| ~ {chance:.3f})", fontsize=9)
    fig.colorbar(image, ax=left, shrink=0.8)
    for label, rows in per_layer.items():
        layers = sorted({r["layer"] for r in rows})
        means = [np.nanmean([r["cos"] for r in rows if r["layer"] == i]) for i in layers]
        right.plot(layers, means, ".-", label=label, lw=1)
    right.axhline(chance, color="k", ls=":", lw=0.8, label="random |cos|")
    right.axhline(0, color="k", lw=0.5)
    right.set_xlabel("layer")
    right.set_ylabel("mean cos over the layer's sites")
    right.legend(fontsize=6)
    return save_figure(fig, path)


def plot_layer_importance(
    rows: Rows,
    curves: Mapping[str, Sequence[float]],
    targets: Sequence[float],
    title: str,
    path: Path,
) -> Path:
    """Leave-one-layer-out importance (with bias norm), drift reduction, cumulative benefit."""
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    layers = [r["layer"] for r in rows]
    left.bar(layers, [r["importance"] for r in rows], color="C0")
    left.set_xlabel("layer")
    left.set_ylabel("importance: val ppl increase without the layer", color="C0", fontsize=8)
    twin = left.twinx()
    twin.plot(layers, [r["bias_l2_rel"] for r in rows], "C1.-", lw=1)
    twin.set_ylabel("bias ||b|| / ||dense output||", color="C1", fontsize=8)
    mid.plot(layers, [r["drift_reduction"] for r in rows], "C2.-")
    mid.axhline(0, color="k", lw=0.5)
    mid.set_xlabel("layer")
    mid.set_ylabel("drift reduction at the layer output (test)", fontsize=8)
    labels = {"estimated": "estimated (LOO shares)", "measured": "measured (top-k biases only)"}
    for name, values in curves.items():
        right.plot(range(1, len(values) + 1), values, ".-", label=labels.get(name, name))
    for target in targets:
        right.axhline(target, color="k", ls=":", lw=0.7)
    right.set_xlabel("top-k layers (ranked by importance)")
    right.set_ylabel("fraction of the benefit")
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
