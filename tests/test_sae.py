"""Sparse autoencoders: SAELens file format round trip, the three encoders against formulas
written out here, activation / d_in checks, training reduces the loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sponlab.config import ConfigError, Section
from sponlab.io.batches import build_batches
from sponlab.model.capture import collect_activations
from sponlab.model.loading import freeze
from sponlab.model.sites import discover_sites
from sponlab.model.tiny import tiny_model, tiny_tokenizer
from sponlab.studies.importance.sae import (
    SparseAutoencoder,
    _unscaled,
    parse_params,
    reconstruction_metrics,
    train_sae,
)
from sponlab.studies.importance.sae_files import (
    SAEFileError,
    find_saes,
    hook_name,
    load_sae,
    load_saes,
    parse_hook,
    save_sae,
)


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


def test_save_load_round_trip_in_saelens_layout(tmp_path):
    saes = {3: _random_sae(seed=3), 11: _random_sae(seed=11)}
    for layer, sae in saes.items():
        save_sae(tmp_path / f"layer_{layer}", sae, "mlp_out", layer, {"fve": 0.5})
    (tmp_path / "notes.txt").write_text("ignored")
    assert list(find_saes(tmp_path)) == [3, 11]
    cfg = json.loads((tmp_path / "layer_11" / "cfg.json").read_text())
    assert cfg["metadata"] == {"hook_name": "blocks.11.hook_mlp_out", "fve": 0.5}
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("standard", 12, 24)
    loaded, _ = load_sae(tmp_path / "layer_11")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(loaded, name), getattr(saes[11], name))
    assert not any(p.requires_grad for p in loaded.parameters())
    both = load_saes(tmp_path, "mlp_out", d_in=12)
    assert sorted(both) == [3, 11]
    x = torch.randn(4, 12)
    torch.testing.assert_close(both[3].encode(x), saes[3].encode(x))
    assert list(find_saes(tmp_path / "layer_3")) == [3]  # a directory that is one SAE
    with pytest.raises(FileNotFoundError, match="layer"):
        load_saes(tmp_path, "mlp_out", 12, [5])
    with pytest.raises(SAEFileError, match="d_in=12"):
        load_saes(tmp_path, "mlp_out", d_in=13)
    with pytest.raises(SAEFileError, match=r"importance\.activation: mlp_out"):
        load_saes(tmp_path, "mlp_act", d_in=12)


def write_public_sae(folder, tensors, cfg):
    """An SAE directory as SAELens (v5 layout: hook_name at the top) writes it."""
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_public_jumprelu_and_topk_saes_encode_as_written_out(tmp_path):
    gen = torch.Generator().manual_seed(0)
    d_in, d_sae = 6, 10
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen),
    }
    threshold = torch.rand(d_sae, generator=gen)
    base = {"d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.2.hook_resid_post"}
    write_public_sae(
        tmp_path / "jr",
        {**w, "threshold": threshold},
        {**base, "architecture": "jumprelu", "apply_b_dec_to_input": False},
    )
    write_public_sae(
        tmp_path / "tk",
        w,
        {**base, "architecture": "standard", "activation_fn_str": "topk",
         "activation_fn_kwargs": {"k": 3}},
    )  # fmt: skip
    x = torch.randn(5, d_in, generator=gen)
    jr, cfg = load_sae(tmp_path / "jr")
    assert parse_hook(cfg["hook_name"]) == ("resid_post", 2)
    pre = x @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction for this SAE
    expected = torch.where(pre > threshold, pre.clamp_min(0), torch.zeros(()))
    torch.testing.assert_close(jr.encode(x), expected)
    tk, _ = load_sae(tmp_path / "tk")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    kth = pre.sort(dim=-1, descending=True).values[:, 2:3]  # 3rd largest per token
    expected = torch.where(pre >= kth, pre.clamp_min(0), torch.zeros(()))
    torch.testing.assert_close(tk.encode(x), expected)
    assert ((tk.encode(x) > 0).sum(-1) <= 3).all()


def test_unreadable_public_saes_are_clear_errors(tmp_path):
    w = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4)}
    w["b_dec"] = torch.zeros(4)
    base = {"d_in": 4, "d_sae": 8, "hook_name": "blocks.0.hook_mlp_out"}
    write_public_sae(tmp_path / "norm", w, {**base, "normalize_activations": "layer_norm"})
    with pytest.raises(SAEFileError, match="normalize_activations"):
        load_sae(tmp_path / "norm")
    write_public_sae(tmp_path / "attn", w, {**base, "hook_name": "blocks.0.attn.hook_z"})
    with pytest.raises(SAEFileError, match="hook point"):
        load_sae(tmp_path / "attn")
    write_public_sae(tmp_path / "jr", w, {**base, "architecture": "jumprelu"})
    with pytest.raises(SAEFileError, match="threshold"):
        load_sae(tmp_path / "jr")
    assert hook_name("mlp_act", 4) == "blocks.4.mlp.hook_post"


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
    sites = discover_sites(model)
    acts = collect_activations(model, sites, [1], batches, "mlp_act", progress=False)[1]
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
    assert (
        p.layers == "auto" and p.activation == "mlp_out" and p.expansion == 2 and p.split == "train"
    )
    assert parse_params(Section({"layers": 3}, "sae", "t")).layers == "3"
    for raw, key in [({"layers": "a-b"}, "sae.layers"), ({"lr": 0}, "sae.lr"), ({"x": 1}, "sae.x")]:
        with pytest.raises(ConfigError, match=key):
            parse_params(Section(raw, "sae", "t"))


def test_release_loading_goes_through_the_same_directory_format(tmp_path, monkeypatch):
    """``from_sae_lens`` with the optional package mocked at its import edge (offline)."""
    import sys
    import types

    from sponlab.studies.importance.sae_files import from_sae_lens

    sae = _random_sae(d_in=6, d_sae=8)
    state = {k: v.detach().clone() for k, v in sae.state_dict().items() if k != "threshold"}
    state["log_threshold"] = torch.zeros(8)  # a training-style JumpReLU checkpoint: threshold 1
    cfg = {
        "architecture": "jumprelu",
        "d_in": 6,
        "d_sae": 8,
        "metadata": {"hook_name": "blocks.5.hook_mlp_out"},
    }
    released = types.SimpleNamespace(
        cfg=types.SimpleNamespace(to_dict=lambda: cfg), state_dict=lambda: state
    )
    calls = []

    def from_pretrained(release, sae_id):
        calls.append((release, sae_id))
        return released, cfg, None

    fake = types.ModuleType("sae_lens")
    fake.SAE = types.SimpleNamespace(from_pretrained=from_pretrained)
    monkeypatch.setitem(sys.modules, "sae_lens", fake)
    out = from_sae_lens("some-release", "layer_5/width_16k", tmp_path / "pub")
    assert calls == [("some-release", "layer_5/width_16k")]
    loaded = load_saes(out, "mlp_out", d_in=6)[5]
    assert loaded.architecture == "jumprelu"
    torch.testing.assert_close(loaded.threshold, torch.ones(8))
    torch.testing.assert_close(loaded.W_enc, sae.W_enc)
