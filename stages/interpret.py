"""Interpret trained SPON biases: statistics, alignment, hidden shift, prompt categories, similarity.

Writes reports/interpret/{bias,alignment,shift,prompts,similarity}/ (CSV + PNG) and a metrics JSON.
The checkpoints are ``interpret.configs`` x ``interpret.sparsity``; similarity compares every pair of
``interpret.similarity`` (pairs that differ only in seed are the cross-seed control).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import typer

from sponlab.analysis import interpret as ia
from sponlab.analysis.alignment import alignment_rows, collect_moments, site_components
from sponlab.analysis.prompts import (
    Variant,
    load_prompt_sets,
    prompt_batches,
    prompt_effects,
    select_prompts,
)
from sponlab.config import analysis_params
from sponlab.data import wants_bos
from sponlab.experiment import sparsify_spec
from sponlab.plots import interpret as plots
from sponlab.sites import sort_sites
from sponlab.sparsify import thresholds_from_tensors
from sponlab.spon import load_biases
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    cell_path,
    load_base,
    load_blocks,
    read_params,
    replace_dir,
    timed,
)
from sponlab.tensorio import load_tensors, write_json

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


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.6g")


def read_shift(path: Path) -> list[dict]:
    """The evaluate stage's per-layer shift.csv (test blocks) as :func:`ia.shift_rows` rows."""
    ev = pd.read_csv(path)
    return ia.shift_rows(
        ev.teal_l2.tolist(), ev.spon_l2.tolist(), ev.teal_rel.tolist(), ev.spon_rel.tolist()
    )


def main(
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(Path("data/blocks/test.safetensors"), "--blocks"),
    thresholds: Path = typer.Option(
        Path("models/thresholds"), "--thresholds", help="Folder of s<sparsity>.safetensors."
    ),
    spon: Path = typer.Option(Path("models/spon"), "--spon", help="Root of CONFIG/s<s>/biases."),
    evals: Path = typer.Option(
        Path("metrics/eval"), "--evals", help="Root of CONFIG/s<s>/shift.csv."
    ),
    out: Path = typer.Option(Path("reports/interpret"), "--out"),
    metrics: Path = typer.Option(Path("metrics/interpret.json"), "--metrics"),
) -> None:
    p = read_params(params)
    ip: ia.InterpretParams = analysis_params(p, "interpret")
    s = p.check_sparsity(ip.sparsity)
    ia.check_configs(ip.configs, p.configs, p.sweep_configs, "interpret.configs")
    ia.check_configs(ip.similarity, p.configs, p.sweep_configs, "interpret.similarity")
    sets = select_prompts(load_prompt_sets(ip.prompts), ip.categories, ip.prompts_per_category)
    loaded, site_map = load_base(p, model)
    lm = loaded.model
    names = list(dict.fromkeys(ip.configs + ip.similarity))
    biases = {
        n: load_biases(cell_path(spon, n, s) / "biases.safetensors")[0].to(loaded.device)
        for n in names
    }
    vectors = {n: ia.output_vectors(biases[n], lm, site_map) for n in names}
    thr = thresholds_from_tensors(load_tensors(thresholds / f"s{s:g}.safetensors")[0])
    specs = {n: sparsify_spec(p, p.config(n), s, site_map, thr) for n in ip.configs}
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
            summary["checkpoints"][n]["bias"] = bias_report(
                n, vectors[n], dense, ip, site_map.num_layers, cell_path(bias_dir, n, s)
            )
            with timed(f"alignment of {n}"):
                rows = alignment_rows(
                    vectors[n],
                    dense,
                    teal[specs[n].sites],
                    lm,
                    site_map,
                    components,
                    baseline,
                )
            folder = cell_path(align_dir, n, s)
            write_csv(folder / "alignment.csv", rows)
            plots.plot_alignment(rows, f"{n} s={s:g}: bias alignment", folder / "alignment.png")
            summary["checkpoints"][n]["alignment"] = {
                **ia.summarize(rows, ALIGN_KEYS),
                "frac_abs_cos_global_over_3x_chance": ia.nanmean(
                    [abs(r["cos_global"]) > 3 * r["chance_abs_cos"] for r in rows]
                ),
            }
    del dense, teal
    seconds["bias_and_alignment"] = time.perf_counter() - start

    start = time.perf_counter()
    prompt_rows = run_prompts(p, ip, loaded, site_map, specs, biases, sets, out, summary)
    seconds["prompts"] = time.perf_counter() - start
    with replace_dir(out / "shift") as shift_dir:
        for n in ip.configs:
            summary["checkpoints"][n]["shift"] = shift_report(
                n, s, evals, prompt_rows[n], cell_path(shift_dir, n, s)
            )
    start = time.perf_counter()
    summary["similarity"] = similarity_report(ip, p.configs, vectors, baseline, out / "similarity")
    seconds["similarity"] = time.perf_counter() - start
    summary["seconds"] = seconds
    write_json(metrics, ia.clean(summary))


