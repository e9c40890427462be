"""The sweep summary: one row per (config, sparsity) cell with its module-matched TEAL baseline.

Every evaluate cell measures TEAL-only on exactly the modules its config sparsifies, so the
baseline of "SPON on o_proj" is TEAL on the same modules with no bias, never a different set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from sponlab.io.layout import SUMMARY_MD
from sponlab.io.tables import markdown_table, pm
from sponlab.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    Test,
    outcome,
    pooled_floor,
    welch,
)


@dataclass(frozen=True)
class CellResult:
    """One (config, sparsity) cell: TEAL baseline of its set, TEAL+SPON mean and spread over seeds.

    ``damage_recovered`` is None when the cell's TEAL damage is not measurable (see
    :func:`sponlab.stats.damage`); the absolute ppl deltas are always given.
    """

    config: str
    sparsity: float
    sparsify: str
    layers: str
    modules: str
    bias: str
    init: str
    seeds: int
    bias_parameters: int
    param_fraction: float  # bias parameters / model parameters
    dense_ppl: float
    teal_ppl: float
    spon_ppl: float  # mean over seeds
    spon_ppl_sd: float | None
    teal_damage: float  # TEAL ppl - dense ppl
    damage_measurable: bool
    damage_recovered: float | None  # mean over seeds
    damage_recovered_sd: float | None
    damage_recovered_seeds: str  # per seed, ';'-joined (for noise tests downstream)
    damage_recovered_block_se: float | None  # test-block bootstrap SE of the mean
    ppl_reduction_vs_teal: float  # (TEAL - SPON) / TEAL
    above_dense: float  # (SPON - dense) / dense
    teal_kl: float | None
    spon_kl: float | None
    achieved_sparsity: float  # mean over the set's sites, on the test text
    sparsity_gap: float  # achieved - target: thresholds that miss their target are visible
    best_epochs: str  # the kept epoch of each seed (0: initial biases kept)
    final_val_kl: float | None  # mean over seeds of the kept epoch's validation KL
    training_tokens: int  # distinct training tokens per seed (0: no training)
    steps: int  # optimizer steps per seed
    budget: str  # converged | step-limited / still improving (any seed; train.json diagnostics)


def cell_result(evaluation: dict, trainings: Sequence[dict], model_parameters: int) -> CellResult:
    """Combine one cell's evaluate ``metrics.json`` and its seeds' ``train.json``."""
    first = trainings[0]
    spon, dr, teal = evaluation["spon"], evaluation["damage_recovered"], evaluation["teal"]
    measurable = bool(evaluation["teal_damage"]["measurable"])
    per_seed = [row["damage_recovered"] for row in evaluation["spon_seeds"]]
    kept = [t["epochs"][t["best_epoch"]]["val_kl"] for t in trainings if t.get("epochs")]
    dense, spon_ppl = evaluation["dense_ppl"], spon["ppl"]["mean"]
    return CellResult(
        config=evaluation["config"],
        sparsity=float(evaluation["sparsity"]),
        sparsify=evaluation["sparsify"],
        layers=first.get("layers", ""),
        modules=",".join(first.get("modules", [])) or "-",
        bias=first.get("bias", "trained") if first.get("parameters") else "-",
        init=first.get("init", "zeros"),
        seeds=len(trainings),
        bias_parameters=int(evaluation["bias_parameters"]),
        param_fraction=evaluation["bias_parameters"] / model_parameters,
        dense_ppl=dense,
        teal_ppl=teal["ppl"],
        spon_ppl=spon_ppl,
        spon_ppl_sd=spon["ppl"]["sd"],
        teal_damage=teal["ppl"] - dense,
        damage_measurable=measurable,
        damage_recovered=dr["mean"] if dr and measurable else None,
        damage_recovered_sd=dr["sd"] if dr and measurable else None,
        damage_recovered_seeds=";".join(f"{v:.6f}" for v in per_seed if v is not None),
        damage_recovered_block_se=evaluation.get("damage_recovered_block_se"),
        ppl_reduction_vs_teal=(teal["ppl"] - spon_ppl) / teal["ppl"],
        above_dense=(spon_ppl - dense) / dense,
        teal_kl=teal["kl"],
        spon_kl=spon["kl"]["mean"] if spon["kl"] else None,
        achieved_sparsity=evaluation["achieved_sparsity"]["mean"],
        sparsity_gap=evaluation["achieved_sparsity"]["mean"] - float(evaluation["sparsity"]),
        best_epochs=",".join(str(t.get("best_epoch", 0)) for t in trainings),
        final_val_kl=sum(kept) / len(kept) if kept else None,
        training_tokens=int(first.get("training_tokens", 0)),
        steps=int(first.get("steps", 0)),
        budget=budget_note(trainings),
    )


def budget_note(trainings: Sequence[dict]) -> str:
    """``converged``, or the reasons any seed's training was limited by its budget ('-': none
    trained)."""
    notes = [t["diagnostics"] for t in trainings if t.get("diagnostics")]
    if not notes:
        return "-"
    limited = sorted({n["budget_note"] for n in notes if n["budget_limited"]})
    return "; ".join(limited) if limited else "converged"


def seed_values(value: object) -> list[float]:
    """Per-seed values of a ``damage_recovered_seeds`` cell: ';'-joined text, or one number when
    a CSV reader parsed a single value as float ('' or NaN: none)."""
    if isinstance(value, (int, float)):
        return [] if pd.isna(value) else [float(value)]
    if not isinstance(value, str) or not value:
        return []
    return [float(v) for v in value.split(";")]


def pareto_front(params: Sequence[float], ppl: Sequence[float]) -> list[bool]:
    """True for points no other point beats on both fewer parameters and lower perplexity."""
    flags = []
    for i, (p_i, q_i) in enumerate(zip(params, ppl, strict=True)):
        dominated = any(
            p_j <= p_i and q_j <= q_i and (p_j < p_i or q_j < q_i)
            for j, (p_j, q_j) in enumerate(zip(params, ppl, strict=True))
            if j != i
        )
        flags.append(not dominated)
    return flags


def summary_table(cells: Sequence[CellResult], reference: str | None = None) -> pd.DataFrame:
    """All cells by sparsity then config, with a per-sparsity noise-aware Pareto flag and,
    against the ``reference`` config: relative parameters and whether the damage-recovered
    difference is beyond noise (95% interval: seed spreads and test blocks)."""
    frame = pd.DataFrame([asdict(c) for c in cells]).sort_values(["sparsity", "config"])
    frame["pareto"] = False
    frame["relative_parameters"] = float("nan")
    frame["vs_reference"] = ""
    for _, group in frame.groupby("sparsity"):
        frame.loc[group.index, "pareto"] = noisy_pareto(group)
        ref = group[group["config"] == reference]
        if ref.empty:
            continue
        ref_row = ref.iloc[0]
        if ref_row["bias_parameters"]:
            rel = group["bias_parameters"] / ref_row["bias_parameters"]
            frame.loc[group.index, "relative_parameters"] = rel
        frame.loc[group.index, "vs_reference"] = _noise_marks(group, ref_row)
    return frame.reset_index(drop=True)


def dr_test(row, other, floor: tuple[float, float], scale_b: float = 1.0) -> Test:
    """Damage recovered of ``row`` minus ``scale_b`` x ``other``'s (rows of the summary or
    transfer table): seed spread (Welch, lone seeds borrow the pooled ``floor``) and each
    cell's test-block bootstrap SE."""
    blocks = [block_se(row), scale_b * block_se(other)]
    return welch(
        seed_values(row.damage_recovered_seeds), seed_values(other.damage_recovered_seeds),
        floor, blocks, scale_b,
    )  # fmt: skip


