"""Summary rows with seeds and the claim verdicts, on synthetic cells with known answers."""

import pandas as pd
import pytest

from sponlab.findings import (
    claim_a,
    claim_b,
    claim_c,
    claim_d,
    closed_form_free,
    closed_form_init,
    findings_json,
    study_findings,
)
from sponlab.summary import cell_result, seed_values, summary_table, to_markdown


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
    assert table.loc["TOP-50", "vs_reference"] == "within noise"
    assert table.loc["ATTN-ONLY", "vs_reference"] == "better"
    # another TEAL set is not compared; unmeasurable damage gives no ratio
    assert table.loc["STUDY-ATTN-ONLY", "vs_reference"] == ""
    assert pd.isna(table.loc["STUDY-ATTN-ONLY", "damage_recovered"])
    assert table.loc["UNIF-ALL", "damage_recovered"] == pytest.approx(0.30)
    assert table.loc["UNIF-ALL", "ppl_reduction_vs_teal"] == pytest.approx(6 / 60)
    assert table.loc["UNIF-ALL", "above_dense"] == pytest.approx(14 / 40)
    text = to_markdown(table.reset_index())
    assert "30.0 ± 4.0%" in text and "within noise" in text and "% PPL vs TEAL" in text
    assert "0.450 (off by -0.050)" in text and "0.500 |" in text


def test_no_noise_estimate_is_said_not_called_within_noise():
    table = frame([("UNIF-ALL", [0.30], {}), ("TOP-50", [0.2], {"params": 50})])
    assert list(table["vs_reference"]) == ["no seed spread", "ref"]


def test_seed_values_survive_a_csv_round_trip(tmp_path):
    table = frame([("UNIF-ALL", [0.30], {}), ("TOP-50", [0.2], {"params": 50})])
    table.to_csv(tmp_path / "s.csv", index=False)
    back = pd.read_csv(tmp_path / "s.csv")  # single values come back as floats
    assert [seed_values(v) for v in back["damage_recovered_seeds"]] == [[0.2], [0.3]]
    assert seed_values(float("nan")) == [] and seed_values("0.1;0.2") == [0.1, 0.2]


def test_claim_verdicts():
    table = frame(
        [
            ("UNIF-ALL", [0.30, 0.34, 0.26], {}),
            ("TOP-50", [0.20, 0.22, 0.18], {"params": 50}),
            ("ATTN-ONLY", [0.31, 0.29, 0.33], {}),
            ("STUDY-UNIF-ALL", [0.2], {"sparsify": "down_proj"}),
            ("STUDY-ATTN-ONLY", [0.9], {"sparsify": "o_proj", "teal": 40.1, "ok": False}),
        ]
    )
    assert claim_a(table, 0.5, "ATTN-ONLY", "UNIF-ALL", 2.0).verdict == "within noise"
    study = claim_a(table, 0.5, "STUDY-ATTN-ONLY", "STUDY-UNIF-ALL", 2.0, "a-study")
    assert study.verdict == "not testable" and "within noise" in study.ours
    # 0.20 / 0.30 = 67% of the benefit, 85% lies beyond the noise: not reproduced
    assert claim_b(table, 0.5, 2.0).verdict == "not reproduced"
    up = frame([("UNIF-ALL", [0.30, 0.34, 0.26], {}), ("TOP-50", [0.28, 0.30, 0.26], {})])
    assert claim_b(up, 0.5, 2.0).verdict == "reproduced"
    row = table[table["config"] == "UNIF-ALL"].iloc[0]
    farther = [{"index": i, "teal_rel": 0.1, "spon_rel": 0.2 if i < 4 else 0.05} for i in range(6)]
    assert claim_c(farther, row, 0.5, "UNIF-ALL").verdict == "reproduced"
    closer = [{"index": i, "teal_rel": 0.1, "spon_rel": 0.05} for i in range(6)]
    assert claim_c(closer, row, 0.5, "UNIF-ALL").verdict == "not reproduced"
    sims = {
        "A~B": {"kind": "config", "shared_sites": 3, "mean_cos": 0.50},
        "A~C": {"kind": "config", "shared_sites": 3, "mean_cos": 0.52},
        "A~D": {"kind": "config", "shared_sites": 0, "mean_cos": None},
        "A~A@1": {"kind": "seed", "shared_sites": 3, "mean_cos": 0.90},
        "B~B@1": {"kind": "seed", "shared_sites": 3, "mean_cos": 0.92},
    }
    assert claim_d(sims, 0.5, 2.0).verdict == "not reproduced"
    curves = {"UNIF-ALL": [[0.5, 0.40, 0.38], [0.5, 0.41, 0.37], [0.5, 0.39, 0.36]]}
    curves["UNIF-ALL-CF-INIT"] = [[0.45, 0.30, 0.29]]
    report = findings_json(study_findings(table, {0.5: farther}, sims, 0.5, 2.0, {0.5: curves}))
    claims = {"a.s50", "a-study.s50", "b.s50", "c.s50", "d.s50", "cf.s50", "cf-init.s50"}
    assert set(report["claims"]) == claims
    assert sum(report["verdicts"].values()) == 7
    assert report["claims"]["cf.s50"]["verdict"] == "not testable"  # no CLOSED-FORM cell
    assert report["claims"]["cf-init.s50"]["verdict"] == "epoch 1: lower KL; best epoch: lower KL"
    curves["UNIF-ALL-CF-INIT"] = [[0.45, 0.41, 0.40]]
    verdict = closed_form_init(curves, 0.5, 2.0).verdict
    assert verdict == "epoch 1: same (within noise); best epoch: higher KL"
    with_cf = frame([("UNIF-ALL", [0.30, 0.34, 0.26], {}), ("CLOSED-FORM", [0.03], {})])
    free = closed_form_free(with_cf, 0.5, 2.0)
    assert "10% of the benefit" in free.ours and free.verdict == "10% of SPON's benefit"