def bias_report(name, vecs, dense, ip, num_layers, folder: Path) -> dict:
    """Per-site statistics, per-layer norms and ranks, heatmap, histograms."""
    rms = {site: dense.rms(site) for site in vecs}
    rows = ia.bias_stat_rows(vecs, rms, ip.near_zero)
    layer_rows = ia.layer_norm_rows(rows)
    write_csv(folder / "stats.csv", rows)
    write_csv(folder / "layers.csv", layer_rows)
    title = f"{name} s={ip.sparsity:g}"
    plots.plot_bias_heatmap(vecs, ip.heatmap_dims, f"{title}: bias values", folder / "heatmap.png")
    plots.plot_bias_histograms(vecs, f"{title}: bias values per layer", folder / "histograms.png")
    plots.plot_layer_norms(layer_rows, f"{title}: bias norm by layer", folder / "layer_norms.png")
    by_rel = sorted(layer_rows, key=lambda r: r["rank_l2_rel"])
    by_abs = sorted(layer_rows, key=lambda r: r["rank_l2"])
    return {
        "sites": len(rows),
        **ia.summarize(rows, ("l2", "l2_rel", "max_rel", "kurtosis", "frac_pos", "frac_zero")),
        "top_layers_l2": [r["layer"] for r in by_abs[:5]],
        "top_layers_l2_rel": [r["layer"] for r in by_rel[:5]],
        "phase_l2_share": {
            phase: sum(
                r["l2"] ** 2 for r in layer_rows if ia.phase_of(r["layer"], num_layers) == phase
            )
            / max(sum(r["l2"] ** 2 for r in layer_rows), 1e-300)
            for phase in ia.PHASES
        },
    }


