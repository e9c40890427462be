"""Activation / gradient importance: maths, gradients vs finite differences, padding, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_params

from sponlab.config import ConfigError, Section
from sponlab.io.batches import BatchError, build_batches, ensure_pad_token, pad_batches
from sponlab.model import capture
from sponlab.model.capture import (
    ImportanceError,
    LayerAggregate,
    PassResult,
    activation_dim,
    activation_hooks,
    activation_module,
    identity,
    mlp_input_module,
    next_token_loss_sum,
    post_norm,
    resolve_layers,
    run_importance,
    sae_targets,
)
from sponlab.model.loading import freeze
from sponlab.model.sites import discover_sites
from sponlab.model.tiny import ARCHITECTURES, tiny_model, tiny_tokenizer
from sponlab.studies.importance.files import load_importance, save_importance
from sponlab.studies.importance.importance import (
    ImportanceParams,
    apply_power,
    finalize,
    normalize,
    parse_params,
)
from sponlab.studies.importance.sae import SparseAutoencoder

# --- normalisation and power on known vectors ----------------------------------------------------


def activation_tensors(model, site_map, layers, batch, aggregate_by, activation="mlp_act"):
    """Per-token values of ``activation`` (``values``) or ``d loss / d activation`` (``gradients``)
    of one batch, [B, T, D] per layer: the unaggregated tensors the streaming sums are checked
    against."""
    captured = {}

    def keep(layer, tensor):
        captured[layer] = tensor.detach().clone()

    capture._forward(model, site_map, layers, batch, aggregate_by, keep, activation)
    return captured


def test_normalize_known_vectors():
    g = np.array([1.0, -2.0, 3.0, 0.0])
    np.testing.assert_allclose(normalize(g, "none"), g)
    np.testing.assert_allclose(normalize(g, "sum_abs"), g * 4 / 6)  # sum |g| = 6, dim 4
    np.testing.assert_allclose(normalize(g, "sum"), g * 4 / 2)  # sum g = 2
    assert np.abs(normalize(g, "sum_abs")).sum() == pytest.approx(4.0)
    assert normalize(g, "sum").sum() == pytest.approx(4.0)


def test_normalize_sum_refuses_cancelling_vector():
    with pytest.raises(ImportanceError, match="~0 relative"):
        normalize(np.array([1.0, -1.0, 2.0, -2.0]), "sum")
    with pytest.raises(ImportanceError, match="~0 relative"):
        normalize(np.array([1.0, -1.0 + 1e-9]), "sum", tolerance=1e-6)
    # a small but clearly non-zero sum is accepted and sign-flipping works
    out = normalize(np.array([1.0, -3.0]), "sum")
    np.testing.assert_allclose(out, [-1.0, 3.0])
    with pytest.raises(ImportanceError):
        normalize(np.zeros(3), "sum_abs")


def test_power_is_sign_preserving():
    g = np.array([-2.0, 3.0, 0.0, 0.5])
    np.testing.assert_allclose(apply_power(g, 2.0), [-4.0, 9.0, 0.0, 0.25])
    np.testing.assert_allclose(apply_power(g, 0.5), [-np.sqrt(2), np.sqrt(3), 0.0, np.sqrt(0.5)])
    np.testing.assert_allclose(apply_power(g, None), g)


def test_finalize_power_before_normalisation():
    agg = LayerAggregate()
    rows = torch.tensor([[[1.0, -4.0, 2.0], [3.0, 0.0, -2.0]]])  # [1, 2, 3]
    agg.add(rows, torch.tensor([[True, True]]))
    result = PassResult("values", {"mlp": {0: agg}}, seconds=1.0, tokens=2)
    params = ImportanceParams(
        aggregation=("mean", "mean_abs"), power=2.0, normalize=("none", "sum_abs")
    )
    out = {(v.aggregation, v.normalize): v.vectors[0] for v in finalize(result, "mlp", params)}
    mean = np.array([2.0, -2.0, 0.0])
    mean_abs = np.array([2.0, 2.0, 2.0])
    np.testing.assert_allclose(out["mean", "none"], [4.0, -4.0, 0.0])
    np.testing.assert_allclose(out["mean_abs", "none"], mean_abs**2)
    np.testing.assert_allclose(out["mean", "sum_abs"], np.sign(mean) * mean**2 * 3 / 8)
    np.testing.assert_allclose(out["mean_abs", "sum_abs"], [1.0, 1.0, 1.0])
    stats = {(v.aggregation, v.normalize): v.stats[0] for v in finalize(result, "mlp", params)}
    assert stats["mean", "none"]["pre_norm_sum_ratio"] == pytest.approx(0.0)
    assert stats["mean_abs", "sum_abs"]["pre_norm_sum_ratio"] == pytest.approx(1.0)
    assert stats["mean_abs", "sum_abs"]["effective_dims"] == pytest.approx(3.0)
    # mean g sums to ~0 here: the sum normalisation must be refused, naming layer and mode
    with pytest.raises(ImportanceError, match="layer 0"):
        finalize(result, "mlp", ImportanceParams(aggregation=("mean",), normalize=("sum",)))


# --- params ------------------------------------------------------------------------------------


def test_parse_params_defaults_and_both():
    p = parse_params(Section({}, "importance", "t"))
    assert p.aggregate_by == ("values", "gradients")
    assert p.aggregation == ("mean", "mean_abs")
    assert p.normalize == ("sum_abs", "sum")
    assert p.power is None and p.split == "val"
    one = parse_params(Section({"aggregation": "mean", "normalize": "none"}, "importance", "t"))
    assert one.aggregation == ("mean",) and one.normalize == ("none",)


def test_parse_params_power_list_uses_first_with_warning():
    with pytest.warns(UserWarning, match="only its first value"):
        p = parse_params(Section({"power": [2, 3]}, "importance", "t"))
    assert p.power == 2.0
    with pytest.warns(UserWarning, match="only its first value"):  # the tools' CLI form
        p = parse_params(Section({"power": "0.5,1.0,2.0"}, "importance", "t"))
    assert p.power == 0.5
    assert parse_params(Section({"power": "2"}, "importance", "t")).power == 2.0


def test_layer_choices_derive_from_the_model_depth():
    assert resolve_layers("auto", 30) == [0, 15, 29]
    assert resolve_layers("auto", 2) == [0, 1]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert parse_params(Section({"layers": "auto"}, "importance", "t")).layers == "auto"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"aggregation": "median"}, "importance.aggregation"),
        ({"normalize": "l2"}, "importance.normalize"),
        ({"aggregate_by": "grads"}, "importance.aggregate_by"),
        ({"power": -1}, "importance.power"),
        ({"power": []}, "importance.power"),
        ({"power": "a,b"}, "importance.power"),
        ({"activation": "attn_out"}, "importance.activation"),
        ({"site": "mlp_out"}, "importance.site"),
        ({"layers": "3-1"}, "importance.layers"),
        ({"split": "dev"}, "importance.split"),
        ({"bogus": 1}, "importance.bogus"),
    ],
)
def test_parse_params_rejects_bad_values(raw, key):
    with pytest.raises(ConfigError, match=key):
        parse_params(Section(raw, "importance", "t"))


# --- gradients vs finite differences -------------------------------------------------------------


def _batch(lengths, vocab=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]
    return pad_batches(seqs, len(seqs), pad_id=3)[0]


def _loss_with_perturbation(model, site_map, batch, layer, index, delta, activation="mlp_act"):
    """Loss when ``delta`` [D] is added to the activation ``activation`` at (row, token)."""
    row, token = index
    module = activation_module(model, site_map, layer, activation)

    def bump(x):
        x = x.clone()
        x[row, token] += delta
        return x

    def pre_hook(_m, args):
        return (bump(args[0]), *args[1:])

    def post_hook(_m, _args, out):
        return (bump(out[0]), *out[1:]) if isinstance(out, tuple) else bump(out)

    if activation == "mlp_act":
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        handle = module.register_forward_hook(post_hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return float(next_token_loss_sum(logits, batch.input_ids, batch.attention_mask))
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("arch", "activation"),
    [("llama", "mlp_act"), ("gemma3", "mlp_act"), ("llama", "mlp_out"), ("qwen3", "resid_post")],
)
def test_gradients_match_finite_differences(arch, activation):
    model = tiny_model(arch, layers=3, hidden=32).double()
    freeze(model)
    site_map = discover_sites(model)
    batch = _batch([9, 6])  # row 1 is padded
    grads = activation_tensors(model, site_map, [0, 2], batch, "gradients", activation)
    assert grads[0].shape[-1] == activation_dim(model, site_map, 0, activation)
    assert all(p.grad is None for p in model.parameters())  # the model stayed frozen
    # RMSNorm computes in float32 even for a float64 model, so eps must stay well above its
    # rounding; the central difference is still accurate to O(eps^2).
    eps = 1e-3
    for layer, row, token, coord in [(0, 1, 2, 5), (0, 0, 4, 17), (2, 1, 0, 3)]:
        coord = coord % grads[layer].shape[-1]
        delta = torch.zeros(grads[layer].shape[-1], dtype=torch.float64)
        delta[coord] = eps
        plus = _loss_with_perturbation(
            model, site_map, batch, layer, (row, token), delta, activation
        )
        minus = _loss_with_perturbation(
            model, site_map, batch, layer, (row, token), -delta, activation
        )
        fd = (plus - minus) / (2 * eps)
        captured = float(grads[layer][row, token, coord])
        assert abs(captured) > 1e-6
        assert captured == pytest.approx(fd, rel=2e-3)
    # a pad position and the last real token predict nothing: zero gradient
    assert float(grads[0][1, 6:].abs().max()) == 0.0
    assert float(grads[0][1, 5].abs().max()) == 0.0


def test_sae_feature_gradient_matches_finite_differences():
    model = tiny_model("llama", layers=2, hidden=32).double()
    freeze(model)
    site_map = discover_sites(model)
    batch = _batch([8, 5])
    d_in = mlp_input_module(model, site_map, 1).in_features
    torch.manual_seed(1)
    sae = SparseAutoencoder(d_in, 2 * d_in).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    grad_x = activation_tensors(model, site_map, [1], batch, "gradients")[1]
    feat_grad = sae_targets({1: sae}, "gradients")[1](grad_x)  # [B, T, d_sae]
    eps, feature, row, token = 1e-4, 7, 0, 3  # |W_dec[j]| ~ 8: step ~1e-3
    # f -> f + eps e_j moves decode(f), hence the captured activation, by eps * W_dec[j]
    delta = eps * sae.W_dec[feature].detach()
    plus = _loss_with_perturbation(model, site_map, batch, 1, (row, token), delta)
    minus = _loss_with_perturbation(model, site_map, batch, 1, (row, token), -delta)
    fd = (plus - minus) / (2 * eps)
    assert float(feat_grad[row, token, feature].detach()) == pytest.approx(fd, rel=2e-3)


def test_feature_tensors_stream_one_layer_at_a_time():
    """Per-token feature tensors [B, T, F] are reduced into the running sums as each layer's
    activation (or gradient) arrives: the previous layer's is freed before the next exists, so a
    pass never holds features of all layers at once (65k SAE features x 32 layers on a GPU)."""
    import gc
    import weakref

    model = tiny_model("llama", layers=4, hidden=32)
    freeze(model)
    site_map = discover_sites(model)
    live: list[weakref.ref] = []
    peak = [0]

    def transform(x: torch.Tensor) -> torch.Tensor:
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in live))
        feats = x * 2.0  # [B, T, F], a new tensor per call
        live.append(weakref.ref(feats))
        return feats

    targets = {"mlp": {layer: transform for layer in range(4)}}
    for aggregate_by in ("values", "gradients"):
        live.clear()
        run_importance(model, site_map, [_batch([9, 6])], aggregate_by, targets, progress=False)
        assert len(live) == 4
    assert peak[0] == 0  # when a layer's features are made, no earlier layer's are alive


# --- padding, tokenisation, hooks ----------------------------------------------------------------


def _docs():
    return [" ".join(f"w{(7 * i + j) % 400}" for j in range(n)) for i, n in enumerate([12, 5, 9])]


@pytest.mark.parametrize("aggregate_by", ["values", "gradients"])
def test_padding_excluded(aggregate_by):
    model = tiny_model("qwen2", layers=2, hidden=32)
    freeze(model)
    site_map = discover_sites(model)
    tok = tiny_tokenizer()
    alone = build_batches(_docs(), tok, 3, 64, batch_size=1)
    padded = build_batches(_docs(), tok, 3, 64, batch_size=3)
    assert padded[0].attention_mask.shape == (3, 12) and padded[0].tokens == 26
    targets = {"mlp": {0: identity, 1: identity}}
    a = run_importance(model, site_map, alone, aggregate_by, targets, progress=False)
    b = run_importance(model, site_map, padded, aggregate_by, targets, progress=False)
    assert a.tokens == b.tokens == 26
    for layer in (0, 1):
        for how in ("mean", "mean_abs"):
            x = a.aggregates["mlp"][layer].result(how)
            y = b.aggregates["mlp"][layer].result(how)
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-7)
    # counting pad tokens would change the result: sanity-check the test can fail
    wrong = LayerAggregate()
    feats = activation_tensors(model, site_map, [0], padded[0], aggregate_by)[0]
    wrong.add(feats, torch.ones_like(padded[0].attention_mask, dtype=torch.bool))
    assert not np.allclose(wrong.result("mean_abs"), a.aggregates["mlp"][0].result("mean_abs"))


def test_tokenizer_without_pad_gets_eos_and_pads_right():
    tok = tiny_tokenizer()
    tok.pad_token = None
    assert ensure_pad_token(tok) == tok.eos_token_id
    batch = build_batches(_docs(), tok, 3, 8, batch_size=3, min_tokens=2)[0]
    assert batch.input_ids.shape == (3, 8)  # truncated to max_length
    row = int(batch.attention_mask.sum(1).argmin())
    assert batch.attention_mask[row, -1] == 0 and batch.input_ids[row, -1] == tok.eos_token_id
    with pytest.raises(BatchError, match="samples requested"):
        build_batches(_docs(), tok, 3, 64, batch_size=3, min_tokens=10)


def test_hooks_always_removed():
    model = tiny_model("llama", layers=2, hidden=32)
    site_map = discover_sites(model)
    modules = [mlp_input_module(model, site_map, i) for i in (0, 1)]

    def boom(_layer, _x):
        raise RuntimeError("boom")

    with (
        pytest.raises(RuntimeError, match="boom"),
        activation_hooks(model, site_map, [0, 1], "mlp_act", boom),
    ):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert all(not m._forward_pre_hooks for m in modules)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture(arch):
    model = tiny_model(arch, layers=2, hidden=32)
    freeze(model)
    site_map = discover_sites(model)
    batches = build_batches(_docs(), tiny_tokenizer(), 3, 16, batch_size=2)
    for aggregate_by in ("values", "gradients"):
        res = run_importance(model, site_map, batches, aggregate_by, {"mlp": {1: identity}}, False)
        vec = res.aggregates["mlp"][1].result("mean_abs")
        assert vec.shape == (model.config.intermediate_size,) and np.all(vec > 0)


# --- files -------------------------------------------------------------------------------------


def test_save_and_load_importance(tmp_path):
    agg = LayerAggregate()
    agg.add(torch.tensor([[[1.0, 2.0, -3.0]]]), torch.tensor([[True]]))
    result = PassResult("gradients", {"sae": {4: agg, 7: agg}}, seconds=2.0, tokens=1)
    params = ImportanceParams(aggregation=("mean_abs",), normalize=("sum_abs",))
    (variant,) = finalize(result, "sae", params)
    assert variant.stem == "gradients_mean_abs_norm-sum_abs"
    path = save_importance(tmp_path, variant, {"features": "sae", "dims": {"4": 3}})
    assert path.name == "gradients_mean_abs_norm-sum_abs.npz"
    loaded = load_importance(path)
    assert loaded.layers == [4, 7]
    np.testing.assert_allclose(loaded.vectors[4], [0.5, 1.0, 1.5])
    assert loaded.metadata == {"features": "sae", "dims": {"4": 3}}
    npy = tmp_path / "layers" / variant.stem / "layer_7.npy"
    np.testing.assert_allclose(np.load(npy, allow_pickle=False), [0.5, 1.0, 1.5])
    with np.load(path, allow_pickle=False) as data:  # plain arrays only, no pickled objects
        assert set(data.files) == {"layer_4", "layer_7", "layers", "metadata"}


# --- stages end to end on a tiny saved model ---------------------------------------------------


def test_stages_end_to_end(tmp_path, monkeypatch, repo_params):

    from sponlab.model.tiny import save_tiny
    from sponlab.stages import importance as importance_stage
    from sponlab.stages import sae as sae_stage

    model_dir = save_tiny(tmp_path / "model", "llama", layers=2, hidden=32)
    # the tiny word-level tokenizer knows only "w<i>" words: give both stages such documents
    docs = [" ".join(f"w{(31 * i + 7 * j) % 500}" for j in range(20 + 3 * i)) for i in range(8)]
    for stage in (importance_stage, sae_stage):
        monkeypatch.setattr(stage, "load_corpus", lambda *_: {"train": docs, "val": docs})
    raw = repo_params
    raw["base"].update(device="cpu", dtype="float32")
    raw["sae"] = {"layers": "1", "samples": 4, "max_length": 32, "steps": 40, "l1": 0.1}
    raw["importance"] = {"samples": 4, "max_length": 32, "batch_size": 3, "layers": "0-1"}
    raw["importance"]["activation"] = raw["sae"]["activation"] = "mlp_act"
    params = write_params(tmp_path / "params.yaml", raw)
    sae_dir, out = tmp_path / "sae", tmp_path / "importance"
    sae_stage.main(params, model_dir, sae_dir, tmp_path / "sae_report", tmp_path / "sae.json")
    assert sorted(p.name for p in (sae_dir / "layer_1").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    metrics = tmp_path / "importance.json"
    figures = tmp_path / "plots" / "importance"
    importance_stage.main(params, model_dir, sae_dir, out, figures, metrics)
    mlp = load_importance(out / "mlp" / "gradients_mean_abs_norm-sum_abs.npz")
    assert mlp.layers == [0, 1] and mlp.vectors[0].shape == (64,)
    assert np.abs(mlp.vectors[1]).sum() == pytest.approx(64)
    assert mlp.metadata["tokens"] > 0 and mlp.metadata["dims"] == {"0": 64, "1": 64}
    sae = load_importance(out / "sae" / "values_mean_norm-sum.npz")
    assert sae.layers == [1] and sae.vectors[1].shape == (128,)
    assert (figures / "mlp" / "values_compare_norm-sum_abs.png").is_file()
    assert (figures / "mlp" / "layers" / "values_norm-sum_abs" / "layer_1.png").is_file()
    assert not list(out.rglob("*.png"))  # figures live under plots/, arrays under metrics/
    with np.load(out / "mlp" / "consolidated_results.npz", allow_pickle=False) as data:
        # every layer x aggregation x normalisation x pass, under the gradient tools' names
        assert len(data["keys"]) == 2 * 2 * 2 * 2
        assert np.array_equal(data["layer_1_mean_abs_norm_sum_abs_gradients"], mlp.vectors[1])
        assert "loading" in json.loads(str(data["metadata"][0]))
    timing = json.loads((out / "timing_stats.json").read_text())
    assert set(timing) == {"values", "gradients"} and timing["values"]["tokens"] > 0
    assert "gradients / values time" in (out / "timing_summary.txt").read_text()
    assert (out / "mlp" / "layers" / "values_mean_norm-sum" / "layer_0.npy").is_file()
    timing = json.loads(metrics.read_text())
    assert timing["gradients_over_values"] > 0
    assert json.loads((out / "metadata.json").read_text())["passes"].keys() == {
        "values",
        "gradients",
    }


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_mlp_out_is_what_the_mlp_adds_to_the_residual_stream(arch):
    """resid_post(l) == resid_in(l) + attention's contribution + mlp_out(l), exactly as the
    block adds them; on Gemma that needs the post-feedforward norm's output, not the MLP's."""
    model = tiny_model(arch, layers=2, hidden=32).double()
    site_map = discover_sites(model)
    block = model.get_submodule(f"{site_map.layers_path}.1")
    attn_out = post_norm(block, "o_proj") or block.self_attn  # what attention adds
    seen = {}

    def keep(name):
        def hook(_m, args, out):
            seen[name + "_in"] = args[0] if args else None
            seen[name] = out[0] if isinstance(out, tuple) else out

        return hook

    modules = {
        "block": block,
        "attn": attn_out,
        "mlp": activation_module(model, site_map, 1, "mlp_out"),
    }
    handles = [m.register_forward_hook(keep(k)) for k, m in modules.items()]
    try:
        with torch.no_grad():
            model(torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    resid_in = seen["block_in"]
    added = resid_in + seen["attn"] + seen["mlp"]
    assert torch.allclose(added, seen["block"], atol=1e-10), arch
    assert (post_norm(block, "down_proj") is not None) == (arch == "gemma3")
    assert resid_in.shape[-1] == activation_dim(model, site_map, 1, "mlp_out")
