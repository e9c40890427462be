"""Is a SPON training converged, or limited by its budget? Epoch selection and diagnostics.

Validation KL is measured per block, so every comparison of two epochs is a paired one over the
same blocks: an epoch replaces the kept one only if its improvement exceeds the standard error of
the per-block differences (otherwise the choice would follow noise), and the last epoch's slope
says whether more training would still have helped. AdamW moves each coordinate by at most about
the learning rate per step, so a bias coordinate that travelled the summed learning rate could not
go further in the steps it had: a cell with many such coordinates is step-limited.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BOUND_FRACTION = 0.9  # |b - b_init| >= this x the summed learning rate: "at the step bound"
STEP_LIMITED = 0.01  # more than this fraction of coordinates at the bound: step-limited
IMPROVING_SIGMAS = 2.0  # last-epoch gain beyond this many paired SEs: still improving


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of per-block values ``[N]`` (SE 0 for one block)."""
    v = values.double()
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def paired_gain(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """Mean per-block improvement ``before - after`` ``[N]`` and its paired standard error."""
    return mean_se(before - after)


def replaces(kept: torch.Tensor, candidate: torch.Tensor) -> bool:
    """Does ``candidate``'s per-block validation KL beat ``kept``'s by more than one paired SE?"""
    gain, se = paired_gain(kept, candidate)
    return gain > se


def fraction_at_bound(
    final: Sequence[torch.Tensor], initial: Sequence[torch.Tensor], summed_lr: float
) -> float:
    """Fraction of bias coordinates that moved at least ``BOUND_FRACTION`` x ``summed_lr``."""
    if summed_lr <= 0 or not final:
        return 0.0
    moved = torch.cat(
        [(f.float() - i.float()).abs().flatten() for f, i in zip(final, initial, strict=True)]
    )
    return float((moved >= BOUND_FRACTION * summed_lr).double().mean())


def diagnostics(per_epoch: Sequence[torch.Tensor], summed_lr: float, at_bound: float) -> dict:
    """train.json's convergence record from per-block validation KLs (epoch 0 = before training).

    ``last_epoch_gain``: val KL of the previous epoch minus the last (positive: still falling),
    with its paired SE; ``budget_limited`` when step-limited or still improving beyond
    ``IMPROVING_SIGMAS`` SEs.
    """
    record: dict = {"summed_lr": summed_lr, "fraction_at_step_bound": at_bound}
    gain, se = (0.0, 0.0)
    if len(per_epoch) > 1:
        gain, se = paired_gain(per_epoch[-2], per_epoch[-1])
    step_limited = at_bound > STEP_LIMITED
    improving = len(per_epoch) > 1 and gain > IMPROVING_SIGMAS * se and gain > 0
    reasons = [
        r for r, on in (("step-limited", step_limited), ("still improving", improving)) if on
    ]
    record |= {
        "last_epoch_gain": gain,
        "last_epoch_gain_se": se,
        "step_limited": step_limited,
        "still_improving": improving,
        "budget_limited": bool(reasons),
        "budget_note": ", ".join(reasons) or "converged",
    }
    return record
