"""Evaluate one cell: TEAL-only and TEAL+SPON perplexity, KL, hidden shift, achieved sparsity."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.evaluate import damage_recovered, evaluate_variant, load_reference
from sponlab.experiment import sparsify_spec
from sponlab.provenance import write_metrics
from sponlab.sparsify import SparsityStats, load_thresholds
from sponlab.spon import load_biases
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    cell_path,
    load_base,
    load_blocks,
    read_params,
    threshold_path,
    timed,
)
from sponlab.tensorio import read_json, write_rows


def main(
    config: str = typer.Option(..., "--config"),
    sparsity: float = typer.Option(..., "--sparsity"),
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(Path("data/blocks/test.safetensors"), "--blocks"),
    dense: Path = typer.Option(Path("data/dense"), "--dense", help="Dense reference folder."),
    dense_metrics: Path = typer.Option(Path("metrics/dense.json"), "--dense-metrics"),
    thresholds: Path = typer.Option(
        None, "--thresholds", help="Default: models/thresholds/s<s>.safetensors"
    ),
    biases: Path = typer.Option(
        None, "--biases", help="Default: models/spon/<config>/s<s>/biases.safetensors"
    ),
    out: Path = typer.Option(None, "--out", help="Default: metrics/eval/<config>/s<sparsity>"),
) -> None:
    cfg = read_params(params)
    alloc = cfg.config(config)
    cfg.check_sparsity(sparsity)
    thresholds = thresholds or threshold_path(Path("models/thresholds"), sparsity)
    biases = biases or cell_path(Path("models/spon"), config, sparsity) / "biases.safetensors"
    out = out or cell_path(Path("metrics/eval"), config, sparsity)
    loaded, site_map = load_base(cfg, model)
    ids = load_blocks(blocks)
    reference = load_reference(dense / "reference.safetensors", loaded.fingerprint)
    thr = load_thresholds(thresholds, site_map, sparsity, loaded.fingerprint)
    spec = sparsify_spec(cfg, alloc, sparsity, site_map, thr)
    spon, _ = load_biases(biases, site_map, sparsity, loaded.fingerprint)
    spon.to(loaded.device)
    stats = SparsityStats()
    run = dict(
        model=loaded.model,
        site_map=site_map,
        blocks=ids,
        batch_size=cfg.eval.batch_size,
        spec=spec,
        reference=reference,
    )
    with timed(f"evaluate TEAL-only ({config}, s={sparsity})"):
        teal = evaluate_variant(**run, stats=stats, desc="teal")
    spon_metrics = teal
    if spon.sites:
        with timed(f"evaluate TEAL+SPON ({config}, s={sparsity}, {len(spon.sites)} sites)"):
            spon_metrics = evaluate_variant(**run, biases=spon, desc="spon")
    dense_ppl = read_json(dense_metrics, producer="dense")["ppl"]
    achieved = stats.achieved()
    values = list(achieved.values())
    write_metrics(
        out / "metrics.json",
        {
            "config": config,
            "sparsity": sparsity,
            "dense_ppl": dense_ppl,
            "teal": teal.summary(),
            "spon": spon_metrics.summary(),
            "damage_recovered": damage_recovered(dense_ppl, teal.ppl, spon_metrics.ppl),
            "bias_sites": len(spon.sites),
            "bias_parameters": spon.num_parameters(),
            "achieved_sparsity": {
                "mean": sum(values) / len(values),
                "min": min(values),
                "max": max(values),
            },
        },
        loaded.device,
        loaded.dtype,
    )
    layers = [
        {
            "index": i,
            "layer": "embed" if i == 0 else i - 1,
            "teal_l2": teal.shift_l2[i],
            "spon_l2": spon_metrics.shift_l2[i],
            "teal_rel": teal.shift_rel[i],
            "spon_rel": spon_metrics.shift_rel[i],
        }
        for i in range(len(teal.shift_l2))
    ]
    write_rows(out / "shift.csv", layers, list(layers[0]))
    write_rows(
        out / "sparsity.csv",
        [
            {"site": s.key, "layer": s.layer, "module": s.module, "target": sparsity, "achieved": v}
            for s, v in achieved.items()
        ],
        ["site", "layer", "module", "target", "achieved"],
    )