def block_se(row) -> float:
    """A cell's test-block bootstrap SE of its mean damage recovered (nan: none recorded)."""
    value = getattr(row, "damage_recovered_block_se", None)
    return math.nan if value is None or pd.isna(value) else float(value)


def _noise_marks(group: pd.DataFrame, ref: pd.Series) -> list[str]:
    """'ref', 'better' / 'worse' than the reference beyond noise (95% interval of the damage-
    recovered difference: seeds and test blocks), 'inconclusive', 'no seed spread' (no noise
    estimate), or '' (not comparable: no biases, another TEAL set, unmeasurable damage)."""
    floor = pooled_floor([seed_values(v) for v in group["damage_recovered_seeds"]])
    ref_row = next(group[group["config"] == ref["config"]].itertuples())
    marks = []
    for row in group.itertuples():
        if row.config == ref["config"]:
            marks.append("ref")
        elif not _comparable(row, ref_row) or not row.bias_parameters:
            marks.append("")
        else:
            test = dr_test(row, ref_row, floor)
            verdict = outcome(test) if math.isfinite(test.se) else "none"
            marks.append({SUPPORTED: "better", CONTRADICTED: "worse", INCONCLUSIVE: "inconclusive",
                          "none": "no seed spread"}[verdict])  # fmt: skip
    return marks


