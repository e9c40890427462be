"""The SPON-extension study's headline claims, re-tested on this run with a verdict each.

Every number comes from the run's outputs (the summary table, the evaluate cells, the interpret
similarity metrics, the transfer table); the study's numbers are the claims themselves. Each
verdict comes from a test with its degrees of freedom and a 95% interval (:mod:`sponlab.stats`):

- ``supported``: the interval clears the claim's threshold in the claimed direction;
- ``contradicted``: the interval lies entirely on the other side;
- ``inconclusive``: the interval straddles it (the data cannot tell);
- ``not testable``: a cell it needs is missing or its TEAL damage is within noise.

A damage-recovered difference carries both noises: the seeds' spread (Welch; a lone seed borrows
the sweep's pooled seed sd and its df) and the test blocks' (a paired bootstrap of each cell's
mean over its blocks, added as independent variances, which is conservative).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import pandas as pd

from sponlab.io.layout import EVALS, SPON, SUMMARY_CSV, cell_path
from sponlab.io.tables import markdown_table, pm
from sponlab.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    Test,
    outcome,
    pooled_floor,
    ratio_interval,
    spread,
    welch,
)
from sponlab.sweep.summary import block_se, dr_test, seed_values

STUDY_GAP = (0.54, 0.57)  # claim (a): o_proj minus down_proj damage recovered
MAGNITUDE_TOLERANCE = 0.10  # (a) magnitude supported when the interval lies within +-10 points
STUDY_COSINE = 0.943  # claim (d)
LEVEL = 0.05  # each two-sided interval is 95%


@dataclass(frozen=True)
class Finding:
    claim: str
    statement: str
    sparsity: float | None
    study: str
    ours: str
    verdict: str
    test: str
    evidence: str


def _row(frame: pd.DataFrame, config: str, sparsity: float) -> pd.Series | None:
    rows = frame[(frame["config"] == config) & (frame["sparsity"] == sparsity)]
    return None if rows.empty else rows.iloc[0]


def _pm(values: Sequence[float], scale: float = 100, unit: str = "%", digits: int = 1) -> str:
    s = spread(values)
    return f"{pm(s.mean, s.sd, scale, digits, unit)} (n={s.n})"


def _raw(values: Sequence[float]) -> str:
    """Mean ± sd of an unscaled quantity (cosines, KL) with 3 decimals."""
    return _pm(values, 1, "", 3)


def describe_test(
    test: Test, scale: float = 100, unit: str = " points", one_sided: bool = False, digits: int = 1
) -> str:
    """``t(df) = t, 95% CI [lo, hi]`` (one-sided: the lower 95% bound)."""
    if not math.isfinite(test.se) or test.se == 0:
        return "no noise estimate (a lone seed and no pooled spread)"
    t = test.difference / test.se
    if one_sided:
        lo = scale * test.bound(0.95, upper=False)
        return f"t({test.df:.1f}) = {t:.2f}, one-sided 95% lower bound {lo:+.{digits}f}{unit}"
    lo, hi = (scale * v for v in test.interval)
    return f"t({test.df:.1f}) = {t:.2f}, 95% CI [{lo:+.{digits}f}, {hi:+.{digits}f}]{unit}"


def _testable(*rows: pd.Series | None) -> str | None:
    """Why the cells cannot carry a verdict (None: they can)."""
    for row in rows:
        if row is None:
            return "cell not in the sweep"
        if not row["damage_measurable"]:
            return f"{row['config']}: TEAL damage +{row['teal_damage']:.2f} ppl is within noise"
        if not seed_values(row["damage_recovered_seeds"]):
            return f"{row['config']}: no damage recovered"
    return None


@dataclass(frozen=True)
class _Pair:
    """Two cells of one sparsity, their per-seed damage recovered and the sweep's seed floor."""

    first: pd.Series
    second: pd.Series
    a: list[float]
    b: list[float]
    floor: tuple[float, float]

    def test(self, scale_b: float = 1.0) -> Test:
        """mean(a) - scale_b x mean(b) with seed and test-block noise."""
        return dr_test(self.first, self.second, self.floor, scale_b)

    def share(self) -> str:
        """The first's mean as a share of the second's, with its interval when defined."""
        one = [block_se(self.first)]
        ratio = ratio_interval(
            welch(self.a, None, self.floor, one),
            welch(self.b, None, self.floor, [block_se(self.second)]),
        )
        if ratio is None:
            return "share undefined: the denominator is not above zero beyond noise"
        r, lo, hi = ratio
        return f"{100 * r:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] of the benefit"


