"""Weight-spectrum analysis: known answers on hand-made matrices and tiny random models."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sponlab.config import ConfigError, Section
from sponlab.model.sites import PROJECTIONS, Site, discover_sites
from sponlab.model.tiny import ARCHITECTURES, save_tiny, tiny_model
from sponlab.studies.spectrum import attention_kernels as kn
from sponlab.studies.spectrum import spectrum as sp
from sponlab.studies.spectrum import trends as tr
from sponlab.studies.spectrum.report import (
    DOWN_HEADERS,
    ERANK_HEADERS,
    PHASE_HEADERS,
    TREND_HEADERS,
    render_report,
)
from sponlab.studies.spectrum.stats import eigen_summary, milestone_counts, statistics, tables

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def tiny_llama():
    """A bare tiny Llama (seed 1), shared by the module (conftest's ``llama`` is a pair)."""
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def result(tiny_llama):
    return sp.analyse(tiny_llama, sp.SpectrumParams())


# --- effective rank -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 32])
def test_identity_has_full_effective_rank(n):
    assert kn.matrix_effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-9)


def test_rank_one_has_effective_rank_one():
    u, v = torch.randn(40, 1), torch.randn(1, 24)
    assert kn.matrix_effective_rank(u @ v) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_of_known_spectra():
    # two equal singular values -> 2; zero matrix -> 0; p = (1/2, 1/4, 1/4) -> exp(1.5 ln 2)
    assert kn.entropy_effective_rank(torch.tensor([3.0, 3.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert kn.matrix_effective_rank(torch.zeros(4, 6)) == 0.0
    expected = math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert kn.entropy_effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(expected)
    # rectangular diag(1, 1, 1) padded with zeros: rank 3 regardless of dtype (bf16 converted)
    w = torch.zeros(3, 7, dtype=torch.bfloat16)
    w[:, :3] = torch.eye(3)
    assert kn.matrix_effective_rank(w) == pytest.approx(3.0)


# --- dimensions, shapes, GQA ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dims_and_shapes_every_architecture(arch):
    model = tiny_model(arch)
    dims = kn.model_dims(model.config)
    assert (dims.layers, dims.hidden, dims.intermediate) == (4, 64, 128)
    assert (dims.heads, dims.kv_heads, dims.head_dim, dims.vocab, dims.group) == (4, 2, 16, 512, 2)
    kn.check_shapes(model, discover_sites(model), dims)  # no error


def test_shape_mismatch_names_the_projection(tiny_llama):
    dims = dataclasses.replace(kn.model_dims(tiny_llama.config), kv_heads=1)
    with pytest.raises(kn.ShapeError, match=r"layers\.0\.k_proj.*\(32, 64\).*\(16, 64\)"):
        kn.check_shapes(tiny_llama, discover_sites(tiny_llama), dims)


def test_gqa_head_mapping():
    assert [kn.kv_head_for(h, 4, 2) for h in range(4)] == [0, 0, 1, 1]
    assert [kn.kv_head_for(h, 9, 3) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [kn.kv_head_for(h, 4, 4) for h in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        kn.kv_head_for(4, 4, 2)


def test_head_weights_pair_each_query_head_with_its_kv_head(tiny_llama):
    sites = discover_sites(tiny_llama)
    dims = kn.model_dims(tiny_llama.config)
    q_w = sites.linear(tiny_llama, Site(1, "q_proj")).weight
    k_w = sites.linear(tiny_llama, Site(1, "k_proj")).weight
    q, k = kn.head_weights(q_w, k_w, dims)  # [H, d, D]
    d = dims.head_dim
    for h in range(dims.heads):
        g = h // 2
        assert torch.equal(q[h], q_w[h * d : (h + 1) * d].double())
        assert torch.equal(k[h], k_w[g * d : (g + 1) * d].double())


def test_zeroing_one_kv_head_zeroes_exactly_its_query_heads():
    model = tiny_model("llama", seed=2)
    sites = discover_sites(model)
    dims = kn.model_dims(model.config)
    with torch.no_grad():
        sites.linear(model, Site(0, "k_proj")).weight[dims.head_dim :] = 0  # KV head 1
    layer = sp.layer_spectrum(model, sites, dims, 0, ("k_proj",))
    assert layer.kernel_erank[2] == 0 and layer.kernel_erank[3] == 0
    assert (layer.kernel_erank[:2] > 1).all()


# --- attention kernel against the direct hidden x hidden computation ---------------------------


def test_kernel_spectrum_matches_direct_computation(tiny_llama):
    sites = discover_sites(tiny_llama)
    dims = kn.model_dims(tiny_llama.config)
    q, k = kn.head_weights(
        sites.linear(tiny_llama, Site(2, "q_proj")).weight,
        sites.linear(tiny_llama, Site(2, "k_proj")).weight,
        dims,
    )
    small_sv = kn.kernel_singular_values(q, k)  # [H, d]
    small_asym = kn.kernel_asymmetry(q, k)  # [H]
    layer = sp.layer_spectrum(tiny_llama, sites, dims, 2, ())
    for h in range(dims.heads):
        a = q[h].T @ k[h]  # [D, D]: the full kernel W_Q_h^T W_K_g, built directly
        assert a.shape == (dims.hidden, dims.hidden)
        full_sv = torch.linalg.svdvals(a)
        assert torch.linalg.matrix_rank(a) <= dims.head_dim
        torch.testing.assert_close(small_sv[h], full_sv[: dims.head_dim], rtol=1e-8, atol=1e-12)
        assert layer.kernel_erank[h] == pytest.approx(kn.entropy_effective_rank(full_sv), rel=1e-6)
        direct_asym = torch.linalg.norm(a - a.T) / torch.linalg.norm(a)
        assert float(small_asym[h]) == pytest.approx(float(direct_asym), rel=1e-8)
        # nonzero eigenvalues of the D x D kernel == eigenvalues of the d x d K Q^T
        full_eig = torch.linalg.eigvals(a)
        full_eig = full_eig[full_eig.abs().argsort(descending=True)][: dims.head_dim]
        small_eig = kn.kernel_eigenvalues(q[h], k[h])
        torch.testing.assert_close(
            torch.sort(small_eig.real).values, torch.sort(full_eig.real).values, atol=1e-9, rtol=0
        )
        torch.testing.assert_close(small_eig.abs(), full_eig.abs(), atol=1e-9, rtol=1e-7)


def test_asymmetry_of_symmetric_and_antisymmetric_kernels():
    q = torch.randn(4, 10, dtype=torch.float64)
    m = torch.randn(4, 4, dtype=torch.float64)
    k_sym = (m @ m.T) @ q  # A = q^T m m^T q: symmetric
    assert float(kn.kernel_asymmetry(q, k_sym)) == pytest.approx(0.0, abs=1e-7)
    k_anti = (m - m.T) @ q  # A = q^T (m - m^T) q: antisymmetric, ||A - A^T|| = 2 ||A||
    assert float(kn.kernel_asymmetry(q, k_anti)) == pytest.approx(2.0, rel=1e-9)


def test_focus_kernel_energy_counts():
    # diagonal kernel in the first 4 coordinates with energies 9, 4, 1, 0 (one zero eigenvalue)
    q = torch.eye(4, 8, dtype=torch.float64)
    k = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)) @ q
    focus = kn.focus_kernel(q, k, layer=0, head=0, kv_head=0, fraction=0.9)
    np.testing.assert_allclose(np.abs(focus.eigenvalues), [3, 2, 1, 0], atol=1e-12)
    np.testing.assert_allclose(focus.eig_energy, np.cumsum([9, 4, 1, 0]) / 14)
    assert focus.eig_count == 2 and focus.sv_count == 2  # 13/14 >= 0.9 > 9/14
    assert focus.asymmetry == pytest.approx(0.0, abs=1e-12)


# --- down_proj SVD ------------------------------------------------------------------------------


def test_down_svd_on_known_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    u = torch.linalg.qr(torch.randn(4, 4))[0]
    v = torch.linalg.qr(torch.randn(9, 4))[0]
    down = kn.down_svd(u @ torch.diag(s) @ v.T, layer=3, thresholds=(0.5, 0.9, 0.99))
    energy = np.array([16, 4, 1, 0.25]) / 21.25
    np.testing.assert_allclose(down.explained, energy, rtol=1e-5)
    assert down.components == {0.5: 1, 0.9: 2, 0.99: 4}  # 0.753, 0.941, 0.988, 1.0
    assert down.condition_number == pytest.approx(8.0, rel=1e-5)
    assert (down.top, down.smallest) == pytest.approx((4.0, 0.5), rel=1e-5)
    assert kn.down_svd(torch.ones(3, 3), 0, (0.5,)).condition_number > 1e6  # rank 1


# --- phases and trends --------------------------------------------------------------------------


def test_phase_split_and_stats():
    # the notebook: third = L // 3, early [0, third), middle [third, 2 third), late the rest
    assert [len(v) for v in tr.phase_layers(30).values()] == [10, 10, 10]
    assert tr.phase_layers(10) == {"early": [0, 1, 2], "middle": [3, 4, 5], "late": [6, 7, 8, 9]}
    assert tr.phase_layers(4) == {"early": [0], "middle": [1], "late": [2, 3]}
    stats = tr.phase_stats([1.0, 3.0, 2.0, 2.0, 10.0, 20.0])
    early = stats[0]
    # std with ddof=1 as pandas: values 1, 3 -> sqrt(2)
    assert (early.phase, early.layers, early.mean) == ("early", (0, 1), 2.0)
    assert early.std == pytest.approx(math.sqrt(2))
    assert (early.min, early.max, early.median, early.range) == (1.0, 3.0, 2.0, 2.0)
    assert early.cv == pytest.approx(math.sqrt(2) / 2)
    assert stats[2].mean == 15.0 and stats[2].range == 10.0
    assert math.isnan(tr.phase_stats([1.0, 2.0])[0].mean)  # fewer layers than phases
    assert math.isnan(tr.phase_stats([1.0, 2.0, 3.0])[0].std)  # one layer: no sample std


def test_notebook_trend_verdicts():
    assert tr.notebook_trend([5, 3, 4]) == "U-SHAPE"
    assert tr.notebook_trend([5, 4, 3]) == "MONOTONE DOWN"
    assert tr.notebook_trend([3, 4, 5]) == "MONOTONE UP"
    assert tr.notebook_trend([3, 5, 4]) == "OTHER"
    assert tr.notebook_trend([3, 3, 3]) == "OTHER"  # no tolerance: ties are not a trend


@pytest.mark.parametrize(
    ("values", "label"),
    [
        ([5, 5, 3, 3, 5, 5], "U-shape"),
        ([1, 1, 4, 4, 2, 2], "inverted-U"),
        (list(range(9)), "monotone up"),
        ([1, 1, 1, 1, 3, 3], "monotone up"),  # flat then rising
        ([9, 8, 7, 6, 5, 4, 3, 2, 1], "monotone down"),
        ([10, 10, 10.05, 10.05, 9.98, 9.98], "flat"),
        ([10, 10, 10.3, 10.3, 10.1, 10.1], "other"),  # rise beyond tol, net within tol
        ([1.0, 2.0], "other"),
    ],
)
def test_trend_labels_on_hand_made_sequences(values, label):
    assert tr.layer_trend(values, tolerance=0.02).label == label


def test_trend_other_when_middle_rises_but_net_change_is_small():
    # tol ~0.21: d1 = +1 > tol, d2 = -0.15 within tol, net = 0.85 > tol -> monotone up
    assert tr.classify_trend([10, 11, 10.85], 0.02) == "monotone up"
    assert tr.classify_trend([10, 11, 10.5], 0.02) == "inverted-U"  # d2 = -0.5 < -tol
    assert tr.classify_trend([10, 10.3, 10.1], 0.02) == "other"  # tol ~0.2: d1 > tol, net <= tol


def test_largest_jump_and_drop():
    trend = tr.layer_trend([1.0, 1.5, 4.0, 3.0, 0.0, 0.5], tolerance=0.02)
    assert trend.jump == (1, 2.5) and trend.drop == (3, -3.0)
    assert tr.layer_trend([1.0, 2.0, 3.0], 0.02).drop is None


# --- params -------------------------------------------------------------------------------------


def _parse(data):
    return sp.parse_params(Section(data, "spectrum", "params.yaml"))


def test_params_defaults_and_repo_section():
    from sponlab.config import load_params
    from sponlab.studies.spectrum.spectrum import spectrum_params

    assert _parse({}) == sp.SpectrumParams()
    params = spectrum_params(load_params(PARAMS))
    assert isinstance(params, sp.SpectrumParams)
    assert params.modules == PROJECTIONS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"tag_reference": "mean"},
            r"spectrum\.tag_reference must be one of \['percentile', 'median', 'absolute'\]",
        ),
        ({"kernel_layer": "top"}, r"spectrum\.kernel_layer must be 'middle' or a layer index"),
        ({"tag_low": 1.2, "tag_high": 1.1}, r"spectrum\.tag_low must be < tag_high"),
        ({"energy_thresholds": [0.5, 1.5]}, r"spectrum\.energy_thresholds\[1\]"),
        ({"modules": ["qkv"]}, r"spectrum\.modules has unknown module"),
        ({"kernel_head": -1}, r"spectrum\.kernel_head must be >= 0"),
        ({"svd_layer": 3}, r"unknown key\(s\) \['spectrum\.svd_layer'\]"),
    ],
)
def test_bad_params_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        _parse(data)


