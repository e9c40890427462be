"""Layer analysis as the layer-analysis notebook defines it, beside the leave-one-layer-out study.

The notebook ranks layers by *drift reduction*: for the hidden state after layer ``l``,
``importance_l = ||h_teal - h_dense|| - ||h_spon - h_dense||`` (mean L2 shift per token, from the
evaluate stage's ``shift.csv``), normalised to percent of the total. That number is cumulative
(the state after layer ``l`` carries every earlier bias), so it measures where drift is removed,
not which layer's bias removes it; the leave-one-layer-out importance answers the latter, and the
rank correlation of the two says how far the cheap ranking can stand in for the expensive one.

Also as the notebook: cumulative importance with the layer sets reaching 80/90/95% and the
parameter savings each implies (``1 - n / L``), the three most and least important layers, and
early / middle / late *quarters* (first quarter ``l < L // 4``, middle half, last quarter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sponlab.studies.layers.leave_one_out import rank_correlation

QUARTERS: tuple[str, ...] = ("early", "middle", "late")


def quarter_of(layer: int, num_layers: int) -> str:
    """The notebook's split: early ``l < L // 4``, middle ``l < 3 L // 4``, late the rest."""
    if layer < num_layers // 4:
        return "early"
    return "middle" if layer < 3 * num_layers // 4 else "late"


@dataclass(frozen=True)
class DriftImportance:
    """Per layer: drift removed by SPON (absolute L2) and its percent of the total, ranked."""

    importance: dict[int, float]
    percent: dict[int, float]

    @property
    def ranked(self) -> list[int]:
        """Layers by decreasing percent (ties: lower layer first)."""
        return sorted(self.percent, key=lambda layer: (-self.percent[layer], layer))

    @property
    def cumulative(self) -> list[float]:
        """Cumulative percent along :attr:`ranked`."""
        return list(np.cumsum([self.percent[layer] for layer in self.ranked]))


def drift_importance(shift_rows: Sequence[Mapping[str, Any]]) -> DriftImportance:
    """From the evaluate stage's shift rows (``layer`` >= 0: that layer's output)."""
    importance = {
        int(r["layer"]): float(r["teal_l2"]) - float(r["spon_l2"])
        for r in shift_rows
        if int(r["layer"]) >= 0
    }
    total = sum(importance.values())
    percent = {k: (v / total * 100 if total else math.nan) for k, v in importance.items()}
    return DriftImportance(importance, percent)


def coverage(
    drift: DriftImportance, num_layers: int, targets: Sequence[float] = (0.8, 0.9, 0.95)
) -> dict[str, dict[str, Any]]:
    """For each target: the smallest top set reaching it (``searchsorted`` as the notebook), its
    size and the parameter savings ``1 - n / L`` of keeping biases only there."""
    cumulative = drift.cumulative
    out = {}
    for target in targets:
        n = min(int(np.searchsorted(cumulative, target * 100)) + 1, len(cumulative))
        out[f"{target:g}"] = {
            "layers": sorted(drift.ranked[:n]),
            "count": n,
            "parameter_savings": 1 - n / num_layers,
        }
    return out


def quarter_shares(percent: Mapping[int, float], num_layers: int) -> dict[str, float]:
    """Percent of the drift importance in the early / middle / late quarters."""
    shares = dict.fromkeys(QUARTERS, 0.0)
    for layer, value in percent.items():
        shares[quarter_of(layer, num_layers)] += value
    return shares


def drift_rows(drift: DriftImportance, loo: Mapping[int, float]) -> list[dict[str, Any]]:
    """One row per layer: drift importance (absolute, percent, rank) and the LOO importance."""
    rank = {layer: i + 1 for i, layer in enumerate(drift.ranked)}
    return [
        {
            "layer": layer,
            "drift_removed": drift.importance[layer],
            "percent": drift.percent[layer],
            "rank": rank[layer],
            "loo_importance": loo.get(layer, math.nan),
        }
        for layer in sorted(drift.importance)
    ]


def drift_summary(
    drift: DriftImportance,
    loo: Mapping[int, float],
    num_layers: int,
    targets: Sequence[float],
) -> dict[str, Any]:
    """The notebook's headline numbers plus the agreement with leave-one-layer-out."""
    shared = sorted(set(drift.importance) & set(loo))
    return {
        "most_important": drift.ranked[:5],
        "top3": drift.ranked[:3],
        "bottom3": drift.ranked[-3:],
        "coverage": coverage(drift, num_layers, targets),
        "quarter_share": quarter_shares(drift.percent, num_layers),
        "spearman_drift_vs_loo": rank_correlation(
            [drift.importance[k] for k in shared], [loo[k] for k in shared]
        ),
    }


def layer_vectors(vectors: Mapping[Any, Any]) -> dict[int, np.ndarray]:
    """Site -> bias [D] as layer -> all its sites' biases concatenated (float64, host)."""
    by_layer: dict[int, list[np.ndarray]] = {}
    for site, vector in vectors.items():
        by_layer.setdefault(site.layer, []).append(vector.detach().double().cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in sorted(by_layer.items())}


def layer_bias_stats(per_layer: Mapping[int, np.ndarray]) -> list[dict[str, float]]:
    """Per layer: L2, mean, std, max |b|, near-zero share (|b| < 1e-6) and size, as the
    notebook's bias-magnitude table (``per_layer`` from :func:`layer_vectors`)."""
    rows = []
    for layer, b in sorted(per_layer.items()):
        rows.append(
            {
                "layer": layer,
                "l2": float(np.linalg.norm(b)),
                "mean": float(b.mean()),
                "std": float(b.std()),
                "max_abs": float(np.abs(b).max()),
                "near_zero": float((np.abs(b) < 1e-6).mean()),
                "dim": int(b.size),
            }
        )
    return rows
