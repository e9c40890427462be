"""Interpret trained SPON biases: statistics, alignment, hidden shift, prompt categories, similarity.

Writes metrics/interpret/{bias,alignment,shift,prompts,similarity}/ (CSV tables),
plots/interpret/{...}/ (figures, the same tree) and metrics/interpret.json.
The checkpoints are ``interpret.configs`` x ``interpret.sparsity``; similarity compares every pair of
``interpret.similarity``, every seed of each (two seeds of one config are the cross-seed control);
the other analyses use each config's first seed.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from sponlab.io.data import wants_bos
from sponlab.io.layout import EVALS, block_path, cell_path
from sponlab.io.provenance import write_metrics
from sponlab.method.experiment import cell_spec
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    SPON_OPTION,
    THRESHOLDS_OPTION,
    load_base,
    load_blocks,
    read_params,
    timed,
)
from sponlab.studies.interpret import params as ia
from sponlab.studies.interpret import shift as sh
from sponlab.studies.interpret import study
from sponlab.studies.interpret.directions import RandomBaseline
from sponlab.studies.interpret.files import (
    interpret_summary,
    load_checkpoints,
    write_bias_reports,
    write_prompts,
    write_shift,
    write_similarity,
)
from sponlab.studies.interpret.params import interpret_params
from sponlab.studies.interpret.prompts import load_prompt_sets, select_prompts


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(block_path("test"), "--blocks"),
    thresholds: Path = THRESHOLDS_OPTION,
    spon: Path = SPON_OPTION,
    evals: Path = typer.Option(EVALS, "--evals", help="Root of CONFIG/s<s>/shift.csv."),
    tables: Path = typer.Option(Path("metrics/interpret"), "--tables", help="CSV tables root."),
    figures: Path = typer.Option(Path("plots/interpret"), "--figures", help="Figures root."),
    metrics: Path = typer.Option(Path("metrics/interpret.json"), "--metrics"),
) -> None:
    begin = time.perf_counter()
    params = read_params(params_file)
    ip: ia.InterpretParams = interpret_params(params)
    s = params.check_sparsity(ip.sparsity)
    ia.check_configs(ip.configs, params.configs, params.swept, "interpret.configs")
    ia.check_configs(ip.similarity, params.configs, params.swept, "interpret.similarity")
    sets = select_prompts(load_prompt_sets(ip.prompts), ip.categories, ip.prompts_per_category)
    loaded, site_map = load_base(params, model)
    checkpoints = ia.seed_checkpoints(
        list(dict.fromkeys(ip.configs + ip.similarity)), params.configs
    )
    biases = load_checkpoints(checkpoints, spon, s, loaded, site_map)
    vectors = {n: ia.output_vectors(b, loaded.model, site_map) for n, b in biases.items()}
    specs = {
        n: cell_spec(params, params.config(n), s, site_map, thresholds, loaded.fingerprint)
        for n in ip.configs
    }
    baseline = RandomBaseline(ip.random_vectors, ip.seed)
    ids = ia.first_blocks(load_blocks(blocks), ip.blocks, "interpret.blocks")
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    with timed(f"bias statistics and alignment on {tuple(ids.shape)}"):
        reports = study.bias_reports(loaded.model, site_map, ids, ip, vectors, specs, baseline)
    write_bias_reports(tables, figures, s, reports, vectors, ip)
    seconds["bias_and_alignment"] = time.perf_counter() - start

    start = time.perf_counter()
    bos = wants_bos(loaded.tokenizer, params.data.bos)
    with timed(f"prompt categories: {len(sets)} x {ip.prompts_per_category} prompts"):
        prompts = study.prompt_report(
            loaded.model, loaded.tokenizer, site_map, ip, specs, biases, sets, bos
        )
    write_prompts(tables / "prompts", figures / "prompts", prompts)
    seconds["prompts"] = time.perf_counter() - start
    shift = {n: sh.read_shift(cell_path(evals, n, s) / "shift.csv") for n in ip.configs}
    write_shift(tables / "shift", figures / "shift", s, shift, prompts.shift)

    table = write_similarity(
        tables / "similarity",
        figures / "similarity",
        checkpoints,
        vectors,
        baseline,
        params.configs,
        ip,
    )
    summary = interpret_summary(s, ip.configs, reports, prompts, shift, table)
    summary["seconds"] = {**seconds, "total": time.perf_counter() - begin}
    write_metrics(metrics, ia.clean(summary), loaded.device, loaded.dtype)