def test_layer_and_head_choices_resolved_against_the_model(tiny_llama):
    assert sp.resolve_layer("middle", 30, "down_layer") == 15
    assert sp.resolve_layer(-1, 30, "down_layer") == 29
    with pytest.raises(ConfigError, match=r"spectrum\.kernel_layer = 4 is out of range.*4 layers"):
        sp.resolve_layer(4, 4, "kernel_layer")
    with pytest.raises(ConfigError, match=r"spectrum\.kernel_head = 4 .* 4 query heads"):
        sp.analyse(tiny_llama, sp.SpectrumParams(kernel_head=4))


# --- whole analysis, report and stage -------------------------------------------------------


def test_threads_give_the_same_result_as_serial(tiny_llama, result):
    serial = sp.analyse(tiny_llama, sp.SpectrumParams(workers=1))
    for name in result.series:
        np.testing.assert_allclose(serial.erank(name), result.erank(name), rtol=1e-6)
    assert result.erank("down_proj")[1] == pytest.approx(
        kn.matrix_effective_rank(
            discover_sites(tiny_llama).linear(tiny_llama, Site(1, "down_proj")).weight
        )
    )


def test_head_tags_by_percentile_of_head_means(result):
    erank = result.kernel_erank  # [L, H]
    low, high = result.tag_thresholds
    assert low == pytest.approx(np.percentile(erank.mean(axis=0), 25))
    assert high == pytest.approx(np.percentile(erank.mean(axis=0), 75))
    # 4 heads with means 1, 2, 3, 4 over two layers: 25th pct 1.75, 75th 3.25
    erank = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    tags, low, high = sp.tag_heads(erank, sp.SpectrumParams())
    assert (low, high) == (1.75, 3.25)
    assert tags.tolist() == [["low", "mid", "mid", "high"]] * 2


