"""Dense baseline: test perplexity and the dense reference (log-probs, hidden states) for KL/shift."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.layout import DENSE_METRICS, block_path
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import save_tensors
from sponlab.method.evaluate import capture_dense, evaluate_variant
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    load_base,
    load_test_set,
    read_params,
    timed,
)


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(block_path("test"), "--blocks"),
    out: Path = typer.Option(Path("data/dense"), "--out", help="Folder for reference.safetensors."),
    metrics: Path = typer.Option(DENSE_METRICS, "--metrics"),
) -> None:
    params = read_params(params_file)
    loaded, site_map = load_base(params, model)
    ids, score_from, protocol = load_test_set(blocks, params.sparsify)
    detail = ids[: params.eval.detail_blocks]
    with timed(f"dense perplexity on {tuple(ids.shape)} ({protocol['protocol']})"):
        dense = evaluate_variant(
            loaded.model, site_map, ids, params.eval.batch_size, desc="dense", score_from=score_from
        )
    with timed(f"dense reference on {tuple(detail.shape)}"):
        reference = capture_dense(loaded.model, detail, params.eval.batch_size)
    meta = {
        "model": str(model),
        "model_fingerprint": loaded.fingerprint,
        "detail_blocks": len(detail),
        "hidden": "embeddings + each layer",
    }
    save_tensors(out / "reference.safetensors", reference.tensors(), meta)
    norms = reference.hidden.norm(dim=-1).mean(dim=(0, 2))  # [L+1]
    write_metrics(
        metrics,
        {
            **dense.summary(),
            "protocol": protocol,  # what the perplexity means (A / B / C, context, sparsified)
            "block_nll": dense.block_nll,  # per test block: paired errors of TEAL's damage
            "num_layers": site_map.num_layers,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "hidden_norm_by_layer": [round(float(v), 4) for v in norms],
        },
        loaded.device,
        loaded.dtype,
    )
