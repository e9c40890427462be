"""Fit the SPON biases of one allocation config at one sparsity, for each of its seeds.

``bias: trained`` distils each seed's biases from the dense model (KL), starting from zeros or the
closed form (``init``) and keeping the best validation epoch; ``closed_form`` computes
b = W E[x - S(x)] on the calibration blocks without training. One folder per seed. A config with
``layers: {ranked: ...}`` takes its layers from the layer-importance stage's ranking
(``--ranking``), so DVC trains it after that analysis.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from sponlab.io.layout import SPON, cell_path, seed_path, threshold_path
from sponlab.io.tensorio import load_tensors, write_json, write_rows
from sponlab.method.closed_form import closed_form_biases
from sponlab.method.experiment import bias_sites, cell_spec
from sponlab.method.ranked import ranked_layers, read_ranking
from sponlab.method.spon import SponBiases, save_biases
from sponlab.method.teachers import teachers_for, validation_targets
from sponlab.method.train import TrainResult, train_spon
from sponlab.model.sites import LayerSelection
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    load_blocks,
    read_params,
    timed,
)


def main(
    config: str = typer.Option(..., "--config", help="Allocation config name from params.yaml."),
    sparsity: float = typer.Option(..., "--sparsity"),
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    data: Path = typer.Option(
        Path("data/blocks"), "--data", help="Folder with calib/train/val blocks."
    ),
    thresholds: Path = THRESHOLDS_OPTION,
    out: Path = typer.Option(None, "--out", help="Default: models/spon/<config>/s<sparsity>"),
    ranking: Path = typer.Option(
        None, "--ranking", help="Layer-importance tables (layers.csv, curves.csv): ranked configs."
    ),
) -> None:
    params = read_params(params_file)
    alloc = params.config(config)
    params.check_sparsity(sparsity)
    out = out or cell_path(SPON, config, sparsity)
    described = alloc.layers.describe()
    if alloc.ranked:
        if ranking is None:
            raise typer.BadParameter(f"{config} takes its layers from a ranking: pass --ranking")
        layers = ranked_layers(alloc.layers, read_ranking(ranking))
        alloc = replace(alloc, layers=LayerSelection(kind="list", layers=tuple(layers)))
        described = f"{described}: {alloc.layers.describe()}"
    meta = {
        "model": str(model),
        "model_fingerprint": None,
        "config": config,
        "sparsity": sparsity,
        "layers": described,
        "modules": list(alloc.modules),
        "sparsify": alloc.sparsify,
        "sparsify_modules": list(alloc.sparsify_modules),
        "method": params.sparsify.method,
        "bias": alloc.bias,
        "init": alloc.init,
        "loss": alloc.loss if alloc.bias == "trained" else None,
    }
    if not alloc.has_biases:  # BASELINE-TEAL: no biases to fit, no model to load
        meta["model_fingerprint"] = made_for(threshold_path(thresholds, sparsity, alloc.sparsify))
        for seed in alloc.seeds:
            empty = SponBiases([], {}, alloc.parametrization)
            write_seed(seed_path(out, seed), {**meta, "seed": seed}, empty, TrainResult(), 0)
        return
    train_seeds(params, alloc, sparsity, model, data, thresholds, out, meta)


def made_for(thresholds: Path) -> str:
    """The model fingerprint the calibrate stage recorded in a thresholds file."""
    return load_tensors(thresholds, producer="calibrate")[1]["model_fingerprint"]


def train_seeds(params, alloc, sparsity, model, data, thresholds, out, meta) -> None:
    """Load the model, fit (or compute) the biases of every seed and write one folder each."""
    loaded, site_map = load_base(params, model)
    meta["model_fingerprint"] = loaded.fingerprint
    sites = bias_sites(alloc, site_map)
    spec = cell_spec(params, alloc, sparsity, site_map, thresholds, loaded.fingerprint)
    start = initial_biases(params, alloc, loaded.model, site_map, spec, sites, data, sparsity)
    val = None  # the validation blocks' dense targets, shared by the seeds
    if sites and alloc.bias == "trained":
        pool = load_blocks(data / "train.safetensors")
        val = validation_targets(loaded.model, load_blocks(data / "val.safetensors"), params.train)
    for seed in alloc.seeds:
        biases = SponBiases.for_model(loaded.model, site_map, sites, alloc.parametrization)
        biases.load_state(start.state())
        result = TrainResult()
        if val is not None:
            settings = replace(params.train, seed=seed, loss=alloc.loss)
            # each seed draws its own blocks: host memory holds one seed's training targets
            teachers = teachers_for(loaded.model, pool, settings.blocks or len(pool), val, settings)
            what = f"train {alloc.name} at s={sparsity}, seed {seed}: {len(sites)} sites"
            with timed(f"{what}, {biases.num_parameters()} params"):
                result = train_spon(
                    loaded.model, site_map, spec, biases, pool, val.blocks, settings, teachers
                )
        write_seed(seed_path(out, seed), {**meta, "seed": seed}, biases, result, len(sites))


def initial_biases(params, alloc, model, site_map, spec, sites, data: Path, sparsity: float):
    """Zeros, or the closed form on the calibration blocks (``bias`` or ``init: closed_form``)."""
    if sites and (alloc.bias == "closed_form" or alloc.init == "closed_form"):
        with timed(f"closed-form biases of {alloc.name} at s={sparsity} ({len(sites)} sites)"):
            return closed_form_biases(
                model,
                site_map,
                spec,
                sites,
                load_blocks(data / "calib.safetensors"),
                params.eval.batch_size,
                alloc.parametrization,
            )
    return SponBiases.for_model(model, site_map, sites, alloc.parametrization)


def write_seed(
    folder: Path, meta: dict, biases: SponBiases, result: TrainResult, sites: int
) -> None:
    """One seed's biases, loss curve, validation curve and train.json."""
    write_rows(folder / "loss.csv", result.steps, ["step", "epoch", "loss", "lr", "grad_norm"])
    write_rows(
        folder / "val.csv",
        result.epochs,
        ["epoch", "step", "val_kl", "val_kl_se", "train_kl", "kept"],
    )
    write_json(
        folder / "train.json",
        {
            **meta,
            "sites": sites,
            "parameters": biases.num_parameters(),
            "best_epoch": result.best_epoch,
            "epochs": result.epochs,
            "training_blocks": len(result.blocks),
            "training_tokens": result.tokens,
            "steps": len(result.steps),
            "autocast": result.autocast,
            "blocks": result.blocks,
            "diagnostics": result.diagnostics,
        },
    )
    save_biases(folder / "biases.safetensors", biases, meta)
