"""The study's claims side by side over models: does a verdict hold beyond one model?

Each model's run writes ``metrics/findings.json`` (:func:`sponlab.sweep.findings.findings_json`:
claims keyed ``"a.s50"``, ``"b.s60"``, ...). A claim about where compensation belongs (``o_proj``
vs ``down_proj``, first vs second half of the layers) is a claim about models only when the
verdicts agree on more than one; this puts them in one table, one column per model, and says per
claim whether they agree, differ (one inconclusive) or are opposite (supported on one model,
contradicted on another).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sponlab.io.tables import markdown_table
from sponlab.stats import CONTRADICTED, SUPPORTED

AGREE, DIFFER, OPPOSITE, PARTIAL = "agree", "differ", "opposite", "not on every model"


def agreement(verdicts: Sequence[str | None]) -> str:
    """``agree`` (one verdict), ``opposite`` (supported and contradicted), ``differ`` (otherwise),
    or ``not on every model`` when a model did not test the claim (None)."""
    if any(v is None for v in verdicts):
        return PARTIAL
    if len(set(verdicts)) == 1:
        return AGREE
    return OPPOSITE if {SUPPORTED, CONTRADICTED} <= set(verdicts) else DIFFER


def _verdict_cell(claim: Mapping | None) -> str:
    if claim is None:
        return "-"
    return f"**{claim['verdict']}**: {claim['ours']}; {claim['test']}"


def findings_by_model_rows(findings: Mapping[str, Mapping]) -> list[list[str]]:
    """One row per claim key over every model's ``findings.json`` (``{label: json}``), in the
    order the claims first appear: claim, sparsity, statement, a cell per model, agreement."""
    keys: dict[str, Mapping] = {}
    for data in findings.values():
        for key, claim in data["claims"].items():
            keys.setdefault(key, claim)
    rows = []
    for key, first in keys.items():
        per_model = [data["claims"].get(key) for data in findings.values()]
        sparsity = first.get("sparsity")
        verdicts = [None if c is None else c["verdict"] for c in per_model]
        rows.append(
            [f"({first['claim']})", "" if sparsity is None else f"{sparsity:g}", first["statement"]]
            + [_verdict_cell(c) for c in per_model]
            + [agreement(verdicts)]
        )
    return rows


def findings_by_model_markdown(findings: Mapping[str, Mapping]) -> str:
    """The side-by-side table and a line counting agreements (Markdown)."""
    if len(findings) < 2:
        raise ValueError(f"findings of at least two models are needed, got {list(findings)}")
    rows = findings_by_model_rows(findings)
    head = ["claim", "sparsity", "statement", *findings, "agreement"]
    counts = {a: sum(r[-1] == a for r in rows) for a in (AGREE, DIFFER, OPPOSITE, PARTIAL)}
    line = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
    return f"{len(rows)} claims over {len(findings)} models: {line}.\n\n" + markdown_table(
        head, rows
    )
