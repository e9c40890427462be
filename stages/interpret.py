"""Interpret trained SPON biases: statistics, alignment, hidden shift, prompt categories, similarity.

Writes metrics/interpret/{bias,alignment,shift,prompts,similarity}/ (CSV tables),
plots/interpret/{...}/ (figures, the same tree) and metrics/interpret.json.
The checkpoints are ``interpret.configs`` x ``interpret.sparsity``; similarity compares every pair of
``interpret.similarity``, every seed of each (two seeds of one config are the cross-seed control);
the other analyses use each config's first seed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from sponlab.io.data import wants_bos
from sponlab.io.layout import EVALS, block_path, cell_path, seed_path
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import write_table
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
    replace_dir,
    timed,
)
from sponlab.studies.interpret import params as ia
from sponlab.studies.interpret import plots, study
from sponlab.studies.interpret import shift as sh
from sponlab.studies.interpret.directions import RandomBaseline
from sponlab.studies.interpret.params import interpret_params
from sponlab.studies.interpret.prompts import load_prompt_sets, select_prompts
from sponlab.studies.interpret.similarity import similarity_table


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(block_path("test"), "--blocks"),
    thresholds: Path = THRESHOLDS_OPTION,
    spon: Path = SPON_OPTION,
    evals: Path = typer.Option(EVALS, "--evals", help="Root of CONFIG/s<s>/shift.csv."),
    tables: Path = typer.Option(Path("metrics/interpret"), "--tables", help="CSV tables root."),
    figures: Path = typer.Option(Path("plots/interpret"), "--figures", help="Figures root."),
    metrics: Path = typer.Option(Path("metrics/interpret.json"), "--metrics"),
) -> None:
    begin = time.perf_counter()
    params = read_params(params_file)
    ip: ia.InterpretParams = interpret_params(params)
    s = params.check_sparsity(ip.sparsity)
    ia.check_configs(ip.configs, params.configs, params.swept, "interpret.configs")
    ia.check_configs(ip.similarity, params.configs, params.swept, "interpret.similarity")
    sets = select_prompts(load_prompt_sets(ip.prompts), ip.categories, ip.prompts_per_category)
    loaded, site_map = load_base(params, model)
    checkpoints = ia.seed_checkpoints(
        list(dict.fromkeys(ip.configs + ip.similarity)), params.configs
    )
    biases = load_checkpoints(checkpoints, spon, s, loaded, site_map)
    vectors = {n: ia.output_vectors(b, loaded.model, site_map) for n, b in biases.items()}
    specs = {
        n: cell_spec(params, params.config(n), s, site_map, thresholds, loaded.fingerprint)
        for n in ip.configs
    }
    baseline = RandomBaseline(ip.random_vectors, ip.seed)
    ids = ia.first_blocks(load_blocks(blocks), ip.blocks, "interpret.blocks")
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    with timed(f"bias statistics and alignment on {tuple(ids.shape)}"):
        reports = study.bias_reports(loaded.model, site_map, ids, ip, vectors, specs, baseline)
    write_bias_reports(tables, figures, s, reports, vectors, ip)
    seconds["bias_and_alignment"] = time.perf_counter() - start

    start = time.perf_counter()
    bos = wants_bos(loaded.tokenizer, params.data.bos)
    with timed(f"prompt categories: {len(sets)} x {ip.prompts_per_category} prompts"):
        prompts = study.prompt_report(
            loaded.model, loaded.tokenizer, site_map, ip, specs, biases, sets, bos
        )
    write_prompts(tables / "prompts", figures / "prompts", prompts)
    seconds["prompts"] = time.perf_counter() - start
    shift = {n: sh.read_shift(cell_path(evals, n, s) / "shift.csv") for n in ip.configs}
    write_shift(tables / "shift", figures / "shift", s, shift, prompts.shift)

    names = [n for n, (config, _) in checkpoints.items() if config in ip.similarity]
    owners = {n: params.config(config) for n, (config, _) in checkpoints.items()}
    seeds = {n: seed for n, (_, seed) in checkpoints.items()}
    table = similarity_table(names, owners, vectors, baseline, seeds)
    with replace_dir(tables / "similarity") as out, replace_dir(figures / "similarity") as fig:
        write_table(out / "sites.csv", table.site_rows)
        write_table(out / "pairs.csv", table.pair_rows)
        plots.plot_similarity(
            table.names, table.matrix, table.chance, table.per_layer, fig / "similarity.png"
        )
    summary: dict[str, Any] = {"sparsity": s, "checkpoints": {}}
    for n in ip.configs:
        summary["checkpoints"][n] = {
            **reports[n].summary,
            "prompt_kl_reduction": prompts.kl_reduction[n],
            "shift": sh.shift_summary(shift[n], prompts.shift[n]),
        }
    summary |= {"prompts": prompts.summary, "similarity": table.summary()}
    summary["seconds"] = {**seconds, "total": time.perf_counter() - begin}
    write_metrics(metrics, ia.clean(summary), loaded.device, loaded.dtype)


def load_checkpoints(checkpoints: dict, spon: Path, s: float, loaded, site_map) -> dict:
    """Each checkpoint's biases (name -> (config, seed)), checked against this model."""
    return {
        name: load_biases(
            seed_path(cell_path(spon, config, s), seed) / "biases.safetensors",
            site_map,
            s,
            loaded.fingerprint,
        )[0].to(loaded.device)
        for name, (config, seed) in checkpoints.items()
    }


