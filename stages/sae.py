"""Train small sparse autoencoders on the base model's MLP activations (for the importance stage)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from sponlab.io.batches import build_batches
from sponlab.io.data import load_corpus, wants_bos
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import replace_dir, write_json
from sponlab.model.capture import collect_activations, resolve_layers
from sponlab.model.loading import load_model
from sponlab.model.sites import discover_sites
from sponlab.stages.common import MODEL_OPTION, PARAMS_OPTION, read_params, timed
from sponlab.studies.importance.plots import plot_sae_training
from sponlab.studies.importance.sae import sae_params, train_sae
from sponlab.studies.importance.sae_files import save_sae


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    out: Path = typer.Option(
        Path("models/sae"),
        "--out",
        help="Folder of SAEs in SAELens format: layer_<i>/{cfg.json, sae_weights.safetensors}.",
    ),
    figures: Path = typer.Option(
        Path("plots/sae"), "--figures", help="Folder for the training curves (JSON data, PNG)."
    ),
    metrics: Path = typer.Option(Path("metrics/sae.json"), "--metrics"),
) -> None:
    params = read_params(params_file)
    settings = sae_params(params)
    lm = load_model(model, params.base.device, params.base.dtype, params.base.device_map)
    site_map = discover_sites(lm.model)
    layers = resolve_layers(settings.layers, site_map.num_layers)
    docs = load_corpus(params.data.source, params.data.seed)[settings.split]
    batches = build_batches(
        docs,
        lm.tokenizer,
        settings.samples,
        settings.max_length,
        settings.batch_size,
        settings.min_tokens,
        wants_bos(lm.tokenizer, params.data.bos),
    )
    with timed(f"collect {settings.activation} activations of layers {layers} ({settings.split})"):
        acts = collect_activations(lm.model, site_map, layers, batches, settings.activation)
    results = {}
    with replace_dir(out) as tmp:
        for layer in layers:
            with timed(f"train SAE layer {layer} ({acts[layer].shape[0]} tokens)"):
                result = train_sae(
                    acts[layer],
                    settings.expansion,
                    settings.l1,
                    settings.lr,
                    settings.steps,
                    settings.token_batch,
                    settings.holdout,
                    settings.seed + layer,
                    device=site_map.layer_device(lm.model, layer),
                )
            extra = {k: result.metrics[k] for k in ("fve", "l0", "mse", "dead_fraction")}
            extra |= {"model_name": str(model), "l1": settings.l1, "steps": settings.steps}
            save_sae(tmp / f"layer_{layer}", result.sae, settings.activation, layer, extra)
            results[layer] = result
    with replace_dir(figures) as tmp:
        write_json(tmp / "history.json", {str(i): r.history for i, r in results.items()})
        plot_sae_training({i: r.history for i, r in results.items()}, tmp / "training.png")
    write_metrics(
        metrics,
        {
            "layers": {str(i): r.metrics for i, r in results.items()},
            "mean_fve": sum(r.metrics["fve"] for r in results.values()) / len(results),
            "mean_l0": sum(r.metrics["l0"] for r in results.values()) / len(results),
            "config": asdict(settings),
        },
        lm.device,
        lm.dtype,
    )