def _comparable(row, ref) -> bool:
    """Both cells recovered measurable damage on the same TEAL set."""
    return bool(
        seed_values(row.damage_recovered_seeds)
        and seed_values(ref.damage_recovered_seeds)
        and row.damage_measurable
        and ref.damage_measurable
        and row.sparsify == ref.sparsify
    )


def noisy_pareto(group: pd.DataFrame) -> list[bool]:
    """Pareto flags that respect noise: a cell is dominated by one with no more parameters that
    recovers more beyond noise, or by one with fewer parameters it does not beat beyond noise.
    Cells without a measurable damage fall back to :func:`pareto_front` on perplexity."""
    rows = list(group.itertuples())
    if not all(_comparable(r, rows[0]) or not r.bias_parameters for r in rows):
        return pareto_front(group["bias_parameters"], group["spon_ppl"])
    floor = pooled_floor([seed_values(v) for v in group["damage_recovered_seeds"]])

    def beats(j, i) -> str:
        test = dr_test(j, i, floor)
        return outcome(test) if math.isfinite(test.se) else INCONCLUSIVE

    flags = []
    for i in rows:
        dominated = any(
            (j.bias_parameters <= i.bias_parameters and beats(j, i) == SUPPORTED)
            or (j.bias_parameters < i.bias_parameters and beats(i, j) != SUPPORTED)
            for j in rows
            if j is not i and seed_values(j.damage_recovered_seeds)
        )
        flags.append(not dominated)
    return flags


def sparsity_key(sparsity: float) -> str:
    """Dot-free column name for metrics JSON (``s50`` for 0.5) so dvc's flattening stays readable."""
    return f"s{round(sparsity * 100):d}"


def nested_metrics(frame: pd.DataFrame, dense_ppl: float) -> dict:
    """``{"ppl": {"TOP-50": {"s50": ...}}, ...}``: one dvc metrics column per config and sparsity."""
    out: dict = {"dense_ppl": dense_ppl}
    fields = {
        "ppl": "spon_ppl",
        "ppl_sd": "spon_ppl_sd",
        "teal_ppl": "teal_ppl",
        "damage_recovered": "damage_recovered",
        "damage_recovered_sd": "damage_recovered_sd",
        "kl": "spon_kl",
    }
    for name, column in fields.items():
        out[name] = {}
        for row in frame.itertuples():
            value = getattr(row, column)
            value = None if pd.isna(value) else round(float(value), 5)
            out[name].setdefault(row.config, {})[sparsity_key(row.sparsity)] = value
    return out


SPARSITY_TOLERANCE = 0.02  # |achieved - target| beyond this is flagged in the table

DISPLAY = {
    "config": "config",
    "sparsity": "sparsity",
    "sparsify": "TEAL set",
    "modules": "SPON modules",
    "layers": "layers",
    "bias": "bias",
    "seeds": "seeds",
    "relative_parameters": "rel. params",
    "dense_ppl": "dense ppl",
    "teal_ppl": "TEAL ppl",
    "spon_ppl": "SPON ppl",
    "ppl_reduction_vs_teal": "% PPL vs TEAL",
    "above_dense": "% above dense",
    "damage_recovered": "damage recovered",
    "vs_reference": "vs ref.",
    "spon_kl": "SPON KL",
    "achieved_sparsity": "achieved sparsity",
    "best_epochs": "kept epoch",
    "budget": "training budget",
    "pareto": "Pareto",
}


