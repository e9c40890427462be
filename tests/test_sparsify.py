import pytest
import torch

from sponlab.method.sparsify import (
    HistogramQuantiles,
    SparsifySpec,
    SparsityStats,
    calibrate_thresholds,
    quantile_threshold,
    sparsified,
    topk_mask,
)
from sponlab.method.spon import SponBiases
from sponlab.model.sites import Site


def teal_spec(site_map, thresholds, sparsity, modules=None):
    sites = tuple(s for s in site_map.sites if modules is None or s.module in modules)
    return SparsifySpec("teal", sparsity, sites, thresholds)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_sparsity_zero_and_zero_bias_is_exactly_dense(llama, blocks):
    model, site_map = llama
    dense = logits(model, blocks)
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.0])[0.0]
    biases = SponBiases.for_model(model, site_map, site_map.sites)
    with (
        sparsified(model, site_map, teal_spec(site_map, thresholds, 0.0)),
        biases.attached(model, site_map),
    ):
        out = logits(model, blocks)
    assert torch.equal(out, dense)


def test_hooks_removed_leave_model_bit_identical(llama, blocks):
    model, site_map = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = logits(model, blocks)
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.5])[0.5]
    with sparsified(model, site_map, teal_spec(site_map, thresholds, 0.5)):
        sparse = logits(model, blocks)
    assert not torch.equal(sparse, dense)
    assert torch.equal(logits(model, blocks), dense)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_hooks_removed_even_on_error(llama, blocks):
    model, site_map = llama
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.5])[0.5]
    with (
        pytest.raises(RuntimeError),
        sparsified(model, site_map, teal_spec(site_map, thresholds, 0.5)),
    ):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_quantile_threshold_hits_target_on_random_data(sparsity):
    values = torch.randn(200_000).abs()
    t = quantile_threshold(values, sparsity)
    assert (values <= t).float().mean().item() == pytest.approx(sparsity, abs=1e-4)
    # a threshold computed on one sample generalises to fresh data of the same distribution
    fresh = torch.randn(200_000).abs()
    assert (fresh <= t).float().mean().item() == pytest.approx(sparsity, abs=0.01)


def test_histogram_quantile_close_to_exact():
    values = torch.randn(100_000).abs() * 0.3
    hist = HistogramQuantiles()
    hist.update(values[:50_000])
    hist.update(values[50_000:])
    for q in (0.3, 0.5, 0.9):
        assert hist.quantile(q) == pytest.approx(quantile_threshold(values, q), rel=0.01)


def test_achieved_sparsity_on_held_out_blocks_matches_target(llama):
    model, site_map = llama
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 512, (16, 32), generator=gen)
    test = torch.randint(0, 512, (16, 32), generator=gen)
    thresholds = calibrate_thresholds(model, site_map, calib, [0.5])[0.5]
    stats = SparsityStats()
    with sparsified(model, site_map, teal_spec(site_map, thresholds, 0.5), stats):
        logits(model, test)
    achieved = stats.achieved()
    assert set(achieved) == set(site_map.sites)
    assert all(abs(v - 0.5) < 0.05 for v in achieved.values()), achieved


def test_shared_inputs_get_shared_thresholds(llama, blocks):
    model, site_map = llama
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.5])[0.5]
    for layer in range(site_map.num_layers):
        assert thresholds[Site(layer, "q_proj")] == thresholds[Site(layer, "v_proj")]
        assert thresholds[Site(layer, "gate_proj")] == thresholds[Site(layer, "up_proj")]
        assert thresholds[Site(layer, "q_proj")] != thresholds[Site(layer, "o_proj")]


def test_topk_mask_keeps_exact_count_per_token():
    x = torch.randn(3, 5, 40)
    keep = topk_mask(x, 0.25)
    assert torch.all(keep.sum(-1) == 30)
    kept_min = torch.where(keep, x.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(~keep, x.abs(), -torch.inf).amax(-1)
    assert torch.all(kept_min > dropped_max)


def test_only_selected_modules_are_sparsified(llama, blocks):
    model, site_map = llama
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.5])[0.5]
    stats = SparsityStats()
    with sparsified(model, site_map, teal_spec(site_map, thresholds, 0.5, {"down_proj"}), stats):
        logits(model, blocks)
    assert {s.module for s in stats.achieved()} == {"down_proj"}


def test_dense_prefix_leaves_prefix_tokens_untouched(llama, blocks):
    model, site_map = llama
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.6])[0.6]
    sites = tuple(site_map.sites)
    spec = SparsifySpec("teal", 0.6, sites, thresholds, dense_prefix=5)
    dense = logits(model, blocks)
    with sparsified(model, site_map, spec):
        out = logits(model, blocks)
    # causal attention: positions before the first sparsified token are exactly dense
    assert torch.equal(out[:, :5], dense[:, :5])
    assert not torch.equal(out[:, 5:], dense[:, 5:])


def test_spec_validation():
    with pytest.raises(ValueError, match="method"):
        SparsifySpec("random", 0.5, ())
    with pytest.raises(ValueError, match="threshold"):
        SparsifySpec("teal", 0.5, (Site(0, "q_proj"),), {})


def test_sorted_threshold_is_the_selection_threshold():
    # greedy allocation sorts a group's |x| once and looks thresholds up: same numbers as kthvalue
    from sponlab.method.sparsify import quantile_threshold, sorted_threshold

    values = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)).abs()
    values[0, :50] = values[0, 50]  # ties
    ascending = values.flatten().sort().values
    for s in (0.0, 0.0004, 0.05, 0.3333, 0.5, 0.99, 1.0):
        assert sorted_threshold(ascending, s) == quantile_threshold(values, s)
    assert sorted_threshold(ascending, 0.0) == float("-inf")