def _pair(frame: pd.DataFrame, first: str, second: str, sparsity: float) -> _Pair | str:
    """The two cells, or why they cannot carry a verdict (see :func:`_testable`)."""
    rows = _row(frame, first, sparsity), _row(frame, second, sparsity)
    why = _testable(*rows)
    if why:
        return why
    group = frame[frame["sparsity"] == sparsity]
    floor = pooled_floor([seed_values(v) for v in group["damage_recovered_seeds"]])
    values = [seed_values(r["damage_recovered_seeds"]) for r in rows]
    return _Pair(*rows, *values, floor)


def _untestable(claim, statement, sparsity, study, why, evidence) -> Finding:
    return Finding(claim, statement, sparsity, study, why, "not testable", "-", evidence)


def claim_a(frame, sparsity, o_cfg, down_cfg, claim: str = "a") -> list[Finding]:
    """(a) o_proj biases recover more of the damage than down_proj biases (77-80% vs 23%):
    the direction, and the study's magnitude (+54 to +57 points) as a separate verdict."""
    study = "o_proj 77-80% vs down_proj 23% of the damage recovered (gap +54 to +57 points)"
    label = f"{o_cfg} (o_proj biases) recovers more than {down_cfg} (down_proj biases)"
    evidence = str(SUMMARY_CSV)
    pair = _pair(frame, o_cfg, down_cfg, sparsity)
    if isinstance(pair, str):
        return [_untestable(claim, label, sparsity, study, pair, evidence)]
    test = pair.test()
    same = "same TEAL set" if pair.first["sparsify"] == pair.second["sparsify"] else "other sets"
    ours = (
        f"{o_cfg} {_pm(pair.a)} vs {down_cfg} {_pm(pair.b)}: gap "
        f"{100 * test.difference:+.1f} points; {same}"
    )
    lo, hi = test.interval
    if hi < STUDY_GAP[0] or lo > STUDY_GAP[1]:
        magnitude = CONTRADICTED
    elif STUDY_GAP[0] - MAGNITUDE_TOLERANCE <= lo and hi <= STUDY_GAP[1] + MAGNITUDE_TOLERANCE:
        magnitude = SUPPORTED
    else:
        magnitude = INCONCLUSIVE
    size = (
        f"the gap is +54 to +57 points (supported: 95% CI within ±{100 * MAGNITUDE_TOLERANCE:.0f})"
    )
    return [
        Finding(claim, label, sparsity, study, ours, outcome(test), describe_test(test), evidence),
        Finding(
            f"{claim}-size", size, sparsity, study, ours, magnitude, describe_test(test), evidence
        ),
    ]


def claim_b(frame: pd.DataFrame, sparsity: float) -> Finding:
    """(b) TOP-50 captures >= 85% of UNIF-ALL's benefit (one-sided test of a - 0.85 b > 0)."""
    study = "TOP-50 gets 85% of UNIF-ALL's benefit at 0.5x parameters (Pareto-optimal)"
    statement = "TOP-50 captures >= 85% of UNIF-ALL's damage recovered"
    evidence = str(SUMMARY_CSV)
    pair = _pair(frame, "TOP-50", "UNIF-ALL", sparsity)
    if isinstance(pair, str):
        return _untestable("b", statement, sparsity, study, pair, evidence)
    test = pair.test(scale_b=0.85)
    ours = (
        f"TOP-50 {_pm(pair.a)} vs UNIF-ALL {_pm(pair.b)}: {pair.share()} at "
        f"{pair.first['relative_parameters']:.2f}x parameters"
    )
    verdict = outcome(test, one_sided=True)
    return Finding("b", statement, sparsity, study, ours, verdict, describe_test(test, one_sided=True),
                   evidence)  # fmt: skip


def claim_c(shift, row: pd.Series | None, sparsity: float, config: str) -> Finding:
    """(c) SPON moves intermediate hidden states further from dense while improving the output:
    supported when most intermediate layers move farther and SPON beats TEAL beyond noise."""
    study = "intermediate hidden states move further from dense; output improves"
    statement = f"{config}: SPON shift > TEAL shift at most intermediate layers, ppl improves"
    evidence = str(cell_path(EVALS, config, sparsity) / "shift.csv")
    why = _testable(row) if shift else "cell not in the sweep"
    if why or row is None:
        return _untestable("c", statement, sparsity, study, why, evidence)
    middle = [r for r in shift if r["index"] not in (0, len(shift) - 1)]  # embeddings, last layer
    farther = sum(r["spon_rel"] > r["teal_rel"] for r in middle) / len(middle)
    values = seed_values(row["damage_recovered_seeds"])
    test = welch(values, None, block_se=[block_se(row)])
    ours = (
        f"farther from dense at {100 * farther:.0f}% of {len(middle)} intermediate layers; "
        f"ppl {row['teal_ppl']:.2f} -> {row['spon_ppl']:.2f} ({_pm(values)} recovered)"
    )
    improves = outcome(test)
    verdict = improves if farther > 0.5 else CONTRADICTED
    return Finding("c", statement, sparsity, study, ours, verdict, describe_test(test), evidence)


