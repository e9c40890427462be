"""The SPON-extension study's four headline claims, re-tested on this run with a verdict each.

Every number comes from the run's outputs (the summary table, the evaluate shift files, the
interpret similarity metrics); the study's numbers are the claims themselves. Verdicts:

- ``reproduced``: our result agrees with the claim (a claimed difference exceeds the noise in the
  claimed direction, or a claimed level is reached or within noise of it);
- ``within noise``: the difference the claim rests on is within ``sigmas`` standard errors;
- ``not reproduced``: our result contradicts the claim beyond the noise;
- ``not testable``: a cell it needs is missing or its TEAL damage is within noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import pandas as pd

from sponlab.stats import compare, pooled_sd, spread
from sponlab.summary import seed_values


@dataclass(frozen=True)
class Finding:
    claim: str
    statement: str
    sparsity: float | None
    study: str
    ours: str
    verdict: str
    evidence: str


def _row(frame: pd.DataFrame, config: str, sparsity: float) -> pd.Series | None:
    rows = frame[(frame["config"] == config) & (frame["sparsity"] == sparsity)]
    return None if rows.empty else rows.iloc[0]


def _pm(values: Sequence[float], scale: float = 100, unit: str = "%", digits: int = 1) -> str:
    s = spread(values)
    sd = "" if math.isnan(s.sd) else f" ± {scale * s.sd:.{digits}f}"
    return f"{scale * s.mean:.{digits}f}{sd}{unit} (n={s.n})"


def _raw(values: Sequence[float]) -> str:
    """Mean ± sd of an unscaled quantity (cosines, KL) with 3 decimals."""
    return _pm(values, 1, "", 3)


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
    """Two cells of one sparsity and their per-seed damage recovered."""

    first: pd.Series
    second: pd.Series
    a: list[float]
    b: list[float]

    @property
    def share(self) -> float:
        """Mean damage recovered of the first as a fraction of the second's."""
        mean_b = spread(self.b).mean
        return spread(self.a).mean / mean_b if mean_b else math.nan


def _pair(frame: pd.DataFrame, first: str, second: str, sparsity: float) -> _Pair | str:
    """The two cells, or why they cannot carry a verdict (see :func:`_testable`)."""
    rows = _row(frame, first, sparsity), _row(frame, second, sparsity)
    why = _testable(*rows)
    if why:
        return why
    return _Pair(*rows, *(seed_values(r["damage_recovered_seeds"]) for r in rows))


def _floor(frame: pd.DataFrame, sparsity: float) -> float:
    """Pooled seed sd of damage recovered over the multi-seed cells of one sparsity."""
    group = frame[frame["sparsity"] == sparsity]
    return pooled_sd([seed_values(v) for v in group["damage_recovered_seeds"]])


def claim_a(
    frame: pd.DataFrame,
    sparsity: float,
    o_cfg: str,
    down_cfg: str,
    sigmas: float,
    claim: str = "a",
) -> Finding:
    """(a) o_proj biases recover more of the damage than down_proj biases (77-80% vs 23%)."""
    study = "o_proj 77-80% vs down_proj 23% of the damage recovered"
    label = f"{o_cfg} (o_proj biases) recovers more than {down_cfg} (down_proj biases)"
    evidence = "metrics/tables/summary.csv"
    pair = _pair(frame, o_cfg, down_cfg, sparsity)
    if isinstance(pair, str):
        return Finding(claim, label, sparsity, study, pair, "not testable", evidence)
    o, down, a, b = pair.first, pair.second, pair.a, pair.b
    c = compare(a, b, _floor(frame, sparsity), sigmas)
    verdict = _direction(c, expect_positive=True)
    if verdict == "reproduced":
        verdict = "reproduced (direction)"
    same = "same TEAL set" if o["sparsify"] == down["sparsify"] else "different TEAL sets"
    ours = (
        f"{o_cfg} {_pm(a)} vs {down_cfg} {_pm(b)}: gap {100 * c['difference']:+.1f} points "
        f"(study: +54 to +57); {same}: {o['sparsify']} / {down['sparsify']}"
    )
    return Finding(claim, label, sparsity, study, ours, verdict, evidence)


def claim_b(frame: pd.DataFrame, sparsity: float, sigmas: float) -> Finding:
    """(b) TOP-50 captures 85% of UNIF-ALL's benefit at half the parameters (Pareto-optimal)."""
    study = "TOP-50 gets 85% of UNIF-ALL's benefit at 0.5x parameters (Pareto-optimal)"
    statement = "TOP-50 captures >= 85% of UNIF-ALL's damage recovered"
    evidence = "metrics/tables/summary.csv"
    pair = _pair(frame, "TOP-50", "UNIF-ALL", sparsity)
    if isinstance(pair, str):
        return Finding("b", statement, sparsity, study, pair, "not testable", evidence)
    top, a, b = pair.first, pair.a, pair.b
    c = compare(a, [0.85 * v for v in b], _floor(frame, sparsity), sigmas)
    verdict = "not reproduced" if not c["within_noise"] and c["difference"] < 0 else "reproduced"
    ours = (
        f"TOP-50 {_pm(a)} vs UNIF-ALL {_pm(b)}: {100 * pair.share:.0f}% of the benefit at "
        f"{top['relative_parameters']:.2f}x parameters; Pareto: {'yes' if top['pareto'] else 'no'}"
    )
    return Finding("b", statement, sparsity, study, ours, verdict, evidence)


