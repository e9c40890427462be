"""Tables (CSV) and the Markdown report of the weight-spectrum analysis."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sponlab.analysis.spectrum import KERNEL_TYPE, SpectrumResult
from sponlab.tensorio import atomic_path

ERANK_HEADERS = (
    "type",
    "shape",
    "max rank",
    "mean erank",
    "mean ratio",
    "min (layer)",
    "max (layer)",
)
PHASE_HEADERS = ("type", "phase", "layers", "mean", "std", "min", "max", "median", "range", "CV")
TREND_HEADERS = ("type", "trend", "early", "middle", "late", "largest jump", "largest drop")
DOWN_HEADERS = ("energy", "components", "fraction of rank")


def tables(result: SpectrumResult) -> dict[str, pd.DataFrame]:
    """Every table of the analysis, keyed by CSV file stem."""
    erank = pd.DataFrame(
        [
            {
                "layer": layer.layer,
                "type": module,
                "rows": layer.shapes[module][0],
                "cols": layer.shapes[module][1],
                "max_rank": min(layer.shapes[module]),
                "erank": layer.erank[module],
                "erank_ratio": layer.erank[module] / min(layer.shapes[module]),
            }
            for layer in result.layers
            for module in result.modules
        ]
    )
    dims = result.dims
    heads = pd.DataFrame(
        [
            {
                "layer": layer.layer,
                "head": h,
                "kv_head": h // dims.group,
                "erank": layer.kernel_erank[h],
                "frobenius": layer.kernel_frobenius[h],
                "asymmetry": layer.kernel_asymmetry[h],
                "tag": result.head_tags[layer.layer, h],
            }
            for layer in result.layers
            for h in range(dims.heads)
        ]
    )
    focus = result.focus
    eigs = pd.DataFrame(
        {
            "index": np.arange(len(focus.eigenvalues)),
            "real": focus.eigenvalues.real,
            "imag": focus.eigenvalues.imag,
            "magnitude": np.abs(focus.eigenvalues),
            "cum_energy": focus.eig_energy,
            "singular_value": focus.singular_values,
            "sv_cum_energy": focus.sv_energy,
        }
    )
    down = result.down
    svd = pd.DataFrame(
        {
            "index": np.arange(len(down.singular_values)),
            "singular_value": down.singular_values,
            "explained": down.explained,
            "cumulative": np.cumsum(down.explained),
        }
    )
    phases = pd.DataFrame(
        [
            {"type": name, **vars(p), "layers": _span(p.layers)}
            for name, stats in result.phases.items()
            for p in stats
        ]
    )
    trends = pd.DataFrame(
        [
            {
                "type": name,
                "trend": t.label,
                **dict(zip(("early", "middle", "late"), t.means, strict=True)),
                "jump_layer": t.jump[0] if t.jump else None,
                "jump": t.jump[1] if t.jump else None,
                "drop_layer": t.drop[0] if t.drop else None,
                "drop": t.drop[1] if t.drop else None,
            }
            for name, t in result.trends.items()
        ]
    )
    return {
        "erank": erank,
        "kernel_heads": heads,
        "kernel_focus_eigs": eigs,
        "down_svd": svd,
        "phases": phases,
        "trends": trends,
    }


def write_tables(result: SpectrumResult, out_dir: Path) -> dict[str, Path]:
    """Write :func:`tables` as ``<stem>.csv`` under ``out_dir`` (atomically, 6 significant digits)."""
    paths = {}
    for stem, frame in tables(result).items():
        paths[stem] = out_dir / f"{stem}.csv"
        with atomic_path(paths[stem]) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")  # keeps the header when empty
    return paths


def relative_link(from_dir: Path, target: Path) -> str:
    """``target`` as a POSIX path relative to ``from_dir`` (a Markdown link that survives moving
    the whole run folder)."""
    return Path(os.path.relpath(target, from_dir)).as_posix()


def _span(layers: Sequence[int]) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


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
    lines = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _step(step: tuple[int, float] | None) -> str:
    return f"{step[0]}→{step[0] + 1} ({step[1]:+.3g})" if step else "-"


def _erank_rows(result: SpectrumResult) -> list[list[Any]]:
    rows = []
    for name in result.series:
        v = result.erank(name)
        shape = (
            f"{result.dims.hidden}x{result.dims.hidden} (per head)"
            if name == KERNEL_TYPE
            else "x".join(map(str, result.dims.expected_shape(name)))
        )
        lo, hi = int(np.argmin(v)), int(np.argmax(v))
        rows.append(
            [
                name,
                shape,
                result.max_rank(name),
                float(v.mean()),
                float(v.mean()) / result.max_rank(name),
                f"{v[lo]:.4g} ({lo})",
                f"{v[hi]:.4g} ({hi})",
            ]
        )
    return rows


def _kernel_section(result: SpectrumResult, figures: Mapping[str, str]) -> list[str]:
    tags, (low, high) = result.head_tags, result.tag_thresholds
    er, p, f = result.kernel_erank, result.params, result.focus
    flagged = [
        [int(i), int(h), int(h) // result.dims.group, float(er[i, h]), str(tags[i, h])]
        for i, h in np.argwhere(tags != "mid")
    ]
    ref = (
        f"{p.tag_low:g}x / {p.tag_high:g}x the median"
        if p.tag_reference == "median"
        else "absolute"
    )
    out = [
        "## Attention kernels A_h = W_Q_h^T W_K_g",
        "",
        f"Query head h reads KV head g = h // {result.dims.group} "
        f"({result.dims.heads} query heads, {result.dims.kv_heads} KV heads). Rank(A_h) <= "
        f"head_dim = {result.dims.head_dim}; effective ranks are computed from the "
        "d x d factors (exactly equal to the full hidden x hidden matrix).",
        "",
        "Asymmetry ||A - A^T||_F / ||A||_F is 0 for a symmetric kernel, 2 for an antisymmetric "
        "one and about 1.41 when W_Q and W_K are unrelated.",
        "",
        f"![kernel effective rank per layer and head]({figures['kernel_heatmap']})",
        "",
        md_table(
            ("statistic", "value"),
            [
                ["median effective rank", float(np.median(er))],
                ["mean effective rank", float(er.mean())],
                ["mean asymmetry ||A-A^T||/||A||", float(result.kernel_asymmetry.mean())],
                [f"low-rank heads (< {low:.4g}; {ref})", int((tags == "low").sum())],
                [f"high-rank heads (> {high:.4g})", int((tags == "high").sum())],
            ],
        ),
        "",
    ]
    if flagged:
        out += [
            md_table(("layer", "head", "kv head", "effective rank", "tag"), flagged),
            "",
        ]
    out += [
        f"### Layer {f.layer}, head {f.head} (KV head {f.kv_head})",
        "",
        "Eigenvalues of A_h are those of the head_dim x head_dim matrix W_K_g W_Q_h^T "
        "(plus hidden - head_dim zeros).",
        "",
        f"![eigenvalues of the focus head]({figures['kernel_focus']})",
        "",
        md_table(
            ("statistic", "value"),
            [
                ["effective rank", f.effective_rank],
                ["asymmetry ||A-A^T||_F / ||A||_F", f.asymmetry],
                ["largest |eigenvalue|", float(np.abs(f.eigenvalues[0]))],
                ["largest singular value", float(f.singular_values[0])],
                ["real eigenvalues", int((np.abs(f.eigenvalues.imag) < 1e-9).sum())],
                ["eigenvalues with Re < 0", int((f.eigenvalues.real < 0).sum())],
                [f"eigenvalues for {f.energy_fraction:.0%} of sum |λ|²", f.eig_count],
                [f"singular values for {f.energy_fraction:.0%} of ||A||_F²", f.sv_count],
            ],
        ),
        "",
    ]
    return out


def _down_section(result: SpectrumResult, figures: Mapping[str, str]) -> list[str]:
    d = result.down
    rank = len(d.singular_values)
    return [
        f"## SVD of down_proj (layer {d.layer})",
        "",
        f"![down_proj singular values]({figures['down_svd']})",
        "",
        md_table(
            DOWN_HEADERS,
            [[f"{t:.0%}", n, f"{n / rank:.1%}"] for t, n in d.components.items()],
        ),
        "",
        md_table(
            ("statistic", "value"),
            [
                ["top singular value", d.top],
                ["smallest singular value", d.smallest],
                ["condition number", d.condition_number],
                ["variance explained by the top component", float(d.explained[0])],
            ],
        ),
        "",
    ]


def _phase_section(result: SpectrumResult, figures: Mapping[str, str]) -> list[str]:
    rows = [
        [name, p.phase, _span(p.layers), p.mean, p.std, p.min, p.max, p.median, p.range, p.cv]
        for name, stats in result.phases.items()
        for p in stats
    ]
    trends = [
        [name, t.label, *t.means, _step(t.jump), _step(t.drop)] for name, t in result.trends.items()
    ]
    tol = result.params.trend_tolerance
    return [
        "## Phases (early / middle / late thirds of the layers)",
        "",
        f"![phase means]({figures['phases']})",
        "",
        md_table(PHASE_HEADERS, rows),
        "",
        "Trend of the three phase means (d1 = middle - early, d2 = late - middle, "
        f"tol = {tol:g} x mean): U-shape d1 < -tol < tol < d2; inverted-U d1 > tol, d2 < -tol; "
        "monotone up/down: no step against the direction beyond tol and a net change beyond tol; "
        "flat: every change within tol; otherwise other. Jump/drop: the largest single "
        "layer-to-layer rise/fall (l→l+1).",
        "",
        md_table(TREND_HEADERS, trends),
        "",
    ]


def render_report(result: SpectrumResult, figures: Mapping[str, str], model: str = "") -> str:
    """The Markdown report; ``figures`` maps figure names to paths relative to the report."""
    d = result.dims
    per_layer = [
        [layer.layer, *(layer.erank[m] for m in result.modules), float(layer.kernel_erank.mean())]
        for layer in result.layers
    ]
    lines = [
        "# Weight spectrum report",
        "",
        f"Model: `{model or 'model'}`. Analysis took {result.seconds:.1f} s on "
        f"{result.workers} CPU thread(s).",
        "",
        md_table(
            ("layers", "hidden", "intermediate", "heads", "KV heads", "head dim", "vocab"),
            [[d.layers, d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim, d.vocab]],
        ),
        "",
        "## Entropy effective rank per weight type",
        "",
        "erank = exp(H(p)), p_i = s_i / sum_j s_j over the singular values s (Roy & Vetterli); "
        "ratio = erank / max rank. qk_kernel: mean over heads of the kernel effective rank.",
        "",
        md_table(ERANK_HEADERS, _erank_rows(result)),
        "",
        f"![effective rank per layer]({figures['erank_by_layer']})",
        "",
        f"![effective rank ratio per layer]({figures['erank_ratio']})",
        "",
        "### Per layer",
        "",
        md_table(("layer", *result.modules, KERNEL_TYPE), per_layer),
        "",
    ]
    lines += _kernel_section(result, figures)
    lines += _down_section(result, figures)
    lines += _phase_section(result, figures)
    lines += [
        "Tables: `erank.csv`, `kernel_heads.csv`, `kernel_focus_eigs.csv`, `down_svd.csv`, "
        "`phases.csv`, `trends.csv` next to this report.",
        "",
    ]
    return "\n".join(lines)