def claim_d(similarity: Mapping[str, Mapping], sparsity: float | None) -> Finding:
    """(d) Different configs converge to the same biases (0.943 mean cosine on shared sites),
    tested on cross-seed pairs only (a shared seed shares the batch order and data draw)."""
    study = f"{STUDY_COSINE} mean cosine between configs on shared layers"
    statement = f"biases of different configs (different seeds) agree at cosine >= {STUDY_COSINE}"
    evidence = "metrics/interpret.json (similarity)"
    shared = [v for v in similarity.values() if v.get("shared_sites") and v["mean_cos"] is not None]
    if shared and "same_seed" not in shared[0]:
        return _untestable("d", statement, sparsity, study, "pairs carry no seeds", evidence)
    configs = [v["mean_cos"] for v in shared if v["kind"] == "config" and not v["same_seed"]]
    seeds = [v["mean_cos"] for v in shared if v["kind"] == "seed"]
    if len(configs) < 2:
        return _untestable("d", statement, sparsity, study, "< 2 cross-seed config pairs", evidence)
    test = welch(configs, None)
    shifted = Test(test.difference - STUDY_COSINE, test.se, test.df)
    ours = (
        f"cross-seed config pairs {_raw(configs)}; seed pairs of one config "
        f"{_raw(seeds) if seeds else 'none'} (pairs share blocks, so df is optimistic)"
    )
    text = describe_test(shifted, 1, f" (cosine minus {STUDY_COSINE})", digits=3)
    return Finding("d", statement, sparsity, study, ours, outcome(shifted), text, evidence)


def closed_form_free(frame: pd.DataFrame, sparsity: float) -> Finding:
    """Does training add to the closed-form bias (b = W E[x - S(x)], no training)?"""
    statement = "trained UNIF-ALL recovers more than CLOSED-FORM (no training)"
    evidence = str(SUMMARY_CSV)
    pair = _pair(frame, "UNIF-ALL", "CLOSED-FORM", sparsity)
    if isinstance(pair, str):
        return _untestable("cf", statement, sparsity, "-", pair, evidence)
    test = pair.test()
    ours = f"UNIF-ALL {_pm(pair.a)} vs CLOSED-FORM {_pm(pair.b)}"
    return Finding(
        "cf", statement, sparsity, "-", ours, outcome(test), describe_test(test), evidence
    )


def closed_form_init(curves: Mapping[str, Sequence[Sequence[float]]], sparsity: float) -> Finding:
    """Does starting from the closed form lower the validation KL after epoch 1 (UNIF-ALL-CF-INIT
    vs UNIF-ALL's seeds from zeros; a lone CF-INIT seed borrows the zeros' spread)?"""
    statement = "training from the closed form lowers val KL after epoch 1 (vs from zeros)"
    evidence = f"{SPON}/{{UNIF-ALL,UNIF-ALL-CF-INIT}}/s{sparsity:g}/seed*/val.csv"
    init, zeros = curves.get("UNIF-ALL-CF-INIT"), curves.get("UNIF-ALL")
    if not init or not zeros or min(len(c) for c in [*init, *zeros]) < 2:
        return _untestable("cf-init", statement, sparsity, "-", "cells missing", evidence)
    after_init, after_zeros = [c[1] for c in init], [c[1] for c in zeros]
    s = spread(after_zeros)
    test = welch(after_zeros, after_init, (s.sd, float(s.n - 1)))
    ours = f"val KL after epoch 1: {_raw(after_init)} vs {_raw(after_zeros)} from zeros"
    return Finding("cf-init", statement, sparsity, "-", ours, outcome(test),
                   describe_test(test, 1, " (val KL)", digits=4), evidence)  # fmt: skip