def test_head_tags_relative_to_median():
    forced = sp.tag_heads(
        np.array([[1.0, 5.0, 10.0]]),
        sp.SpectrumParams(tag_reference="median", tag_low=0.8, tag_high=1.1),
    )
    assert forced[0].tolist() == [["low", "mid", "high"]]
    absolute = sp.SpectrumParams(tag_reference="absolute", tag_low=2.0, tag_high=9.0)
    assert sp.tag_heads(np.array([[1.0, 5.0, 10.0]]), absolute)[0].tolist() == [
        ["low", "mid", "high"]
    ]


def _table_rows(markdown: str, headers) -> list[list[str]]:
    """Data rows of the Markdown table whose header row is exactly ``headers``."""
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(headers) + " |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_report_tables(result):
    from sponlab.studies.spectrum.plots import FIGURES

    figures = {name: f"figures/{file}" for name, file in FIGURES.items()}
    md = render_report(result, figures, model="tiny")
    names = [*PROJECTIONS, sp.KERNEL_TYPE]
    summary = _table_rows(md, ERANK_HEADERS)
    assert [row[0] for row in summary] == names
    assert summary[0][1:3] == ["64x64", "4"] and summary[1][1:3] == ["32x64", "4"]
    # per phase: one table per phase with one row per weight type (L=4: early 0, middle 1, late 2-3)
    assert len(_table_rows(md, PHASE_HEADERS)) == len(names)
    assert "#### early (0)" in md and "#### late (2-3)" in md
    trends = _table_rows(md, TREND_HEADERS)
    assert [row[0] for row in trends] == names
    assert all(row[4] in ("U-SHAPE", "MONOTONE DOWN", "MONOTONE UP", "OTHER") for row in trends)
    assert all(row[5] in tr.TRENDS for row in trends)
    assert [row[0] for row in _table_rows(md, DOWN_HEADERS)] == ["50%", "75%", "90%", "95%", "99%"]
    per_layer = _table_rows(md, ("layer", *PROJECTIONS, sp.KERNEL_TYPE))
    assert [row[0] for row in per_layer] == ["0", "1", "2", "3"]
    assert set(re.findall(r"\]\((figures/[^)]+)\)", md)) == set(figures.values())
    assert "asymmetry \\|\\|A - A^T\\|\\|" in md  # pipes escaped inside tables
    # the notebook's section order
    order = [
        "## Model configuration",
        "## Attention kernel analysis",
        "## Attention kernel effective rank: all layers x all heads",
        "## W_down SVD analysis",
        "## Effective rank by layer and weight type",
        "## Phase analysis",
    ]
    assert [md.index(h) for h in order] == sorted(md.index(h) for h in order)
    frames = tables(result)
    assert len(frames["erank"]) == 4 * 7 and len(frames["kernel_heads"]) == 4 * 4
    assert frames["kernel_heads"]["kv_head"].tolist()[:4] == [0, 0, 1, 1]


