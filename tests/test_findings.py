"""Summary rows with seeds and the claim verdicts, on synthetic cells with known answers."""

import pandas as pd
import pytest

from sponlab.sweep.budget import budget_line, curve_line, default_recovered
from sponlab.sweep.findings import (
    claim_a,
    claim_b,
    claim_c,
    claim_d,
    closed_form_free,
    closed_form_init,
    false_positive_line,
    findings_json,
    study_findings,
    transfer_findings,
)
from sponlab.sweep.summary import cell_result, seed_values, summary_table, to_markdown


def evaluation(config, values, teal=60.0, dense=40.0, params=100, sparsify="all", ok=True):
    """An evaluate metrics.json whose seeds recover ``values`` of the damage."""
    ppls = [teal - v * (teal - dense) for v in values]
    mean = sum(ppls) / len(ppls)
    seeds = [
        {"seed": i, "ppl": p, "nll": 0.0, "tokens": 10, "kl": 0.1, "damage_recovered": v}
        for i, (p, v) in enumerate(zip(ppls, values, strict=True))
    ]
    dr = sum(values) / len(values)
    sd = None if len(values) < 2 else pd.Series(values).std()
    return {
        "config": config,
        "sparsity": 0.5,
        "sparsify": sparsify,
        "dense_ppl": dense,
        "teal": {"ppl": teal, "kl": 0.2},
        "spon_seeds": seeds,
        "spon": {"ppl": {"mean": mean, "sd": None}, "kl": {"mean": 0.1}},
        "damage_recovered": {"mean": dr, "sd": sd},
        "teal_damage": {"measurable": ok},
        "bias_parameters": params,
        "achieved_sparsity": {"mean": 0.5 if ok else 0.45},
    }


def training(n, params=100):
    return [{"layers": "all", "modules": ["down_proj"], "parameters": params, "best_epoch": 1,
             "epochs": [{"val_kl": 0.3}, {"val_kl": 0.2}]} for _ in range(n)]  # fmt: skip


def frame(cells):
    return summary_table(
        [cell_result(evaluation(*c[:2], **c[2]), training(len(c[1])), 10_000) for c in cells],
        reference="UNIF-ALL",
    )


def test_summary_marks_noise_and_relative_parameters():
    table = frame(
        [
            ("UNIF-ALL", [0.30, 0.34, 0.26], {}),
            ("TOP-50", [0.29, 0.33, 0.27], {"params": 50}),
            ("ATTN-ONLY", [0.70, 0.72, 0.68], {}),
            ("STUDY-ATTN-ONLY", [1.5], {"sparsify": "o_proj", "teal": 40.1, "ok": False}),
        ]
    ).set_index("config")
    assert table.loc["TOP-50", "relative_parameters"] == 0.5
    assert table.loc["UNIF-ALL", "vs_reference"] == "ref"
    assert table.loc["TOP-50", "vs_reference"] == "inconclusive"
    assert table.loc["ATTN-ONLY", "vs_reference"] == "better"
    # another TEAL set is not compared; unmeasurable damage gives no ratio
    assert table.loc["STUDY-ATTN-ONLY", "vs_reference"] == ""
    assert pd.isna(table.loc["STUDY-ATTN-ONLY", "damage_recovered"])
    assert table.loc["UNIF-ALL", "damage_recovered"] == pytest.approx(0.30)
    assert table.loc["UNIF-ALL", "ppl_reduction_vs_teal"] == pytest.approx(6 / 60)
    assert table.loc["UNIF-ALL", "above_dense"] == pytest.approx(14 / 40)
    text = to_markdown(table.reset_index())
    assert "30.0 ± 4.0%" in text and "inconclusive" in text and "% PPL vs TEAL" in text
    assert "0.450 (off by -0.050)" in text and "0.500 |" in text


def test_noise_aware_pareto():
    table = frame(
        [
            ("UNIF-ALL", [0.30, 0.31, 0.29], {}),
            ("TOP-50", [0.29, 0.33, 0.27], {"params": 50}),  # as good within noise, half the size
            ("TOP-75", [0.40, 0.41, 0.39], {"params": 75}),  # better beyond noise
            ("BOTTOM-50", [0.10, 0.11, 0.09], {"params": 50}),  # worse than TOP-50
        ]
    ).set_index("config")
    assert table["pareto"].to_dict() == {
        "BOTTOM-50": False, "TOP-50": True, "TOP-75": True, "UNIF-ALL": False
    }  # fmt: skip


