"""Evaluate one cell: TEAL-only once, TEAL+SPON for every seed (perplexity, KL, hidden shift).

metrics.json holds the TEAL baseline of the config's sparsified set, its damage and whether that
is measurable, every seed's TEAL+SPON numbers and their mean and spread; shift.csv the per-layer
hidden-state shift (TEAL, and TEAL+SPON averaged over seeds); sparsity.csv the achieved sparsity.
"""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.evaluate import (
    SHIFT_FIELDS,
    SPARSITY_FIELDS,
    VariantMetrics,
    achieved_summary,
    cell_metrics,
    evaluate_variant,
    load_reference,
    same_for_all_seeds,
    shift_rows,
    sparsity_rows,
)
from sponlab.experiment import cell_spec
from sponlab.layout import cell_path, seed_path
from sponlab.provenance import write_metrics
from sponlab.sparsify import SparsityStats
from sponlab.spon import load_biases
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    load_blocks,
    read_params,
    timed,
)
from sponlab.stats import damage
from sponlab.tensorio import read_json, write_rows


def main(
    config: str = typer.Option(..., "--config"),
    sparsity: float = typer.Option(..., "--sparsity"),
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(Path("data/blocks/test.safetensors"), "--blocks"),
    dense: Path = typer.Option(Path("data/dense"), "--dense", help="Dense reference folder."),
    dense_metrics: Path = typer.Option(Path("metrics/dense.json"), "--dense-metrics"),
    thresholds: Path = THRESHOLDS_OPTION,
    trained: Path = typer.Option(
        None, "--trained", help="Train cell folder. Default: models/spon/<config>/s<s>"
    ),
    out: Path = typer.Option(None, "--out", help="Default: metrics/eval/<config>/s<sparsity>"),
) -> None:
    cfg = read_params(params)
    alloc = cfg.config(config)
    cfg.check_sparsity(sparsity)
    trained = trained or cell_path(Path("models/spon"), config, sparsity)
    out = out or cell_path(Path("metrics/eval"), config, sparsity)
    loaded, site_map = load_base(cfg, model)
    dense_info = read_json(dense_metrics, producer="dense")
    stats = SparsityStats()
    run = dict(
        model=loaded.model,
        site_map=site_map,
        blocks=load_blocks(blocks),
        batch_size=cfg.eval.batch_size,
        spec=cell_spec(cfg, alloc, sparsity, site_map, thresholds, loaded.fingerprint),
        reference=load_reference(dense / "reference.safetensors", loaded.fingerprint),
    )
    with timed(f"evaluate TEAL-only ({config}, set {alloc.sparsify}, s={sparsity})"):
        teal = evaluate_variant(**run, stats=stats, desc="teal")
    seeds: dict[int, VariantMetrics] = {}
    sizes: dict[int, dict[str, int]] = {}  # per seed: bias sites and parameters
    for seed in alloc.seeds:
        file = seed_path(trained, seed) / "biases.safetensors"
        spon = load_biases(file, site_map, sparsity, loaded.fingerprint)[0].to(loaded.device)
        sizes[seed] = {"bias_sites": len(spon.sites), "bias_parameters": spon.num_parameters()}
        seeds[seed] = teal
        if spon.sites:
            with timed(f"evaluate TEAL+SPON ({config}, s={sparsity}, seed {seed})"):
                seeds[seed] = evaluate_variant(**run, biases=spon, desc=f"spon seed {seed}")
    hurt = damage(
        dense_info["ppl"],
        teal.ppl,
        dense_info["block_nll"],
        teal.block_nll,
        cfg.summary.min_damage,
        cfg.summary.noise_sigmas,
    )
    payload = cell_metrics(config, sparsity, alloc.sparsify, dense_info["ppl"], teal, seeds)
    payload |= {"teal_damage": hurt.as_dict(), **same_for_all_seeds(sizes, trained)}
    payload["achieved_sparsity"] = achieved_summary(stats, sparsity)
    write_metrics(out / "metrics.json", payload, loaded.device, loaded.dtype)
    write_rows(out / "shift.csv", shift_rows(teal, list(seeds.values())), SHIFT_FIELDS)
    write_rows(out / "sparsity.csv", sparsity_rows(stats, sparsity), SPARSITY_FIELDS)