def study_findings(
    frame: pd.DataFrame,
    shifts: Mapping[float, Sequence[Mapping[str, float]]],
    similarity: Mapping[str, Mapping] | None,
    similarity_sparsity: float | None,
    curves: Mapping[float, Mapping[str, Sequence[Sequence[float]]]] | None = None,
) -> list[Finding]:
    """All claims at every sparsity of ``frame``: (a) direction and size on the same TEAL set
    (and on the study's own sets when STUDY-* cells exist), (b), (c), (d) once; then the closed
    form, free and (when swept) as an initialisation."""
    out: list[Finding] = []
    sparsities = sorted(frame["sparsity"].unique())
    for s in sparsities:
        out += claim_a(frame, s, "ATTN-ONLY", "UNIF-ALL")
        if _row(frame, "STUDY-ATTN-ONLY", s) is not None:
            out += claim_a(frame, s, "STUDY-ATTN-ONLY", "STUDY-UNIF-ALL", "a-study")
        out.append(claim_b(frame, s))
        out.append(claim_c(shifts.get(s, []), _row(frame, "UNIF-ALL", s), s, "UNIF-ALL"))
    out.append(claim_d(similarity or {}, similarity_sparsity))
    for s in sparsities:
        out.append(closed_form_free(frame, s))
        if (curves or {}).get(s, {}).get("UNIF-ALL-CF-INIT"):
            out.append(closed_form_init((curves or {})[s], s))
    return out


def transfer_findings(frame: pd.DataFrame) -> list[Finding]:
    """On every unseen text domain: "SPON lowers perplexity below TEAL alone" per config and
    sparsity (seed and block noise), then claims (a) and (b) re-tested there."""
    out = []
    domains = [d for d in dict.fromkeys(frame["domain"]) if not str(d).startswith("wikipedia")]
    for domain in domains:
        part = frame[frame["domain"] == domain]
        for s in sorted(part["sparsity"].unique()):
            for config in dict.fromkeys(part["config"]):
                out.append(_not_worse(part, config, s, domain))
            for found in [*claim_a(part, s, "ATTN-ONLY", "UNIF-ALL"), claim_b(part, s)]:
                out.append(replace(found, claim=f"{found.claim}@{domain}",
                                   evidence="metrics/transfer/summary.csv"))  # fmt: skip
    return out


def _not_worse(part: pd.DataFrame, config: str, sparsity: float, domain: str) -> Finding:
    statement = f"{config}: SPON lowers {domain} perplexity below TEAL alone"
    evidence = "metrics/transfer/summary.csv"
    row = _row(part, config, sparsity)
    why = _testable(row)
    if why or row is None:
        return _untestable(f"transfer@{domain}", statement, sparsity, "-", why, evidence)
    values = seed_values(row["damage_recovered_seeds"])
    test = welch(values, None, block_se=[block_se(row)])
    ours = f"{_pm(values)} of TEAL's damage recovered"
    return Finding(f"transfer@{domain}", statement, sparsity, "-", ours, outcome(test),
                   describe_test(test), evidence)  # fmt: skip


def false_positive_line(findings: Sequence[Finding]) -> str:
    """How many verdicts were printed and how many a 95% level expects by chance."""
    tested = [f for f in findings if f.verdict in (SUPPORTED, CONTRADICTED, INCONCLUSIVE)]
    return (
        f"{len(tested)} verdicts at 95% each: if no claim held, about {LEVEL * len(tested):.1f} "
        "of them would come out supported or contradicted by chance."
    )


def findings_markdown(findings: Sequence[Finding]) -> str:
    """One row per claim and sparsity."""
    head = ["claim", "sparsity", "statement", "study", "ours (mean ± seed sd)", "test", "verdict"]
    rows = [
        [f"({f.claim})", "" if f.sparsity is None else f"{f.sparsity:g}", f.statement, f.study,
         f.ours, f.test, f"**{f.verdict}**"]
        for f in findings
    ]  # fmt: skip
    return markdown_table(head, rows) + "\n"


def findings_json(findings: Sequence[Finding]) -> dict:
    """``{"a.s50": {...}, ...}`` plus verdict counts and the chance level."""
    out: dict = {"claims": {}}
    for f in findings:
        key = f.claim if f.sparsity is None else f"{f.claim}.s{round(100 * f.sparsity)}"
        while key in out["claims"]:
            key += "+"
        out["claims"][key] = asdict(f)
    verdicts = [f.verdict for f in findings]
    out["verdicts"] = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    tested = sum(v in (SUPPORTED, CONTRADICTED, INCONCLUSIVE) for v in verdicts)
    out["tests"] = tested
    out["expected_false_positives"] = LEVEL * tested
    return out
