"""Figure of the transfer stage: damage recovered per text domain, config and sparsity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sponlab.io.figures import plt, save_figure  # common selects the Agg backend first


def plot_transfer(frame: pd.DataFrame, path: Path) -> Path:
    """One panel per sparsity: grouped bars (configs) per domain, seed sd as error bars; cells
    whose TEAL damage is within noise are left empty."""
    sparsities = sorted(frame["sparsity"].unique())
    domains = list(dict.fromkeys(frame["domain"]))
    configs = list(dict.fromkeys(frame["config"]))
    fig, axes = plt.subplots(
        1, len(sparsities), figsize=(6 * len(sparsities), 4), squeeze=False, constrained_layout=True
    )
    width = 0.8 / max(len(configs), 1)
    for ax, s in zip(axes[0], sparsities, strict=True):
        for i, config in enumerate(configs):
            sel = frame[(frame["sparsity"] == s) & (frame["config"] == config)].set_index("domain")
            values = [
                100 * sel.loc[d, "damage_recovered"]
                if d in sel.index and bool(sel.loc[d, "damage_measurable"])
                else np.nan
                for d in domains
            ]
            errors = [
                100 * sel.loc[d, "damage_recovered_sd"] if d in sel.index else np.nan
                for d in domains
            ]
            x = np.arange(len(domains)) + (i - (len(configs) - 1) / 2) * width
            ax.bar(x, values, width, yerr=np.nan_to_num(errors), label=config, capsize=2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(np.arange(len(domains)), domains, rotation=20, fontsize=8)
        ax.set_ylabel("damage recovered (%)")
        ax.set_title(f"s={s:g}: in-domain test vs unseen domains", fontsize=10)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_training(frame: pd.DataFrame, path: Path) -> Path:
    """Damage recovered against training-set size, one panel per domain and one line per mix
    (seed sd as error bars; sizes whose TEAL damage is within noise are left out)."""
    domains = list(dict.fromkeys(frame["domain"]))
    fig, axes = plt.subplots(
        1, len(domains), figsize=(3.2 * len(domains), 3.4), squeeze=False, sharey=True,
        constrained_layout=True,
    )  # fmt: skip
    for ax, domain in zip(axes[0], domains, strict=True):
        for mix, group in frame[frame["domain"] == domain].groupby("mix", sort=False):
            group = group[group["damage_measurable"].astype(bool)].sort_values("size")
            ax.errorbar(
                group["size"], 100 * group["damage_recovered"],
                yerr=np.nan_to_num(100 * group["damage_recovered_sd"]),
                marker="o", capsize=2, label=mix,
            )  # fmt: skip
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        sizes = sorted(frame["size"].unique())
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training blocks")
        ax.set_title(domain, fontsize=9)
    axes[0][0].set_ylabel("damage recovered (%)")
    axes[0][0].legend(fontsize=7, title="training mix", title_fontsize=7)
    return save_figure(fig, path)
