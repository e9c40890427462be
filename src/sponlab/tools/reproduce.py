"""Does a run reproduce a reference run? Compare two dvc.lock files and their metrics.

After ``dvc repro`` in a fresh clone, the clone's ``dvc.lock`` records the hash of every output it
produced and git still holds the committed reference. Outputs are compared by hash (bit-identical
or not); metrics files (JSON) number by number, ignoring wall-clock timings and the ``env``
record (:data:`IGNORED_KEYS`). Outputs that hold timings (:data:`TIMED_OUTPUTS`), and metrics files
that differ only in those keys, are reported but do not fail the check. Bit-identity is expected
on the CPU that made the reference (its ``env.cpu``): :func:`machine_line` says when it is another;
there ``rtol`` > 0 judges the run by its metrics only (:func:`failures`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
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
    provenance_only: bool = False  # a metrics file equal but for IGNORED_KEYS

    @property
    def identical(self) -> bool:
        return self.reference is not None and self.reference == self.current

    @property
    def timed(self) -> bool:
        return self.path.startswith(TIMED_OUTPUTS)

    @property
    def passes(self) -> bool:
        return self.identical or self.timed or self.provenance_only


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


def leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of a JSON value (numbers, strings, booleans, null,
    empty containers), skipping :data:`IGNORED_KEYS` at any depth."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            if key not in IGNORED_KEYS:
                yield from leaves(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from leaves(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted key, number)`` for every number in a JSON value, skipping :data:`IGNORED_KEYS`."""
    for key, leaf in leaves(value, prefix):
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            yield key, float(leaf)


def compare_values(file: str, reference: Any, current: Any) -> list[MetricComparison]:
    """Every number of one metrics file (parsed JSON of both runs)."""
    ref, cur = dict(flatten(reference)), dict(flatten(current))
    return [MetricComparison(file, k, ref.get(k), cur.get(k)) for k in sorted(set(ref) | set(cur))]


def compare_metrics(file: str, reference: str, current: str) -> list[MetricComparison]:
    """Every number of one metrics JSON file (texts of both runs)."""
    return compare_values(file, json.loads(reference), json.loads(current))


def is_metrics_file(path: str) -> bool:
    return path.startswith("metrics/") and path.endswith(".json")


def compare_run(
    show: Callable[[str], str], lock_text: str, read: Callable[[str], str | None]
) -> tuple[list[OutputComparison], list[MetricComparison]]:
    """This run (``lock_text``, files by ``read``: None when absent) against the reference
    (files by ``show``): every output, and every number of every metrics JSON file."""
    outputs, metrics = [], []
    for out in compare_outputs(lock_outputs(show("dvc.lock")), lock_outputs(lock_text)):
        text = read(out.path) if is_metrics_file(out.path) else None
        if text is not None:
            ref, cur = json.loads(show(out.path)), json.loads(text)
            metrics += compare_values(out.path, ref, cur)
            if not out.identical and dict(leaves(ref)) == dict(leaves(cur)):  # env / timings only
                out = OutputComparison(out.path, out.reference, out.current, True)
        outputs.append(out)
    return outputs, metrics


def cpu_of(metrics_text: str | None) -> str:
    """The ``env.cpu`` a metrics JSON text records (``not recorded`` for older files)."""
    env = json.loads(metrics_text).get("env", {}) if metrics_text else {}
    return env.get("cpu", "not recorded")


def machine_line(reference_cpu: str, current_cpu: str) -> str:
    """Which CPUs made the two runs; bit-identity is only expected on the same one."""
    line = f"reference CPU: {reference_cpu}; this run: {current_cpu}"
    if reference_cpu != current_cpu:
        line += (
            " (another or unrecorded CPU: BLAS takes other code paths, so float results may "
            "differ in the last bits and hard thresholds amplify that; compare on the same CPU)"
        )
    return line


def failures(
    outputs: list[OutputComparison], metrics: list[MetricComparison], rtol: float
) -> list[OutputComparison | MetricComparison]:
    """What fails the check: with ``rtol`` 0 (same CPU, bit-identity expected) every output that
    neither is identical nor :attr:`~OutputComparison.passes`, and every metric off by more than
    ``rtol``; with ``rtol`` > 0 (another CPU: compare by the numbers) only the metrics."""
    failed: list[OutputComparison | MetricComparison] = []
    if rtol == 0:
        failed += [o for o in outputs if not o.passes]
    return failed + [m for m in metrics if m.relative > rtol]


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
        rows = [[o.path, _note(o)] for o in differ]
        lines.append("\n" + markdown_table(["output differs", "note"], rows))
    if off:
        rows = [[f"{m.file}: {m.key}", m.reference, m.current, f"{m.relative:.2e}"] for m in off]
        lines.append("\n" + markdown_table(["metric", "reference", "current", "rel. diff"], rows))
    return "\n".join(lines) + "\n"


def _note(out: OutputComparison) -> str:
    if out.provenance_only:
        return "differs only in env / timings"
    if out.timed:
        return "holds timings"
    if not is_metrics_file(out.path):
        return "hash only: its numbers count through the metrics computed from it"
    return ""
