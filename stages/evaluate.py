"""Evaluate one cell: TEAL+SPON for every seed (perplexity, KL, hidden shift) against TEAL-only.

The TEAL-only numbers of the config's sparsified set come from the baseline stage (computed once
per set and sparsity); a cell without biases (BASELINE-TEAL) loads no model. metrics.json holds
the TEAL baseline, its damage and whether that is measurable, every seed's TEAL+SPON numbers and
their mean and spread; shift.csv the per-layer hidden-state shift (TEAL, and TEAL+SPON averaged
over seeds); sparsity.csv the achieved sparsity per site (of the TEAL-only pass).
"""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.layout import (
    BASELINES,
    DENSE_METRICS,
    EVALS,
    SPON,
    baseline_path,
    block_path,
    cell_path,
    seed_path,
)
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import read_json, write_rows
from sponlab.method.evaluate import (
    SHIFT_FIELDS,
    SPARSITY_FIELDS,
    VariantMetrics,
    achieved_summary,
    cell_metrics,
    evaluate_variant,
    load_reference,
    read_baseline,
    same_for_all_seeds,
    shift_rows,
)
from sponlab.method.experiment import cell_spec
from sponlab.method.spon import load_biases
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    load_test_set,
    read_params,
    timed,
)
from sponlab.stats import block_bootstrap_se, damage, finite_or_none


def main(
    config: str = typer.Option(..., "--config"),
    sparsity: float = typer.Option(..., "--sparsity"),
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(block_path("test"), "--blocks"),
    dense: Path = typer.Option(Path("data/dense"), "--dense", help="Dense reference folder."),
    dense_metrics: Path = typer.Option(DENSE_METRICS, "--dense-metrics"),
    thresholds: Path = THRESHOLDS_OPTION,
    baselines: Path = typer.Option(
        BASELINES, "--baselines", help="Root of the baseline stage's s<s>/<set>.json (TEAL-only)."
    ),
    trained: Path = typer.Option(
        None, "--trained", help="Train cell folder. Default: models/spon/<config>/s<s>"
    ),
    out: Path = typer.Option(None, "--out", help="Default: metrics/eval/<config>/s<sparsity>"),
) -> None:
    params = read_params(params_file)
    alloc = params.config(config)
    params.check_sparsity(sparsity)
    trained = trained or cell_path(SPON, config, sparsity)
    out = out or cell_path(EVALS, config, sparsity)
    dense_info = read_json(dense_metrics, producer="dense")
    teal, rows, made = read_baseline(
        baseline_path(baselines, sparsity, alloc.sparsify), sparsity, alloc.sparsify
    )
    files = {seed: seed_path(trained, seed) / "biases.safetensors" for seed in alloc.seeds}
    stored = {
        s: load_biases(f, None, sparsity, made["model_fingerprint"]) for s, f in files.items()
    }
    sizes = {
        s: {"bias_sites": len(b.sites), "bias_parameters": b.num_parameters()}
        for s, (b, _) in stored.items()
    }
    seeds: dict[int, VariantMetrics] = dict.fromkeys(alloc.seeds, teal)  # no biases: TEAL-only
    device, dtype = made["env"]["device"], made["env"]["dtype"]
    if any(size["bias_sites"] for size in sizes.values()):  # only then is a model needed
        device, dtype = evaluate_seeds(
            params, alloc, sparsity, files, seeds, model, blocks, dense, thresholds
        )
    hurt = damage(
        dense_info["ppl"],
        teal.ppl,
        dense_info["block_nll"],
        teal.block_nll,
        params.summary.min_damage,
        params.summary.noise_sigmas,
    )
    payload = cell_metrics(config, sparsity, alloc.sparsify, dense_info["ppl"], teal, seeds)
    payload |= {"teal_damage": hurt.as_dict(), **same_for_all_seeds(sizes, trained)}
    payload["protocol"] = dense_info.get("protocol")  # the test windows dense was scored on
    payload["achieved_sparsity"] = achieved_summary(rows, sparsity)
    payload["teal"]["block_nll"] = teal.block_nll
    payload["damage_recovered_block_se"] = finite_or_none(
        block_bootstrap_se(
            dense_info["block_nll"], teal.block_nll, [m.block_nll for m in seeds.values()]
        )
    )  # test-block noise of the mean damage recovered (paired bootstrap)
    write_metrics(out / "metrics.json", payload, device, dtype)
    write_rows(out / "shift.csv", shift_rows(teal, list(seeds.values())), SHIFT_FIELDS)
    write_rows(out / "sparsity.csv", rows, SPARSITY_FIELDS)


def evaluate_seeds(params, alloc, sparsity, files, seeds, model, blocks, dense, thresholds):
    """TEAL+SPON metrics of every seed with biases, into ``seeds``; the model's device, dtype."""
    loaded, site_map = load_base(params, model)
    ids, score_from, _ = load_test_set(blocks, params.sparsify)
    run = dict(
        model=loaded.model,
        site_map=site_map,
        blocks=ids,
        score_from=score_from,
        batch_size=params.eval.batch_size,
        spec=cell_spec(params, alloc, sparsity, site_map, thresholds, loaded.fingerprint),
        reference=load_reference(dense / "reference.safetensors", loaded.fingerprint),
    )
    for seed, file in files.items():
        spon = load_biases(file, site_map, sparsity, loaded.fingerprint)[0]
        if spon.sites:
            with timed(f"evaluate TEAL+SPON ({alloc.name}, s={sparsity}, seed {seed})"):
                biases = spon.to(loaded.device)
                seeds[seed] = evaluate_variant(**run, biases=biases, desc=f"spon seed {seed}")
    return loaded.device, loaded.dtype
