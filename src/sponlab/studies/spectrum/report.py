"""Tables (CSV) and the Markdown report of the weight-spectrum analysis."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sponlab.io.tables import markdown_table
from sponlab.studies.spectrum.spectrum import KERNEL_TYPE, SpectrumResult
from sponlab.studies.spectrum.stats import span, statistics

ERANK_HEADERS = (
    "weight type",
    "shape",
    "count",
    "min",
    "max",
    "mean",
    "median",
    "std",
    "range",
    "first",
    "last",
    "variance",
    "CV",
)
PHASE_HEADERS = ("type", "mean", "std", "min", "max", "median", "range", "CV")
TREND_HEADERS = ("weight", "early", "middle", "late", "trend", "with tolerance")
DOWN_HEADERS = ("energy", "components", "fraction of rank")


def relative_link(from_dir: Path, target: Path) -> str:
    """``target`` as a POSIX path relative to ``from_dir`` (a Markdown link that survives moving
    the whole run folder)."""
    return Path(os.path.relpath(target, from_dir)).as_posix()


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def _cell(text: str) -> str:
    """Escape ``|`` so norms like ||A|| do not split a table cell."""
    return text.replace("|", "\\|")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells formatted with :func:`_num` unless strings)."""
    cells = [[_cell(c) if isinstance(c, str) else _num(c) for c in row] for row in rows]
    return markdown_table([_cell(h) for h in headers], cells)


def _step(step: list | None) -> tuple[str, float | None]:
    """``(layers "l→l+1", delta)`` of a largest layer-to-layer step."""
    return (f"{step[0]}→{step[0] + 1}", step[1]) if step else ("-", None)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _focus_section(stats: dict[str, Any], figures: Mapping[str, str]) -> list[str]:
    f, hidden = stats["focus_kernel"], stats["config"]["hidden"]
    n = f["eigenvalues"]
    pct = f["nonzero_percentiles"]
    return [
        f"## Attention kernel analysis (layer {f['layer']}, head {f['head']})",
        "",
        f"The attention kernel W_Q_h^T W_K_g (KV head {f['kv_head']}) maps the input space "
        f"(d={hidden}) to itself: which directions the head attends to.",
        "",
        md_table(
            ("metric", "value"),
            [
                ["kernel shape", f"{hidden} x {hidden}"],
                ["asymmetry ||A - A^T|| / ||A||", f["asymmetry"]],
                ["complex eigenvalues", f"{f['complex']}/{n} ({_pct(f['complex'], n)})"],
                [
                    f"top {stats['config']['head_dim']} eigenvalues energy",
                    _pct(f["top_head_dim_energy"], 1),
                ],
                ["effective rank (entropy of |eigenvalues|)", f["effective_rank_eigen"]],
                ["effective rank (entropy of singular values)", f["effective_rank_singular"]],
                ["99% spectral energy at", f"{f['milestones']['0.99']}/{hidden} components"],
            ],
        ),
        "",
        f"![eigenvalues of the focus head]({figures['kernel_focus']})",
        "",
        "### Top 20 eigenvalues",
        "",
        md_table(
            ("rank", "real", "imaginary", "magnitude"), [[i, *z] for i, z in enumerate(f["top20"])]
        ),
        "",
        "### Eigenvalue magnitude spectrum",
        "",
        f"Of {n} eigenvalues, **{f['nonzero']} are non-zero** (|λ| > 1e-8); "
        f"{n - f['nonzero']} are zero (rank(A) <= head_dim). Non-zero magnitudes:",
        "",
        md_table(("percentile", "magnitude"), [[f"{q}%", v] for q, v in pct.items()]),
        "",
        "### Complex plane distribution",
        "",
        f"- real part range: [{f['real_range'][0]:.4g}, {f['real_range'][1]:.4g}]",
        f"- imaginary part range: [{f['imag_range'][0]:.4g}, {f['imag_range'][1]:.4g}]",
        f"- {f['complex']} eigenvalues have |imag| > 1e-6, {f['real']} are essentially real",
        f"- {f['positive_real']} have a positive real part, {f['negative_real']} a negative one",
        "",
        "### Cumulative spectral energy",
        "",
        md_table(
            ("energy threshold", "components needed", f"% of total ({hidden})"),
            [[f"{float(m):.0%}", c, _pct(c, hidden)] for m, c in f["milestones"].items()],
        ),
        "",
    ]


