"""Does a run reproduce a reference run? Compare two dvc.lock files and their metrics.

After ``dvc repro`` in a fresh clone, the clone's ``dvc.lock`` records the hash of every output it
produced and git still holds the committed reference. Outputs are compared by hash (bit-identical
or not); metrics files (JSON) number by number, ignoring wall-clock timings and the ``env``
record (:data:`IGNORED_KEYS`). Outputs that hold timings (:data:`TIMED_OUTPUTS`) are reported but
do not fail the check.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from sponlab.io.tables import markdown_table

# Wall-clock measurements (and their ratios) that results files carry next to the numbers.
IGNORED_KEYS = ("seconds", "tokens_per_s", "gradients_over_values", "env")
# Outputs that hold wall-clock timings next to their results (never bit-identical by design).
TIMED_OUTPUTS = (
    "metrics/importance.json",
    "metrics/interpret.json",
    "metrics/interpret_layers.json",
    "metrics/sae.json",
    "metrics/spectrum.json",
    "metrics/importance",
    "metrics/spectrum",
    "plots/importance",
    "plots/sae",
    "plots/spectrum",
)


@dataclass(frozen=True)
class OutputComparison:
    """One output path of dvc.lock: its hash in the reference and in the current run."""

    path: str
    reference: str | None
    current: str | None

    @property
    def identical(self) -> bool:
        return self.reference is not None and self.reference == self.current

    @property
    def timed(self) -> bool:
        return self.path.startswith(TIMED_OUTPUTS)


@dataclass(frozen=True)
class MetricComparison:
    """One number of a metrics file in both runs, with its relative difference."""

    file: str
    key: str
    reference: float | None
    current: float | None

    @property
    def relative(self) -> float:
        if self.reference is None or self.current is None:
            return math.inf
        if self.reference == self.current:
            return 0.0
        return abs(self.current - self.reference) / max(abs(self.reference), 1e-12)


def lock_outputs(lock_text: str) -> dict[str, str]:
    """``{output path: md5}`` of every stage's outputs in a dvc.lock file's text."""
    stages = (yaml.safe_load(lock_text) or {}).get("stages", {})
    return {
        out["path"]: out.get("md5", "")
        for stage in stages.values()
        for out in stage.get("outs", [])
    }


def compare_outputs(
    reference: Mapping[str, str], current: Mapping[str, str]
) -> list[OutputComparison]:
    """Every output of either run, sorted by path."""
    paths = sorted(set(reference) | set(current))
    return [OutputComparison(p, reference.get(p), current.get(p)) for p in paths]


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted key, number)`` for every number in a JSON value, skipping :data:`IGNORED_KEYS`."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key not in IGNORED_KEYS:
                yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from flatten(item, f"{prefix}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix, float(value)


def compare_metrics(file: str, reference: str, current: str) -> list[MetricComparison]:
    """Every number of one metrics JSON file (texts of both runs)."""
    ref, cur = dict(flatten(json.loads(reference))), dict(flatten(json.loads(current)))
    return [MetricComparison(file, k, ref.get(k), cur.get(k)) for k in sorted(set(ref) | set(cur))]


def report(outputs: list[OutputComparison], metrics: list[MetricComparison], rtol: float) -> str:
    """Markdown summary: identical outputs, differing outputs, metrics beyond ``rtol``."""
    same = [o for o in outputs if o.identical]
    differ = [o for o in outputs if not o.identical]
    off = [m for m in metrics if m.relative > rtol]
    lines = [
        f"outputs bit-identical to the reference: {len(same)} of {len(outputs)}",
        f"metrics compared: {len(metrics)}; beyond rtol={rtol:g}: {len(off)}",
    ]
    if differ:
        rows = [[o.path, "holds timings" if o.timed else ""] for o in differ]
        lines.append("\n" + markdown_table(["output differs", "note"], rows))
    if off:
        rows = [[f"{m.file}: {m.key}", m.reference, m.current, f"{m.relative:.2e}"] for m in off]
        lines.append("\n" + markdown_table(["metric", "reference", "current", "rel. diff"], rows))
    return "\n".join(lines) + "\n"
