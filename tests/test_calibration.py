"""Sequential TEAL calibration: every site hits its target with all upstream sites sparsified."""

import pytest
import torch

from sponlab.method.calibration import calibrate_sequential
from sponlab.method.sparsify import SparsifySpec, SparsityStats, calibrate_thresholds, sparsified
from sponlab.model.sites import discover_sites
from sponlab.model.tiny import tiny_model


def achieved(model, site_map, blocks, thresholds, sparsity, sites):
    """Zeroed fraction per site when ``sites`` are sparsified together."""
    stats = SparsityStats()
    spec = SparsifySpec("teal", sparsity, tuple(sites), thresholds)
    with torch.no_grad(), sparsified(model, site_map, spec, stats):
        model(blocks)
    return stats.achieved()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_every_site_hits_the_target_on_the_calibration_text(arch, blocks):
    model = tiny_model(arch, seed=0)
    site_map = discover_sites(model)
    thresholds = calibrate_sequential(model, site_map, blocks, 0.6, batch_size=4)
    assert set(thresholds) == set(site_map.sites)
    fractions = achieved(model, site_map, blocks, thresholds, 0.6, site_map.sites)
    # exact quantiles of the very inputs each site sees: off by at most one tied entry
    assert max(abs(f - 0.6) for f in fractions.values()) < 1e-3


def test_dense_calibration_drifts_where_sequential_does_not(llama, blocks):
    """The reason for sequential mode: upstream sparsification shifts downstream inputs."""
    model, site_map = llama
    dense = calibrate_thresholds(model, site_map, blocks, [0.6])[0.6]
    seq = calibrate_sequential(model, site_map, blocks, 0.6)
    first = [s for s in site_map.sites if s.layer == 0 and s.group == "qkv"]
    assert all(seq[s] == dense[s] for s in first)  # nothing upstream of the first group
    drift = achieved(model, site_map, blocks, dense, 0.6, site_map.sites)
    assert max(abs(f - 0.6) for f in drift.values()) > 1e-3


def test_applied_subset_only_sparsifies_those_sites_upstream(llama, blocks):
    model, site_map = llama
    downs = [s for s in site_map.sites if s.module == "down_proj"]
    thresholds = calibrate_sequential(model, site_map, blocks, 0.5, applied=downs)
    assert set(thresholds) == set(site_map.sites)
    fractions = achieved(model, site_map, blocks, thresholds, 0.5, downs)
    assert max(abs(f - 0.5) for f in fractions.values()) < 1e-3


def test_calibration_leaves_model_untouched(llama, blocks):
    model, site_map = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(blocks).logits
    calibrate_sequential(model, site_map, blocks, 0.5, batch_size=4)
    with torch.no_grad():
        assert torch.equal(model(blocks).logits, dense)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