def _heatmap_section(stats: dict[str, Any], figures: Mapping[str, str]) -> list[str]:
    h = stats["kernel_heatmap"]
    low, high = h["thresholds"]["low"], h["thresholds"]["high"]
    rule = (
        f"heads whose mean over layers is <= the 25th percentile of the head means ({low:.4g}) "
        f"are LOW-RANK, >= the 75th ({high:.4g}) HIGH-RANK"
        if h["tag_reference"] == "percentile"
        else f"(layer, head) kernels below {low:.4g} are low-rank, above {high:.4g} high-rank "
        f"({h['tag_reference']} rule; MIXED: a head tagged differently across layers)"
    )
    g = h["global"]
    keys = ("mean", "std", "min", "max")
    return [
        "## Attention kernel effective rank: all layers x all heads",
        "",
        "Entropy effective rank of W_Q_h^T W_K_g per layer and head. Low-rank heads do structured "
        "relational operations (positional, syntactic); high-rank heads a soft lookup.",
        "",
        f"![kernel effective rank per layer and head]({figures['kernel_heatmap']})",
        "",
        md_table(
            ("metric", "value"), [[f"global {k}", g[k]] for k in ("min", "max", "mean", "std")]
        ),
        "",
        "### Per-head summary (mean across layers)",
        "",
        f"Categories: {rule}.",
        "",
        md_table(
            ("head", *keys, "category"),
            [[r["head"], *(r[k] for k in keys), r["category"]] for r in h["per_head"]],
        ),
        "",
        "### Per-layer summary (mean across heads)",
        "",
        md_table(("layer", *keys), [[r["layer"], *(r[k] for k in keys)] for r in h["per_layer"]]),
        "",
    ]


def _down_section(stats: dict[str, Any], figures: Mapping[str, str]) -> list[str]:
    d = stats["down_proj"]
    rank = min(d["shape"])
    return [
        f"## W_down SVD analysis (layer {d['layer']})",
        "",
        f"- shape: {d['shape'][0]} x {d['shape'][1]}",
        f"- 99% variance captured by {d['milestones']['0.99']}/{rank} singular values",
        f"- top singular value: {d['top_singular_value']:.4f}",
        f"- smallest singular value: {d['smallest_singular_value']:.6f}",
        f"- condition number: {_num(d['condition_number'])}",
        "",
        md_table(
            DOWN_HEADERS,
            [[f"{float(m):.0%}", n, f"{n / rank:.1%}"] for m, n in d["milestones"].items()],
        ),
        "",
        f"![down_proj singular values]({figures['down_svd']})",
        "",
    ]


def _erank_section(result: SpectrumResult, stats: dict, figures: Mapping[str, str]) -> list[str]:
    cols = ("count", "min", "max", "mean", "median", "std", "range", "first", "last", "variance")
    rows = [
        [n, t["shape"], *(t[c] for c in cols), t["cv"]] for n, t in stats["weight_types"].items()
    ]
    per_layer = [
        [layer.layer, *(layer.erank[m] for m in result.modules), float(layer.kernel_erank.mean())]
        for layer in result.layers
    ]
    return [
        "## Effective rank by layer and weight type",
        "",
        "Effective rank = exp(entropy of the normalised singular values) (Roy & Vetterli): higher "
        f"is a more spread-out spectrum. {KERNEL_TYPE}: mean over heads of the kernel erank.",
        "",
        md_table(ERANK_HEADERS, rows),
        "",
        f"![effective rank per layer]({figures['erank_by_layer']})",
        "",
        f"![effective rank ratio per layer]({figures['erank_ratio']})",
        "",
        "### Effective rank per layer",
        "",
        md_table(("layer", *result.modules, KERNEL_TYPE), per_layer),
        "",
    ]


