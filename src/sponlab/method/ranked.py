"""Allocations from measured layer importance: analyse -> allocate -> train in one DAG.

The layer-importance stage ranks the layers of one trained config (``interpret.layers.config``)
by leave-one-layer-out importance on validation blocks and measures the benefit kept by its top-k
layers (``metrics/interpret/layers/{layers,curves}.csv``). A config with ``layers: {ranked:
CONFIG, ...}`` takes its layers from that ranking:

- ``coverage: f``: the fewest top-ranked layers whose measured benefit reaches ``f`` of the full
  config's (the study's data-driven allocation; all layers if the curve never reaches it);
- ``top: k``: the ``k`` most important layers (CORNERSTONE: the layers whose removal hurts most);
- ``above: median``: the layers with above-median importance (CRITICAL-ONLY).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import pandas as pd

from sponlab.model.sites import LayerSelection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRanking:
    """Layers by decreasing importance, each one's importance and the top-k benefit curve."""

    order: tuple[int, ...]  # most important first
    importance: Mapping[int, float]  # ppl without the layer's biases - ppl with all of them
    coverage: tuple[float, ...]  # fraction of the full benefit kept by the top-k, k = 1..L
    curve: str  # which curve ``coverage`` is: measured | estimated (additivity assumed)


def layers_needed(fractions: Sequence[float], target: float) -> int | None:
    """Smallest k whose cumulative fraction reaches ``target`` (None if never / undefined)."""
    for k, value in enumerate(fractions, start=1):
        if not math.isnan(value) and value >= target - 1e-12:
            return k
    return None


def read_ranking(folder: Path) -> LayerRanking:
    """The ranking the layer-importance stage wrote to ``folder`` (layers.csv, curves.csv)."""
    layers = pd.read_csv(folder / "layers.csv")
    curves = pd.read_csv(folder / "curves.csv").sort_values("k")
    measured = "measured" in curves and curves["measured"].notna().any()
    curve = "measured" if measured else "estimated"
    return LayerRanking(
        order=tuple(int(v) for v in curves["layer_added"]),
        importance={int(r.layer): float(r.importance) for r in layers.itertuples()},
        coverage=tuple(float(v) for v in curves[curve]),
        curve=curve,
    )


def ranked_layers(selection: LayerSelection, ranking: LayerRanking) -> list[int]:
    """The sorted layer indices ``selection`` (``kind == "ranked"``) takes from ``ranking``."""
    if selection.kind != "ranked":
        raise ValueError(f"not a ranked layer selection: {selection.describe()}")
    order = list(ranking.order)
    if selection.rule == "top":
        count = min(int(selection.fraction), len(order))
    elif selection.rule == "coverage":
        needed = layers_needed(ranking.coverage, selection.fraction)
        count = len(order) if needed is None else needed
        if needed is None:
            log.warning(
                "the %s curve never reaches %.2f of the benefit: taking all %d layers",
                ranking.curve, selection.fraction, len(order),
            )  # fmt: skip
    elif selection.rule == "above":
        cut = median(ranking.importance.values())
        return sorted(layer for layer, value in ranking.importance.items() if value > cut)
    else:
        raise ValueError(f"unknown ranking rule {selection.rule!r}")
    return sorted(order[:count])