def test_no_noise_estimate_is_said_not_called_within_noise():
    table = frame([("UNIF-ALL", [0.30], {}), ("TOP-50", [0.2], {"params": 50})])
    assert list(table["vs_reference"]) == ["no seed spread", "ref"]


def test_seed_values_survive_a_csv_round_trip(tmp_path):
    table = frame([("UNIF-ALL", [0.30], {}), ("TOP-50", [0.2], {"params": 50})])
    table.to_csv(tmp_path / "s.csv", index=False)
    back = pd.read_csv(tmp_path / "s.csv")  # single values come back as floats
    assert [seed_values(v) for v in back["damage_recovered_seeds"]] == [[0.2], [0.3]]
    assert seed_values(float("nan")) == [] and seed_values("0.1;0.2") == [0.1, 0.2]


def verdicts(findings):
    return [f.verdict for f in findings]


@pytest.mark.parametrize(
    ("attn", "direction", "size"),
    [
        ([0.31, 0.29, 0.33], "inconclusive", "contradicted"),  # gap +1 point, CI straddles 0
        ([0.70, 0.72, 0.68], "supported", "contradicted"),  # +40 points: right sign, too small
        ([0.85, 0.86, 0.84], "supported", "supported"),  # +55 points, as the study
        ([0.10, 0.12, 0.11], "contradicted", "contradicted"),
    ],
)
def test_claim_a_direction_and_size_are_separate_verdicts(attn, direction, size):
    table = frame([("UNIF-ALL", [0.30, 0.31, 0.29], {}), ("ATTN-ONLY", attn, {})])
    found = claim_a(table, 0.5, "ATTN-ONLY", "UNIF-ALL")
    assert verdicts(found) == [direction, size] and "t(" in found[0].test


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ([0.20, 0.22, 0.18], "contradicted"),  # 67% of the benefit
        ([0.28, 0.30, 0.26], "inconclusive"),  # 93%, but the noise reaches below 85%
        ([0.33, 0.34, 0.32], "supported"),  # 110%, clearly above 85%
    ],
)
def test_claim_b_is_a_one_sided_test_of_85_percent(top, expected):
    table = frame([("UNIF-ALL", [0.30, 0.34, 0.26], {}), ("TOP-50", top, {"params": 50})])
    found = claim_b(table, 0.5)
    assert found.verdict == expected and "one-sided" in found.test
    assert "% [" in found.ours  # the share with its interval


def test_block_noise_widens_the_interval():
    table = frame([("UNIF-ALL", [0.30, 0.31, 0.29], {}), ("ATTN-ONLY", [0.70, 0.72, 0.68], {})])
    assert claim_a(table, 0.5, "ATTN-ONLY", "UNIF-ALL")[0].verdict == "supported"
    table["damage_recovered_block_se"] = 0.3  # test blocks too few to tell
    assert claim_a(table, 0.5, "ATTN-ONLY", "UNIF-ALL")[0].verdict == "inconclusive"


def test_no_ratio_when_the_denominator_is_within_noise():
    table = frame([("UNIF-ALL", [0.02, -0.03, 0.01], {}), ("TOP-50", [0.01, 0.0, 0.02], {})])
    assert "share undefined" in claim_b(table, 0.5).ours


def test_claim_c_needs_farther_states_and_a_gain_beyond_noise():
    table = frame([("UNIF-ALL", [0.30, 0.34, 0.26], {})])
    row = table.iloc[0]
    farther = [{"index": i, "teal_rel": 0.1, "spon_rel": 0.2 if i < 4 else 0.05} for i in range(6)]
    assert claim_c(farther, row, 0.5, "UNIF-ALL").verdict == "supported"
    closer = [{"index": i, "teal_rel": 0.1, "spon_rel": 0.05} for i in range(6)]
    assert claim_c(closer, row, 0.5, "UNIF-ALL").verdict == "contradicted"
    noisy = frame([("UNIF-ALL", [0.30, -0.2, 0.05], {})]).iloc[0]
    assert claim_c(farther, noisy, 0.5, "UNIF-ALL").verdict == "inconclusive"


