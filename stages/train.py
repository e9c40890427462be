"""Train the SPON biases of one allocation config at one sparsity (KL to the dense model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from sponlab.experiment import bias_sites, sparsify_spec
from sponlab.sparsify import load_thresholds
from sponlab.spon import SponBiases, save_biases
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
from sponlab.tensorio import write_json, write_rows
from sponlab.train import TrainResult, train_spon


def main(
    config: str = typer.Option(..., "--config", help="Allocation config name from params.yaml."),
    sparsity: float = typer.Option(..., "--sparsity"),
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    data: Path = typer.Option(Path("data/blocks"), "--data", help="Folder with train/val blocks."),
    thresholds: Path = typer.Option(
        None, "--thresholds", help="Default: models/thresholds/s<s>.safetensors"
    ),
    out: Path = typer.Option(None, "--out", help="Default: models/spon/<config>/s<sparsity>"),
) -> None:
    cfg = read_params(params)
    alloc = cfg.config(config)
    cfg.check_sparsity(sparsity)
    thresholds = thresholds or threshold_path(Path("models/thresholds"), sparsity)
    out = out or cell_path(Path("models/spon"), config, sparsity)
    loaded, site_map = load_base(cfg, model)
    sites = bias_sites(alloc, site_map)
    biases = SponBiases.for_model(loaded.model, site_map, sites, alloc.parametrization)
    thr = load_thresholds(thresholds, site_map, sparsity, loaded.fingerprint)
    spec = sparsify_spec(cfg, alloc, sparsity, site_map, thr)
    settings = cfg.train if alloc.seed is None else replace(cfg.train, seed=alloc.seed)
    result = TrainResult()
    if sites:
        with timed(
            f"train {config} at s={sparsity}: {len(sites)} sites, {biases.num_parameters()} params"
        ):
            result = train_spon(
                loaded.model,
                site_map,
                spec,
                biases,
                load_blocks(data / "train.safetensors"),
                load_blocks(data / "val.safetensors"),
                settings,
            )
    meta = {
        "model": str(model),
        "model_fingerprint": loaded.fingerprint,
        "config": config,
        "sparsity": sparsity,
        "layers": alloc.layers.describe(),
        "modules": list(alloc.modules),
        "sparsify_modules": list(alloc.sparsify_modules),
        "method": cfg.sparsify.method,
        "seed": settings.seed,
    }
    write_rows(out / "loss.csv", result.steps, ["step", "epoch", "loss", "lr", "grad_norm"])
    write_rows(out / "val.csv", result.epochs, ["epoch", "step", "val_kl", "train_kl"])
    write_json(
        out / "train.json",
        {
            **meta,
            "sites": len(sites),
            "parameters": biases.num_parameters(),
            "epochs": result.epochs,
        },
    )
    save_biases(out / "biases.safetensors", biases, meta)