def claim_c(
    shift: Sequence[Mapping[str, float]], row: pd.Series | None, sparsity: float, config: str
) -> Finding:
    """(c) SPON moves intermediate hidden states further from dense while improving the output."""
    study = "intermediate hidden states move further from dense; output improves"
    statement = f"{config}: SPON shift > TEAL shift at most intermediate layers, ppl improves"
    evidence = f"metrics/eval/{config}/s{sparsity:g}/shift.csv"
    if row is None or not shift:
        return Finding(
            "c", statement, sparsity, study, "cell not in the sweep", "not testable", evidence
        )
    middle = [r for r in shift if r["index"] not in (0, len(shift) - 1)]  # embeddings, last layer
    farther = sum(r["spon_rel"] > r["teal_rel"] for r in middle) / len(middle)
    improved = row["spon_ppl"] < row["teal_ppl"]
    final = shift[-1]
    ours = (
        f"farther from dense at {100 * farther:.0f}% of {len(middle)} intermediate layers; "
        f"final-layer shift {final['teal_rel']:.3f} -> {final['spon_rel']:.3f}; "
        f"ppl {row['teal_ppl']:.2f} -> {row['spon_ppl']:.2f}"
    )
    verdict = "reproduced" if farther > 0.5 and improved else "not reproduced"
    return Finding("c", statement, sparsity, study, ours, verdict, evidence)


def claim_d(similarity: Mapping[str, Mapping], sparsity: float | None, sigmas: float) -> Finding:
    """(d) Different configs converge to the same biases (0.943 mean cosine on shared layers)."""
    study = "0.943 mean cosine between configs on shared layers"
    statement = "biases of different configs agree on shared sites as much as two seeds do"
    evidence = "metrics/interpret.json (similarity)"
    shared = [v for v in similarity.values() if v.get("shared_sites") and v["mean_cos"] is not None]
    configs = [v["mean_cos"] for v in shared if v["kind"] == "config"]
    seeds = [v["mean_cos"] for v in shared if v["kind"] == "seed"]
    if not configs or not seeds:
        return Finding(
            "d", statement, sparsity, study, "no config or seed pairs", "not testable", evidence
        )
    c = compare(configs, seeds, math.nan, sigmas)
    ours = f"mean cosine between configs {_raw(configs)}, between seeds of one config {_raw(seeds)}"
    verdict = "reproduced" if c["within_noise"] or c["difference"] > 0 else "not reproduced"
    return Finding("d", statement, sparsity, study, ours, verdict, evidence)


def _lower(c: Mapping) -> str:
    """A validation-KL difference in words (negative difference: the first is lower)."""
    if c["within_noise"]:
        return "same (within noise)"
    return "lower KL" if c["difference"] < 0 else "higher KL"


def _direction(c: Mapping, expect_positive: bool) -> str:
    if c["within_noise"]:
        return "within noise"
    return "reproduced" if (c["difference"] > 0) == expect_positive else "not reproduced"


def closed_form_free(frame: pd.DataFrame, sparsity: float, sigmas: float) -> Finding:
    """How much of SPON's benefit the closed-form bias gets without any training."""
    statement = "CLOSED-FORM (b = W E[x - S(x)], no training) vs trained UNIF-ALL"
    evidence = "metrics/tables/summary.csv"
    pair = _pair(frame, "CLOSED-FORM", "UNIF-ALL", sparsity)
    if isinstance(pair, str):
        return Finding("cf", statement, sparsity, "-", pair, "not testable", evidence)
    a, b, share = pair.a, pair.b, pair.share
    c = compare(a, b, _floor(frame, sparsity), sigmas)
    ours = f"CLOSED-FORM {_pm(a)} vs UNIF-ALL {_pm(b)}: {100 * share:.0f}% of the benefit for free"
    if c["within_noise"]:
        verdict = "as good as SPON (within noise)"
    elif share <= 0:
        verdict = "none of SPON's benefit"
    else:
        verdict = f"{100 * share:.0f}% of SPON's benefit"
    return Finding("cf", statement, sparsity, "-", ours, verdict, evidence)