def test_focus_head_statistics_on_a_kernel_with_known_eigenvalues():
    # head_dim 2, hidden 4: A = Q^T K = diag(2, -3, 0, 0)
    q = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    k = torch.tensor([[2.0, 0, 0, 0], [0, -3.0, 0, 0]], dtype=torch.float64)
    focus = kn.focus_kernel(q, k, layer=1, head=0, kv_head=0, fraction=0.99)
    s = eigen_summary(focus, hidden=4)
    assert (s["eigenvalues"], s["nonzero"], s["complex"], s["real"]) == (4, 2, 0, 4)
    assert (s["positive_real"], s["negative_real"]) == (1, 1)
    p = np.array([0.6, 0.4])  # |lambda| / sum |lambda| of the non-zero ones (3, 2)
    assert s["effective_rank_eigen"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert s["nonzero_percentiles"]["0"] == pytest.approx(2.0)
    assert s["nonzero_percentiles"]["50"] == pytest.approx(2.5)
    assert s["nonzero_percentiles"]["100"] == pytest.approx(3.0)
    # energy 9 + 4: the first eigenvalue holds 9/13 = 69%
    assert s["milestones"] == {"0.5": 1, "0.75": 2, "0.9": 2, "0.95": 2, "0.99": 2}
    assert s["asymmetry"] == pytest.approx(0.0, abs=1e-12)  # diagonal kernel
    assert milestone_counts(np.array([1.0, 1.0, 1.0, 1.0]), (0.5, 0.75, 1.0)) == {
        "0.5": 2,
        "0.75": 3,
        "1": 4,
    }


def test_statistics_json_holds_the_report_numbers(result):
    stats = statistics(result, "tiny")
    assert stats["config"]["kv_dim"] == stats["config"]["head_dim"] * stats["config"]["kv_heads"]
    heads = stats["kernel_heatmap"]["per_head"]
    assert [h["head"] for h in heads] == [0, 1, 2, 3]
    assert {h["category"] for h in heads} <= {"LOW-RANK", "MID", "HIGH-RANK"}
    er = result.kernel_erank
    assert stats["kernel_heatmap"]["global"]["std"] == pytest.approx(er.std())  # numpy, ddof=0
    down = result.erank("down_proj")
    assert stats["weight_types"]["down_proj"]["variance"] == pytest.approx(down.var())
    pooled = stats["phases"]["pooled"]["late"]  # layers 2-3 of every projection, ddof=1
    values = np.concatenate([result.erank(m)[[2, 3]] for m in result.modules])
    assert pooled["std"] == pytest.approx(values.std(ddof=1))


def test_stage_writes_report_figures_and_metrics(tmp_path):
    from sponlab.io.tensorio import read_json
    from sponlab.stages.spectrum import main

    model_dir = save_tiny(tmp_path / "model", "qwen3", seed=3)
    out, metrics = tmp_path / "metrics" / "spectrum", tmp_path / "metrics" / "spectrum.json"
    figures = tmp_path / "plots" / "spectrum"
    main(params_file=PARAMS, model=model_dir, tables=out, figures=figures, metrics=metrics)
    md = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", md)
    assert len(links) == 6 and all((out / link).resolve().parent == figures for link in links)
    assert all((out / link).is_file() and link.startswith("../../plots/") for link in links)
    assert read_json(out / "statistics.json")["config"]["layers"] == 4
    for stem in ("erank", "kernel_heads", "kernel_focus_eigs", "down_svd", "phases", "trends"):
        assert (out / f"{stem}.csv").is_file()
    summary = read_json(metrics)
    assert set(summary["erank_mean"]) == {*PROJECTIONS, sp.KERNEL_TYPE}
    assert summary["down_proj"]["layer"] == 2 and summary["down_proj"]["condition_number"] > 1
    assert 0 < summary["kernel"]["erank_median"] <= 16