def run_prompts(p, ip, loaded, site_map, specs, biases, sets, out: Path, summary) -> dict:
    """KL and hidden shift per category for TEAL-only (one per distinct spec) and each config."""
    teal_name = {}
    variants: dict[str, Variant] = {}
    for n in ip.configs:
        key = specs[n].sites
        existing = [
            v for v, var in variants.items() if var.spec.sites == key and var.biases is None
        ]
        teal_name[n] = existing[0] if existing else "TEAL-only" + (f"[{n}]" if variants else "")
        variants.setdefault(teal_name[n], Variant(specs[n]))
        variants[f"SPON[{n}]"] = Variant(specs[n], biases[n])
    bos = wants_bos(loaded.tokenizer, p.data.bos)
    effect_rows, layer_rows = [], []
    per_config: dict[str, dict[str, list[dict]]] = {n: {} for n in ip.configs}
    for category, prompts in sets.items():
        batches = prompt_batches(
            prompts, loaded.tokenizer, ip.prompt_batch, ip.max_prompt_tokens, bos
        )
        with timed(f"prompts {category}: {len(prompts)} prompts, {len(variants)} variants"):
            totals = prompt_effects(loaded.model, site_map, batches, variants, desc=category)
        for v, t in totals.items():
            effect_rows.append(
                {
                    "category": category,
                    "variant": v,
                    "prompts": len(prompts),
                    "tokens": t.tokens,
                    "kl": t.kl,
                    "shift_rel_final": t.shift_rel[-1],
                    "shift_rel_mean": float(np.mean(t.shift_rel[1:])),
                }
            )
            layer_rows += [
                {"category": category, "variant": v, "index": i, "l2": l2, "rel": rel}
                for i, (l2, rel) in enumerate(zip(t.shift_l2, t.shift_rel, strict=True))
            ]
        for n in ip.configs:
            tl, sp = totals[teal_name[n]], totals[f"SPON[{n}]"]
            per_config[n][category] = ia.shift_rows(
                tl.shift_l2, sp.shift_l2, tl.shift_rel, sp.shift_rel
            )
    with replace_dir(out / "prompts") as folder:
        write_csv(folder / "effects.csv", effect_rows)
        write_csv(folder / "shift_by_layer.csv", layer_rows)
        plots.plot_prompt_effects(effect_rows, folder / "kl.png")
    summary["prompts"] = {
        c: {
            r["variant"]: {"kl": r["kl"], "shift_rel_final": r["shift_rel_final"]}
            for r in effect_rows
            if r["category"] == c
        }
        for c in sets
    }
    for n in ip.configs:
        tl = [r for r in effect_rows if r["variant"] == teal_name[n]]
        sp = [r for r in effect_rows if r["variant"] == f"SPON[{n}]"]
        summary["checkpoints"][n]["prompt_kl_reduction"] = {
            a["category"]: 1 - b["kl"] / a["kl"] if a["kl"] > 0 else None
            for a, b in zip(tl, sp, strict=True)
        }
    return per_config


def shift_report(name, s, evals: Path, prompt_rows: dict, folder: Path) -> dict:
    """Test-block shift from the evaluate stage plus prompt categories, with drift reduction."""
    rows = read_shift(cell_path(evals, name, s) / "shift.csv")
    write_csv(folder / "test.csv", rows)
    write_csv(
        folder / "prompts.csv",
        [{"category": c, **r} for c, cat_rows in prompt_rows.items() for r in cat_rows],
    )
    plots.plot_shift(
        rows, prompt_rows, f"{name} s={s:g}: hidden-state shift vs dense", folder / "shift.png"
    )
    final = rows[-1]
    return {
        "test_final_teal_rel": final["teal_rel"],
        "test_final_spon_rel": final["spon_rel"],
        "test_mean_drift_reduction": ia.nanmean([r["drift_reduction"] for r in rows[1:]]),
        "prompt_mean_drift_reduction": {
            c: ia.nanmean([r["drift_reduction"] for r in cat_rows[1:]])
            for c, cat_rows in prompt_rows.items()
        },
    }


def similarity_report(ip, configs, vectors, baseline, out: Path) -> dict:
    """Cosine of biases on shared sites for every pair of ``interpret.similarity`` configs."""
    names = list(ip.similarity)
    matrix = np.eye(len(names))
    site_rows, pairs, per_layer, result = [], [], {}, {}
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        rows = ia.similarity_rows(vectors[a], vectors[b], baseline)
        kind = "seed" if ia.same_allocation(configs[a], configs[b]) else "config"
        stats = {"kind": kind, **ia.similarity_summary(rows)}
        matrix[i, j] = matrix[j, i] = stats["mean_cos"] if rows else np.nan
        pairs.append({"a": a, "b": b, **stats})
        site_rows += [{"a": a, "b": b, **r} for r in rows]
        result[f"{a}~{b}"] = stats
        if rows and (kind == "seed" or a == names[0]):
            per_layer[f"{a} vs {b}" + (" (seed)" if kind == "seed" else "")] = rows
    with replace_dir(out) as folder:
        write_csv(folder / "sites.csv", site_rows)
        write_csv(folder / "pairs.csv", pairs)
        chance = ia.nanmean([r["chance_abs_cos"] for r in pairs])
        plots.plot_similarity(names, matrix, chance, per_layer, folder / "similarity.png")
    return result
