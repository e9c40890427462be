"""Figures of the allocation sweep: perplexity, damage recovered, Pareto, loss and drift curves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sponlab.io.figures import new_figure, save_figure


def ppl_by_config(frame: pd.DataFrame, dense_ppl: float, path: Path) -> Path:
    """Grouped bars: TEAL-only vs TEAL+SPON perplexity per config, one group per sparsity."""
    fig, ax = new_figure(8, 4.2)
    configs = list(dict.fromkeys(frame["config"]))
    sparsities = sorted(frame["sparsity"].unique())
    width = 0.8 / (2 * len(sparsities))
    x = np.arange(len(configs))
    for k, s in enumerate(sparsities):
        sub = frame[frame["sparsity"] == s].set_index("config").reindex(configs)
        offset = (2 * k - len(sparsities) + 0.5) * width
        ax.bar(x + offset, sub["teal_ppl"], width, label=f"TEAL s={s:g}", alpha=0.55)
        ax.bar(x + offset + width, sub["spon_ppl"], width, label=f"TEAL+SPON s={s:g}")
    ax.axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks(x, configs, rotation=20, ha="right")
    ax.set_ylabel("test perplexity")
    low = min(dense_ppl, frame["spon_ppl"].min())
    ax.set_ylim(bottom=0.95 * low)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title("Perplexity by allocation and sparsity")
    return save_figure(fig, path)


def damage_recovered(frame: pd.DataFrame, path: Path) -> Path:
    """Bars of (ppl_teal - ppl_spon) / (ppl_teal - ppl_dense) per config and sparsity: mean over
    seeds with the seed sd as error bar; cells whose TEAL damage is within noise get no bar."""
    fig, ax = new_figure(8, 4)
    order = list(dict.fromkeys(frame["config"]))
    table = frame.pivot(index="config", columns="sparsity", values="damage_recovered")
    table = table.astype(float).reindex(order)
    errors = frame.pivot(index="config", columns="sparsity", values="damage_recovered_sd")
    errors = errors.astype(float).reindex(order)
    width = 0.8 / max(len(table.columns), 1)
    x = np.arange(len(table))
    for k, s in enumerate(table.columns):
        ax.bar(
            x + k * width,
            100 * table[s].fillna(0),
            width,
            yerr=100 * errors[s].fillna(0),
            capsize=2,
            label=f"s={s:g}",
        )
        for i in np.flatnonzero(table[s].isna().to_numpy()):
            ax.text(x[i] + k * width, 0, "n/a", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x + width * (len(table.columns) - 1) / 2, table.index, rotation=25, ha="right")
    ax.set_ylabel("damage recovered (%)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_title("Share of the TEAL damage recovered (mean ± seed sd; n/a: damage within noise)")
    return save_figure(fig, path)


def pareto(frame: pd.DataFrame, path: Path) -> Path:
    """SPON perplexity vs bias parameters; frontier points connected per sparsity."""
    fig, ax = new_figure(6.4, 4.2)
    for s, group in frame.groupby("sparsity"):
        (line,) = ax.plot([], [])
        color = line.get_color()
        ax.scatter(group["bias_parameters"] + 1, group["spon_ppl"], color=color, label=f"s={s:g}")
        for row in group.itertuples():
            ax.annotate(row.config, (row.bias_parameters + 1, row.spon_ppl), fontsize=6)
        front = group[group["pareto"]].sort_values("bias_parameters")
        ax.plot(front["bias_parameters"] + 1, front["spon_ppl"], color=color, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("SPON bias parameters + 1 (log)")
    ax.set_ylabel("test perplexity")
    ax.legend(fontsize=8)
    ax.set_title("Pareto frontier: parameters vs perplexity")
    return save_figure(fig, path)


def loss_curves(curves: Mapping[str, pd.DataFrame], path: Path) -> Path:
    """Training KL per step for every trained cell."""
    fig, ax = new_figure(7, 4)
    for label, frame in curves.items():
        if len(frame):
            ax.plot(frame["step"], frame["loss"], label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train KL(dense || sparse)")
    ax.legend(fontsize=6, ncols=2)
    ax.set_title("SPON training curves")
    return save_figure(fig, path)


def shift_by_layer(shifts: Mapping[str, pd.DataFrame], title: str, path: Path) -> Path:
    """Relative residual-stream shift vs dense by layer: TEAL-only (dashed) and TEAL+SPON."""
    fig, ax = new_figure(7, 4)
    teal_drawn = False
    for label, frame in shifts.items():
        layers = frame[frame["index"] > 0]
        if not teal_drawn:
            ax.plot(layers["index"] - 1, layers["teal_rel"], "k--", label="TEAL-only")
            teal_drawn = True
        ax.plot(layers["index"] - 1, layers["spon_rel"], label=f"{label}", linewidth=1)
    ax.set_xlabel("layer (output of block)")
    ax.set_ylabel("||h - h_dense|| / ||h_dense||")
    ax.legend(fontsize=7)
    ax.set_title(title)
    return save_figure(fig, path)


def allocation(sites: pd.DataFrame, path_rows: pd.DataFrame, title: str, path: Path) -> Path:
    """Per-layer sparsity of each input group (a set's allocation, the calibrate stage's
    allocation.csv) and, for a greedy search, its block-output error vs uniform TEAL's."""
    fig, ax = new_figure(8, 4)
    per_group = sites.groupby(["layer", "group"], sort=True)["sparsity"].first().unstack()
    for group in per_group.columns:
        ax.plot(per_group.index, per_group[group], marker="o", markersize=3, label=group)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity of the group's input")
    ax.set_ylim(0, 1)
    if len(path_rows):
        last = path_rows.groupby("layer").last()  # the final step of every layer's search
        twin = ax.twinx()
        ratio = last["error"] / last["uniform_error"].where(last["uniform_error"] > 0)
        twin.plot(last.index, ratio, color="black", linestyle="--", label="error / uniform")
        twin.set_ylabel("block-output error, greedy / uniform")
        twin.legend(fontsize=7, loc="upper right")
    ax.legend(fontsize=7, loc="upper left", ncols=4)
    ax.set_title(title)
    return save_figure(fig, path)
