"""Learning curve: damage recovered and validation KL against distinct training tokens.

Each config of ``learning_curve.configs`` is retrained at ``learning_curve.sparsity`` on
``sizes`` blocks per seed (the first ``size`` of the seed's permutation of the training pool),
with the run's ``train`` settings; the default size is read from the default train cells. Every
variant is scored on the test blocks and on one transfer domain. A second sweep (README "Other
sweeps"): frozen in dvc.yaml, its committed output is what the report shows. Writes
metrics/learning_curve/{curve.csv,table.csv,curve.md}, plots/learning_curve/curve.png and
metrics/learning_curve.json.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import typer

from sponlab.io.data import BlockSpec, wants_bos
from sponlab.io.layout import BLOCKS, CURVE_VARIANTS, cell_path, curve_variant_path, seed_path
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import read_json, write_rows, write_table, write_text
from sponlab.method.experiment import bias_sites, cell_spec
from sponlab.method.spon import load_biases
from sponlab.method.teachers import validation_targets
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    load_blocks,
    read_params,
    timed,
)
from sponlab.studies.interpret.params import InterpretParams, interpret_params
from sponlab.studies.transfer.curve_plots import plot_curve
from sponlab.studies.transfer.learning_curve import (
    CURVE_FIELDS,
    LearningCurveParams,
    check_trained,
    curve_markdown,
    curve_metrics,
    curve_row,
    curve_table,
    load_variant,
    save_variant,
    train_variant,
    variant_recipe,
)
from sponlab.studies.transfer.transfer import CellModels, domain_blocks, evaluate_cells

log = logging.getLogger(__name__)


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    data: Path = typer.Option(BLOCKS, "--data", help="Train, val and test blocks."),
    thresholds: Path = THRESHOLDS_OPTION,
    spon: Path = typer.Option(Path("models/spon"), "--spon", help="Default train cells."),
    tables: Path = typer.Option(Path("metrics/learning_curve"), "--tables"),
    figures: Path = typer.Option(Path("plots/learning_curve"), "--figures"),
    metrics: Path = typer.Option(Path("metrics/learning_curve.json"), "--metrics"),
    work: Path = typer.Option(
        CURVE_VARIANTS, "--work", help="Retrained variants, kept so an interrupted run resumes."
    ),
) -> None:
    params = read_params(params_file)
    ip: InterpretParams = interpret_params(params)
    lc: LearningCurveParams = ip.learning_curve
    params.check_sparsity(lc.sparsity)
    check_trained(lc, params.configs)
    loaded, site_map = load_base(params, model)
    pool = load_blocks(data / "train.safetensors")
    if max(lc.sizes) > len(pool):
        raise typer.BadParameter(
            f"interpret.learning_curve.sizes goes to {max(lc.sizes)} blocks; the pool (data.train_blocks) "
            f"has {len(pool)}"
        )
    val = load_blocks(data / "val.safetensors")
    val_targets = validation_targets(loaded.model, val, params.train)
    rows, cells, labels = [], [], {}
    for config in lc.configs:
        alloc = params.config(config)
        spec = cell_spec(params, alloc, lc.sparsity, site_map, thresholds, loaded.fingerprint)
        sites = bias_sites(alloc, site_map)
        for size in lc.sizes:
            seeds = {}
            for seed in lc.seeds:
                settings = replace(params.train, seed=seed, blocks=size, loss=alloc.loss)
                reused = _default_cell(spon, config, lc.sparsity, seed, size, params, loaded)
                if reused is not None:
                    biases, info = reused
                else:
                    folder = curve_variant_path(work, config, lc.sparsity, size, seed)
                    recipe = variant_recipe(settings, spec, sites, alloc.parametrization, pool, val)
                    biases, info = _retrained(
                        folder, recipe, lc.sparsity, loaded, site_map, spec, sites, pool,
                        val_targets, settings, alloc.parametrization,
                    )  # fmt: skip
                seeds[seed] = biases
                rows.append(curve_row(config, size, pool.shape[1], seed, info, reused is not None))
            labels[f"{config} x{size}"] = (config, size)
            cells.append(CellModels(f"{config} x{size}", lc.sparsity, alloc.sparsify, spec, seeds,
                                    math.nan))  # fmt: skip
    _score(params, lc, loaded, site_map, data, cells, labels, rows)
    table, frame = curve_table(rows), pd.DataFrame(rows)
    default = params.train.blocks or len(pool)
    write_rows(tables / "curve.csv", rows, CURVE_FIELDS)
    write_table(tables / "table.csv", table.to_dict("records"))
    write_text(tables / "curve.md", curve_markdown(table, frame, default, lc.domain))
    plot_curve(table, default * pool.shape[1], lc.domain, figures / "curve.png")
    write_metrics(metrics, curve_metrics(table, frame, default), loaded.device, loaded.dtype)


def _retrained(folder, recipe, sparsity, loaded, site_map, spec, sites, pool, val_targets,
               settings, parametrization):  # fmt: skip
    """A variant trained from zeros, or the one an earlier (interrupted) run saved under the same
    recipe in ``folder``."""
    saved = load_variant(folder, recipe, sparsity, loaded.fingerprint)
    if saved is not None:
        log.info("reusing the variant saved in %s", folder)
        return saved
    with timed(f"training {folder}"):
        biases, info = train_variant(loaded.model, site_map, spec, sites, pool, val_targets,
                                     settings, parametrization)  # fmt: skip
    save_variant(folder, biases, info, recipe,
                 {"sparsity": sparsity, "model_fingerprint": loaded.fingerprint})  # fmt: skip
    return biases, info


def _default_cell(spon: Path, config, sparsity, seed, size, params, loaded):
    """The default train cell's biases and train.json when it trained this very variant."""
    folder = seed_path(cell_path(spon, config, sparsity), seed)
    if size != params.train.blocks or not (folder / "train.json").is_file():
        return None
    info = read_json(folder / "train.json", "train")
    if info.get("training_blocks") != size:
        return None
    biases, _ = load_biases(folder / "biases.safetensors", None, sparsity, loaded.fingerprint)
    return biases, info


def _score(params, lc, loaded, site_map, data: Path, cells, labels, rows) -> None:
    """Damage recovered of every variant on the test blocks and on the transfer domain."""
    block = BlockSpec(params.data.block_len, lc.domain_blocks, wants_bos(loaded.tokenizer, params.data.bos),
                      params.data.seed)  # fmt: skip
    sets = {
        "test": load_blocks(data / "test.safetensors"),
        "domain": domain_blocks(lc.domain, loaded.tokenizer, block),
    }
    for name, blocks in sets.items():
        with timed(f"score {len(cells)} variants on {name} {tuple(blocks.shape)}"):
            found = evaluate_cells(loaded.model, site_map, blocks, params.eval.batch_size, cells,
                                   params.summary.min_damage, params.summary.noise_sigmas)  # fmt: skip
        for cell in found:
            config, size = labels[cell["config"]]
            per_seed = [float(v) for v in cell["damage_recovered_seeds"].split(";") if v]
            measurable = bool(cell["damage_measurable"])
            for row in rows:
                if row["config"] == config and row["size"] == size:
                    k = list(lc.seeds).index(row["seed"])
                    row[f"{name}_recovered"] = per_seed[k] if measurable else None
                    row[f"{name}_block_se"] = cell["damage_recovered_block_se"]
