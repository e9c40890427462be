"""Layer analysis as the layer-analysis notebook defines it: values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sponlab.model.sites import Site
from sponlab.studies.layers import drift as dl


def shift(teal, spon):
    """Shift rows as the evaluate stage writes them (index 0 = embeddings, layer -1)."""
    rows = [{"layer": -1, "teal_l2": 0.0, "spon_l2": 0.0}]
    return rows + [
        {"layer": i, "teal_l2": t, "spon_l2": s}
        for i, (t, s) in enumerate(zip(teal, spon, strict=True))
    ]


def test_drift_importance_ranking_coverage_and_quarters():
    # drift removed per layer: 1, 4, 2, 3 (sum 10) -> 10%, 40%, 20%, 30%
    drift = dl.drift_importance(shift([2, 5, 4, 6], [1, 1, 2, 3]))
    assert drift.importance == {0: 1.0, 1: 4.0, 2: 2.0, 3: 3.0}
    assert drift.percent == pytest.approx({0: 10.0, 1: 40.0, 2: 20.0, 3: 30.0})
    assert drift.ranked == [1, 3, 2, 0]
    assert drift.cumulative == pytest.approx([40, 70, 90, 100])
    cov = dl.coverage(drift, 4, (0.7, 0.8, 0.95))
    # searchsorted as the notebook: 70% is reached by the second layer, 80% by the third
    assert cov["0.7"] == {"layers": [1, 3], "count": 2, "parameter_savings": 0.5}
    assert cov["0.8"]["layers"] == [1, 2, 3] and cov["0.8"]["parameter_savings"] == 0.25
    assert cov["0.95"]["count"] == 4
    # quarters of 4 layers: early [0], middle [1, 2], late [3]
    assert dl.quarter_shares(drift.percent, 4) == pytest.approx(
        {"early": 10.0, "middle": 60.0, "late": 30.0}
    )
    assert [dl.quarter_of(layer, 30) for layer in (6, 7, 21, 22, 29)] == [
        "early",
        "middle",
        "middle",
        "late",
        "late",
    ]


def test_drift_summary_agreement_with_leave_one_out():
    drift = dl.drift_importance(shift([2, 5, 4, 6], [1, 1, 2, 3]))
    same = dl.drift_summary(drift, {0: 0.1, 1: 0.9, 2: 0.3, 3: 0.5}, 4, (0.8,))
    assert same["spearman_drift_vs_loo"] == pytest.approx(1.0)
    assert same["top3"] == [1, 3, 2] and same["bottom3"] == [3, 2, 0]
    reversed_ = dl.drift_summary(drift, {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.3}, 4, (0.8,))
    assert reversed_["spearman_drift_vs_loo"] == pytest.approx(-1.0)
    rows = dl.drift_rows(drift, {1: 0.9})
    assert [r["rank"] for r in rows] == [4, 1, 3, 2] and math.isnan(rows[0]["loo_importance"])


def test_layer_bias_stats_concatenate_a_layers_sites():
    vectors = {
        Site(0, "o_proj"): torch.tensor([3.0, -4.0]),
        Site(0, "down_proj"): torch.tensor([0.0, 0.0]),
        Site(2, "down_proj"): torch.tensor([1.0, 1.0, 1.0, 1.0]),
    }
    per_layer = dl.layer_vectors(vectors)
    assert sorted(per_layer) == [0, 2] and per_layer[0].size == 4
    rows = dl.layer_bias_stats(per_layer)
    assert rows[0]["l2"] == pytest.approx(5.0) and rows[0]["max_abs"] == 4.0
    assert rows[0]["mean"] == pytest.approx(-0.25) and rows[0]["near_zero"] == 0.5
    assert rows[1] == {
        "layer": 2,
        "l2": 2.0,
        "mean": 1.0,
        "std": 0.0,
        "max_abs": 1.0,
        "near_zero": 0.0,
        "dim": 4,
    }
    assert np.isclose(rows[0]["std"], np.std([3.0, -4.0, 0.0, 0.0]))
