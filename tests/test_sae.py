"""Sparse autoencoders: file format round trip, encoder formula, training reduces the loss."""

from __future__ import annotations

import pytest
import torch

from sponlab.analysis.batches import build_batches
from sponlab.analysis.capture import collect_mlp_inputs
from sponlab.analysis.sae import (
    SparseAutoencoder,
    _unscaled,
    load_sae,
    load_saes,
    parse_params,
    reconstruction_metrics,
    sae_layers,
    save_sae,
    train_sae,
)
from sponlab.config import ConfigError, Section
from sponlab.models import freeze
from sponlab.sites import discover_sites
from sponlab.tiny import tiny_model, tiny_tokenizer


def _random_sae(d_in: int = 12, d_sae: int = 24, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


def test_encode_decode_formula():
    sae = _random_sae()
    x = torch.randn(5, 12)
    expected = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), expected)
    x_hat, f = sae(x)
    torch.testing.assert_close(x_hat, f @ sae.W_dec + sae.b_dec)
    g = torch.randn(3, 12)
    torch.testing.assert_close(sae.feature_grad(g), g @ sae.W_dec.T)


def test_save_load_round_trip(tmp_path):
    saes = {3: _random_sae(seed=3), 11: _random_sae(seed=11)}
    for layer, sae in saes.items():
        save_sae(tmp_path, layer, sae, model="tiny", extra={"fve": 0.5})
    (tmp_path / "notes.txt").write_text("ignored")
    assert sae_layers(tmp_path) == [3, 11]
    loaded, meta = load_sae(tmp_path / "layer_11.safetensors")
    assert meta == {
        "d_in": 12,
        "d_sae": 24,
        "layer": 11,
        "site": "layers.11.down_proj",
        "model": "tiny",
        "fve": 0.5,
    }
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(loaded, name), getattr(saes[11], name))
    assert not any(p.requires_grad for p in loaded.parameters())
    both = load_saes(tmp_path, d_in=12)
    assert sorted(both) == [3, 11]
    x = torch.randn(4, 12)
    torch.testing.assert_close(both[3].encode(x), saes[3].encode(x))
    with pytest.raises(FileNotFoundError, match="layer"):
        load_saes(tmp_path, [5])
    with pytest.raises(ValueError, match="d_in"):
        load_saes(tmp_path, d_in=13)


def test_unscaled_is_the_same_map():
    sae, scale = _random_sae(), 3.7
    x = torch.randn(6, 12)
    x_hat_scaled, f_scaled = sae(x * scale)
    x_hat, f = _unscaled(sae, scale)(x)
    torch.testing.assert_close(f, f_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_scaled / scale, rtol=1e-5, atol=1e-5)


def test_training_reduces_reconstruction_loss():
    model = tiny_model("llama", layers=2, hidden=32)
    freeze(model)
    docs = [" ".join(f"w{(13 * i + 7 * j) % 500}" for j in range(40)) for i in range(16)]
    batches = build_batches(docs, tiny_tokenizer(), 16, 40, batch_size=8)
    acts = collect_mlp_inputs(model, discover_sites(model), [1], batches, progress=False)[1]
    assert acts.shape == (16 * 40, 64)
    result = train_sae(acts, expansion=2, l1=0.5, lr=3e-3, steps=150, token_batch=128)
    m = result.metrics
    assert m["mse"] < 0.5 * m["mse_before"]
    assert m["fve"] > 0.5 > m["fve_before"]
    assert 0 < m["l0"] < 128
    assert result.history["loss"][-1] < result.history["loss"][0]
    # the reported metrics describe the returned (unscaled) SAE on raw activations
    again = reconstruction_metrics(result.sae, acts)
    assert again["fve"] > 0.5


def test_parse_params():
    p = parse_params(Section({}, "sae", "t"))
    assert p.layers == "0,14,29" and p.expansion == 2 and p.split == "train"
    assert parse_params(Section({"layers": 3}, "sae", "t")).layers == "3"
    for raw, key in [({"layers": "a-b"}, "sae.layers"), ({"lr": 0}, "sae.lr"), ({"x": 1}, "sae.x")]:
        with pytest.raises(ConfigError, match=key):
            parse_params(Section(raw, "sae", "t"))
