"""Re-test the SPON-extension study's claims (a)-(d) on this run, and report the closed-form
baseline (free, and as an initialisation): findings JSON + Markdown table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from sponlab.io.layout import EVALS, cell_path, seed_path
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import read_json, write_text
from sponlab.stages.common import PARAMS_OPTION, read_params
from sponlab.studies.interpret.params import InterpretParams, interpret_params
from sponlab.sweep.budget import budget_line, curve_line, default_recovered
from sponlab.sweep.findings import (
    false_positive_line,
    findings_json,
    findings_markdown,
    study_findings,
    transfer_findings,
)


def main(
    params_file: Path = PARAMS_OPTION,
    summary: Path = typer.Option(Path("metrics/tables/summary.csv"), "--summary"),
    evals: Path = typer.Option(EVALS, "--evals", help="Evaluate cells root."),
    interpret: Path = typer.Option(Path("metrics/interpret.json"), "--interpret"),
    trained: Path = typer.Option(Path("models/spon"), "--trained", help="Train cells root."),
    out: Path = typer.Option(Path("metrics/findings.json"), "--out"),
    markdown: Path = typer.Option(Path("metrics/findings.md"), "--markdown"),
    transfer: Path = typer.Option(
        Path("metrics/transfer/summary.csv"), "--transfer", help="Transfer table (optional)."
    ),
    curve: Path = typer.Option(
        Path("metrics/learning_curve.json"), "--curve", help="Learning-curve metrics (optional)."
    ),
) -> None:
    params = read_params(params_file)
    frame = pd.read_csv(summary)
    shifts = {}
    if "UNIF-ALL" in params.swept:
        for s in params.sparsities:
            file = cell_path(evals, "UNIF-ALL", s) / "shift.csv"
            shifts[s] = pd.read_csv(file).to_dict("records")
    similarity, sim_sparsity = None, None
    ip: InterpretParams = interpret_params(params)
    if interpret.is_file():
        similarity, sim_sparsity = read_json(interpret, "interpret")["similarity"], ip.sparsity
    curves: dict[float, dict[str, list[list[float]]]] = {s: {} for s in params.sparsities}
    for config in ("UNIF-ALL", "UNIF-ALL-CF-INIT"):
        if config not in params.swept:
            continue
        for s in params.sparsities:
            cell = cell_path(trained, config, s)
            curves[s][config] = [
                pd.read_csv(seed_path(cell, k) / "val.csv")["val_kl"].tolist()
                for k in params.config(config).seeds
            ]
    found = study_findings(frame, shifts, similarity, sim_sparsity, curves)
    moved = []
    if transfer.is_file():
        moved = transfer_findings(pd.read_csv(transfer))
    everything = [*found, *moved]
    write_metrics(out, findings_json(everything))
    lc = read_json(curve, "learning-curve") if curve.is_file() else None
    lc_sparsity = ip.learning_curve.sparsity
    observed = default_recovered(frame, lc_sparsity)
    lines = [budget_line(frame), curve_line(lc, params.train.blocks, lc_sparsity, observed)]
    text = "\n\n".join([*lines, false_positive_line(everything), ""])
    text += findings_markdown(found)
    if moved:
        text += (
            "\n## Out of domain (stage transfer: text no stage trained, calibrated or tested on)\n\n"
            + findings_markdown(moved)
        )
    write_text(markdown, "# SPON-extension study: claims re-tested on this run\n\n" + text)
    typer.echo(text)
