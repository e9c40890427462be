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


@dataclass(frozen=True)
class Test:
    """A difference of means with its standard error, degrees of freedom and 95% interval.

    ``df`` is Welch-Satterthwaite over the variance parts (each side's seed spread, or the
    sweep's pooled seed sd with its df for a lone seed, and the test-block bootstrap)."""

    difference: float
    se: float
    df: float

    def bound(self, level: float, upper: bool) -> float:
        """One-sided ``level`` confidence bound (upper or lower) of the difference."""
        if not math.isfinite(self.se) or self.df <= 0:
            return math.inf if upper else -math.inf
        from scipy.stats import t

        half = float(t.ppf(level, self.df)) * self.se
        return self.difference + half if upper else self.difference - half

    @property
    def interval(self) -> tuple[float, float]:
        """Two-sided 95% interval."""
        return self.bound(0.975, upper=False), self.bound(0.975, upper=True)


def satterthwaite(parts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Total variance and its Welch-Satterthwaite df from ``(variance, df)`` parts."""
    total = sum(v for v, _ in parts)
    denom = sum(v * v / d for v, d in parts if v > 0 and math.isfinite(d) and d > 0)
    if total <= 0:
        return 0.0, math.inf
    return total, (total * total / denom) if denom > 0 else math.inf


def mean_part(values: Sequence[float], floor: tuple[float, float]) -> tuple[float, float]:
    """``(variance of the mean, df)`` of replicates; a lone replicate borrows ``floor`` (pooled
    seed sd of the sweep, its df); none available: infinite variance (no test)."""
    s = spread(values)
    if s.n > 1:
        return s.sd**2 / s.n, s.n - 1
    sd, df = floor
    return (sd**2, df) if math.isfinite(sd) and df > 0 else (math.inf, 0.0)


def welch(
    a: Sequence[float],
    b: Sequence[float] | None,
    floor: tuple[float, float] = (math.nan, 0.0),
    block_se: Sequence[float] = (),
    scale_b: float = 1.0,
) -> Test:
    """mean(a) - scale_b x mean(b) (``b`` None: mean(a) against 0), with seed parts from
    :func:`mean_part` and each ``block_se`` (test-block bootstrap SE of a side's mean, df = blocks
    - 1 folded in as ~infinite) added as a variance."""
    parts = [mean_part(a, floor)]
    diff = spread(a).mean
    if b is not None:
        vb, db = mean_part(b, floor)
        parts.append((scale_b * scale_b * vb, db))
        diff -= scale_b * spread(b).mean
    parts += [(se * se, math.inf) for se in block_se if math.isfinite(se)]
    if any(not math.isfinite(v) for v, _ in parts):
        return Test(diff, math.inf, 0.0)
    var, df = satterthwaite(parts)
    return Test(diff, math.sqrt(var), df)


def pooled_floor(groups: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Pooled seed sd of the groups with >= 2 replicates and its df (nan, 0 if none)."""
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    return pooled_sd(groups), float(df)


SUPPORTED, INCONCLUSIVE, CONTRADICTED = "supported", "inconclusive", "contradicted"


def outcome(test: Test, threshold: float = 0.0, one_sided: bool = False) -> str:
    """Claim "difference > threshold": supported when the lower 95% bound (one- or two-sided)
    clears it, contradicted when the upper bound falls below it, else inconclusive."""
    level = 0.95 if one_sided else 0.975
    if test.bound(level, upper=False) > threshold:
        return SUPPORTED
    if test.bound(level, upper=True) < threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def ratio_interval(num: Test, den: Test) -> tuple[float, float, float] | None:
    """Ratio of two independent means with a delta-method 95% interval; None unless the
    denominator is above zero beyond its own noise (lower 95% bound > 0)."""
    if den.bound(0.975, upper=False) <= 0:
        return None
    r = num.difference / den.difference
    var, df = satterthwaite(
        [((num.se / den.difference) ** 2, num.df), ((r * den.se / den.difference) ** 2, den.df)]
    )
    half = Test(r, math.sqrt(var), df)
    lo, hi = half.interval
    return r, lo, hi


def block_bootstrap_se(
    dense: Sequence[float],
    teal: Sequence[float],
    spon: Sequence[Sequence[float]],
    draws: int = 2000,
    seed: int = 0,
) -> float:
    """Test-block noise of a cell's mean damage recovered: the blocks are resampled jointly
    (paired) for dense, TEAL and every seed's per-block NLL ``[N]``, and the SD of the
    recomputed mean damage recovered over ``draws`` resamples returned (ppl = exp of the mean
    block NLL). nan when fewer than 2 blocks, no seeds, or a resample where TEAL does no damage."""
    import numpy as np

    d, t, s = np.asarray(dense), np.asarray(teal), np.asarray(spon, dtype=float)  # [N] [N] [S,N]
    n = len(d)
    if n < 2 or s.size == 0 or len(t) != n or s.shape[-1] != n:
        return math.nan
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))  # [draws, N]
    pd_, pt = np.exp(d[idx].mean(-1)), np.exp(t[idx].mean(-1))  # [draws]
    ps = np.exp(s[:, idx].mean(-1))  # [S, draws]
    with np.errstate(divide="ignore", invalid="ignore"):  # no damage in a resample: nan, no ratio
        recovered = ((pt - ps) / (pt - pd_)).mean(0)  # [draws]
    return float(recovered.std(ddof=1))


def finite_or_none(value: float) -> float | None:
    """``value``, or None when it is nan / infinite (JSON has no nan)."""
    return value if math.isfinite(value) else None
