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


CURVE_READING = {SUPPORTED: "data-limited", CONTRADICTED: "saturated", INCONCLUSIVE: "inconclusive"}


def curve_line(curve: Mapping[str, Any] | None, blocks: int, sparsity: float) -> str:
    """Is the default's recovery limited by its training data? The learning curve's per-seed slope
    at the default size, tested one-sided against zero (metrics/learning_curve.json); a curve
    whose default was another ``train.blocks`` says so instead of lending its slope to this one."""
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
