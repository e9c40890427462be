"""Evaluate chosen configs on text domains no stage saw: does SPON's gain transfer?

For ``interpret.transfer.configs`` at every sweep sparsity, on ``interpret.transfer.blocks``
blocks of each domain (code, technical, multilingual, stories): dense, TEAL-only, TEAL+SPON per
seed, damage recovered (mean ± seed sd, with the measurability rule) and achieved sparsity.
Writes metrics/transfer/summary.{csv,md} (the in-domain Wikipedia test rows from the summary
table beside them), plots/transfer/damage_by_domain.png and metrics/transfer.json.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from sponlab.io.data import BlockSpec, wants_bos
from sponlab.io.layout import cell_path, seed_path
from sponlab.io.provenance import write_metrics
from sponlab.io.tensorio import write_table, write_text
from sponlab.method.experiment import cell_spec
from sponlab.method.spon import load_biases
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    SPON_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    read_params,
    timed,
)
from sponlab.studies.interpret import params as ia
from sponlab.studies.interpret.params import interpret_params
from sponlab.studies.transfer.plots import plot_transfer
from sponlab.studies.transfer.transfer import (
    CellModels,
    domain_blocks,
    evaluate_cells,
    transfer_markdown,
    transfer_metrics,
    with_pareto,
)


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    thresholds: Path = THRESHOLDS_OPTION,
    spon: Path = SPON_OPTION,
    summary: Path = typer.Option(Path("metrics/tables/summary.csv"), "--summary"),
    tables: Path = typer.Option(Path("metrics/transfer"), "--tables"),
    figures: Path = typer.Option(Path("plots/transfer"), "--figures"),
    metrics: Path = typer.Option(Path("metrics/transfer.json"), "--metrics"),
) -> None:
    params = read_params(params_file)
    tp = interpret_params(params).transfer
    ia.check_configs(tp.configs, params.configs, params.swept, "interpret.transfer.configs")
    in_domain = pd.read_csv(summary)
    in_domain = in_domain[in_domain["config"].isin(tp.configs)].assign(domain="wikipedia (test)")
    loaded, site_map = load_base(params, model)
    cells = []
    for config in tp.configs:
        alloc = params.config(config)
        for s in params.sparsities:
            row = in_domain[(in_domain["config"] == config) & (in_domain["sparsity"] == s)]
            files = {k: seed_path(cell_path(spon, config, s), k) / "biases.safetensors"
                     for k in alloc.seeds}  # fmt: skip
            seeds = {
                k: load_biases(f, site_map, s, loaded.fingerprint)[0].to(loaded.device)
                for k, f in files.items()
            }
            spec = cell_spec(params, alloc, s, site_map, thresholds, loaded.fingerprint)
            rel = float(row["relative_parameters"].iloc[0]) if len(row) else float("nan")
            cells.append(CellModels(config, s, alloc.sparsify, spec, seeds, rel))
    bos = wants_bos(loaded.tokenizer, params.data.bos)
    spec = BlockSpec(params.data.block_len, tp.blocks, bos, params.data.seed)
    rows = []
    for domain in tp.domains:
        blocks = domain_blocks(domain, loaded.tokenizer, spec)
        with timed(f"transfer to {domain}: {tuple(blocks.shape)}, {len(cells)} cells"):
            found = evaluate_cells(
                loaded.model, site_map, blocks, tp.batch_size, cells,
                params.summary.min_damage, params.summary.noise_sigmas,
            )  # fmt: skip
        rows += [{"domain": domain, **r} for r in with_pareto(found)]
    frame = pd.concat([in_domain, pd.DataFrame(rows)], ignore_index=True)[list(rows[0])]
    write_table(tables / "summary.csv", frame.to_dict("records"))
    write_text(tables / "summary.md", transfer_markdown(frame))
    plot_transfer(frame, figures / "damage_by_domain.png")
    write_metrics(metrics, transfer_metrics(frame), loaded.device, loaded.dtype)
