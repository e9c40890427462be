"""The run's report: metrics/report.md, written only from metrics and plot files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from sponlab.io.layout import REPORT
from sponlab.io.tensorio import read_json, write_text
from sponlab.stages.common import PARAMS_OPTION, read_params
from sponlab.sweep.report import FIGURES, RunFiles, build_report
from sponlab.sweep.summary import sparsity_key


def _optional_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _optional_json(path: Path, producer: str):
    return read_json(path, producer) if path.is_file() else None


def main(
    params_file: Path = PARAMS_OPTION,
    root: Path = typer.Option(Path("."), "--root", help="Run folder (metrics/, plots/)."),
    out: Path = typer.Option(REPORT, "--out"),
) -> None:
    params = read_params(params_file)
    metrics = root / "metrics"
    findings = metrics / "findings.md"
    figures = {key: root / rel for key, rel in FIGURES}
    for s in params.sparsities:
        key = f"shift_{sparsity_key(s)}"
        figures[key] = root / f"plots/sweep/{key}.png"
    run = RunFiles(
        params=params,
        dense=read_json(metrics / "dense.json", "dense"),
        summary=pd.read_csv(metrics / "tables/summary.csv"),
        findings_md=findings.read_text() if findings.is_file() else None,
        interpret=_optional_json(metrics / "interpret.json", "interpret"),
        layers=_optional_json(metrics / "interpret_layers.json", "layer-importance"),
        sae=_optional_json(metrics / "sae.json", "sae"),
        importance=_optional_json(metrics / "importance.json", "importance"),
        spectrum=_optional_json(metrics / "spectrum.json", "spectrum"),
        figures=figures,
        transfer_md=_optional_text(metrics / "transfer/summary.md"),
        training_md=_optional_text(metrics / "transfer_training/training.md"),
        curve_md=_optional_text(metrics / "learning_curve/curve.md"),
    )
    write_text(out, build_report(run, out.parent))
    typer.echo(f"report: {out}")
