"""Shared figure helpers: headless backend, consistent style, atomic PNG saving."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

DPI = 120


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, plt.Axes]:
    """A figure with one axes and the project's default size."""
    fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    return fig, ax


def save_figure(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
