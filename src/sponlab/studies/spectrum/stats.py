"""The weight spectrum's numbers: the notebook's statistics and the CSV tables.

Everything the report prints comes from :func:`statistics` (also written as ``statistics.json``):
the focus head's eigenvalue spectrum (effective rank from the entropy of the normalised |eigenvalue|
magnitudes, non-zero count, percentiles, complex-plane counts, energy milestones), the kernel
effective-rank heatmap (global, per head with its low / mid / high category, per layer), the
down_proj SVD milestones, per-weight-type statistics over layers, and the phase analysis (pooled
mean ± std per phase, per-phase per-type tables, the notebook's trend verdict, sharpest steps).
Standard deviations follow the notebook: numpy's (ddof=0) for per-type and heatmap statistics,
pandas' (ddof=1) for phase tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sponlab.io.tensorio import atomic_path, write_json
from sponlab.studies.spectrum.attention_kernels import FocusKernel
from sponlab.studies.spectrum.spectrum import KERNEL_TYPE, SpectrumResult
from sponlab.studies.spectrum.trends import PHASES, notebook_trend, phase_layers

MILESTONES: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.99)
PERCENTILES: tuple[int, ...] = (0, 5, 10, 25, 50, 75, 90, 95, 100)
NONZERO = 1e-8  # |eigenvalue| above this counts as non-zero
COMPLEX = 1e-6  # |imaginary part| above this counts as complex


def span(layers: Sequence[int]) -> str:
    """``first-last`` of a run of layers (``-`` when empty)."""
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def milestone_counts(magnitudes: np.ndarray, fractions: tuple[float, ...] = MILESTONES) -> dict:
    """Components needed for each fraction of the energy sum |x|^2 (largest first)."""
    energy = np.sort(np.abs(magnitudes) ** 2)[::-1]
    total = energy.sum()
    cumulative = np.cumsum(energy) / total if total > 0 else np.zeros_like(energy)
    return {f"{m:g}": int((cumulative < m).sum()) + 1 for m in fractions}


def eigen_summary(focus: FocusKernel, hidden: int) -> dict[str, Any]:
    """The notebook's focus-head table: the kernel is hidden x hidden, so its eigenvalues are the
    head_dim computed ones plus hidden - head_dim exact zeros."""
    eig = np.concatenate([focus.eigenvalues, np.zeros(hidden - len(focus.eigenvalues))])
    mags = np.abs(eig)  # [hidden]
    p = mags / mags.sum() if mags.sum() > 0 else mags
    nonzero = mags[mags > NONZERO]
    n_complex = int((np.abs(eig.imag) > COMPLEX).sum())
    head_dim = len(focus.eigenvalues)
    energy = (mags**2).sum()
    top = np.sort(mags)[::-1][:head_dim]
    return {
        "layer": focus.layer,
        "head": focus.head,
        "kv_head": focus.kv_head,
        "kernel_shape": [hidden, hidden],
        "asymmetry": focus.asymmetry,
        "eigenvalues": len(eig),
        "complex": n_complex,
        "real": int(len(eig) - n_complex),
        "positive_real": int((eig.real > 0).sum()),
        "negative_real": int((eig.real < 0).sum()),
        "real_range": [float(eig.real.min()), float(eig.real.max())],
        "imag_range": [float(eig.imag.min()), float(eig.imag.max())],
        "top_head_dim_energy": float((top**2).sum() / energy) if energy > 0 else math.nan,
        "effective_rank_eigen": float(np.exp(-np.sum(p * np.log(p + 1e-12)))),
        "effective_rank_singular": focus.effective_rank,
        "nonzero": len(nonzero),
        "nonzero_percentiles": {
            str(q): float(v)
            for q, v in zip(PERCENTILES, np.percentile(nonzero, PERCENTILES), strict=True)
        }
        if len(nonzero)
        else {},
        "milestones": milestone_counts(mags),
        "top20": [[float(z.real), float(z.imag), float(abs(z))] for z in focus.eigenvalues[:20]],
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def heatmap_summary(result: SpectrumResult) -> dict[str, Any]:
    """Global statistics of the [layers, heads] kernel effective ranks, per head (with its
    category) and per layer."""
    er = result.kernel_erank  # [L, H]
    tags = result.head_tags
    low, high = result.tag_thresholds
    return {
        "global": _summary(er),
        "tag_reference": result.params.tag_reference,
        "thresholds": {"low": low, "high": high},
        "per_head": [
            {"head": h, **_summary(er[:, h]), "category": _category(tags[:, h])}
            for h in range(er.shape[1])
        ],
        "per_layer": [{"layer": i, **_summary(er[i])} for i in range(er.shape[0])],
    }


def _category(column: np.ndarray) -> str:
    """A head's tag over layers: its single value when constant (percentile rule), else mixed."""
    values = set(column.tolist())
    return (
        {"low": "LOW-RANK", "high": "HIGH-RANK", "mid": "MID"}[values.pop()]
        if len(values) == 1
        else "MIXED"
    )


