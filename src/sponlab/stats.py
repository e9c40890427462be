"""Noise-aware comparisons: replicate spread over seeds, paired test-block errors, verdicts.

A difference between two configs means nothing until it is set against the spread between
training seeds, and a damage-recovered ratio means nothing when the damage it divides by is itself
within noise. These small pure functions carry those rules for the summary and the findings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one quantity over replicates (training seeds)."""

    mean: float
    sd: float  # sample standard deviation (n - 1); nan for one replicate
    lo: float
    hi: float
    n: int

    @property
    def se(self) -> float:
        """Standard error of the mean (nan for one replicate)."""
        return self.sd / math.sqrt(self.n) if self.n > 1 else math.nan

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def spread(values: Sequence[float]) -> Spread:
    """:class:`Spread` of ``values`` (at least one)."""
    if not values:
        raise ValueError("spread of no values")
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return Spread(mean, sd, min(values), max(values), n)


def pooled_sd(groups: Sequence[Sequence[float]]) -> float:
    """Pooled within-group standard deviation of the groups with >= 2 values (nan if none)."""
    ss = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(ss / dof) if dof else math.nan


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of mean(a - b) over paired samples (e.g. per-block NLL of two variants)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(
            f"paired_se needs two equal samples of >= 2 values, got {len(a)}, {len(b)}"
        )
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return spread(diffs).se


@dataclass(frozen=True)
class Damage:
    """TEAL's damage to perplexity and whether it is large enough to divide by."""

    ppl: float  # TEAL ppl - dense ppl
    relative: float  # ppl / dense ppl
    nll_se: float  # paired standard error of the mean NLL difference over test blocks
    measurable: bool
    reason: str

    def as_dict(self) -> dict[str, float | bool | str]:
        return asdict(self)


def damage(
    dense_ppl: float,
    teal_ppl: float,
    dense_block_nll: Sequence[float],
    teal_block_nll: Sequence[float],
    min_relative: float,
    sigmas: float,
) -> Damage:
    """Is TEAL's damage measurable? It must be >= ``min_relative`` of dense ppl and its NLL
    increase more than ``sigmas`` paired standard errors over the test blocks."""
    se = paired_se(teal_block_nll, dense_block_nll)
    delta_nll = math.log(teal_ppl / dense_ppl)
    relative = (teal_ppl - dense_ppl) / dense_ppl
    if relative < min_relative:
        reason = f"damage {100 * relative:.2f}% of dense ppl < {100 * min_relative:g}%"
    elif delta_nll <= sigmas * se:
        reason = f"NLL increase {delta_nll:.4f} <= {sigmas:g} x paired SE {se:.4f}"
    else:
        reason = "measurable"
    return Damage(teal_ppl - dense_ppl, relative, se, reason == "measurable", reason)


def compare(a: Sequence[float], b: Sequence[float], floor_sd: float, sigmas: float) -> dict:
    """Difference of means ``a - b`` against its noise: ``sigmas`` standard errors.

    The standard error uses each side's own seed spread, and ``floor_sd`` (e.g. the pooled seed
    sd of the sweep) where a side has a single replicate or a smaller spread than the pool.
    """
    sa, sb = spread(a), spread(b)

    def var(s: Spread) -> float:
        sd = s.sd if not math.isnan(s.sd) else floor_sd
        sd = max(sd, floor_sd) if not math.isnan(floor_sd) else sd
        return (sd**2) / s.n if not math.isnan(sd) else math.nan

    se = math.sqrt(var(sa) + var(sb))
    diff = sa.mean - sb.mean
    within = math.isnan(se) or abs(diff) <= sigmas * se
    return {"difference": diff, "se": None if math.isnan(se) else se, "within_noise": within}
