"""Per-layer importance of MLP activations and SAE features: values or loss gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sponlab.io.batches import build_batches
from sponlab.io.data import load_corpus, wants_bos
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import replace_dir, write_json
from sponlab.model.capture import (
    activation_dim,
    feature_targets,
    resolve_layers,
    run_importance,
)
from sponlab.model.loading import load_model
from sponlab.model.sites import discover_sites
from sponlab.stages.common import MODEL_OPTION, PARAMS_OPTION, read_params, timed
from sponlab.studies.importance.files import (
    LOADING,
    importance_headline,
    params_dict,
    save_consolidated,
    write_timing,
    write_variants,
)
from sponlab.studies.importance.importance import ImportanceParams, finalize, importance_params
from sponlab.studies.importance.plots import plot_variants
from sponlab.studies.importance.sae_files import find_saes, load_saes


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    sae: Path = typer.Option(
        Path("models/sae"),
        "--sae",
        help="SAE directory (SAELens format): one SAE or one per sub-folder.",
    ),
    tables: Path = typer.Option(
        Path("metrics/importance"), "--tables", help="Folder for <features>/*.npz, .npy, metadata."
    ),
    figures: Path = typer.Option(
        Path("plots/importance"), "--figures", help="Folder for <features>/*.png."
    ),
    metrics: Path = typer.Option(Path("metrics/importance.json"), "--metrics"),
) -> None:
    params = read_params(params_file)
    settings: ImportanceParams = importance_params(params)
    lm = load_model(model, params.base.device, params.base.dtype, params.base.device_map)
    site_map = discover_sites(lm.model)
    targets_layers = what_to_analyse(settings, lm.model, site_map, sae)
    docs = load_corpus(params.data.source, params.data.seed)[settings.split]
    bos = wants_bos(lm.tokenizer, params.data.bos)
    batches = build_batches(
        docs,
        lm.tokenizer,
        settings.samples,
        settings.max_length,
        settings.batch_size,
        settings.min_tokens,
        bos,
    )
    context = {
        "model": str(model),
        "model_type": lm.model.config.model_type,
        "activation": settings.activation,
        "split": settings.split,
    }
    summary: dict[str, Any] = {
        "config": params_dict(settings),
        **context,
        "passes": {},
        "files": {},
    }
    summary["loading"] = LOADING
    every: dict[str, list] = {}  # features -> variants of all passes (consolidated file)
    with replace_dir(tables) as tmp, replace_dir(figures) as fig:
        for aggregate_by in settings.aggregate_by:
            targets = feature_targets(
                targets_layers.get("mlp", []), targets_layers.get("sae", {}), aggregate_by
            )
            result = run_importance(
                lm.model, site_map, batches, aggregate_by, targets, activation=settings.activation
            )
            summary["passes"][aggregate_by] = result.timing()
            for features in targets:
                variants = finalize(result, features, settings)
                every.setdefault(features, []).extend(variants)
                with timed(f"write {features} {aggregate_by} results and figures"):
                    written = write_variants(tmp / features, variants, result, settings, context)
                    plot_variants(
                        fig / features,
                        variants,
                        settings.layer_figures,
                        "SAE feature" if features == "sae" else "MLP dimension",
                    )
                summary["files"].update({f"{features}/{k}.npz": v for k, v in written.items()})
        for features, variants in every.items():
            save_consolidated(tmp / features, variants, {**context, "features": features})
        write_timing(tmp, summary["passes"])
        write_json(tmp / "metadata.json", summary)
    write_metrics(metrics, importance_headline(summary, targets_layers), lm.device, lm.dtype)


def what_to_analyse(settings: ImportanceParams, model, site_map, sae: Path) -> dict[str, Any]:
    """``mlp``: the selected layers; ``sae``: the SAEs of ``sae`` on those layers (checked
    against the site and its width)."""
    layers = resolve_layers(settings.layers, site_map.num_layers)
    out: dict[str, Any] = {}
    if "mlp" in settings.features:
        out["mlp"] = layers
    if "sae" in settings.features:
        chosen = [i for i in find_saes(sae) if i in layers]
        if not chosen:
            raise typer.BadParameter(f"no SAE in {sae} for the selected layers {settings.layers}")
        d_in = activation_dim(model, site_map, chosen[0], settings.activation)
        out["sae"] = load_saes(sae, settings.activation, d_in, chosen)
    return out
