"""Tensors that cross layers follow each layer's device (``device_map: auto`` puts layers on
different GPUs). CPU has one device, so a second one is stood in for: ``meta`` for the SAE (a CPU
weight meeting a meta activation raises), a mask usable only through ``.to(device)`` for the
padding mask. Each test fails when the fix it guards is reverted."""

from __future__ import annotations

import torch

from sponlab.model.capture import LayerAggregate, sae_targets
from sponlab.studies.importance.sae import SparseAutoencoder


def test_sae_features_run_on_the_device_of_their_layer():
    sae = SparseAutoencoder(8, 16)  # loaded on the host, as load_saes does
    x = torch.zeros(2, 3, 8, device="meta")  # the layer's activations on another device
    for aggregate_by in ("values", "gradients"):
        feats = sae_targets({0: sae}, aggregate_by)[0](x)
        assert feats.device.type == "meta" and feats.shape == (2, 3, 16)
    assert all(p.device.type == "meta" for p in sae.parameters())


class _MaskOnOtherDevice:
    """A padding mask held on another device: usable only through ``.to(device)``, which records
    the device asked for (meta cannot play this role: a meta mask has no data to copy)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask, self.asked = mask, []

    def to(self, device: torch.device) -> torch.Tensor:
        self.asked.append(torch.device(device))
        return self.mask.to(device)


def test_padding_mask_follows_the_activations_device():
    # the mask is built on the embedding device; a later layer's activations live elsewhere
    feats = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # [B, T, F]
    mask = _MaskOnOtherDevice(torch.tensor([[True, True, False], [True, False, False]]))
    aggregate = LayerAggregate()
    aggregate.add(feats, mask)  # type: ignore[arg-type]
    assert mask.asked == [feats.device]
    assert aggregate.tokens == 3 and aggregate.total is not None
    assert aggregate.total.tolist() == [0 + 4 + 12, 1 + 5 + 13, 2 + 6 + 14, 3 + 7 + 15]


def test_kl_targets_follow_the_logits_device():
    # cached targets live on the embedding's device; the LM head may be on the last GPU
    from sponlab.method.distill import TeacherTarget, kl_per_token, kl_to_teacher, top_k_target
    from sponlab.method.train import centred_logit_l2, next_token_ce

    logp = torch.log_softmax(torch.randn(2, 3, 11), -1)  # host
    logits = torch.zeros(2, 3, 11, device="meta")  # "another GPU"
    assert kl_per_token(TeacherTarget(logp), logits).device.type == "meta"
    assert kl_per_token(top_k_target(logp, 4), logits).device.type == "meta"
    assert kl_to_teacher(logp, logits).device.type == "meta"
    assert centred_logit_l2(logp, logits).device.type == "meta"
    assert next_token_ce(logits, torch.zeros(2, 3, dtype=torch.long)).device.type == "meta"


def test_folded_bias_lives_on_its_layers_device(llama):
    from sponlab.method.spon import SponBiases, fold_into_model

    model, site_map = llama
    site = site_map.select([1], ["down_proj"])[0]
    biases = SponBiases.for_model(model, site_map, [site])  # on the host
    linear = site_map.linear(model, site)
    linear.to("meta")  # this layer on another device
    fold_into_model(model, site_map, biases)
    assert linear.bias is not None and linear.bias.device.type == "meta"


def test_offloaded_layers_are_refused_before_work(llama):
    import pytest

    from sponlab.model.loading import check_placement
    from sponlab.paramcheck import ConfigError

    model, _ = llama
    check_placement(model)  # everything placed: fine
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.3": "disk"}
    with pytest.raises(ConfigError, match=r"base\.device_map.*model\.layers\.3"):
        check_placement(model)
    model.hf_device_map = {}
    model.model.layers[2].mlp.to("meta")  # a spill accelerate leaves on meta
    with pytest.raises(ConfigError, match=r"layers\.2\.mlp"):
        check_placement(model)


def test_loaded_models_keep_no_kv_cache(llama):
    from sponlab.model.loading import no_kv_cache

    model, _ = llama
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert model(ids).past_key_values is not None  # the probe can fail: transformers' default
    no_kv_cache(model)
    assert model(ids).past_key_values is None


def test_histogram_calibration_counts_where_the_values_are(monkeypatch):
    # a GPU calibration must bucketise on the GPU: update may not copy a batch to the host
    from sponlab.method.sparsify import HistogramQuantiles, quantile_threshold

    values = torch.randn(20_000, generator=torch.Generator().manual_seed(0)).abs()
    hist = HistogramQuantiles()

    def host_copy(self, *args, **kwargs):
        raise AssertionError("HistogramQuantiles.update copied a batch to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", host_copy)
    hist.update(values[:10_000])
    hist.update(values[10_000:].to(torch.bfloat16))
    monkeypatch.undo()
    assert hist.counts.dtype == torch.int64 and int(hist.counts.sum()) == 20_000
    assert hist.counts.device == hist.edges.device == values.device
    assert abs(hist.quantile(0.5) / quantile_threshold(values, 0.5) - 1) < 0.01
    edges = torch.zeros(3, device="meta")  # counts already placed: a batch elsewhere is refused
    try:
        hist.update(edges)
    except ValueError as err:
        assert "histogram counts live on cpu" in str(err)
    else:
        raise AssertionError("values on a second device were counted")


def test_layer_device_follows_a_layer_moved_elsewhere():
    # the SAE stage trains each layer's SAE on that layer's device (device_map spreads layers)
    from sponlab.model.sites import discover_sites
    from sponlab.model.tiny import tiny_model

    model = tiny_model("llama", layers=3)
    site_map = discover_sites(model)
    model.model.layers[1].to("meta")
    devices = [site_map.layer_device(model, i).type for i in range(3)]
    assert devices == ["cpu", "meta", "cpu"]
