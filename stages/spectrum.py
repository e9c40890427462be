"""Weight spectra of the base model: effective ranks, attention kernels, down_proj SVD, report."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.analysis.spectrum import analyse, headline_metrics, load_weights
from sponlab.analysis.spectrum_report import render_report, write_tables
from sponlab.config import analysis_params
from sponlab.plots.spectrum import plot_all
from sponlab.provenance import write_metrics
from sponlab.stages.common import MODEL_OPTION, PARAMS_OPTION, read_params, replace_dir, timed
from sponlab.tensorio import write_text


def main(
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    out: Path = typer.Option(
        Path("reports/spectrum"), "--out", help="Folder for report.md, CSV tables and figures/."
    ),
    metrics: Path = typer.Option(Path("metrics/spectrum.json"), "--metrics"),
) -> None:
    cfg = analysis_params(read_params(params), "spectrum")
    weights = load_weights(model)
    result = analyse(weights, cfg)
    with timed(f"write spectrum report to {out}"), replace_dir(out) as tmp:
        write_tables(result, tmp)
        figures = plot_all(result, tmp / "figures")
        relative = {name: path.relative_to(tmp).as_posix() for name, path in figures.items()}
        write_text(tmp / "report.md", render_report(result, relative, model=str(model)))
    write_metrics(metrics, headline_metrics(result))
