"""Weight spectra of the base model: effective ranks, attention kernels, down_proj SVD, report."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import replace_dir, write_text
from sponlab.stages.common import MODEL_OPTION, PARAMS_OPTION, read_params, timed
from sponlab.studies.spectrum.plots import plot_all
from sponlab.studies.spectrum.report import relative_link, render_report
from sponlab.studies.spectrum.spectrum import (
    analyse,
    headline_metrics,
    load_weights,
    spectrum_params,
)
from sponlab.studies.spectrum.stats import write_statistics, write_tables


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    tables: Path = typer.Option(
        Path("metrics/spectrum"), "--tables", help="Folder for report.md and the CSV tables."
    ),
    figures: Path = typer.Option(Path("plots/spectrum"), "--figures", help="Folder for figures."),
    metrics: Path = typer.Option(Path("metrics/spectrum.json"), "--metrics"),
) -> None:
    settings = spectrum_params(read_params(params_file))
    weights = load_weights(model)
    result = analyse(weights, settings)
    with (
        timed(f"write spectrum report to {tables}, figures to {figures}"),
        replace_dir(tables) as tmp,
        replace_dir(figures) as fig,
    ):
        drawn = plot_all(result, fig)
        # links from report.md to the figures' final place (relative, so the run folder can move)
        links = {
            name: relative_link(tables, figures / path.relative_to(fig))
            for name, path in drawn.items()
        }
        write_tables(result, tmp)
        write_statistics(result, tmp, model=str(model))
        write_text(tmp / "report.md", render_report(result, links, model=str(model)))
    write_metrics(metrics, headline_metrics(result))