def type_statistics(values: np.ndarray, shape: str) -> dict[str, Any]:
    """The notebook's per-weight-type row over layers (numpy std, ddof=0)."""
    mean, std = float(values.mean()), float(values.std())
    return {
        "shape": shape,
        "count": int(values.size),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": mean,
        "median": float(np.median(values)),
        "std": std,
        "range": float(values.max() - values.min()),
        "first": float(values[0]),
        "last": float(values[-1]),
        "variance": float(values.var()),
        "cv": std / mean if mean else math.nan,
    }


def phase_summary(result: SpectrumResult) -> dict[str, Any]:
    """Pooled mean ± std (ddof=1) of every weight type's values per phase, the per-type phase
    tables, the notebook's trend verdict and the sharpest layer-to-layer steps."""
    layers = phase_layers(result.dims.layers)
    pooled = {}
    for phase in PHASES:
        values = np.concatenate([result.erank(m)[layers[phase]] for m in result.modules])
        pooled[phase] = {
            "layers": layers[phase],
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
        }
    per_type = {
        name: [vars(p) | {"layers": list(p.layers)} for p in s] for name, s in result.phases.items()
    }
    trend = {}
    for name, t in result.trends.items():
        steps = np.diff(result.erank(name))
        trend[name] = {
            "means": list(t.means),
            "verdict": notebook_trend(t.means),
            "label": t.label,
            "max_drop": [int(np.argmin(steps)), float(steps.min())] if steps.size else None,
            "max_jump": [int(np.argmax(steps)), float(steps.max())] if steps.size else None,
        }
    return {"pooled": pooled, "per_type": per_type, "trends": trend}


def statistics(result: SpectrumResult, model: str = "") -> dict[str, Any]:
    """Every number of the spectrum report (``statistics.json``)."""
    d = result.dims
    down = result.down
    shapes = {
        name: "x".join(map(str, d.expected_shape(name))) if name != KERNEL_TYPE else "per head"
        for name in result.series
    }
    return {
        "model": model,
        "config": {
            "layers": d.layers,
            "hidden": d.hidden,
            "intermediate": d.intermediate,
            "heads": d.heads,
            "kv_heads": d.kv_heads,
            "head_dim": d.head_dim,
            "kv_dim": d.head_dim * d.kv_heads,
            "vocab": d.vocab,
        },
        "focus_kernel": eigen_summary(result.focus, d.hidden),
        "kernel_heatmap": heatmap_summary(result),
        "down_proj": {
            "layer": down.layer,
            "shape": list(d.expected_shape("down_proj")),
            "top_singular_value": down.top,
            "smallest_singular_value": down.smallest,
            "condition_number": down.condition_number,
            "milestones": milestone_counts(down.singular_values),
        },
        "weight_types": {
            name: type_statistics(result.erank(name), shapes[name]) for name in result.series
        },
        "phases": phase_summary(result),
    }


def _erank_table(result: SpectrumResult) -> pd.DataFrame:
    return pd.DataFrame(
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


def _heads_table(result: SpectrumResult) -> pd.DataFrame:
    dims = result.dims
    return pd.DataFrame(
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


def _spectra_tables(result: SpectrumResult) -> dict[str, pd.DataFrame]:
    """The focus head's eigen/singular spectrum and the down_proj singular spectrum."""
    focus, down = result.focus, result.down
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
    svd = pd.DataFrame(
        {
            "index": np.arange(len(down.singular_values)),
            "singular_value": down.singular_values,
            "explained": down.explained,
            "cumulative": np.cumsum(down.explained),
        }
    )
    return {"kernel_focus_eigs": eigs, "down_svd": svd}


def _phase_tables(result: SpectrumResult) -> dict[str, pd.DataFrame]:
    phases = pd.DataFrame(
        [
            {"type": name, **vars(p), "layers": span(p.layers)}
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
    return {"phases": phases, "trends": trends}


def tables(result: SpectrumResult) -> dict[str, pd.DataFrame]:
    """Every table of the analysis, keyed by CSV file stem."""
    return {
        "erank": _erank_table(result),
        "kernel_heads": _heads_table(result),
        **_spectra_tables(result),
        **_phase_tables(result),
    }


def write_tables(result: SpectrumResult, out_dir: Path) -> dict[str, Path]:
    """Write :func:`tables` as ``<stem>.csv`` under ``out_dir`` (atomically, 6 significant digits)."""
    paths = {}
    for stem, frame in tables(result).items():
        paths[stem] = out_dir / f"{stem}.csv"
        with atomic_path(paths[stem]) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")  # keeps the header when empty
    return paths


def _finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats (an infinite condition number) become None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_statistics(result: SpectrumResult, out_dir: Path, model: str = "") -> Path:
    """``statistics.json``: every number of the report (non-finite values as null)."""
    return write_json(Path(out_dir) / "statistics.json", _finite(statistics(result, model)))