def _phase_section(result: SpectrumResult, stats: dict, figures: Mapping[str, str]) -> list[str]:
    ph = stats["phases"]
    pooled = ph["pooled"]
    spans = {name: span(v["layers"]) for name, v in pooled.items()}
    out = [
        "## Phase analysis: early / middle / late",
        "",
        f"Layers split into thirds (third = L // 3, the remainder in the last phase): early "
        f"({spans['early']}), middle ({spans['middle']}), late ({spans['late']}).",
        "",
        "### Aggregate mean effective rank by phase",
        "",
        md_table(
            ("phase", "layers", "mean erank", "std"),
            [[n, spans[n], v["mean"], v["std"]] for n, v in pooled.items()],
        ),
        "",
        "### Per-phase, per-weight statistics",
        "",
    ]
    for phase in pooled:
        rows = [
            [name, p["mean"], p["std"], p["min"], p["max"], p["median"], p["range"], p["cv"]]
            for name, per in ph["per_type"].items()
            for p in per
            if p["phase"] == phase
        ]
        out += [f"#### {phase} ({spans[phase]})", "", md_table(PHASE_HEADERS, rows), ""]
    trend_rows = [[n, *t["means"], t["verdict"], t["label"]] for n, t in ph["trends"].items()]
    steps = [[n, *_step(t["max_drop"]), *_step(t["max_jump"])] for n, t in ph["trends"].items()]
    tol = result.params.trend_tolerance
    out += [
        "### Per-weight phase trend",
        "",
        "A U-shape (middle below both ends) would mean the middle layers are more structured. "
        f"Trend: the notebook's strict rule; with tolerance: changes within {tol:g} x the mean "
        "count as flat.",
        "",
        md_table(TREND_HEADERS, trend_rows),
        "",
        f"![phase means]({figures['phases']})",
        "",
        "### Layer-over-layer gradient (sharp transitions)",
        "",
        md_table(("weight", "max drop (layers)", "drop Δ", "max jump (layers)", "jump Δ"), steps),
        "",
    ]
    return out


def render_report(result: SpectrumResult, figures: Mapping[str, str], model: str = "") -> str:
    """The Markdown report in the weight-analysis notebook's section order; ``figures`` maps
    figure names to paths relative to the report. Every number comes from :func:`statistics`."""
    stats = statistics(result, model)
    c = stats["config"]
    config_rows = [
        ["layers (L)", c["layers"]],
        ["hidden size (d)", c["hidden"]],
        ["FFN intermediate (d_ff)", c["intermediate"]],
        ["attention heads (h)", c["heads"]],
        ["KV heads", c["kv_heads"]],
        ["vocab size (V)", c["vocab"]],
        ["head dim (d_head)", c["head_dim"]],
        ["KV dim (d_kv)", c["kv_dim"]],
    ]
    lines = [
        f"# Transformer weight analysis: {model or 'model'}",
        "",
        f"Analysis took {result.seconds:.1f} s on {result.workers} CPU thread(s); every number "
        "below is in `statistics.json` beside this report.",
        "",
        "## Model configuration",
        "",
        md_table(("parameter", "value"), config_rows),
        "",
    ]
    lines += _focus_section(stats, figures)
    lines += _heatmap_section(stats, figures)
    lines += _down_section(stats, figures)
    lines += _erank_section(result, stats, figures)
    lines += _phase_section(result, stats, figures)
    lines += [
        "Tables: `erank.csv`, `kernel_heads.csv`, `kernel_focus_eigs.csv`, `down_svd.csv`, "
        "`phases.csv`, `trends.csv`, `statistics.json` next to this report.",
        "",
    ]
    return "\n".join(lines)
