"""Cross-config and cross-seed similarity of SPON biases, against a random-direction baseline.

For two checkpoints the biases of every site both train are compared by cosine (output space).
Pairs of configs that differ only in their seed are the control: how similar two trainings of the
*same* allocation are. Every mean comes with the chance level of ``|cos|`` for the dimension.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sponlab.allocations import AllocationConfig
from sponlab.model.sites import Site, sort_sites
from sponlab.studies.interpret.directions import RandomBaseline, cosine, expected_abs_cos, nanmean


def same_allocation(a: AllocationConfig, b: AllocationConfig) -> bool:
    """True when two checkpoints differ at most in name and seed (a cross-seed control pair)."""

    def key(c: AllocationConfig) -> tuple:
        return (c.layers, c.modules, c.sparsify_modules, c.parametrization, c.bias, c.init)

    return key(a) == key(b)


def similarity_rows(
    vecs_a: Mapping[Site, torch.Tensor],
    vecs_b: Mapping[Site, torch.Tensor],
    baseline: RandomBaseline,
) -> list[dict]:
    """Per shared site: cosine, norm ratio and the random-direction chance level of |cos|."""
    rows = []
    for site in sort_sites(set(vecs_a) & set(vecs_b)):
        a, b = vecs_a[site], vecs_b[site]
        rows.append(
            {
                "site": site.key,
                "layer": site.layer,
                "module": site.module,
                "cos": cosine(a, b),
                "norm_ratio": float(b.norm() / a.norm()) if float(a.norm()) > 0 else math.nan,
                "random_abs_cos": baseline(a.numel()),
                "chance_abs_cos": expected_abs_cos(a.numel()),
            }
        )
    return rows


def similarity_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean signed and absolute cosine over shared sites vs the mean chance level."""
    return {
        "shared_sites": len(rows),
        "mean_cos": nanmean([r["cos"] for r in rows]),
        "mean_abs_cos": nanmean([abs(r["cos"]) for r in rows]),
        "random_abs_cos": nanmean([r["random_abs_cos"] for r in rows]),
        "chance_abs_cos": nanmean([r["chance_abs_cos"] for r in rows]),
    }


@dataclass
class SimilarityTable:
    """All pairs of a list of checkpoints: per-site rows, per-pair summaries, the mean-cos matrix."""

    names: list[str]
    matrix: np.ndarray  # [C, C] mean cosine on shared sites (diagonal 1, nan: nothing shared)
    site_rows: list[dict]
    pair_rows: list[dict]
    per_layer: dict[str, list[dict]]  # site rows of seed pairs and of pairs with the first config

    def summary(self) -> dict[str, Any]:
        return {
            f"{r['a']}~{r['b']}": {k: v for k, v in r.items() if k not in ("a", "b")}
            for r in self.pair_rows
        }

    @property
    def chance(self) -> float:
        return nanmean([r["chance_abs_cos"] for r in self.pair_rows])


def similarity_table(
    names: Sequence[str],
    configs: Mapping[str, AllocationConfig],
    vectors: Mapping[str, Mapping[Site, torch.Tensor]],
    baseline: RandomBaseline,
    seeds: Mapping[str, int] | None = None,
) -> SimilarityTable:
    """Cosine similarity of biases on shared sites for every pair of ``names``; ``seeds`` (the
    training seed of each name) marks pairs trained with the same seed, whose shared batch
    order (and, before seeds drew their data, shared blocks) makes them agree more."""
    table = SimilarityTable(list(names), np.eye(len(names)), [], [], {})
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        rows = similarity_rows(vectors[a], vectors[b], baseline)
        kind = "seed" if same_allocation(configs[a], configs[b]) else "config"
        stats = {"a": a, "b": b, "kind": kind}
        if seeds is not None:
            stats |= {"seed_a": seeds[a], "seed_b": seeds[b], "same_seed": seeds[a] == seeds[b]}
        stats |= similarity_summary(rows)
        table.matrix[i, j] = table.matrix[j, i] = stats["mean_cos"]
        table.pair_rows.append(stats)
        table.site_rows += [{"a": a, "b": b, **r} for r in rows]
        if rows and (kind == "seed" or a == names[0]):
            table.per_layer[f"{a} vs {b}" + (" (seed)" if kind == "seed" else "")] = rows
    return table
