"""Which layers' biases matter: leave-one-layer-out perplexity and cumulative benefit curves.

On validation blocks (never the test blocks the headline perplexity comes from), with the cell's
TEAL sparsification active throughout: ``ppl_teal`` (no biases), ``ppl_full`` (all biases) and, per
layer ``l``, ``ppl_{-l}`` with that layer's biases removed. The importance of ``l`` is
``ppl_{-l} - ppl_full``; the benefit of all biases is ``ppl_teal - ppl_full``. Layers ranked by
importance then give two cumulative curves: *estimated* (cumulative share of the positive
importances, which assumes the effects add up) and *measured* (the benefit fraction
``(ppl_teal - ppl_topk) / (ppl_teal - ppl_full)`` with only the top-k layers' biases, k = 1..L-1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from sponlab.method.evaluate import evaluate_variant
from sponlab.method.ranked import layers_needed
from sponlab.method.sparsify import SparsifySpec
from sponlab.method.spon import SponBiases
from sponlab.model.sites import SiteMap
from sponlab.studies.interpret.alignment import collect_moments
from sponlab.studies.interpret.params import (
    PHASES,
    bias_stat_rows,
    layer_norm_rows,
    output_vectors,
    phase_of,
)


def bias_layers(biases: SponBiases) -> list[int]:
    """Sorted layers that hold at least one bias."""
    return sorted({s.layer for s in biases.sites})


def subset_biases(biases: SponBiases, layers: Sequence[int]) -> SponBiases:
    """A copy of ``biases`` restricted to ``layers`` (same parametrisation and values)."""
    wanted = set(layers)
    sites = [s for s in biases.sites if s.layer in wanted]
    dims = {s: biases.vector(s).numel() for s in sites}
    out = SponBiases(sites, dims, biases.parametrization)
    with torch.no_grad():
        for site in sites:
            out.vector(site).copy_(biases.vector(site))
    return out.to(biases.vector(biases.sites[0]).device) if biases.sites else out


@dataclass
class LayerImportance:
    """Perplexities of the leave-one-layer-out study (and of the top-k curve when measured)."""

    ppl_teal: float
    ppl_full: float
    loo: dict[int, float]  # layer -> ppl without that layer's biases
    topk: list[float] | None = None  # ppl with the top-k ranked layers, k = 1..L

    @property
    def benefit(self) -> float:
        return self.ppl_teal - self.ppl_full

    def importance(self) -> dict[int, float]:
        return {layer: ppl - self.ppl_full for layer, ppl in self.loo.items()}

    def ranked(self) -> list[int]:
        """Layers by decreasing importance (ties by layer index)."""
        imp = self.importance()
        return sorted(imp, key=lambda layer: (-imp[layer], layer))


def _ppl(model, site_map, blocks, batch_size, spec, biases, desc) -> float:
    return evaluate_variant(
        model, site_map, blocks, batch_size, spec=spec, biases=biases, desc=desc
    ).ppl


def leave_one_layer_out(
    model: nn.Module,
    site_map: SiteMap,
    blocks: torch.Tensor,
    batch_size: int,
    spec: SparsifySpec | None,
    biases: SponBiases,
    measure_topk: bool = True,
) -> LayerImportance:
    """Perplexity on ``blocks`` [N, T] without biases, with all, and with each layer left out.

    With ``measure_topk`` also with only the top-k layers (ranked by importance) for k < L.
    """
    layers = bias_layers(biases)
    run = (model, site_map, blocks, batch_size, spec)
    result = LayerImportance(
        ppl_teal=_ppl(*run, None, "teal"), ppl_full=_ppl(*run, biases, "all biases"), loo={}
    )
    for layer in tqdm(layers, desc="leave one layer out", leave=False):
        rest = [i for i in layers if i != layer]
        result.loo[layer] = _ppl(*run, subset_biases(biases, rest), f"without {layer}")
    if measure_topk:
        ranked = result.ranked()
        result.topk = [
            _ppl(*run, subset_biases(biases, ranked[:k]), f"top {k}")
            for k in tqdm(range(1, len(ranked)), desc="top-k layers", leave=False)
        ] + [result.ppl_full]
    return result


def estimated_fractions(importances: Sequence[float]) -> list[float]:
    """Cumulative share of the positive importances, largest first (additivity assumed)."""
    values = sorted((max(v, 0.0) for v in importances), reverse=True)
    total = sum(values)
    if total <= 0:
        return [math.nan] * len(values)
    return list(np.cumsum(values) / total)


def measured_fractions(ppl_teal: float, ppl_full: float, topk: Sequence[float]) -> list[float]:
    """Benefit fraction ``(ppl_teal - ppl_k) / (ppl_teal - ppl_full)`` for each k."""
    benefit = ppl_teal - ppl_full
    if abs(benefit) < 1e-12:
        return [math.nan] * len(topk)
    return [(ppl_teal - p) / benefit for p in topk]


def phase_shares(values: Mapping[int, float], num_layers: int) -> dict[str, float]:
    """Share of the positive values that falls in the early / middle / late third of the stack."""
    total = sum(max(v, 0.0) for v in values.values())
    shares = dict.fromkeys(PHASES, 0.0)
    for layer, value in values.items():
        shares[phase_of(layer, num_layers)] += max(value, 0.0)
    return {k: (v / total if total > 0 else math.nan) for k, v in shares.items()}


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman correlation (nan when undefined, e.g. a constant input)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def importance_rows(
    result: LayerImportance,
    num_layers: int,
    bias_norms: Mapping[int, Mapping[str, float]],
    drift: Mapping[int, float],
) -> list[dict]:
    """One row per layer: LOO perplexity, importance, share, rank, bias norm, drift reduction."""
    importance = result.importance()
    total = sum(max(v, 0.0) for v in importance.values())
    ranked = result.ranked()
    return [
        {
            "layer": layer,
            "phase": phase_of(layer, num_layers),
            "ppl_without": result.loo[layer],
            "importance": value,
            "share": max(value, 0.0) / total if total > 0 else math.nan,
            "rank": ranked.index(layer) + 1,
            "bias_l2": bias_norms[layer]["l2"],
            "bias_l2_rel": bias_norms[layer]["l2_rel"],
            "drift_reduction": drift.get(layer, math.nan),
        }
        for layer, value in sorted(importance.items())
    ]


def cumulative_curves(result: LayerImportance) -> dict[str, list[float]]:
    """``estimated`` (LOO shares) and, when measured, ``measured`` benefit fractions per k."""
    curves = {"estimated": estimated_fractions(list(result.importance().values()))}
    if result.topk is not None:
        curves["measured"] = measured_fractions(result.ppl_teal, result.ppl_full, result.topk)
    return curves


def importance_summary(
    result: LayerImportance,
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[float]],
    targets: Sequence[float],
    num_layers: int,
) -> dict[str, Any]:
    """Headline numbers: benefit, additivity, layers needed per target, phase shares, rank corr."""
    imp = [r["importance"] for r in rows]
    benefit = result.benefit
    return {
        "ppl_teal": result.ppl_teal,
        "ppl_full": result.ppl_full,
        "benefit": benefit,
        "loo_sum_over_benefit": sum(imp) / benefit if abs(benefit) > 1e-12 else math.nan,
        "top_layers": result.ranked()[:5],
        "layers_needed": {
            name: {f"{t:g}": layers_needed(c, t) for t in targets} for name, c in curves.items()
        },
        "phase_share": {
            "importance": phase_shares(result.importance(), num_layers),
            "bias_l2_sq": phase_shares({r["layer"]: r["bias_l2"] ** 2 for r in rows}, num_layers),
        },
        "spearman_importance_vs_bias_l2_rel": rank_correlation(
            imp, [r["bias_l2_rel"] for r in rows]
        ),
        "spearman_importance_vs_drift_reduction": rank_correlation(
            imp, [r["drift_reduction"] for r in rows]
        ),
    }


def bias_norms_by_layer(
    model: nn.Module,
    site_map: SiteMap,
    biases: SponBiases,
    ids: torch.Tensor,
    batch_size: int,
    near_zero: float,
) -> dict[int, dict[str, Any]]:
    """Per layer: bias norm, relative to the dense output scale on the token blocks ``ids`` [N, T]."""
    vectors = output_vectors(biases, model, site_map)
    dense = collect_moments(model, site_map, list(vectors), ids, batch_size)
    stats = bias_stat_rows(vectors, {x: dense.rms(x) for x in vectors}, near_zero)
    return {r["layer"]: r for r in layer_norm_rows(stats)}


def curve_rows(result: LayerImportance, curves: Mapping[str, Sequence[float]]) -> list[dict]:
    """One row per k: the layer added k-th (by importance) and each cumulative curve at k."""
    return [
        {"k": k + 1, "layer_added": layer, **{n: c[k] for n, c in curves.items()}}
        | ({"ppl_topk": result.topk[k]} if result.topk else {})
        for k, layer in enumerate(result.ranked())
    ]
