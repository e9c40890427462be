"""The public API: ``from sponlab import ...`` gives the stages' own functions, documented."""

import inspect

import pytest
import torch

import sponlab


def test_every_public_name_is_defined_where_the_api_says_with_a_docstring():
    """Each name resolves, and a function or class is defined in the module ``_EXPORTS`` names
    (not re-exported from elsewhere), so the API points at the code the stages run."""
    assert sorted(sponlab.__all__) == sorted(sponlab._EXPORTS)
    for name in sponlab.__all__:
        value = getattr(sponlab, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert value.__module__ == sponlab._EXPORTS[name], (name, value.__module__)
            assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sponlab.nope  # noqa: B018


def test_the_method_in_a_few_public_names():
    """Calibrate, sparsify, allocate, train, evaluate: the quick-start path on a tiny model."""
    from sponlab import (
        SparsifySpec,
        SponBiases,
        TrainParams,
        allocation,
        bias_sites,
        calibrate_sequential,
        damage_recovered,
        discover_sites,
        evaluate_variant,
        sparsified,
        tiny_model,
        train_spon,
    )

    model = tiny_model("llama")
    site_map = discover_sites(model)
    gen = torch.Generator().manual_seed(0)
    calib, train, test = (torch.randint(0, 512, (8, 16), generator=gen) for _ in range(3))
    thresholds = calibrate_sequential(model, site_map, calib, 0.6)
    spec = SparsifySpec("teal", 0.6, tuple(site_map.sites), thresholds)
    with torch.no_grad(), sparsified(model, site_map, spec):
        assert model(test).logits.shape == (8, 16, 512)
    alloc = allocation(layers={"first": 0.5}, modules=["down_proj"])
    sites = bias_sites(alloc, site_map)
    assert [s.layer for s in sites] == [0, 1] and {s.module for s in sites} == {"down_proj"}
    biases = SponBiases.for_model(model, site_map, sites)
    settings = TrainParams(lr=1e-3, epochs=2, batch_size=4)
    result = train_spon(model, site_map, spec, biases, train, train, settings)
    assert result.epochs[result.best_epoch]["val_kl"] <= result.epochs[0]["val_kl"]
    dense = evaluate_variant(model, site_map, test, 4).ppl
    teal = evaluate_variant(model, site_map, test, 4, spec).ppl
    spon = evaluate_variant(model, site_map, test, 4, spec, biases).ppl
    assert teal != dense  # a random-init model: sparsification changes, not necessarily hurts
    assert damage_recovered(dense, teal, spon) == pytest.approx((teal - spon) / (teal - dense))
    with pytest.raises(ValueError, match="unknown projection"):
        allocation(modules=["mlp"])
