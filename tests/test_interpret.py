"""Interpret / layer-importance computations on tiny models with known answers."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REPO_PARAMS, write_params
from sklearn.decomposition import PCA

from sponlab.allocations import AllocationConfig
from sponlab.config import ConfigError, Section
from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds, sparsified
from sponlab.method.spon import SponBiases
from sponlab.model.hooks import capture_inputs
from sponlab.model.sites import LayerSelection, Site
from sponlab.model.tiny import tiny_tokenizer
from sponlab.studies.interpret import directions as dr
from sponlab.studies.interpret import params as ia
from sponlab.studies.interpret import shift as sh
from sponlab.studies.interpret import similarity as sim
from sponlab.studies.interpret.alignment import (
    alignment_row,
    alignment_rows,
    collect_moments,
    principal_components,
)
from sponlab.studies.interpret.prompts import (
    Variant,
    kl_reduction,
    load_prompt_sets,
    prompt_batches,
    prompt_effects,
    prompt_variants,
    select_prompts,
)
from sponlab.studies.layers import leave_one_out as la


def teal(model, site_map, blocks, sparsity=0.5):
    thresholds = calibrate_thresholds(model, site_map, blocks, [sparsity])[sparsity]
    return SparsifySpec("teal", sparsity, tuple(site_map.sites), thresholds)


def no_hooks(model, site_map):
    """No hook left on any projection (transformers itself keeps hooks on other modules)."""
    linears = [site_map.linear(model, s) for s in site_map.sites]
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in linears)


# --- params -------------------------------------------------------------------------------------


def test_params_defaults_and_errors_name_the_key():
    params = ia.parse_params(Section({}, "interpret", "p.yaml"))
    assert params.layers.cumulative == "measured" and params.categories is None
    cases = [
        ({"layers": {"cumulative": "greedy"}}, r"interpret\.layers\.cumulative.*measured"),
        ({"sparsity": 1.0}, r"interpret\.sparsity"),
        ({"similarity": ["UNIF-ALL"]}, r"interpret\.similarity"),
        ({"categories": "math"}, r"interpret\.categories"),
        ({"layers": {"targets": [0.8, 1.5]}}, r"interpret\.layers\.targets"),
        ({"colour": "red"}, r"unknown key.*interpret\.colour"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            ia.parse_params(Section(raw, "interpret", "p.yaml"))


def test_check_configs_rejects_untrained_and_teal_only():
    alloc = AllocationConfig("A", LayerSelection("all"), ("o_proj",), sparsify_modules=("o_proj",))
    base = AllocationConfig("T", LayerSelection("none"), (), sparsify_modules=("o_proj",))
    configs = {"A": alloc, "T": base}
    ia.check_configs(["A"], configs, ["A", "T"], "k")
    with pytest.raises(ConfigError, match=r"is not swept \(sweep\.configs, sweep\.ranked\)"):
        ia.check_configs(["A"], configs, ["T"], "k")
    with pytest.raises(ConfigError, match="no SPON biases"):
        ia.check_configs(["T"], configs, ["A", "T"], "k")
    with pytest.raises(ConfigError, match="unknown config 'X'"):
        ia.check_configs(["X"], configs, ["A"], "k")


# --- statistics and chance levels -----------------------------------------------------------


def test_vector_stats_known_values():
    row = ia.vector_stats(torch.tensor([1.0, -1.0, 1.0, -1.0]), act_rms=2.0)
    assert row["mean"] == 0 and row["std"] == 1 and row["l2"] == 2 and row["max_abs"] == 1
    assert row["kurtosis"] == pytest.approx(-2.0)
    assert row["frac_pos"] == 0.5
    assert row["l2_rel"] == pytest.approx(0.5) and row["max_rel"] == pytest.approx(0.5)
    zeros = ia.vector_stats(torch.tensor([0.0, 1e-5, 1.0, -1.0]), act_rms=1.0, near_zero=1e-3)
    assert zeros["frac_zero"] == 0.5
    gen = torch.Generator().manual_seed(0)
    assert abs(ia.excess_kurtosis(torch.randn(200_000, generator=gen))) < 0.05
    uniform = torch.rand(200_000, generator=gen)
    assert ia.excess_kurtosis(uniform) == pytest.approx(-1.2, abs=0.02)


def test_random_baseline_matches_sqrt_2_over_pi_d():
    for dim in (16, 64, 576):
        exact = dr.expected_abs_cos(dim)
        assert exact == pytest.approx(math.sqrt(2 / (math.pi * dim)), rel=0.07)
        assert dr.RandomBaseline(4000, seed=1)(dim) == pytest.approx(exact, rel=0.05)
    assert dr.expected_abs_cos(2) == pytest.approx(2 / math.pi)  # E|cos θ|, θ uniform


def test_layer_norm_rows_rank_layers():
    vecs = {Site(0, "o_proj"): torch.ones(4), Site(1, "o_proj"): 3 * torch.ones(4)}
    rms = {Site(0, "o_proj"): 1.0, Site(1, "o_proj"): 10.0}
    rows = ia.layer_norm_rows(ia.bias_stat_rows(vecs, rms, 1e-3))
    assert [r["rank_l2"] for r in rows] == [2, 1]  # layer 1 has the larger bias
    assert [r["rank_l2_rel"] for r in rows] == [1, 2]  # but the smaller one relative to scale
    assert rows[0]["l2_rel"] == pytest.approx(1.0) and rows[1]["l2_rel"] == pytest.approx(0.3)


def test_shift_rows_drift_reduction():
    rows = sh.shift_rows([0, 1, 2], [0, 1, 1], [0.0, 1.0, 2.0], [0.0, 0.5, 2.0])
    assert math.isnan(rows[0]["drift_reduction"])
    assert [r["drift_reduction"] for r in rows[1:]] == [0.5, 0.0]
    assert sh.drift_by_layer(rows) == {0: 0.5, 1: 0.0}


# --- similarity -------------------------------------------------------------------------------


def test_similarity_identical_negated_and_seed_pairs():
    gen = torch.Generator().manual_seed(0)
    a = {Site(i, "o_proj"): torch.randn(32, generator=gen) for i in range(3)}
    base = dr.RandomBaseline(50)
    same = sim.similarity_summary(
        sim.similarity_rows(a, {k: v.clone() for k, v in a.items()}, base)
    )
    assert same["mean_cos"] == pytest.approx(1.0) and same["shared_sites"] == 3
    neg = sim.similarity_summary(sim.similarity_rows(a, {k: -v for k, v in a.items()}, base))
    assert neg["mean_cos"] == pytest.approx(-1.0) and neg["mean_abs_cos"] == pytest.approx(1.0)
    partial = sim.similarity_rows(a, {Site(1, "o_proj"): a[Site(1, "o_proj")]}, base)
    assert len(partial) == 1
    assert same["chance_abs_cos"] == pytest.approx(dr.expected_abs_cos(32))
    x = AllocationConfig("X", LayerSelection("all"), ("o_proj",), sparsify_modules=("o_proj",))
    assert sim.same_allocation(x, replace(x, name="Y", seeds=(1,)))
    assert not sim.same_allocation(x, replace(x, name="Z", modules=("q_proj",)))
    assert not sim.same_allocation(x, replace(x, name="C", bias="closed_form"))


def test_similarity_table_marks_seed_pairs_and_is_symmetric():
    gen = torch.Generator().manual_seed(2)
    sites = [Site(i, m) for i in range(2) for m in ("o_proj", "down_proj")]
    v = {s: torch.randn(16, generator=gen) for s in sites}
    w = {s: torch.randn(16, generator=gen) for s in sites if s.module == "o_proj"}
    x = AllocationConfig(
        "X", LayerSelection("all"), ("o_proj", "down_proj"), sparsify_modules=("o_proj",)
    )
    configs = {
        "X": x,
        "X1": replace(x, name="X1", seeds=(1,)),
        "Z": replace(x, name="Z", modules=("o_proj",)),
    }
    table = sim.similarity_table(
        ["X", "X1", "Z"], configs, {"X": v, "X1": dict(v), "Z": w}, dr.RandomBaseline(20)
    )
    kinds = {(r["a"], r["b"]): r["kind"] for r in table.pair_rows}
    assert kinds == {("X", "X1"): "seed", ("X", "Z"): "config", ("X1", "Z"): "config"}
    assert table.matrix[0, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(table.matrix, table.matrix.T)
    assert table.summary()["X~Z"]["shared_sites"] == 2
    assert "X vs X1 (seed)" in table.per_layer


# --- alignment --------------------------------------------------------------------------------


def test_bias_equal_to_mean_error_has_cosine_one(llama, blocks):
    model, site_map = llama
    spec = teal(model, site_map, blocks)
    sites = site_map.sites
    dense = collect_moments(model, site_map, sites, blocks, 4)
    sparse = collect_moments(model, site_map, sites, blocks, 4, spec)
    assert no_hooks(model, site_map)
    errors = {s: (dense.mean(s) - sparse.mean(s)).float() for s in sites}
    rows = alignment_rows(errors, dense, sparse, model, site_map, {}, dr.RandomBaseline(20))
    assert all(r["cos_global"] == pytest.approx(1.0) for r in rows)
    assert all(r["error_explained"] == pytest.approx(1.0, abs=1e-6) for r in rows)
    # without sparsification the layer's own-mask error is exactly zero
    site = Site(1, "down_proj")
    assert torch.count_nonzero(dense.local_error(site, site_map.linear(model, site))) == 0


def test_local_error_is_weight_times_mean_masked_input(llama, blocks):
    model, site_map = llama
    spec = teal(model, site_map, blocks)
    site = Site(2, "o_proj")
    linear = site_map.linear(model, site)
    seen = []
    # the capture hook is registered first, so it sees the raw (unsparsified) input
    with (
        torch.no_grad(),
        capture_inputs(model, site_map, [site], lambda s, x: seen.append(x)),
        sparsified(model, site_map, spec),
    ):
        model(blocks)
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    dropped = x * (x.abs() <= spec.thresholds[site])  # x - S(x)
    expected = dropped.mean(0) @ linear.weight.double().T
    sparse = collect_moments(model, site_map, [site], blocks, 6, spec)
    torch.testing.assert_close(sparse.local_error(site, linear), expected, rtol=1e-4, atol=1e-6)


def test_pca_matches_sklearn_and_centring_hides_the_mean():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(200, 12, generator=gen) * torch.linspace(3, 0.5, 12)
    mean = torch.zeros(12)
    mean[-1] = 50.0  # large mean along the lowest-variance axis
    data = data + mean
    comps, ratio = principal_components(data, 4)
    ref = PCA(n_components=4).fit(data.double().numpy())
    cos = np.abs(np.sum(comps.numpy() * ref.components_, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)
    np.testing.assert_allclose(ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-6)
    row = alignment_row(mean, mean, mean, data.mean(0), comps, dr.RandomBaseline(20))
    assert row["cos_dense_mean"] == pytest.approx(1.0, abs=1e-3)
    assert row["max_abs_cos_pc"] < 0.05  # the mean direction is invisible to centred PCA


# --- layer importance -------------------------------------------------------------------------


def test_leave_one_out_zero_biases_give_zero_importance(llama, blocks):
    model, site_map = llama
    spec = teal(model, site_map, blocks)
    zero = SponBiases.for_model(model, site_map, site_map.sites)
    result = la.leave_one_layer_out(model, site_map, blocks[:2], 2, spec, zero, measure_topk=True)
    assert result.benefit == 0.0
    assert all(v == 0.0 for v in result.importance().values())
    curves = la.cumulative_curves(result)
    assert all(math.isnan(v) for v in curves["measured"])
    assert la.layers_needed(curves["measured"], 0.9) is None


def test_leave_one_out_finds_the_only_nonzero_layer(llama, blocks):
    model, site_map = llama
    spec = teal(model, site_map, blocks)
    biases = SponBiases.for_model(model, site_map, site_map.sites)
    with torch.no_grad():
        for site in biases.sites:
            if site.layer == 1:
                biases.vector(site).normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    result = la.leave_one_layer_out(model, site_map, blocks[:2], 2, spec, biases, False)
    imp = result.importance()
    assert imp[1] == pytest.approx(result.benefit) and imp[1] != 0
    assert all(imp[layer] == 0.0 for layer in (0, 2, 3))
    assert result.ranked()[0 if imp[1] > 0 else -1] == 1


def test_cumulative_fractions_and_phase_shares():
    assert la.estimated_fractions([3.0, 1.0, 0.0, -1.0]) == pytest.approx([0.75, 1.0, 1.0, 1.0])
    measured = la.measured_fractions(10.0, 6.0, [8.0, 6.5, 6.0])
    assert measured == pytest.approx([0.5, 0.875, 1.0])
    assert [la.layers_needed(measured, t) for t in (0.5, 0.8, 0.9)] == [1, 2, 3]
    shares = la.phase_shares({0: 1.0, 1: 1.0, 2: 2.0, 3: 0.0, 4: 0.0, 5: -5.0}, 6)
    assert shares == pytest.approx({"early": 0.5, "middle": 0.5, "late": 0.0})
    assert [ia.phase_of(i, 30) for i in (0, 9, 10, 19, 20, 29)] == [
        "early",
        "early",
        "middle",
        "middle",
        "late",
        "late",
    ]


# --- prompts ----------------------------------------------------------------------------------


def test_builtin_prompt_sets():
    sets = load_prompt_sets()
    assert set(sets) >= {"math", "code", "commonsense", "factual", "safety"}
    for prompts in sets.values():
        assert len(prompts) >= 20 and len(set(prompts)) == len(prompts)
    assert list(select_prompts(sets, ["code"], 3)) == ["code"]
    with pytest.raises(ConfigError, match="unknown"):
        select_prompts(sets, ["poetry"], 3)


def test_prompt_effects_exclude_padding(llama, blocks):
    model, site_map = llama
    spec = teal(model, site_map, blocks)
    biases = SponBiases.for_model(model, site_map, site_map.sites)
    with torch.no_grad():
        for vec in biases.vectors:
            vec.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    tok = tiny_tokenizer()
    prompts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14 w15 w16"]
    variants = {"teal": Variant(spec), "spon": Variant(spec, biases)}
    batched = prompt_batches(prompts, tok, 3, 64, bos=True)
    assert batched[0].attention_mask.sum(1).tolist() == [10, 6, 3]
    together = prompt_effects(model, site_map, batched, variants)
    single = [prompt_batches([p], tok, 1, 64, bos=True)[0] for p in prompts]
    apart = prompt_effects(model, site_map, single, variants)
    for name in variants:
        assert together[name].tokens == apart[name].tokens == 19
        assert together[name].kl == pytest.approx(apart[name].kl, rel=1e-4, abs=1e-7)
        np.testing.assert_allclose(together[name].shift_rel, apart[name].shift_rel, rtol=1e-4)
    assert together["spon"].kl != together["teal"].kl
    assert no_hooks(model, site_map)


def test_prompt_variants_share_one_teal_baseline():
    spec = SparsifySpec("topk", 0.5, (Site(0, "o_proj"),))
    other = SparsifySpec("topk", 0.5, (Site(0, "down_proj"),))
    variants, baseline = prompt_variants(
        ["A", "B", "C"], {"A": spec, "B": spec, "C": other}, {"A": None, "B": None, "C": None}
    )
    assert list(variants) == ["TEAL-only", "SPON[A]", "SPON[B]", "TEAL-only[C]", "SPON[C]"]
    assert baseline == {"A": "TEAL-only", "B": "TEAL-only", "C": "TEAL-only[C]"}
    rows = [
        {"category": "math", "variant": "TEAL-only", "kl": 2.0},
        {"category": "math", "variant": "SPON[A]", "kl": 0.5},
    ]
    assert kl_reduction(rows, "A", "TEAL-only") == {"math": 0.75}


def test_output_vectors_of_input_parametrisation(llama):
    model, site_map = llama
    site = Site(0, "down_proj")
    biases = SponBiases.for_model(model, site_map, [site], parametrization="input")
    with torch.no_grad():
        biases.vector(site).fill_(0.1)
    vec = ia.output_vectors(biases, model, site_map)[site]
    weight = site_map.linear(model, site).weight
    torch.testing.assert_close(vec, weight @ torch.full((weight.shape[1],), 0.1))


# --- the two stages end to end on a tiny model (no training: random biases) -------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import yaml

    from sponlab.config import load_params
    from sponlab.io.tensorio import save_tensors
    from sponlab.method.experiment import bias_sites
    from sponlab.method.sparsify import thresholds_to_tensors
    from sponlab.method.spon import save_biases
    from sponlab.model.sites import discover_sites
    from sponlab.model.tiny import save_tiny, tiny_model

    root = tmp_path_factory.mktemp("interpret")
    save_tiny(root / "model", "llama", layers=3, hidden=32)
    model = tiny_model("llama", layers=3, hidden=32)
    site_map = discover_sites(model)
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["base"] = {"source": "hub", "name": "x", "device": "cpu", "dtype": "float32"}
    raw["configs"]["UNIF-ALL"]["seeds"] = [0, 1]
    raw["configs"]["ATTN-ONLY"]["seeds"] = [3]
    raw["sweep"] = {"configs": ["UNIF-ALL", "ATTN-ONLY"], "sparsities": [0.5]}
    raw["interpret"] = {
        "configs": ["UNIF-ALL", "ATTN-ONLY"],
        "similarity": ["UNIF-ALL", "ATTN-ONLY"],
        "blocks": 2,
        "categories": ["math", "safety"],
        "prompts_per_category": 2,
        "layers": {"val_blocks": 2, "batch_size": 2},
        "transfer": {"configs": ["UNIF-ALL", "ATTN-ONLY"], "blocks": 2, "domains": ["code"]},
    }
    raw["data"]["block_len"] = 16
    params = load_params(write_params(root / "params.yaml", raw))
    gen = torch.Generator().manual_seed(0)
    for split in ("test", "val"):
        ids = torch.randint(4, 512, (3, 12), generator=gen)
        save_tensors(root / f"blocks/{split}.safetensors", {"input_ids": ids})
    thresholds = calibrate_thresholds(model, site_map, ids, [0.5])[0.5]
    save_tensors(root / "thresholds/s0.5/all.safetensors", thresholds_to_tensors(thresholds))
    for name in params.sweep_configs:
        sites = bias_sites(params.config(name), site_map)
        for seed in params.config(name).seeds:
            biases = SponBiases.for_model(model, site_map, sites)
            with torch.no_grad():
                for vec in biases.vectors:
                    vec.normal_(0, 0.02, generator=gen)
            save_biases(root / f"spon/{name}/s0.5/seed{seed}/biases.safetensors", biases, {})
        shift = "index,layer,teal_l2,spon_l2,teal_rel,spon_rel\n0,embed,0,0,0,0\n"
        shift += "".join(f"{i + 1},{i},1,0.5,0.1,0.05\n" for i in range(3))
        (root / f"eval/{name}/s0.5").mkdir(parents=True)
        (root / f"eval/{name}/s0.5/shift.csv").write_text(shift)
    return root


def test_stages_write_all_outputs(workspace):
    import json

    from typer.testing import CliRunner

    from sponlab.cli import app

    root = workspace
    common = ["--params", str(root / "params.yaml"), "--model", str(root / "model")]
    common += ["--thresholds", str(root / "thresholds"), "--spon", str(root / "spon")]
    common += ["--evals", str(root / "eval")]
    tables, figures = root / "metrics" / "interpret", root / "plots" / "interpret"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["interpret", *common, "--blocks", str(root / "blocks/test.safetensors"),
         "--tables", str(tables), "--figures", str(figures),
         "--metrics", str(root / "interpret.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["layer-importance", *common, "--blocks", str(root / "blocks/val.safetensors"),
         "--tables", str(tables / "layers"), "--figures", str(figures / "layers"),
         "--metrics", str(root / "layers.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in (
        "bias/UNIF-ALL/s0.5/stats.csv",
        "alignment/UNIF-ALL/s0.5/alignment.csv",
        "alignment/UNIF-ALL/s0.5/residual.csv",
        "shift/UNIF-ALL/s0.5/test.csv",
        "prompts/effects.csv",
        "similarity/pairs.csv",
        "layers/layers.csv",
        "layers/curves.csv",
        "layers/drift_importance.csv",
        "layers/bias_stats.csv",
    ):
        assert (tables / name).stat().st_size > 0, name
    for name in (
        "bias/ATTN-ONLY/s0.5/heatmap.png",
        "alignment/UNIF-ALL/s0.5/alignment.png",
        "shift/UNIF-ALL/s0.5/shift.png",
        "prompts/kl.png",
        "similarity/similarity.png",
        "layers/importance.png",
        "layers/bias_stats.png",
        "layers/drift_importance.png",
        "layers/top_bottom_biases.png",
    ):
        assert (figures / name).stat().st_size > 0, name
    # tables and figures are folded into metrics/ and plots/: no figure among the tables
    assert not list(tables.rglob("*.png")) and not list(figures.rglob("*.csv"))
    metrics = json.loads((root / "interpret.json").read_text())
    assert metrics["similarity"]["UNIF-ALL~UNIF-ALL@seed1"]["kind"] == "seed"
    assert metrics["similarity"]["UNIF-ALL~ATTN-ONLY"]["kind"] == "config"
    assert set(metrics["prompts"]) == {"math", "safety"}
    shift = metrics["checkpoints"]["UNIF-ALL"]["shift"]
    assert shift["test_mean_drift_reduction"] == pytest.approx(0.5)
    layers = json.loads((root / "layers.json").read_text())
    assert set(layers["layers_needed"]) == {"estimated", "measured"}
    assert set(layers["drift_ranking"]["coverage"]) == {"0.8", "0.9", "0.95"}
    resid = metrics["checkpoints"]["UNIF-ALL"]["alignment"]  # per-linear; residual beside it
    assert "max_abs_cos_pc" in resid
    residual = metrics["checkpoints"]["UNIF-ALL"]["residual_alignment"]
    assert 0 <= residual["max_abs_cos_resid_pc"] <= 1
    assert sum(layers["drift_ranking"]["quarter_share"].values()) == pytest.approx(100.0)


def test_residual_alignment_against_known_components(llama):
    from sponlab.studies.interpret.directions import RandomBaseline
    from sponlab.studies.interpret.residual import (
        residual_alignment_rows,
        residual_components,
        residual_samples,
    )

    model, _ = llama
    ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    samples = residual_samples(model, ids, 2, [0, 2], tokens=40, seed=0)
    hidden = model.config.hidden_size
    assert samples[0].shape == (40, hidden) and samples[2].shape == (40, hidden)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True).hidden_states[3]  # after layer 2
    # every sampled row is a real residual-stream vector of layer 2
    flat = out.reshape(-1, hidden)
    assert all(torch.isclose(flat, row).all(dim=1).any() for row in samples[2][:5])
    comps = residual_components(samples, 3)
    assert comps[0].shape == (3, hidden)
    # a bias along PC1 of its layer: |cos| 1 and all its energy in the subspace; a vector whose
    # width is not the hidden size (no residual-stream vector) is skipped
    vectors = {Site(0, "down_proj"): comps[0][0].clone(), Site(2, "o_proj"): comps[2][1] + 0}
    rows = residual_alignment_rows(vectors, comps, RandomBaseline(10, 0))
    assert [r["site"] for r in rows] == ["layers.0.down_proj", "layers.2.o_proj"]
    assert rows[0]["max_abs_cos_resid_pc"] == pytest.approx(1.0)
    assert rows[0]["resid_pc_energy"] == pytest.approx(1.0)
    assert rows[1]["abs_cos_resid_pc2"] == pytest.approx(1.0)
    assert rows[0]["resid_pc_energy_chance"] == pytest.approx(3 / hidden)
    odd = {Site(1, "down_proj"): torch.ones(hidden + 1)}
    assert residual_alignment_rows(odd, {1: comps[0]}, RandomBaseline(10, 0)) == []


def test_transfer_stage_writes_table_figure_metrics_and_findings_rows(workspace):
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from sponlab.cli import app
    from sponlab.sweep.findings import transfer_findings

    root = workspace
    summary = root / "summary.csv"
    pd.DataFrame(
        [
            {"config": c, "sparsity": 0.5, "sparsify": "all", "relative_parameters": r,
             "seeds": 1, "dense_ppl": 500.0, "teal_ppl": 520.0, "spon_ppl": 510.0,
             "spon_ppl_sd": 0.0, "teal_damage": 20.0, "damage_measurable": True,
             "damage_recovered": 0.5, "damage_recovered_sd": 0.0,
             "damage_recovered_seeds": "0.5", "achieved_sparsity": 0.5, "pareto": True}
            for c, r in (("UNIF-ALL", 1.0), ("ATTN-ONLY", 0.3))
        ]
    ).to_csv(summary, index=False)  # fmt: skip
    args = ["transfer", "--params", str(root / "params.yaml"), "--model", str(root / "model")]
    args += ["--thresholds", str(root / "thresholds"), "--spon", str(root / "spon")]
    args += ["--summary", str(summary), "--tables", str(root / "metrics/transfer")]
    args += ["--figures", str(root / "plots/transfer"), "--metrics", str(root / "transfer.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(root / "metrics/transfer/summary.csv")
    assert sorted(table["domain"].unique()) == ["code", "wikipedia (test)"]
    code = table[table["domain"] == "code"].set_index("config")
    assert code.loc["UNIF-ALL", "seeds"] == 2 and code.loc["ATTN-ONLY", "seeds"] == 1
    assert (root / "plots/transfer/damage_by_domain.png").stat().st_size > 0
    assert "| code | 0.5 | UNIF-ALL |" in (root / "metrics/transfer/summary.md").read_text()
    metrics = json.loads((root / "transfer.json").read_text())
    assert set(metrics["code"]) == {"UNIF-ALL", "ATTN-ONLY"}
    claims = {f.claim for f in transfer_findings(table)}
    assert {"transfer@code", "a@code", "b@code"} <= claims
    assert "damage_recovered_block_se" in table


def test_gemma_post_norm_sites_are_not_residual_directions():
    from sponlab.model.sites import discover_sites
    from sponlab.model.tiny import tiny_model
    from sponlab.studies.interpret.directions import RandomBaseline
    from sponlab.studies.interpret.residual import post_norm_sites, residual_alignment_rows

    gemma = tiny_model("gemma3", seed=0)
    gemma_map = discover_sites(gemma)
    sites = gemma_map.select([0, 1], ["o_proj", "down_proj", "q_proj"])
    assert post_norm_sites(gemma, gemma_map, sites) == {
        s for s in sites if s.module in ("o_proj", "down_proj")
    }
    llama = tiny_model("llama", seed=0)
    llama_map = discover_sites(llama)
    assert post_norm_sites(llama, llama_map, llama_map.sites) == set()
    hidden = gemma.config.get_text_config().hidden_size
    vectors = {s: torch.randn(hidden) for s in sites if s.module != "q_proj"}
    comps = {0: torch.eye(hidden)[:2], 1: torch.eye(hidden)[:2]}
    baseline = RandomBaseline(count=8, seed=0)
    assert len(residual_alignment_rows(vectors, comps, baseline)) == 4  # without the check
    skip = post_norm_sites(gemma, gemma_map, vectors)
    assert residual_alignment_rows(vectors, comps, baseline, skip) == []
