"""Does more, or other, training text make SPON's gain transfer? (training size x domain mix)

``interpret.transfer.training.config`` is retrained at ``interpret.sparsity`` from zeros on each
training set: ``sizes`` blocks drawn from each mix (``train``: the pipeline's own training text;
a domain: the training half of its documents), once per seed, keeping the epoch of lowest KL on
the usual validation blocks. Each variant is evaluated like the transfer stage on the evaluation
half of every domain and on the in-domain Wikipedia test blocks. Writes
metrics/transfer_training/{training.csv,training.md}, plots/transfer_training/training.png and
metrics/transfer_training.json.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import typer

from sponlab.config import ConfigError
from sponlab.io.data import BlockSpec, load_corpus, wants_bos
from sponlab.io.layout import BLOCKS
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import write_table, write_text
from sponlab.method.experiment import bias_sites, cell_spec
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
from sponlab.studies.transfer.plots import plot_training
from sponlab.studies.transfer.transfer import (
    CellModels,
    domain_blocks,
    domain_documents,
    evaluate_cells,
    mixed_blocks,
    train_variants,
    training_markdown,
    training_metrics,
)

IN_DOMAIN = "wikipedia (test)"


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    data: Path = typer.Option(BLOCKS, "--data", help="Folder with val/test blocks."),
    thresholds: Path = THRESHOLDS_OPTION,
    tables: Path = typer.Option(Path("metrics/transfer_training"), "--tables"),
    figures: Path = typer.Option(Path("plots/transfer_training"), "--figures"),
    metrics: Path = typer.Option(Path("metrics/transfer_training.json"), "--metrics"),
) -> None:
    params = read_params(params_file)
    ip: InterpretParams = interpret_params(params)
    tt, sparsity = ip.transfer.training, ip.sparsity
    alloc = params.config(tt.config)
    if alloc.bias != "trained" or alloc.init != "zeros" or alloc.ranked or not alloc.has_biases:
        raise ConfigError(
            "params.yaml: interpret.transfer.training.config must be a trained config with "
            f"biases, fixed layers and init zeros; {tt.config!r} is not"
        )
    params.check_sparsity(sparsity)
    loaded, site_map = load_base(params, model)
    spec = cell_spec(params, alloc, sparsity, site_map, thresholds, loaded.fingerprint)
    block = BlockSpec(
        params.data.block_len, 0, wants_bos(loaded.tokenizer, params.data.bos), params.data.seed
    )
    sets = training_sets(params, tt, loaded.tokenizer, block)
    with timed(f"train {tt.config} at s={sparsity} on {len(sets)} sets x {len(tt.seeds)} seeds"):
        trained = train_variants(
            loaded.model, site_map, spec, bias_sites(alloc, site_map), sets,
            load_blocks(data / "val.safetensors"), replace(params.train, loss=alloc.loss, blocks=0),
            tt.seeds, alloc.parametrization,
        )  # fmt: skip
    labels = {f"{mix} x{size}": (mix, size) for mix, size in trained}
    cells = [CellModels(label, sparsity, alloc.sparsify, spec, trained[key], math.nan)
             for label, key in labels.items()]  # fmt: skip
    evals = {IN_DOMAIN: load_blocks(data / "test.safetensors")[: ip.transfer.blocks]}
    spec_eval = replace(block, count=ip.transfer.blocks)
    evals |= {d: domain_blocks(d, loaded.tokenizer, spec_eval) for d in ip.transfer.domains}
    rows = []
    for domain, blocks in evals.items():
        with timed(f"{domain}: {tuple(blocks.shape)}, {len(cells)} training sets"):
            found = evaluate_cells(
                loaded.model, site_map, blocks, ip.transfer.batch_size, cells,
                params.summary.min_damage, params.summary.noise_sigmas,
            )  # fmt: skip
        for row in found:
            mix, size = labels[row["config"]]
            rows.append({"domain": domain, "mix": mix, "size": size, **row})
    frame = pd.DataFrame(rows).drop(columns=["relative_parameters", "pareto"])
    write_table(tables / "training.csv", frame.to_dict("records"))
    write_text(tables / "training.md", training_markdown(frame))
    plot_training(frame, figures / "training.png")
    write_metrics(metrics, training_metrics(frame), loaded.device, loaded.dtype)


def training_sets(params, tt, tokenizer, block: BlockSpec) -> dict[tuple[str, int], torch.Tensor]:
    """(mix, size) -> training blocks: the pipeline's training text and domain training halves."""
    used = {source for mix in tt.mixes.values() for source in mix}
    sources = {d: domain_documents(d, "train") for d in used - {"train"}}
    if "train" in used:
        sources["train"] = load_corpus(params.data.source, params.data.seed)["train"]
    return {
        (mix, size): mixed_blocks(weights, size, sources, tokenizer, block)
        for mix, weights in tt.mixes.items()
        for size in tt.sizes
    }