def closed_form_init(
    curves: Mapping[str, Sequence[Sequence[float]]], sparsity: float, sigmas: float
) -> Finding:
    """Does starting from the closed form speed training? Validation KL after the first epoch
    (and the kept one) of UNIF-ALL-CF-INIT vs UNIF-ALL's seeds started from zeros."""
    statement = "training from the closed form (UNIF-ALL-CF-INIT) vs from zeros (UNIF-ALL)"
    evidence = f"models/spon/{{UNIF-ALL,UNIF-ALL-CF-INIT}}/s{sparsity:g}/seed*/val.csv"
    init, zeros = curves.get("UNIF-ALL-CF-INIT"), curves.get("UNIF-ALL")
    if not init or not zeros or min(len(c) for c in [*init, *zeros]) < 2:
        return Finding(
            "cf-init", statement, sparsity, "-", "cells missing", "not testable", evidence
        )
    after = [c[1] for c in init], [c[1] for c in zeros]
    first = compare(*after, spread(after[1]).sd, sigmas)  # a lone CF-INIT seed: zeros' spread
    best = [min(c) for c in init], [min(c) for c in zeros]
    ours = (
        f"val KL at start {_raw([c[0] for c in init])} vs {_raw([c[0] for c in zeros])}"
        f"; after epoch 1 {_raw(after[0])} vs {_raw(after[1])}"
        f"; best {_raw(best[0])} vs {_raw(best[1])}"
    )
    end = compare(*best, spread(best[1]).sd, sigmas)
    verdict = f"epoch 1: {_lower(first)}; best epoch: {_lower(end)}"
    return Finding("cf-init", statement, sparsity, "-", ours, verdict, evidence)


def study_findings(
    frame: pd.DataFrame,
    shifts: Mapping[float, Sequence[Mapping[str, float]]],
    similarity: Mapping[str, Mapping] | None,
    similarity_sparsity: float | None,
    sigmas: float,
    curves: Mapping[float, Mapping[str, Sequence[Sequence[float]]]] | None = None,
) -> list[Finding]:
    """All claims at every sparsity of ``frame``: (a) on the same TEAL set (fair) and on the
    study's own sets (STUDY-* configs), (b), (c) from UNIF-ALL's ``shifts``, (d) once; then the
    closed-form baseline, free and as an initialisation (``curves``: per sparsity, config ->
    per-seed validation KL by epoch)."""
    out = []
    sparsities = sorted(frame["sparsity"].unique())
    for s in sparsities:
        out.append(claim_a(frame, s, "ATTN-ONLY", "UNIF-ALL", sigmas))
        out.append(claim_a(frame, s, "STUDY-ATTN-ONLY", "STUDY-UNIF-ALL", sigmas, "a-study"))
        out.append(claim_b(frame, s, sigmas))
        out.append(claim_c(shifts.get(s, []), _row(frame, "UNIF-ALL", s), s, "UNIF-ALL"))
    out.append(claim_d(similarity or {}, similarity_sparsity, sigmas))
    for s in sparsities:
        out.append(closed_form_free(frame, s, sigmas))
        out.append(closed_form_init((curves or {}).get(s, {}), s, sigmas))
    return out


def transfer_findings(frame: pd.DataFrame, sigmas: float) -> list[Finding]:
    """Claims (a) and (b) re-tested on every unseen text domain of the transfer stage's table
    (the same noise rules; the in-domain rows are the main table's)."""
    out = []
    domains = [d for d in dict.fromkeys(frame["domain"]) if not str(d).startswith("wikipedia")]
    for domain in domains:
        part = frame[frame["domain"] == domain]
        for s in sorted(part["sparsity"].unique()):
            for found in (
                claim_a(part, s, "ATTN-ONLY", "UNIF-ALL", sigmas),
                claim_b(part, s, sigmas),
            ):
                out.append(
                    replace(
                        found,
                        claim=f"{found.claim}@{domain}",
                        evidence="metrics/transfer/summary.csv",
                    )
                )
    return out


def findings_markdown(findings: Sequence[Finding]) -> str:
    """One row per claim and sparsity."""
    head = "| claim | sparsity | statement | study | ours (mean ± seed sd) | verdict | evidence |"
    rule = "|---|---|---|---|---|---|---|"
    rows = [
        f"| ({f.claim}) | {'' if f.sparsity is None else f'{f.sparsity:g}'} | {f.statement} | "
        f"{f.study} | {f.ours} | **{f.verdict}** | `{f.evidence}` |"
        for f in findings
    ]
    return "\n".join([head, rule, *rows]) + "\n"


def findings_json(findings: Sequence[Finding]) -> dict:
    """``{"a.s50": {...}, ...}`` plus a verdict count."""
    out: dict = {"claims": {}}
    for f in findings:
        key = f.claim if f.sparsity is None else f"{f.claim}.s{round(100 * f.sparsity)}"
        while key in out["claims"]:
            key += "+"
        out["claims"][key] = asdict(f)
    verdicts = [f.verdict for f in findings]
    out["verdicts"] = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    return out
