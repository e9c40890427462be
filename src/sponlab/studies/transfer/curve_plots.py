"""Figure of the learning-curve stage: recovery and validation KL against training tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sponlab.io.figures import plt, save_figure  # common selects the Agg backend first


def plot_curve(table: pd.DataFrame, default_tokens: int, domain: str, path: Path) -> Path:
    """Three panels against distinct training tokens (log scale): damage recovered on the test
    text and on ``domain``, kept validation KL; mean ± seed sd per config; the default's budget
    as a dashed line."""
    panels = [
        ("test_recovered", 100, "test text: damage recovered (%)"),
        ("domain_recovered", 100, f"{domain}: damage recovered (%)"),
        ("val_kl", 1, "validation KL (kept epoch)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        for config in dict.fromkeys(table["config"]):
            part = table[table["config"] == config].sort_values("tokens")
            ax.errorbar(part["tokens"], scale * part[key], yerr=scale * np.nan_to_num(part[f"{key}_sd"]),
                        marker="o", capsize=3, label=config)  # fmt: skip
        ax.axvline(default_tokens, color="k", ls="--", lw=0.8, label="default budget")
        if key != "val_kl":
            ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct training tokens per seed")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Learning curve (mean ± seed sd)")
    return save_figure(fig, path)
