"""TEAL's greedy per-layer sparsity allocation (sponlab.method.greedy) and per-site calibration targets."""

from __future__ import annotations

import itertools

import pytest
import torch

from sponlab.method.calibration import calibrate_sequential, decoder_layers, record_layer_calls
from sponlab.method.greedy import (
    LayerSearch,
    greedy_allocation,
    group_parameters,
    search_layer,
)
from sponlab.method.sparsify import SparsifySpec, SparsityStats, sparsified


def test_each_layer_reaches_the_target_in_equal_weighted_steps(llama, blocks):
    model, site_map = llama
    allocation, path = greedy_allocation(model, site_map, blocks, 0.5, site_map.sites, step=0.1)
    assert set(allocation) == set(site_map.sites)
    unit = model.get_input_embeddings().weight.shape[1] ** 2
    for layer in range(site_map.num_layers):
        rows = [r for r in path if r.layer == layer]
        own = [s for s in site_map.sites if s.layer == layer]
        params = group_parameters(model, site_map, own)
        increment = 0.1 * unit / sum(params.values())  # every step adds the same weighted amount
        effs = [0.0] + [r.effective for r in rows]
        assert all(b - a == pytest.approx(increment) for a, b in itertools.pairwise(effs))
        assert 0.5 <= rows[-1].effective < 0.5 + increment + 1e-9
        weighted = sum(allocation[s] * site_map.linear(model, s).weight.numel() for s in own)
        assert weighted / sum(params.values()) == pytest.approx(rows[-1].effective)
        for site in own:  # equal within an input group
            assert allocation[site] == rows[-1].sparsities[site.group]


def test_a_group_that_cannot_hurt_is_raised_first(llama, blocks):
    model, site_map = llama
    with torch.no_grad():
        site_map.linear(model, site_map.select([0], ["o_proj"])[0]).weight.zero_()
    layers = decoder_layers(model, site_map)
    hidden, calls = record_layer_calls(model, layers, blocks, 8)
    own = site_map.select([0], list(site_map.modules_present()))
    search = LayerSearch(model, site_map, 0, list(zip(hidden, calls[0], strict=True)), own, 0.25)
    assert search.error(dict.fromkeys(search.reps, 0.0)) == 0.0  # dense layer: no error
    params = group_parameters(model, site_map, own)
    unit = model.get_input_embeddings().weight.shape[1] ** 2
    rows = search_layer(search, params, unit, 0.6, 0.05)
    # o_proj's output is zero, so the whole attention branch (o and q/k/v inputs) is free: both
    # are raised to their limit first (ties: by name), before any MLP group, which costs error
    free = [int(0.99 / (0.05 * unit / params[g]) + 1e-9) for g in ("o", "qkv")]
    assert [r.group for r in rows[: sum(free)]] == ["o"] * free[0] + ["qkv"] * free[1]
    assert all(r.error == 0.0 for r in rows[: sum(free)])
    assert rows[sum(free)].group in ("gate_up", "down") and rows[sum(free)].error > 0
    assert rows[sum(free)].uniform_error > 0


def test_calibration_meets_per_site_targets(llama, blocks):
    model, site_map = llama
    targets = {s: (0.3 if s.group in ("qkv", "gate_up") else 0.7) for s in site_map.sites}
    thresholds = calibrate_sequential(model, site_map, blocks, 0.5, targets=targets)
    stats = SparsityStats()
    spec = SparsifySpec("teal", 0.5, tuple(site_map.sites), thresholds)
    with torch.no_grad(), sparsified(model, site_map, spec, stats):
        model(blocks)
    for site, achieved in stats.achieved().items():
        assert achieved == pytest.approx(targets[site], abs=0.02), site
