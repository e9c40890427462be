"""Figures (PNG) and long-format plot data of the sweep for offline viewing and dvc plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from sponlab.io.layout import DENSE_METRICS, EVALS, SPON, cell_path, seed_path
from sponlab.io.tensorio import atomic_path, read_json
from sponlab.stages.common import PARAMS_OPTION, read_params
from sponlab.sweep import plots as figures
from sponlab.sweep.summary import sparsity_key


def main(
    params_file: Path = PARAMS_OPTION,
    summary: Path = typer.Option(Path("metrics/tables/summary.csv"), "--summary"),
    dense_metrics: Path = typer.Option(DENSE_METRICS, "--dense-metrics"),
    evals: Path = typer.Option(EVALS, "--evals"),
    trained: Path = typer.Option(SPON, "--trained"),
    allocations: Path = typer.Option(
        Path("metrics/allocation"), "--allocations", help="calibrate's s<s>/<set>/ folders."
    ),
    out: Path = typer.Option(Path("plots/sweep"), "--out", help="Folder for PNGs and CSV data."),
) -> None:
    params = read_params(params_file)
    frame = pd.read_csv(summary)
    dense_ppl = read_json(dense_metrics)["ppl"]
    figures.ppl_by_config(frame, dense_ppl, out / "ppl_by_config.png")
    figures.damage_recovered(frame, out / "damage_recovered.png")
    figures.pareto(frame, out / "pareto.png")
    curves, shifts = {}, []
    for config in params.swept:
        for s in params.sparsities:
            first = params.config(config).seeds[0]
            loss = pd.read_csv(seed_path(cell_path(trained, config, s), first) / "loss.csv")
            if len(loss):
                curves[f"{config} s={s:g}"] = loss
            shift = pd.read_csv(cell_path(evals, config, s) / "shift.csv")
            shifts.append(shift.assign(config=config, sparsity=s))
    figures.loss_curves(curves, out / "loss_curves.png")
    shift_all = pd.concat(shifts, ignore_index=True)
    for s in params.sparsities:
        per_config = {
            c: g for c, g in shift_all[shift_all["sparsity"] == s].groupby("config", sort=False)
        }
        figures.shift_by_layer(
            per_config,
            f"Hidden-state shift vs dense, s={s:g}",
            out / f"shift_{sparsity_key(s)}.png",
        )
    long_loss = (
        pd.concat([c.assign(cell=label) for label, c in curves.items()], ignore_index=True)
        if curves
        else pd.DataFrame(columns=["step", "loss", "cell"])
    )
    for name, kind in params.sparsify.allocations.items():
        if kind == "greedy" and name in params.sweep_sets:
            for s in params.sparsities:
                folder = allocations / f"s{s:g}" / name
                figures.allocation(
                    pd.read_csv(folder / "allocation.csv"),
                    pd.read_csv(folder / "path.csv"),
                    f"Greedy allocation of set {name} at s={s:g}",
                    out / f"allocation_{name}_{sparsity_key(s)}.png",
                )
    for name, data in (("loss.csv", long_loss), ("shift.csv", shift_all)):
        with atomic_path(out / name) as tmp:
            data.to_csv(tmp, index=False)
