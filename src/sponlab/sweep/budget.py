"""The run's training budget beside the study's, and whether more data would help: the lines the
findings print above the claims (is a verdict about SPON, or about the training budget?)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from sponlab.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED

STUDY_BUDGET = "2,048 blocks x 128 tokens = 262,144 tokens, 10 epochs"


def budget_line(frame: pd.DataFrame) -> str:
    """The training budget of the run's trained cells beside the study's."""
    trained = frame[frame["training_tokens"] > 0] if "training_tokens" in frame else frame[:0]
    if trained.empty:
        return f"Training budget: no trained cell (study: {STUDY_BUDGET})."
    tokens, steps = int(trained["training_tokens"].max()), int(trained["steps"].max())
    limited = trained[trained["budget"] != "converged"]
    flags = ", ".join(f"{r.config} s={r.sparsity:g} ({r.budget})" for r in limited.itertuples())
    return (
        f"Training budget per seed: {tokens:,} distinct tokens, {steps} steps (study: "
        f"{STUDY_BUDGET}). Budget-limited cells: {flags or 'none'}."
    )


def default_recovered(frame: pd.DataFrame, sparsity: float) -> dict[str, float]:
    """Mean damage recovered per config at ``sparsity`` (the summary's rows): what the learning
    curve's default-size point must reproduce."""
    rows = frame[(frame["sparsity"] - sparsity).abs() < 1e-9] if "sparsity" in frame else frame[:0]
    return {
        r.config: float(r.damage_recovered)
        for r in rows.itertuples()
        if not pd.isna(r.damage_recovered)
    }


CURVE_READING = {SUPPORTED: "data-limited", CONTRADICTED: "saturated", INCONCLUSIVE: "inconclusive"}


# The curve's point at the default size is the default cell's own recipe (same seeds, same drawn
# blocks): its mean damage recovered equals the cell's up to the curve's 6-decimal per-seed values.
CURVE_MATCH_ATOL = 1e-5


def curve_mismatch(
    curve: Mapping[str, Any], blocks: int, observed: Mapping[str, float] | None
) -> str | None:
    """Why the curve is not this run's (another model, CPU or code), or None: its point at the
    default size must equal the default cell's damage recovered (``observed``: config -> mean)."""
    for config, value in (observed or {}).items():
        point = curve.get(config, {}).get(f"b{blocks}", {}).get("test_recovered")
        if point is None or value is None or abs(point - value) <= CURVE_MATCH_ATOL:
            continue
        return (
            f"Learning curve: its {blocks}-block point for {config} ({100 * point:.1f}% recovered) "
            f"is not this run's {config} cell ({100 * value:.1f}%), which trains the same recipe: "
            "the curve comes from another model or run (a frozen stage: `dvc exp run` does not "
            "re-run it); re-run the learning-curve stage (README *Other sweeps*) before reading "
            "its slope."
        )
    return None


def curve_line(
    curve: Mapping[str, Any] | None,
    blocks: int,
    sparsity: float,
    observed: Mapping[str, float] | None = None,
) -> str:
    """Is the default's recovery limited by its training data? The learning curve's per-seed slope
    at the default size, tested one-sided against zero (metrics/learning_curve.json); a curve
    whose default was another ``train.blocks``, or whose default-size point is not this run's
    cell (``observed``, :func:`curve_mismatch`), says so instead of lending its slope."""
    if not curve:
        return "Learning curve: not run (README *Other sweeps*); data limitation untested."
    ran_at = {c.get("default_blocks") for k, c in curve.items() if k != "env"}
    if None in ran_at:
        return (
            "Learning curve: its file records no default budget (written before it did); re-run "
            f"the learning-curve stage (README *Other sweeps*) to test the slope at {blocks} blocks."
        )
    if ran_at != {blocks}:
        return (
            f"Learning curve: measured with a default of {', '.join(map(str, sorted(ran_at)))} "
            f"training blocks per seed, this run trains {blocks}; re-run the learning-curve stage "
            "(README *Other sweeps*) to test the slope at this budget."
        )
    mismatch = curve_mismatch(curve, blocks, observed)
    if mismatch:
        return mismatch
    parts = []
    for config, cell in curve.items():
        slope = cell.get("slope_at_default", {}).get("test_recovered") if config != "env" else None
        if not slope:
            continue
        verdict = cell.get("data_limited")
        parts.append(
            f"{config} {100 * slope['slope']:+.1f} ± {100 * slope['se']:.1f} points per doubling "
            f"(t({slope['df']:.0f}), more data helps: {verdict}; {CURVE_READING.get(verdict, verdict)})"
        )
    return (
        f"Learning curve (s={sparsity:g}, test text) at the default {blocks} training blocks per "
        f"seed: {'; '.join(parts) or 'no slope at this size'}."
    )
