"""Interpret trained SPON biases: statistics, alignment, hidden shift, prompt categories, similarity.

Writes reports/interpret/{bias,alignment,shift,prompts,similarity}/ (CSV + PNG) and a metrics JSON.
The checkpoints are ``interpret.configs`` x ``interpret.sparsity``; similarity compares every pair of
``interpret.similarity``, every seed of each (two seeds of one config are the cross-seed control);
the other analyses use each config's first seed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from sponlab.analysis import interpret as ia
from sponlab.analysis import shift as sh
from sponlab.analysis.alignment import alignment_rows, collect_moments, site_components
from sponlab.analysis.prompts import (
    effect_rows,
    kl_reduction,
    layer_rows,
    load_prompt_sets,
    prompt_batches,
    prompt_effects,
    prompt_variants,
    select_prompts,
)
from sponlab.analysis.similarity import similarity_table
from sponlab.config import analysis_params
from sponlab.data import wants_bos
from sponlab.experiment import cell_spec
from sponlab.layout import cell_path, seed_path
from sponlab.plots import interpret as plots
from sponlab.provenance import write_metrics
from sponlab.sites import sort_sites
from sponlab.spon import load_biases
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    load_base,
    load_blocks,
    read_params,
    replace_dir,
    timed,
)
from sponlab.tensorio import write_table

ALIGN_KEYS = (
    "cos_global",
    "cos_local",
    "cos_dense_mean",
    "max_abs_cos_pc",
    "pc_energy",
    "pc_energy_chance",
    "error_explained",
    "chance_abs_cos",
    "random_abs_cos",
)


def main(
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(Path("data/blocks/test.safetensors"), "--blocks"),
    thresholds: Path = typer.Option(
        Path("models/thresholds"), "--thresholds", help="Root of s<s>/<set>.safetensors."
    ),
    spon: Path = typer.Option(
        Path("models/spon"), "--spon", help="Root of CONFIG/s<s>/seed<k>/biases."
    ),
    evals: Path = typer.Option(
        Path("metrics/eval"), "--evals", help="Root of CONFIG/s<s>/shift.csv."
    ),
    out: Path = typer.Option(Path("reports/interpret"), "--out"),
    metrics: Path = typer.Option(Path("metrics/interpret.json"), "--metrics"),
) -> None:
    begin = time.perf_counter()
    p = read_params(params)
    ip: ia.InterpretParams = analysis_params(p, "interpret")
    s = p.check_sparsity(ip.sparsity)
    ia.check_configs(ip.configs, p.configs, p.sweep_configs, "interpret.configs")
    ia.check_configs(ip.similarity, p.configs, p.sweep_configs, "interpret.similarity")
    sets = select_prompts(load_prompt_sets(ip.prompts), ip.categories, ip.prompts_per_category)
    loaded, site_map = load_base(p, model)
    lm = loaded.model
    checkpoints = ia.seed_checkpoints(list(dict.fromkeys(ip.configs + ip.similarity)), p.configs)
    biases = {
        name: load_biases(
            seed_path(cell_path(spon, n, s), seed) / "biases.safetensors",
            site_map,
            s,
            loaded.fingerprint,
        )[0].to(loaded.device)
        for name, (n, seed) in checkpoints.items()
    }
    vectors = {n: ia.output_vectors(b, lm, site_map) for n, b in biases.items()}
    specs = {
        n: cell_spec(p, p.config(n), s, site_map, thresholds, loaded.fingerprint)
        for n in ip.configs
    }
    baseline = ia.RandomBaseline(ip.random_vectors, ip.seed)
    summary: dict[str, Any] = {"sparsity": s, "checkpoints": {n: {} for n in ip.configs}}
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    ids = ia.first_blocks(load_blocks(blocks), ip.blocks, "interpret.blocks")
    sites = sort_sites({site for n in ip.configs for site in biases[n].sites})
    with timed(f"dense and TEAL-only passes on {tuple(ids.shape)}, {len(sites)} sites"):
        dense = collect_moments(
            lm,
            site_map,
            sites,
            ids,
            ip.batch_size,
            keep_samples=ip.pca_components > 0,
            desc="dense",
        )
        teal = {}
        for n in ip.configs:
            key = specs[n].sites
            if key not in teal:
                teal[key] = collect_moments(
                    lm, site_map, sites, ids, ip.batch_size, specs[n], desc="teal"
                )
        components = site_components(dense, ip.pca_components, ip.pca_tokens, ip.seed)
        dense.samples.clear()  # [tokens, D] per site: no longer needed
    with replace_dir(out / "bias") as bias_dir, replace_dir(out / "alignment") as align_dir:
        for n in ip.configs:
            title = f"{n} s={s:g}"
            rows = ia.bias_stat_rows(
                vectors[n], {x: dense.rms(x) for x in vectors[n]}, ip.near_zero
            )
            norms = ia.layer_norm_rows(rows)
            write_bias_report(cell_path(bias_dir, n, s), rows, norms, vectors[n], ip, title)
            summary["checkpoints"][n]["bias"] = ia.bias_summary(rows, norms, site_map.num_layers)
            with timed(f"alignment of {n}"):
                rows = alignment_rows(
                    vectors[n], dense, teal[specs[n].sites], lm, site_map, components, baseline
                )
            write_table(cell_path(align_dir, n, s) / "alignment.csv", rows)
            plots.plot_alignment(
                rows, f"{title}: bias alignment", cell_path(align_dir, n, s) / "alignment.png"
            )
            summary["checkpoints"][n]["alignment"] = alignment_summary(rows)
    del dense, teal
    seconds["bias_and_alignment"] = time.perf_counter() - start

    start = time.perf_counter()
    prompt_shift = run_prompts(p, ip, loaded, site_map, specs, biases, sets, out, summary)
    seconds["prompts"] = time.perf_counter() - start
    with replace_dir(out / "shift") as shift_dir:
        for n in ip.configs:
            rows = sh.read_shift(cell_path(evals, n, s) / "shift.csv")
            folder = cell_path(shift_dir, n, s)
            write_table(folder / "test.csv", rows)
            write_table(
                folder / "prompts.csv",
                [{"category": c, **r} for c, cat in prompt_shift[n].items() for r in cat],
            )
            title = f"{n} s={s:g}: hidden-state shift vs dense"
            plots.plot_shift(rows, prompt_shift[n], title, folder / "shift.png")
            summary["checkpoints"][n]["shift"] = sh.shift_summary(rows, prompt_shift[n])

    names = [n for n, (config, _) in checkpoints.items() if config in ip.similarity]
    owners = {n: p.config(config) for n, (config, _) in checkpoints.items()}
    table = similarity_table(names, owners, vectors, baseline)
    with replace_dir(out / "similarity") as folder:
        write_table(folder / "sites.csv", table.site_rows)
        write_table(folder / "pairs.csv", table.pair_rows)
        plots.plot_similarity(
            table.names, table.matrix, table.chance, table.per_layer, folder / "similarity.png"
        )
    summary["similarity"] = table.summary()
    summary["seconds"] = {**seconds, "total": time.perf_counter() - begin}
    write_metrics(metrics, ia.clean(summary), loaded.device, loaded.dtype)


def alignment_summary(rows: list[dict]) -> dict:
    over = [abs(r["cos_global"]) > 3 * r["chance_abs_cos"] for r in rows]
    return {
        **ia.summarize(rows, ALIGN_KEYS),
        "frac_abs_cos_global_over_3x_chance": ia.nanmean(over),
    }


def write_bias_report(folder: Path, rows, norms, vectors, ip, title: str) -> None:
    """Per-site statistics, per-layer norms and ranks, heatmap, histograms."""
    write_table(folder / "stats.csv", rows)
    write_table(folder / "layers.csv", norms)
    plots.plot_bias_heatmap(
        vectors, ip.heatmap_dims, f"{title}: bias values", folder / "heatmap.png"
    )
    plots.plot_bias_histograms(
        vectors, f"{title}: bias values per layer", folder / "histograms.png"
    )
    plots.plot_layer_norms(norms, f"{title}: bias norm by layer", folder / "layer_norms.png")


def run_prompts(p, ip, loaded, site_map, specs, biases, sets, out: Path, summary) -> dict:
    """KL and hidden shift per category; returns per config {category: shift rows}."""
    variants, baseline = prompt_variants(ip.configs, specs, biases)
    bos = wants_bos(loaded.tokenizer, p.data.bos)
    effects, layers = [], []
    shift: dict[str, dict[str, list[dict]]] = {n: {} for n in ip.configs}
    for category, prompts in sets.items():
        batches = prompt_batches(
            prompts, loaded.tokenizer, ip.prompt_batch, ip.max_prompt_tokens, bos
        )
        with timed(f"prompts {category}: {len(prompts)} prompts, {len(variants)} variants"):
            totals = prompt_effects(loaded.model, site_map, batches, variants, desc=category)
        effects += effect_rows(category, len(prompts), totals)
        layers += layer_rows(category, totals)
        for n in ip.configs:
            tl, sp = totals[baseline[n]], totals[f"SPON[{n}]"]
            shift[n][category] = sh.shift_rows(tl.shift_l2, sp.shift_l2, tl.shift_rel, sp.shift_rel)
    with replace_dir(out / "prompts") as folder:
        write_table(folder / "effects.csv", effects)
        write_table(folder / "shift_by_layer.csv", layers)
        plots.plot_prompt_effects(effects, folder / "kl.png")
    summary["prompts"] = {
        c: {r["variant"]: {"kl": r["kl"], "shift_rel_final": r["shift_rel_final"]} for r in rows}
        for c in sets
        for rows in [[r for r in effects if r["category"] == c]]
    }
    for n in ip.configs:
        summary["checkpoints"][n]["prompt_kl_reduction"] = kl_reduction(effects, n, baseline[n])
    return shift
