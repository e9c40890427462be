"""The interpret stage's analyses of trained checkpoints, as library calls.

For the checkpoints of ``interpret.configs`` at one sparsity: per-site bias statistics and their
alignment with the sparsification error and the dense principal directions of the site's output
(one dense and one TEAL-only pass per sparsified set) and of the residual stream after its layer, the prompt-category effects (KL and hidden shift of TEAL-only
vs TEAL+SPON on categorised prompts) and the cross-config similarity. Each function returns rows
(tables) and a JSON-ready summary; writing them (metrics/ tables, plots/ figures) is the stage's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sponlab.method.sparsify import SparsifySpec
from sponlab.method.spon import SponBiases
from sponlab.model.sites import Site, SiteMap, sort_sites
from sponlab.studies.interpret import directions as dr
from sponlab.studies.interpret import params as ia
from sponlab.studies.interpret import shift as sh
from sponlab.studies.interpret.alignment import alignment_rows, collect_moments, site_components
from sponlab.studies.interpret.prompts import (
    effect_rows,
    kl_reduction,
    layer_rows,
    prompt_batches,
    prompt_effects,
    prompt_variants,
)
from sponlab.studies.interpret.residual import (
    post_norm_sites,
    residual_alignment_rows,
    residual_components,
    residual_samples,
)

ALIGN_KEYS = (
    "cos_global",
    "cos_local",
    "cos_dense_mean",
    "max_abs_cos_pc",
    "pc_energy",
    "pc_energy_chance",
    "error_explained",
    "chance_abs_cos",
    "random_abs_cos",
)

RESIDUAL_KEYS = (
    "max_abs_cos_resid_pc",
    "resid_pc_energy",
    "resid_pc_energy_chance",
    "chance_abs_cos",
    "random_abs_cos",
)

Rows = list[dict[str, Any]]


@dataclass
class BiasReport:
    """One checkpoint's per-site statistics, per-layer norms and alignment rows, with summaries."""

    stats: Rows
    norms: Rows
    alignment: Rows
    residual: Rows = field(default_factory=list)  # alignment with residual-stream PCs
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptReport:
    """Per category and variant: KL / final shift (``effects``), shift by layer (``layers``), and
    per config {category: shift rows} for the shift figure."""

    effects: Rows
    layers: Rows
    shift: dict[str, dict[str, Rows]]
    summary: dict[str, Any]
    kl_reduction: dict[str, dict[str, float]]


def alignment_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means of the alignment columns and the share of sites whose bias is aligned with the mean
    sparsification error by more than 3x the chance |cos|."""
    over = [abs(r["cos_global"]) > 3 * r["chance_abs_cos"] for r in rows]
    return {
        **ia.summarize(rows, ALIGN_KEYS),
        "frac_abs_cos_global_over_3x_chance": dr.nanmean(over),
    }


def bias_reports(
    model: nn.Module,
    site_map: SiteMap,
    ids: torch.Tensor,
    params: ia.InterpretParams,
    vectors: Mapping[str, Mapping[Site, torch.Tensor]],
    specs: Mapping[str, SparsifySpec],
    baseline: dr.RandomBaseline,
) -> dict[str, BiasReport]:
    """Bias statistics and alignment of every config in ``specs`` on token blocks ``ids`` [N, T]:
    one dense pass (with samples for PCA) and one TEAL-only pass per distinct sparsified set."""
    sites = sort_sites({site for n in specs for site in vectors[n]})
    batch = params.batch_size
    keep = params.pca_components > 0
    dense = collect_moments(model, site_map, sites, ids, batch, keep_samples=keep, desc="dense")
    teal = {}
    for spec in specs.values():
        if spec.sites not in teal:
            teal[spec.sites] = collect_moments(
                model, site_map, sites, ids, batch, spec, desc="teal"
            )
    components = site_components(dense, params.pca_components, params.pca_tokens, params.seed)
    dense.samples.clear()  # [tokens, D] per site: no longer needed
    resid_pcs = {}
    if params.pca_components > 0:
        layers = sorted({site.layer for site in sites})
        samples = residual_samples(model, ids, batch, layers, params.pca_tokens, params.seed)
        resid_pcs = residual_components(samples, params.pca_components)
    reports = {}
    for name, spec in specs.items():
        rms = {site: dense.rms(site) for site in vectors[name]}
        stats = ia.bias_stat_rows(vectors[name], rms, params.near_zero)
        norms = ia.layer_norm_rows(stats)
        rows = alignment_rows(
            vectors[name], dense, teal[spec.sites], model, site_map, components, baseline
        )
        post_norm = post_norm_sites(model, site_map, vectors[name])
        resid = residual_alignment_rows(vectors[name], resid_pcs, baseline, post_norm)
        summary = {
            "bias": ia.bias_summary(stats, norms, site_map.num_layers),
            "alignment": alignment_summary(rows),
        }
        if resid:
            summary["residual_alignment"] = ia.summarize(resid, RESIDUAL_KEYS)
        reports[name] = BiasReport(stats, norms, rows, resid, summary)
    return reports


def prompt_report(
    model: nn.Module,
    tokenizer: Any,
    site_map: SiteMap,
    params: ia.InterpretParams,
    specs: Mapping[str, SparsifySpec],
    biases: Mapping[str, SponBiases],
    sets: Mapping[str, Sequence[str]],
    bos: bool,
) -> PromptReport:
    """KL to dense and hidden shift of TEAL-only and TEAL+SPON per prompt category."""
    variants, baseline = prompt_variants(list(specs), specs, biases)
    effects: Rows = []
    layers: Rows = []
    shift: dict[str, dict[str, Rows]] = {n: {} for n in specs}
    for category, prompts in sets.items():
        batches = prompt_batches(
            prompts, tokenizer, params.prompt_batch, params.max_prompt_tokens, bos
        )
        totals = prompt_effects(model, site_map, batches, variants, desc=category)
        effects += effect_rows(category, len(prompts), totals)
        layers += layer_rows(category, totals)
        for n in specs:
            tl, sp = totals[baseline[n]], totals[f"SPON[{n}]"]
            shift[n][category] = sh.shift_rows(tl.shift_l2, sp.shift_l2, tl.shift_rel, sp.shift_rel)
    summary = {
        c: {r["variant"]: {"kl": r["kl"], "shift_rel_final": r["shift_rel_final"]} for r in rows}
        for c in sets
        for rows in [[r for r in effects if r["category"] == c]]
    }
    reduction = {n: kl_reduction(effects, n, baseline[n]) for n in specs}
    return PromptReport(effects, layers, shift, summary, reduction)
