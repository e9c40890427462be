"""Closed-form biases b = W E[x - S(x)]: zero when nothing is lost, zero mean output error."""

import pytest
import torch

from sponlab.method.closed_form import closed_form_biases
from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds, sparsified
from sponlab.model.hooks import capture_inputs


def spec_for(model, site_map, blocks, sparsity, modules=None):
    sites = site_map.sites if modules is None else site_map.select(range(4), modules)
    thresholds = calibrate_thresholds(model, site_map, blocks, [sparsity], sites)[sparsity]
    return SparsifySpec("teal", sparsity, tuple(sites), thresholds)


def test_nothing_lost_gives_zero_biases(llama, blocks):
    model, site_map = llama
    sites = site_map.select(range(4), ["o_proj", "down_proj"])
    spec = spec_for(model, site_map, blocks, 0.0)
    biases = closed_form_biases(model, site_map, spec, sites, blocks, batch_size=4)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in biases.vectors)
    # a site whose input is not sparsified loses nothing either
    spec = spec_for(model, site_map, blocks, 0.6, ["down_proj"])
    biases = closed_form_biases(model, site_map, spec, sites, blocks, batch_size=4)
    for site in biases.sites:
        assert (biases.vector(site).abs().max() == 0) == (site.module == "o_proj")


@pytest.mark.parametrize("parametrization", ["output", "input"])
def test_the_mean_output_error_of_every_site_is_zero(llama, blocks, parametrization):
    """With all closed-form biases attached, E[W x - (W S(x) + b)] = 0 at every bias site,
    where x is the site's input in that same (sparsified, biased) model: the sequential walk
    must have seen exactly the inputs the deployed model gives each site."""
    model, site_map = llama
    sites = site_map.select(range(4), ["o_proj", "down_proj"])
    spec = spec_for(model, site_map, blocks, 0.6)
    biases = closed_form_biases(model, site_map, spec, sites, blocks, 3, parametrization)
    assert all(v.abs().max() > 0 for v in biases.vectors)
    errors = {s: torch.zeros(site_map.linear(model, s).out_features) for s in sites}
    raw = {}

    def record(site, x):
        raw[site] = x

    with (
        torch.no_grad(),
        capture_inputs(model, site_map, sites, record),  # x before S
        sparsified(model, site_map, spec),
        biases.attached(model, site_map),
    ):
        handles = []
        for site in sites:  # registered after the bias hook: sees W S(x) + b

            def out_hook(module, args, output, site=site):
                dense = torch.nn.functional.linear(raw[site], module.weight)  # W x
                errors[site] += (dense - output).float().sum(dim=(0, 1))

            handles.append(site_map.linear(model, site).register_forward_hook(out_hook))
        try:
            for start in range(0, len(blocks), 3):
                model(blocks[start : start + 3])
        finally:
            for h in handles:
                h.remove()
    for site, err in errors.items():
        mean_error = (err / blocks.numel()).abs().max()
        bias = biases.output_bias(site, site_map.linear(model, site)).detach().abs().max()
        assert mean_error < 1e-5 * max(float(bias), 1e-3) * 100, (site, mean_error, bias)
