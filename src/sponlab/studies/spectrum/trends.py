"""Early / middle / late layer phases and the shape of a per-layer curve (U, inverted-U, monotone,
flat), for the weight-spectrum report."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("early", "middle", "late")
TRENDS: tuple[str, ...] = ("U-shape", "inverted-U", "monotone up", "monotone down", "flat", "other")


# ----------------------------------------------------------------------------------------------
# Phases and trends


def phase_layers(num_layers: int) -> dict[str, list[int]]:
    """Early / middle / late thirds as the weight-analysis notebook splits them: ``third = L // 3``,
    early ``[0, third)``, middle ``[third, 2 * third)``, late the rest (the remainder goes last)."""
    third = num_layers // 3
    return {
        "early": list(range(third)),
        "middle": list(range(third, 2 * third)),
        "late": list(range(2 * third, num_layers)),
    }


@dataclass(frozen=True)
class PhaseStats:
    """Summary of one weight type's per-layer values over one phase."""

    phase: str
    layers: tuple[int, ...]
    mean: float
    std: float  # sample (ddof=1, as pandas in the notebook); NaN for one layer
    min: float
    max: float
    median: float
    range: float
    cv: float  # std / mean


def phase_stats(values: Sequence[float]) -> list[PhaseStats]:
    """Statistics of ``values`` (one per layer) for each phase; NaN for an empty phase."""
    values = np.asarray(values, dtype=float)
    out = []
    for phase, layers in phase_layers(len(values)).items():
        v = values[layers]
        if v.size == 0:
            out.append(PhaseStats(phase, (), *([math.nan] * 7)))
            continue
        mean = float(v.mean())
        std = float(v.std(ddof=1)) if v.size > 1 else math.nan
        out.append(
            PhaseStats(
                phase=phase,
                layers=tuple(layers),
                mean=mean,
                std=std,
                min=float(v.min()),
                max=float(v.max()),
                median=float(np.median(v)),
                range=float(v.max() - v.min()),
                cv=std / mean if mean != 0 else math.nan,
            )
        )
    return out


def classify_trend(means: Sequence[float], tolerance: float) -> str:
    """Label the early -> middle -> late shape of three phase means.

    With d1 = middle - early, d2 = late - middle, net = late - early and
    tol = ``tolerance`` * mean(|means|) (differences within tol count as "no change"):

    * ``U-shape``: d1 < -tol and d2 > tol (the middle dips below both ends);
    * ``inverted-U``: d1 > tol and d2 < -tol (the middle rises above both ends);
    * ``monotone up``: d1 >= -tol, d2 >= -tol and net > tol;
    * ``monotone down``: d1 <= tol, d2 <= tol and net < -tol;
    * ``flat``: |d1|, |d2| and |net| all <= tol;
    * ``other``: anything else (including NaN means from fewer than three layers).
    """
    early, middle, late = (float(m) for m in means)
    if any(math.isnan(m) for m in (early, middle, late)):
        return "other"
    tol = tolerance * float(np.mean(np.abs([early, middle, late])))
    d1, d2, net = middle - early, late - middle, late - early
    if d1 < -tol and d2 > tol:
        return "U-shape"
    if d1 > tol and d2 < -tol:
        return "inverted-U"
    if d1 >= -tol and d2 >= -tol and net > tol:
        return "monotone up"
    if d1 <= tol and d2 <= tol and net < -tol:
        return "monotone down"
    if max(abs(d1), abs(d2), abs(net)) <= tol:
        return "flat"
    return "other"


def notebook_trend(means: Sequence[float]) -> str:
    """The notebook's strict verdict on (early, middle, late) phase means: ``U-SHAPE`` when the
    middle is below both ends, ``MONOTONE DOWN`` / ``MONOTONE UP`` when strictly ordered,
    ``OTHER`` otherwise (no tolerance, unlike :func:`classify_trend`)."""
    early, middle, late = (float(m) for m in means)
    if middle < early and middle < late:
        return "U-SHAPE"
    if early > middle > late:
        return "MONOTONE DOWN"
    if early < middle < late:
        return "MONOTONE UP"
    return "OTHER"


@dataclass(frozen=True)
class Trend:
    """Shape label of a per-layer sequence and its largest single-step rise and fall."""

    label: str
    means: tuple[float, float, float]  # early, middle, late
    jump: tuple[int, float] | None  # (layer l, value[l+1] - value[l]) with the largest rise
    drop: tuple[int, float] | None  # (layer l, value[l+1] - value[l]) with the largest fall


def layer_trend(values: Sequence[float], tolerance: float) -> Trend:
    """:func:`classify_trend` of the phase means plus the largest layer-to-layer jump and drop."""
    values = np.asarray(values, dtype=float)
    means = tuple(p.mean for p in phase_stats(values))
    steps = np.diff(values)  # [L-1]
    jump = drop = None
    if steps.size:
        up, down = int(np.argmax(steps)), int(np.argmin(steps))
        jump = (up, float(steps[up])) if steps[up] > 0 else None
        drop = (down, float(steps[down])) if steps[down] < 0 else None
    return Trend(classify_trend(means, tolerance), means, jump, drop)  # type: ignore[arg-type]
