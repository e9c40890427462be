"""The sweep summary: one row per (config, sparsity) cell with its module-matched TEAL baseline.

Every evaluate cell measures TEAL-only on exactly the modules its config sparsifies, so the
baseline of "SPON on o_proj" is TEAL on the same modules with no bias, never a different set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class CellResult:
    config: str
    sparsity: float
    layers: str
    modules: str
    sparsify_modules: str
    bias_parameters: int
    relative_parameters: float  # bias parameters / model parameters
    dense_ppl: float
    teal_ppl: float
    spon_ppl: float
    damage_recovered: float | None
    teal_kl: float | None
    spon_kl: float | None
    achieved_sparsity: float
    final_val_kl: float | None


def cell_result(evaluation: dict, training: dict, model_parameters: int) -> CellResult:
    """Combine one cell's evaluate ``metrics.json`` and train ``train.json``."""
    epochs = training.get("epochs") or []
    return CellResult(
        config=evaluation["config"],
        sparsity=float(evaluation["sparsity"]),
        layers=training.get("layers", ""),
        modules=",".join(training.get("modules", [])) or "-",
        sparsify_modules=",".join(training.get("sparsify_modules", [])),
        bias_parameters=int(evaluation["bias_parameters"]),
        relative_parameters=evaluation["bias_parameters"] / model_parameters,
        dense_ppl=evaluation["dense_ppl"],
        teal_ppl=evaluation["teal"]["ppl"],
        spon_ppl=evaluation["spon"]["ppl"],
        damage_recovered=evaluation["damage_recovered"],
        teal_kl=evaluation["teal"]["kl"],
        spon_kl=evaluation["spon"]["kl"],
        achieved_sparsity=evaluation["achieved_sparsity"]["mean"],
        final_val_kl=epochs[-1]["val_kl"] if epochs else None,
    )


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


def summary_table(cells: Sequence[CellResult]) -> pd.DataFrame:
    """All cells, sorted by sparsity then config, with a per-sparsity Pareto flag."""
    frame = pd.DataFrame([asdict(c) for c in cells]).sort_values(["sparsity", "config"])
    frame["pareto"] = False
    for _, group in frame.groupby("sparsity"):
        frame.loc[group.index, "pareto"] = pareto_front(group["bias_parameters"], group["spon_ppl"])
    return frame.reset_index(drop=True)


def sparsity_key(sparsity: float) -> str:
    """Dot-free column name for metrics JSON (``s50`` for 0.5) so dvc's flattening stays readable."""
    return f"s{round(sparsity * 100):d}"


def nested_metrics(frame: pd.DataFrame, dense_ppl: float) -> dict:
    """``{"ppl": {"TOP-50": {"s50": ...}}, ...}``: one dvc metrics column per config and sparsity."""
    out: dict = {"dense_ppl": dense_ppl}
    fields = {
        "ppl": "spon_ppl",
        "teal_ppl": "teal_ppl",
        "damage_recovered": "damage_recovered",
        "kl": "spon_kl",
    }
    for name, column in fields.items():
        out[name] = {}
        for row in frame.itertuples():
            value = getattr(row, column)
            value = None if pd.isna(value) else round(float(value), 5)
            out[name].setdefault(row.config, {})[sparsity_key(row.sparsity)] = value
    return out


DISPLAY = {
    "config": "config",
    "sparsity": "sparsity",
    "modules": "SPON modules",
    "layers": "layers",
    "bias_parameters": "bias params",
    "relative_parameters": "rel. params",
    "dense_ppl": "dense ppl",
    "teal_ppl": "TEAL ppl",
    "spon_ppl": "SPON ppl",
    "damage_recovered": "damage recovered",
    "teal_kl": "TEAL KL",
    "spon_kl": "SPON KL",
    "achieved_sparsity": "achieved sparsity",
    "pareto": "Pareto",
}


def display_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader wants, rounded, with readable headers."""
    shown = frame[list(DISPLAY)].copy()
    shown["relative_parameters"] = shown["relative_parameters"].map(lambda v: f"{100 * v:.3f}%")
    shown["damage_recovered"] = shown["damage_recovered"].map(
        lambda v: "n/a" if pd.isna(v) else f"{100 * v:.1f}%"
    )
    for column in ("dense_ppl", "teal_ppl", "spon_ppl"):
        shown[column] = shown[column].map(lambda v: f"{v:.3f}")
    for column in ("teal_kl", "spon_kl", "achieved_sparsity"):
        shown[column] = shown[column].map(lambda v: "n/a" if pd.isna(v) else f"{v:.4f}")
    shown["pareto"] = shown["pareto"].map(lambda v: "yes" if v else "")
    return shown.rename(columns=DISPLAY)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    shown = display_table(frame)
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


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
    ("metrics/tables/summary.md", "summary table (CSV and LaTeX beside it)"),
    ("metrics/summary.json", "nested metrics (dvc metrics show / diff)"),
    ("plots/sweep", "sweep figures (dvc plots show / diff)"),
    ("reports/interpret", "what the biases encode, where they matter"),
    ("reports/spectrum/report.md", "weight-spectrum report"),
    ("reports/importance", "activation / gradient importance"),
)


def results_overview(root: Path) -> str:
    """Where the results of a finished run are, then the summary table itself (Markdown)."""
    lines = ["Results:"]
    for rel, what in RESULT_PLACES:
        state = "" if (root / rel).exists() else "  (not built)"
        lines.append(f"  {rel:<28} {what}{state}")
    table = root / "metrics/tables/summary.md"
    if table.is_file():
        lines += ["", table.read_text().rstrip()]
    return "\n".join(lines) + "\n"
