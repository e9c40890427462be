"""TEAL-only metrics of one sparsified set at one sparsity, shared by every evaluate cell using it.

Each evaluate cell compares its TEAL+SPON seeds with the TEAL-only model of its sparsified set;
that baseline depends only on (set, sparsity), so it is computed once here (perplexity, per-block
NLL, KL and hidden shift on the dense reference, achieved sparsity per site) instead of once per
config.
"""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.layout import BASELINES, baseline_path, block_path
from sponlab.io.provenance import write_metrics
from sponlab.method.evaluate import baseline_payload, evaluate_variant, load_reference
from sponlab.method.experiment import set_spec
from sponlab.method.sparsify import SparsityStats
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    load_test_set,
    read_params,
    timed,
)


def main(
    sparsity: float = typer.Option(..., "--sparsity"),
    sparsified: str = typer.Option("all", "--set", help="Sparsified set from sparsify.sets."),
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(block_path("test"), "--blocks"),
    dense: Path = typer.Option(Path("data/dense"), "--dense", help="Dense reference folder."),
    thresholds: Path = THRESHOLDS_OPTION,
    out: Path = typer.Option(None, "--out", help="Default: data/baseline/s<sparsity>/<set>.json"),
) -> None:
    params = read_params(params_file)
    params.check_sparsity(sparsity)
    modules = params.sparsified_set(sparsified)
    out = out or baseline_path(BASELINES, sparsity, sparsified)
    loaded, site_map = load_base(params, model)
    spec = set_spec(params, sparsified, modules, sparsity, site_map, thresholds, loaded.fingerprint)
    stats = SparsityStats()
    ids, score_from, protocol = load_test_set(blocks, params.sparsify)
    with timed(f"evaluate TEAL-only (set {sparsified}, s={sparsity})"):
        teal = evaluate_variant(
            loaded.model,
            site_map,
            ids,
            params.eval.batch_size,
            spec=spec,
            reference=load_reference(dense / "reference.safetensors", loaded.fingerprint),
            stats=stats,
            desc="teal",
            score_from=score_from,
        )
    meta = {
        "sparsity": sparsity,
        "set": sparsified,
        "modules": list(modules),
        "model": str(model),
        "model_fingerprint": loaded.fingerprint,
        "protocol": protocol,
    }
    write_metrics(out, baseline_payload(teal, stats, meta), loaded.device, loaded.dtype)