def write_bias_reports(tables: Path, figures: Path, s: float, reports, vectors, ip) -> None:
    """Per checkpoint: stats.csv, layers.csv, alignment.csv; heatmap, histograms, norms, alignment."""
    with (
        replace_dir(tables / "bias") as bias_t,
        replace_dir(figures / "bias") as bias_f,
        replace_dir(tables / "alignment") as align_t,
        replace_dir(figures / "alignment") as align_f,
    ):
        for n, report in reports.items():
            title = f"{n} s={s:g}"
            t, f = cell_path(bias_t, n, s), cell_path(bias_f, n, s)
            write_table(t / "stats.csv", report.stats)
            write_table(t / "layers.csv", report.norms)
            plots.plot_bias_heatmap(
                vectors[n], ip.heatmap_dims, f"{title}: bias values", f / "heatmap.png"
            )
            plots.plot_bias_histograms(
                vectors[n], f"{title}: bias values per layer", f / "histograms.png"
            )
            plots.plot_layer_norms(
                report.norms, f"{title}: bias norm by layer", f / "layer_norms.png"
            )
            write_table(cell_path(align_t, n, s) / "alignment.csv", report.alignment)
            if report.residual:
                write_table(cell_path(align_t, n, s) / "residual.csv", report.residual)
            plots.plot_alignment(
                report.alignment,
                f"{title}: bias alignment",
                cell_path(align_f, n, s) / "alignment.png",
            )


def write_prompts(tables: Path, figures: Path, prompts: study.PromptReport) -> None:
    with replace_dir(tables) as out, replace_dir(figures) as fig:
        write_table(out / "effects.csv", prompts.effects)
        write_table(out / "shift_by_layer.csv", prompts.layers)
        plots.plot_prompt_effects(prompts.effects, fig / "kl.png")


def write_shift(tables: Path, figures: Path, s: float, test: dict, prompts: dict) -> None:
    """Per config: test.csv (from its evaluate cell), prompts.csv and the shift figure."""
    with replace_dir(tables) as out, replace_dir(figures) as fig:
        for n, rows in test.items():
            folder = cell_path(out, n, s)
            write_table(folder / "test.csv", rows)
            write_table(
                folder / "prompts.csv",
                [{"category": c, **r} for c, cat in prompts[n].items() for r in cat],
            )
            title = f"{n} s={s:g}: hidden-state shift vs dense"
            plots.plot_shift(rows, prompts[n], title, cell_path(fig, n, s) / "shift.png")