def similarity(config_cosines, same_seed_cosine=0.99):
    pairs = {f"A~B{i}": {"kind": "config", "shared_sites": 3, "mean_cos": c, "same_seed": False}
             for i, c in enumerate(config_cosines)}  # fmt: skip
    pairs["A~B"] = {"kind": "config", "shared_sites": 3, "mean_cos": same_seed_cosine,
                    "same_seed": True}  # fmt: skip
    pairs["A~A@1"] = {"kind": "seed", "shared_sites": 3, "mean_cos": 0.9, "same_seed": False}
    pairs["A~D"] = {"kind": "config", "shared_sites": 0, "mean_cos": None, "same_seed": False}
    return pairs


@pytest.mark.parametrize(
    ("cosines", "expected"),
    [
        ([0.50, 0.52, 0.48], "contradicted"),
        ([0.97, 0.975, 0.98], "supported"),
        ([0.90, 0.99, 0.94], "inconclusive"),
    ],
)
def test_claim_d_uses_cross_seed_pairs_against_the_study(cosines, expected):
    found = claim_d(similarity(cosines), 0.5)
    assert found.verdict == expected
    assert "0.990" not in found.ours  # the same-seed pair is left out


def test_study_findings_and_counts():
    table = frame(
        [
            ("UNIF-ALL", [0.30, 0.34, 0.26], {}),
            ("TOP-50", [0.20, 0.22, 0.18], {"params": 50}),
            ("ATTN-ONLY", [0.31, 0.29, 0.33], {}),
            ("CLOSED-FORM", [0.03], {}),
        ]
    )
    farther = [{"index": i, "teal_rel": 0.1, "spon_rel": 0.2} for i in range(6)]
    curves = {"UNIF-ALL": [[0.5, 0.40, 0.38], [0.5, 0.41, 0.37], [0.5, 0.39, 0.36]]}
    curves["UNIF-ALL-CF-INIT"] = [[0.45, 0.30, 0.29]]
    found = study_findings(table, {0.5: farther}, similarity([0.5, 0.6]), 0.5, {0.5: curves})
    report = findings_json(found)
    assert set(report["claims"]) == {
        "a.s50", "a-size.s50", "b.s50", "c.s50", "d.s50", "cf.s50", "cf-init.s50"
    }  # fmt: skip
    assert report["claims"]["cf.s50"]["verdict"] == "supported"  # training adds to the CF
    assert report["claims"]["cf-init.s50"]["verdict"] == "supported"  # lower KL after epoch 1
    assert report["tests"] == 7 and report["expected_false_positives"] == pytest.approx(0.35)
    assert "7 verdicts at 95%" in false_positive_line(found)
    curves["UNIF-ALL-CF-INIT"] = [[0.45, 0.41, 0.40]]
    assert closed_form_init(curves, 0.5).verdict == "inconclusive"
    assert closed_form_free(table, 0.5).verdict == "supported"


def test_transfer_claim_per_domain():
    table = frame(
        [
            ("UNIF-ALL", [-0.08, -0.06, -0.07], {}),  # worse than TEAL alone on this domain
            ("TOP-50", [0.05, -0.04, 0.01], {"params": 50}),
            ("ATTN-ONLY", [0.10, 0.12, 0.11], {}),
        ]
    )
    table["domain"] = "stories"
    found = {f.statement.split(":")[0]: f.verdict for f in transfer_findings(table)
             if f.claim == "transfer@stories"}  # fmt: skip
    assert found == {"UNIF-ALL": "contradicted", "TOP-50": "inconclusive", "ATTN-ONLY": "supported"}


def test_budget_line_flags_limited_cells():
    table = frame([("UNIF-ALL", [0.30, 0.34, 0.26], {})])
    table["training_tokens"], table["steps"], table["budget"] = 16384, 64, "still improving"
    line = budget_line(table)
    assert "16,384 distinct tokens, 64 steps" in line and "UNIF-ALL s=0.5 (still improving)" in line


