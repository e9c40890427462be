"""Figures of the weight-spectrum analysis (one function per PNG, plus :func:`plot_all`)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from sponlab.io.figures import new_figure, save_figure
from sponlab.studies.spectrum.attention_kernels import DownSVD, FocusKernel
from sponlab.studies.spectrum.spectrum import KERNEL_TYPE, SpectrumResult
from sponlab.studies.spectrum.trends import PHASES

FIGURES: dict[str, str] = {
    "erank_by_layer": "erank_by_layer.png",
    "erank_ratio": "erank_ratio_by_layer.png",
    "kernel_heatmap": "kernel_erank_heatmap.png",
    "kernel_focus": "kernel_focus_eigenvalues.png",
    "down_svd": "down_proj_svd.png",
    "phases": "phase_means.png",
}


def erank_by_layer(result: SpectrumResult, path: Path) -> Path:
    """One panel per weight type: effective rank against layer, max rank as a dashed line."""
    names = result.series
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows), constrained_layout=True, squeeze=False
    )
    layers = np.arange(result.dims.layers)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(layers, result.erank(name), marker="o", markersize=3)
        ax.axhline(result.max_rank(name), color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.set_ylabel("effective rank")
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("Entropy effective rank per layer (dashed: max rank)")
    return save_figure(fig, path)


def erank_ratio(result: SpectrumResult, path: Path) -> Path:
    """All weight types on one axes: effective rank / max rank against layer."""
    fig, ax = new_figure(7.5, 4.2)
    layers = np.arange(result.dims.layers)
    for name in result.series:
        style = "--" if name == KERNEL_TYPE else "-"
        ax.plot(layers, result.erank(name) / result.max_rank(name), style, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank / max rank")
    ax.set_title("Normalised effective rank")
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def kernel_heatmap(result: SpectrumResult, path: Path) -> Path:
    """Layers x heads heatmaps of kernel effective rank (low/high tags marked) and asymmetry."""
    erank, asym, tags = result.kernel_erank, result.kernel_asymmetry, result.head_tags  # [L, H]
    height = max(3.5, 0.22 * result.dims.layers + 1.5)
    width = 2 * max(4.0, 0.45 * result.dims.heads + 2.0)
    fig, axes = plt.subplots(1, 2, figsize=(width, height), constrained_layout=True)
    for ax, data, title in (
        (axes[0], erank, "kernel effective rank (v low, ^ high)"),
        (axes[1], asym, "asymmetry ||A-A^T|| / ||A||"),
    ):
        image = ax.imshow(data, aspect="auto", cmap="viridis", origin="upper")
        fig.colorbar(image, ax=ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(result.dims.heads))
    for marker, tag in (("v", "low"), ("^", "high")):
        rows, cols = np.nonzero(tags == tag)
        axes[0].scatter(cols, rows, marker=marker, color="red", s=14)
    return save_figure(fig, path)


def kernel_focus(focus: FocusKernel, path: Path) -> Path:
    """Magnitude spectrum, complex plane and cumulative energy of one head's kernel."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    eig = focus.eigenvalues
    index = np.arange(1, len(eig) + 1)
    axes[0].semilogy(index, np.maximum(np.abs(eig), 1e-12), marker=".", label="|eigenvalue|")
    axes[0].semilogy(index, np.maximum(focus.singular_values, 1e-12), ".", label="singular value")
    axes[0].set_xlabel("index")
    axes[0].set_title("magnitude spectrum")
    axes[0].legend(fontsize=8)
    axes[1].scatter(eig.real, eig.imag, s=10)
    axes[1].axhline(0, color="grey", linewidth=0.6)
    axes[1].axvline(0, color="grey", linewidth=0.6)
    axes[1].set_xlabel("Re")
    axes[1].set_ylabel("Im")
    axes[1].set_title(f"eigenvalues (asymmetry {focus.asymmetry:.3f})")
    axes[2].plot(index, focus.eig_energy, label=f"sum |λ|² ({focus.eig_count})")
    axes[2].plot(index, focus.sv_energy, label=f"sum σ² ({focus.sv_count})")
    axes[2].axhline(focus.energy_fraction, color="grey", linestyle="--", linewidth=0.8)
    axes[2].set_xlabel("components")
    axes[2].set_title(f"cumulative energy (count for {focus.energy_fraction:.0%})")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Kernel A_h, layer {focus.layer}, head {focus.head} (KV head {focus.kv_head})")
    return save_figure(fig, path)


def down_svd(down: DownSVD, path: Path) -> Path:
    """Singular values (log) and cumulative variance explained with the threshold counts."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    index = np.arange(1, len(down.singular_values) + 1)
    axes[0].semilogy(index, np.maximum(down.singular_values, 1e-12))
    axes[0].set_xlabel("index")
    axes[0].set_ylabel("singular value")
    axes[0].set_title(f"condition number {down.condition_number:.3g}")
    axes[1].plot(index, np.cumsum(down.explained))
    for threshold, count in down.components.items():
        axes[1].axvline(count, color="grey", linestyle=":", linewidth=0.8)
        axes[1].annotate(f"{threshold:.0%}", (count, threshold), fontsize=7)
    axes[1].set_xlabel("components")
    axes[1].set_ylabel("variance explained")
    fig.suptitle(f"down_proj SVD, layer {down.layer}")
    return save_figure(fig, path)


def phase_means(result: SpectrumResult, path: Path) -> Path:
    """Grouped bars: mean normalised effective rank of each weight type per phase (std as error)."""
    fig, ax = new_figure(8.0, 4.0)
    names = result.series
    width = 0.8 / len(PHASES)
    x = np.arange(len(names))
    for i, phase in enumerate(PHASES):
        stats = [next(p for p in result.phases[n] if p.phase == phase) for n in names]
        scale = np.array([result.max_rank(n) for n in names], dtype=float)
        ax.bar(
            x + (i - 1) * width,
            [s.mean for s in stats] / scale,
            width,
            yerr=[s.std for s in stats] / scale,
            label=phase,
            capsize=2,
        )
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("effective rank / max rank")
    ax.set_title("Phase means (early / middle / late thirds)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_all(result: SpectrumResult, out_dir: Path) -> dict[str, Path]:
    """Write every figure into ``out_dir``; returns name -> path (names as in :data:`FIGURES`)."""
    makers = {
        "erank_by_layer": lambda p: erank_by_layer(result, p),
        "erank_ratio": lambda p: erank_ratio(result, p),
        "kernel_heatmap": lambda p: kernel_heatmap(result, p),
        "kernel_focus": lambda p: kernel_focus(result.focus, p),
        "down_svd": lambda p: down_svd(result.down, p),
        "phases": lambda p: phase_means(result, p),
    }
    return {name: make(Path(out_dir) / FIGURES[name]) for name, make in makers.items()}
