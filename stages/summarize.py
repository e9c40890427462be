"""Summarise the sweep: one row per cell (mean ± seed spread), set-matched TEAL baselines, noise
marks against the reference config, the Pareto frontier and nested metrics for dvc."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.layout import DENSE_METRICS, EVALS, cell_path, seed_path
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import atomic_path, read_json, write_text
from sponlab.stages.common import PARAMS_OPTION, read_params
from sponlab.sweep.summary import (
    cell_result,
    nested_metrics,
    perplexity_line,
    summary_table,
    to_latex,
    to_markdown,
)


def main(
    params_file: Path = PARAMS_OPTION,
    evals: Path = typer.Option(EVALS, "--evals", help="Evaluate cells root."),
    trained: Path = typer.Option(Path("models/spon"), "--trained", help="Train cells root."),
    dense_metrics: Path = typer.Option(DENSE_METRICS, "--dense-metrics"),
    metrics: Path = typer.Option(Path("metrics/summary.json"), "--metrics"),
    tables: Path = typer.Option(Path("metrics/tables"), "--tables", help="summary.{csv,md,tex}"),
) -> None:
    params = read_params(params_file)
    dense = read_json(dense_metrics)
    cells = [
        cell_result(
            read_json(cell_path(evals, config, s) / "metrics.json", producer="evaluate"),
            [
                read_json(seed_path(cell_path(trained, config, s), k) / "train.json", "train")
                for k in params.config(config).seeds
            ],
            dense["parameters"],
        )
        for config in params.swept
        for s in params.sparsities
    ]
    frame = summary_table(cells, params.summary.reference)
    with atomic_path(tables / "summary.csv") as tmp:
        frame.to_csv(tmp, index=False)
    write_text(tables / "summary.md", perplexity_line(dense) + "\n\n" + to_markdown(frame))
    write_text(tables / "summary.tex", to_latex(frame))
    write_metrics(metrics, nested_metrics(frame, dense["ppl"]))
    typer.echo(to_markdown(frame))