def test_curve_line_reads_the_learning_curves_verdict():

    slope = {"slope": 0.062, "se": 0.011, "df": 2.0}
    curve = {"UNIF-ALL": {"slope_at_default": {"test_recovered": slope}, "data_limited": "supported"},
             "env": {"torch": "2.13"}}  # fmt: skip
    assert "records no default budget" in curve_line(curve, 128, 0.5)
    curve["UNIF-ALL"]["default_blocks"] = 128
    line = curve_line(curve, 128, 0.5)
    assert "at the default 128 training blocks" in line and "s=0.5" in line
    assert (
        "UNIF-ALL +6.2 ± 1.1 points per doubling (t(2), more data helps: supported; data-limited)"
        in line
    )
    assert "not run" in curve_line(None, 128, 0.5)
    stale = curve_line(curve, 256, 0.5)  # the default budget moved after the curve ran
    assert "default of 128" in stale and "trains 256" in stale and "+6.2" not in stale
    curve["UNIF-ALL"]["b128"] = {"test_recovered": 0.347306}  # the default cell's recipe
    assert "+6.2" in curve_line(curve, 128, 0.5, {"UNIF-ALL": 0.3473065497})
    other = curve_line(curve, 128, 0.5, {"UNIF-ALL": 0.2841, "TOP-50": 0.3})  # another model
    assert "not this run's UNIF-ALL cell (28.4%)" in other and "+6.2" not in other


def test_default_recovered_reads_the_summary_rows_at_the_curves_sparsity():
    frame = pd.DataFrame(
        {"config": ["UNIF-ALL", "UNIF-ALL", "BASELINE-TEAL"], "sparsity": [0.5, 0.6, 0.5],
         "damage_recovered": [0.35, 0.6, float("nan")]}
    )  # fmt: skip
    assert default_recovered(frame, 0.5) == {"UNIF-ALL": 0.35}


def _findings(**verdicts):
    """A findings.json with one claim per keyword (``a_s50="supported"``)."""
    claims = {}
    for key, verdict in verdicts.items():
        name, sparsity = key.split("_s")
        claims[f"{name}.s{sparsity}"] = {
            "claim": name, "sparsity": int(sparsity) / 100, "statement": f"claim {name}",
            "study": "-", "ours": "x", "verdict": verdict, "test": "t(2) = 1.0",
        }  # fmt: skip
    return {"claims": claims}


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        (["supported", "supported"], "agree"),
        (["supported", "inconclusive"], "differ"),
        (["contradicted", "inconclusive", "supported"], "opposite"),
        (["supported", None], "not on every model"),
    ],
)
def test_agreement_of_verdicts_over_models(verdicts, expected):
    from sponlab.sweep.by_model import agreement

    assert agreement(verdicts) == expected


def test_findings_by_model_rows_put_each_models_verdict_beside_the_others():
    from sponlab.sweep.by_model import findings_by_model_markdown, findings_by_model_rows

    small = _findings(a_s50="supported", b_s50="inconclusive", c_s60="contradicted")
    other = _findings(a_s50="contradicted", b_s50="inconclusive")
    rows = findings_by_model_rows({"small": small, "other": other})
    assert [r[0] for r in rows] == ["(a)", "(b)", "(c)"]
    assert [r[-1] for r in rows] == ["opposite", "agree", "not on every model"]
    assert rows[0][3].startswith("**supported**") and rows[0][4].startswith("**contradicted**")
    assert rows[2][4] == "-"
    text = findings_by_model_markdown({"small": small, "other": other})
    assert text.startswith("3 claims over 2 models: 1 agree, 1 opposite, 1 not on every model.")
    with pytest.raises(ValueError, match="at least two models"):
        findings_by_model_markdown({"small": small})


def test_findings_by_model_cli_reads_a_git_revision_and_the_workspace(tmp_path, monkeypatch):
    """The CLI reads one model's findings at a committed revision (as for a DVC experiment) and
    the other from the workspace; a malformed --model is refused with exit 2."""
    import json
    import subprocess
    import sys

    from typer.testing import CliRunner

    from sponlab.cli import app

    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    path = tmp_path / "metrics" / "findings.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_findings(a_s50="supported")))
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first model"], check=True)
    path.write_text(json.dumps(_findings(a_s50="inconclusive")))
    out = tmp_path / "by_model.md"
    args = ["findings-by-model", "--model", "one=HEAD", "--model", "two=workspace"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = out.read_text().splitlines()[-1]
    assert "**supported**" in row and "**inconclusive**" in row and row.endswith("| differ |")
    assert CliRunner().invoke(app, ["findings-by-model", "--model", "HEAD"]).exit_code == 2
    assert CliRunner().invoke(app, [*args[:3], "--model", "x=nosuchrev"]).exit_code == 2
