"""One train cell (config x sparsity): the biases of each of its seeds, and their files.

The train stage resolves the config and loads the model and blocks; this module starts every seed
from the same initial biases (zeros or the closed form), trains it when the config is trained
(sharing the validation targets across seeds) and writes one folder per seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sponlab.allocations import AllocationConfig
from sponlab.config import Params
from sponlab.io.tensorio import write_json, write_rows
from sponlab.method.closed_form import closed_form_biases
from sponlab.method.sparsify import SparsifySpec
from sponlab.method.spon import SponBiases, save_biases
from sponlab.method.teachers import Rows, teachers_for, validation_targets
from sponlab.method.train import TrainResult, train_spon
from sponlab.model.sites import Site, SiteMap

log = logging.getLogger(__name__)

LOSS_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm"]
VAL_FIELDS = ["epoch", "step", "val_kl", "val_kl_se", "train_kl", "kept"]


def needs_closed_form(alloc: AllocationConfig, sites: Sequence[Site]) -> bool:
    """Whether the cell's biases start from (or are) the closed form on the calibration blocks."""
    return bool(sites) and (alloc.bias == "closed_form" or alloc.init == "closed_form")


def initial_biases(
    params: Params,
    alloc: AllocationConfig,
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec,
    sites: Sequence[Site],
    calib: torch.Tensor | None,
) -> SponBiases:
    """Zeros, or the closed form on the calibration blocks ``calib`` [N, T] when the config asks
    for it (``bias`` or ``init: closed_form``)."""
    if not needs_closed_form(alloc, sites):
        return SponBiases.for_model(model, site_map, sites, alloc.parametrization)
    if calib is None:
        raise ValueError(f"{alloc.name} needs the calibration blocks for its closed form")
    start = time.perf_counter()
    biases = closed_form_biases(model, site_map, spec, sites, calib, params.eval.batch_size,
                                alloc.parametrization)  # fmt: skip
    log.info("closed-form biases of %s (%d sites) in %.1fs", alloc.name, len(sites),
             time.perf_counter() - start)  # fmt: skip
    return biases


def fit_seeds(
    params: Params,
    alloc: AllocationConfig,
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec,
    start: SponBiases,
    blocks: tuple[torch.Tensor, torch.Tensor] | None,
    hidden: tuple[Rows, Rows] | None = None,
) -> Iterator[tuple[int, SponBiases, TrainResult]]:
    """Each seed's biases from ``start``: trained on ``blocks`` = (training pool [P, T],
    validation blocks [V, T]) when the config is trained, else ``start`` itself. The validation
    targets are shared; host memory holds one seed's training targets at a time. With ``hidden``
    (the teacher stage's stored states of the pool and the validation blocks) only the LM head
    runs for the targets."""
    val = None
    pool_hidden, val_hidden = hidden or (None, None)
    if blocks is not None and start.sites and alloc.bias == "trained":
        pool = blocks[0]
        val = validation_targets(model, blocks[1], params.train, val_hidden)
    for seed in alloc.seeds:
        biases = SponBiases.for_model(model, site_map, start.sites, alloc.parametrization)
        biases.load_state(start.state())
        result = TrainResult()
        if val is not None:
            settings = replace(params.train, seed=seed, loss=alloc.loss)
            trained = settings.blocks or len(pool)
            teachers = teachers_for(model, pool, trained, val, settings, pool_hidden)
            log.info("train %s, seed %d: %d sites, %d params", alloc.name, seed,
                     len(start.sites), biases.num_parameters())  # fmt: skip
            result = train_spon(model, site_map, spec, biases, pool, val.blocks, settings, teachers)
            log.info("seed %d trained in %.1fs", seed, result.seconds)
        yield seed, biases, result


def write_seed(
    folder: Path, meta: dict[str, Any], biases: SponBiases, result: TrainResult, sites: int
) -> None:
    """One seed's biases, loss curve, validation curve and train.json."""
    write_rows(folder / "loss.csv", result.steps, LOSS_FIELDS)
    write_rows(folder / "val.csv", result.epochs, VAL_FIELDS)
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
