"""Layer importance of SPON biases: leave-one-layer-out perplexity on validation blocks.

Writes metrics/interpret/layers/ (layers.csv, curves.csv; drift_importance.csv and bias_stats.csv,
the layer-analysis notebook's ranking by drift removed and bias statistics), plots/interpret/layers/
(importance.png; bias_stats.png, drift_importance.png, top_bottom_biases.png) and a metrics JSON
with the benefit, the number of layers for each target fraction, early/middle/late shares and the
drift ranking's coverage sets, parameter savings, quarters and agreement with leave-one-out.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from sponlab.io.layout import EVALS, block_path, cell_path, seed_path
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import replace_dir, write_table
from sponlab.method.experiment import cell_spec
from sponlab.method.spon import load_biases
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    SPON_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    load_blocks,
    read_params,
    timed,
)
from sponlab.studies.interpret import params as ia
from sponlab.studies.interpret import shift as sh
from sponlab.studies.interpret.params import interpret_params
from sponlab.studies.interpret.plots import plot_layer_importance
from sponlab.studies.layers import drift as dl
from sponlab.studies.layers import leave_one_out as la
from sponlab.studies.layers.plots import plot_bias_stats, plot_drift_importance, plot_top_bottom


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(block_path("val"), "--blocks"),
    thresholds: Path = THRESHOLDS_OPTION,
    spon: Path = SPON_OPTION,
    evals: Path = typer.Option(
        EVALS, "--evals", help="Root of CONFIG/s<s>/shift.csv (test drift)."
    ),
    tables: Path = typer.Option(Path("metrics/interpret/layers"), "--tables", help="CSV tables."),
    figures: Path = typer.Option(Path("plots/interpret/layers"), "--figures", help="Figures."),
    metrics: Path = typer.Option(Path("metrics/interpret_layers.json"), "--metrics"),
) -> None:
    params = read_params(params_file)
    ip: ia.InterpretParams = interpret_params(params)
    lp, s = ip.layers, params.check_sparsity(ip.sparsity)
    ia.check_configs([lp.config], params.configs, params.sweep_configs, "interpret.layers.config")
    loaded, site_map = load_base(params, model)
    alloc = params.config(lp.config)
    cell = seed_path(cell_path(spon, lp.config, s), alloc.seeds[0]) / "biases.safetensors"
    biases = load_biases(cell, site_map, s, loaded.fingerprint)[0].to(loaded.device)
    spec = cell_spec(params, alloc, s, site_map, thresholds, loaded.fingerprint)
    ids = ia.first_blocks(load_blocks(blocks), lp.val_blocks, "interpret.layers.val_blocks")
    start = time.perf_counter()
    with timed(f"leave-one-layer-out on {tuple(ids.shape)} ({lp.cumulative} cumulative curve)"):
        result = la.leave_one_layer_out(
            loaded.model, site_map, ids, lp.batch_size, spec, biases, lp.cumulative == "measured"
        )
    seconds = time.perf_counter() - start
    norms = la.bias_norms_by_layer(loaded.model, site_map, biases, ids, lp.batch_size, ip.near_zero)
    shift = sh.read_shift(cell_path(evals, lp.config, s) / "shift.csv")
    rows = la.importance_rows(result, site_map.num_layers, norms, sh.drift_by_layer(shift))
    curves = la.cumulative_curves(result)
    # the layer-analysis notebook's view: drift removed per layer output, bias statistics
    drift = dl.drift_importance(shift)
    per_layer = dl.layer_vectors(ia.output_vectors(biases, loaded.model, site_map))
    bias_stats = dl.layer_bias_stats(per_layer)
    with replace_dir(tables) as out, replace_dir(figures) as fig:
        write_table(out / "layers.csv", rows)
        write_table(out / "curves.csv", la.curve_rows(result, curves))
        write_table(out / "drift_importance.csv", dl.drift_rows(drift, result.importance()))
        write_table(out / "bias_stats.csv", bias_stats)
        title = f"{lp.config} s={s:g}: leave-one-layer-out on {ids.numel()} val tokens"
        plot_layer_importance(rows, curves, lp.targets, title, fig / "importance.png")
        write_notebook_figures(
            fig, f"{lp.config} s={s:g}", drift, bias_stats, per_layer, lp.targets
        )
    summary = la.importance_summary(result, rows, curves, lp.targets, site_map.num_layers)
    summary["drift_ranking"] = dl.drift_summary(
        drift, result.importance(), site_map.num_layers, lp.targets
    )
    write_metrics(
        metrics,
        ia.clean(
            {"config": lp.config, "sparsity": s, "val_tokens": ids.numel(), **summary}
            | {"seconds": seconds}
        ),
        loaded.device,
        loaded.dtype,
    )


def write_notebook_figures(fig: Path, title: str, drift, bias_stats, per_layer, targets) -> None:
    """The notebook's figures: bias statistics by layer, drift importance, top/bottom layers."""
    plot_bias_stats(bias_stats, f"{title}: SPON bias statistics by layer", fig / "bias_stats.png")
    plot_drift_importance(
        drift.ranked,
        drift.percent,
        drift.cumulative,
        targets,
        f"{title}: layer importance by drift removed (test text)",
        fig / "drift_importance.png",
    )
    biased = [layer for layer in drift.ranked if layer in per_layer]  # most important first
    plot_top_bottom(
        per_layer,
        biased[:3],
        biased[-3:],
        f"{title}: biases of high vs low importance layers",
        fig / "top_bottom_biases.png",
    )