def display_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader wants, rounded, with readable headers (mean ± seed sd)."""
    shown = frame[list(DISPLAY)].copy()
    shown["relative_parameters"] = frame["relative_parameters"].map(
        lambda v: "n/a" if pd.isna(v) else f"{v:.2f}x"
    )
    shown["spon_ppl"] = [
        pm(m, s, 1, 2) for m, s in zip(frame["spon_ppl"], frame["spon_ppl_sd"], strict=True)
    ]
    shown["damage_recovered"] = [
        pm(m, s, 100, 1, "%") if ok else f"n/a (TEAL +{d:.2f} ppl: within noise)"
        for m, s, ok, d in zip(
            frame["damage_recovered"],
            frame["damage_recovered_sd"],
            frame["damage_measurable"],
            frame["teal_damage"],
            strict=True,
        )
    ]
    for column in ("ppl_reduction_vs_teal", "above_dense"):
        shown[column] = frame[column].map(lambda v: f"{100 * v:.1f}%")
    for column in ("dense_ppl", "teal_ppl"):
        shown[column] = frame[column].map(lambda v: f"{v:.2f}")
    shown["spon_kl"] = frame["spon_kl"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.4f}")
    shown["achieved_sparsity"] = [
        f"{a:.3f}" + (f" (off by {g:+.3f})" if abs(g) > SPARSITY_TOLERANCE else "")
        for a, g in zip(frame["achieved_sparsity"], frame["sparsity_gap"], strict=True)
    ]
    shown["pareto"] = frame["pareto"].map(lambda v: "yes" if v else "")
    shown["vs_reference"] = frame["vs_reference"].fillna("")
    return shown.rename(columns=DISPLAY)


def protocol_line(dense: dict) -> str:
    """The dense metrics' protocol in words: definition, windows x context, scored tokens."""
    info = dense.get("protocol") or {"definition": "C: independent blocks", "windows": "?",
                                      "context": "?", "stride": None}  # fmt: skip
    stride = f", stride {info['stride']}" if info.get("protocol") == "sliding" else ""
    return (
        f"{info['definition']} ({info['windows']} windows x {info['context']} tokens{stride}, "
        f"{dense['tokens']} scored tokens)"
    )


def perplexity_line(dense: dict) -> str:
    """What every perplexity of the table means: protocol, sparsified tokens and dtype."""
    info = dense.get("protocol") or {}
    dtype = (dense.get("env") or {}).get("dtype", "?")
    return (
        f"Perplexity protocol: {protocol_line(dense)}; sparsified tokens: "
        f"{info.get('sparsified_tokens', 'all')}; {dtype}."
    )


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    shown = display_table(frame)
    return markdown_table(list(shown.columns), shown.itertuples(index=False)) + "\n"


def to_latex(frame: pd.DataFrame) -> str:
    """A booktabs LaTeX tabular of the display table."""
    shown = display_table(frame)

    def esc(value: object) -> str:
        return str(value).replace("%", r"\%").replace("_", r"\_").replace("&", r"\&")

    lines = [
        r"\begin{tabular}{" + "l" * len(shown.columns) + "}",
        r"\toprule",
        " & ".join(esc(c) for c in shown.columns) + r" \\",
        r"\midrule",
        *(" & ".join(esc(v) for v in row) + r" \\" for row in shown.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


# Where `make repro` leaves what a reader looks at first (paths as in dvc.yaml).
RESULT_PLACES: tuple[tuple[str, str], ...] = (
    ("metrics/report.md", "the run's report: tables, findings, every figure with its caption"),
    ("metrics/tables/summary.md", "summary table (CSV and LaTeX beside it)"),
    ("metrics/findings.md", "the study's claims (a)-(d) re-tested, with verdicts"),
    ("metrics/summary.json", "nested metrics (dvc metrics show / diff)"),
    ("plots/sweep", "sweep figures (dvc plots show / diff)"),
    ("metrics/interpret", "what the biases encode, where they matter (figures: plots/interpret)"),
    ("metrics/spectrum/report.md", "weight-spectrum report"),
    ("metrics/importance", "activation / gradient importance (figures: plots/importance)"),
)


def results_overview(root: Path) -> str:
    """Where the results of a finished run are, then the summary table itself (Markdown)."""
    lines = ["Results:"]
    for rel, what in RESULT_PLACES:
        state = "" if (root / rel).exists() else "  (not built)"
        lines.append(f"  {rel:<28} {what}{state}")
    table = root / SUMMARY_MD
    if table.is_file():
        lines += ["", table.read_text().rstrip()]
    return "\n".join(lines) + "\n"
