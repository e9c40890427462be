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

from sponlab.io.layout import BLOCKS, SPON, TEACHER, cell_path, seed_path, threshold_path
from sponlab.io.tensorio import load_tensors
from sponlab.method.cell import fit_seeds, initial_biases, needs_closed_form, write_seed
from sponlab.method.experiment import bias_sites, cell_spec
from sponlab.method.ranked import ranked_layers, read_ranking
from sponlab.method.spon import SponBiases
from sponlab.method.teachers import read_hidden
from sponlab.method.train import TrainResult
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
    data: Path = typer.Option(BLOCKS, "--data", help="Folder with calib/train/val blocks."),
    thresholds: Path = THRESHOLDS_OPTION,
    out: Path = typer.Option(None, "--out", help="Default: models/spon/<config>/s<sparsity>"),
    ranking: Path = typer.Option(
        None, "--ranking", help="Layer-importance tables (layers.csv, curves.csv): ranked configs."
    ),
    teacher: Path = typer.Option(
        TEACHER, "--teacher", help="The teacher stage's hidden states of the train/val blocks."
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
    train_seeds(params, alloc, sparsity, (model, data, thresholds, teacher), out, meta)


def made_for(thresholds: Path) -> str:
    """The model fingerprint the calibrate stage recorded in a thresholds file."""
    return load_tensors(thresholds, producer="calibrate")[1]["model_fingerprint"]


def train_seeds(params, alloc, sparsity, inputs, out, meta) -> None:
    """Load the model and blocks, fit (or compute) the biases of every seed, one folder each;
    ``inputs``: the model, blocks, thresholds and teacher paths."""
    model, data, thresholds, teacher = inputs
    loaded, site_map = load_base(params, model)
    meta["model_fingerprint"] = loaded.fingerprint
    sites = bias_sites(alloc, site_map)
    spec = cell_spec(params, alloc, sparsity, site_map, thresholds, loaded.fingerprint)
    calib = load_blocks(data / "calib.safetensors") if needs_closed_form(alloc, sites) else None
    start = initial_biases(params, alloc, loaded.model, site_map, spec, sites, calib)
    blocks, hidden = None, None
    if sites and alloc.bias == "trained":
        blocks = (load_blocks(data / "train.safetensors"), load_blocks(data / "val.safetensors"))
        hidden = read_hidden(teacher, *blocks, loaded.fingerprint)
    with timed(f"{alloc.name} at s={sparsity}: {len(alloc.seeds)} seed(s), {len(sites)} sites"):
        for seed, biases, result in fit_seeds(
            params, alloc, loaded.model, site_map, spec, start, blocks, hidden
        ):
            write_seed(seed_path(out, seed), {**meta, "seed": seed}, biases, result, len(sites))
