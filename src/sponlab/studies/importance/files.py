"""Importance results on disk: one ``<stem>.npz`` per variant plus per-layer ``.npy`` files, and
their metadata JSON (what was analysed, on which text, with which params).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sponlab.io.tensorio import atomic_path, write_json, write_text
from sponlab.model.capture import PassResult
from sponlab.studies.importance.importance import ImportanceParams, ImportanceScores

log = logging.getLogger(__name__)


_LAYER_KEY_RE = re.compile(r"^layer_(\d+)$")


@dataclass(frozen=True)
class ImportanceResult:
    """A consolidated ``.npz`` read back: one vector per layer plus its metadata."""

    vectors: dict[int, np.ndarray]
    metadata: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)


def save_importance(out_dir: Path, variant: ImportanceScores, metadata: Mapping[str, Any]) -> Path:
    """Write ``<stem>.npz`` (keys ``layer_<i>``, ``layers``, ``metadata``) and per-layer ``.npy``.

    ``metadata`` is stored as a one-element JSON string array so ``allow_pickle=False`` loads it.
    Per-layer vectors go to ``layers/<stem>/layer_<i>.npy``.
    """
    out_dir = Path(out_dir)
    arrays: dict[str, np.ndarray] = {f"layer_{i}": v for i, v in sorted(variant.vectors.items())}
    arrays["layers"] = np.asarray(sorted(variant.vectors), dtype=np.int64)
    arrays["metadata"] = np.asarray([json.dumps(dict(metadata), sort_keys=True)])
    path = out_dir / f"{variant.stem}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    for layer, vector in variant.vectors.items():
        npy = out_dir / "layers" / variant.stem / f"layer_{layer}.npy"
        with atomic_path(npy) as tmp, open(tmp, "wb") as handle:
            np.save(handle, vector, allow_pickle=False)
    return path


def load_importance(path: Path) -> ImportanceResult:
    """Read a consolidated ``.npz`` written by :func:`save_importance` (no pickle)."""
    with np.load(Path(path), allow_pickle=False) as data:
        vectors = {
            int(m.group(1)): data[key]
            for key in data.files
            if (m := _LAYER_KEY_RE.match(key)) is not None
        }
        metadata = json.loads(str(data["metadata"][0])) if "metadata" in data.files else {}
    return ImportanceResult(vectors=vectors, metadata=metadata)


def variant_metadata(
    variant: ImportanceScores,
    result: PassResult,
    params: ImportanceParams,
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """What a consolidated file says about itself: config, sizes, statistics, timing."""
    return {
        **dict(context),
        "features": variant.features,
        "aggregate_by": variant.aggregate_by,
        "aggregation": variant.aggregation,
        "normalize": variant.normalize,
        "power": variant.power,
        "layers": sorted(variant.vectors),
        "dims": {str(i): int(v.size) for i, v in sorted(variant.vectors.items())},
        "tokens": result.tokens,
        "seconds": result.seconds,
        "params": params_dict(params),
        "stats": {str(i): s for i, s in sorted(variant.stats.items())},
    }


def params_dict(params: ImportanceParams) -> dict[str, Any]:
    """JSON-ready params (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}


def write_variants(
    out_dir: Path,
    variants: Sequence[ImportanceScores],
    result: PassResult,
    params: ImportanceParams,
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """Save every variant (``.npz`` + per-layer ``.npy``); return their metadata by stem."""
    written = {}
    for variant in variants:
        meta = variant_metadata(variant, result, params, context)
        save_importance(out_dir, variant, meta)
        written[variant.stem] = {k: v for k, v in meta.items() if k not in ("params", *context)}
    return written


CONSOLIDATED = "consolidated_results.npz"
LOADING = (
    "import numpy as np; d = np.load('<features>/consolidated_results.npz', allow_pickle=False); "
    "d['layer_<i>_<aggregation>_norm_<normalize>[_pow_<p>]_<aggregate_by>'] is one layer's vector "
    "(e.g. layer_0_mean_abs_norm_sum_abs_gradients); d['keys'] lists them, d['metadata'][0] is JSON. "
    "Per variant: sponlab.studies.importance.files.load_importance('<features>/<stem>.npz')."
)


def consolidated_key(layer: int, variant: ImportanceScores) -> str:
    """The gradient tools' array name, e.g. ``layer_0_mean_abs_norm_sum_abs_gradients``."""
    power = "" if variant.power is None else f"_pow_{variant.power:g}"
    norm = f"_norm_{variant.normalize}"
    return f"layer_{layer}_{variant.aggregation}{norm}{power}_{variant.aggregate_by}"


def save_consolidated(
    out_dir: Path, variants: Sequence[ImportanceScores], metadata: Mapping[str, Any]
) -> Path:
    """Every layer x aggregation x normalisation x pass of one features kind in one ``.npz``
    (keys from :func:`consolidated_key`, plus ``keys``, ``layers`` and JSON ``metadata``)."""
    arrays = {
        consolidated_key(layer, v): vector
        for v in variants
        for layer, vector in sorted(v.vectors.items())
    }
    layers = sorted({layer for v in variants for layer in v.vectors})
    meta = {**dict(metadata), "loading": LOADING}
    arrays |= {
        "keys": np.asarray(sorted(arrays)),
        "layers": np.asarray(layers, dtype=np.int64),
        "metadata": np.asarray([json.dumps(meta, sort_keys=True)]),
    }
    path = Path(out_dir) / CONSOLIDATED
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def write_timing(out_dir: Path, passes: Mapping[str, Mapping[str, float]]) -> None:
    """``timing_stats.json`` (per pass: seconds, tokens, tokens/s, batches) and a readable
    ``timing_summary.txt``, as the gradient tools write them."""
    write_json(Path(out_dir) / "timing_stats.json", {k: dict(v) for k, v in passes.items()})
    lines = ["pass        seconds    tokens  tokens/s  batches"]
    for name, t in passes.items():
        lines.append(
            f"{name:<10} {t['seconds']:8.2f} {t['tokens']:9d} {t['tokens_per_s']:9.1f} "
            f"{t['batches']:8d}"
        )
    if "values" in passes and "gradients" in passes:
        ratio = passes["gradients"]["seconds"] / passes["values"]["seconds"]
        lines.append(f"gradients / values time: {ratio:.2f}x")
    write_text(Path(out_dir) / "timing_summary.txt", "\n".join(lines) + "\n")


def importance_headline(summary: dict[str, Any], targets_layers: dict[str, Any]) -> dict[str, Any]:
    """Timing of each pass (and gradients / values ratio) plus what was analysed."""
    passes = summary["passes"]
    out: dict[str, Any] = {
        "passes": passes,
        "layers": {name: sorted(v) for name, v in targets_layers.items()},
    }
    if "values" in passes and "gradients" in passes:
        out["gradients_over_values"] = passes["gradients"]["seconds"] / passes["values"]["seconds"]
    return out
