"""Hidden-state shift of TEAL-only and TEAL+SPON from the dense model, per layer.

Rows come from the evaluate stage's ``shift.csv`` (test blocks) or from prompt categories:
relative shift ``||h - h_dense|| / ||h_dense||`` per hidden state and the drift reduction SPON
brings (``1 - spon_rel / teal_rel``), which the layer analyses rank layers by.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sponlab.studies.interpret.directions import nanmean


def shift_rows(
    teal_l2: Sequence[float],
    spon_l2: Sequence[float],
    teal_rel: Sequence[float],
    spon_rel: Sequence[float],
) -> list[dict]:
    """Per hidden state (0 = embeddings, i = output of layer i-1): shifts and drift reduction.

    ``drift_reduction = 1 - spon_rel / teal_rel`` (nan where TEAL-only does not shift at all).
    """
    rows = []
    for i, (tl2, sl2, trel, srel) in enumerate(
        zip(teal_l2, spon_l2, teal_rel, spon_rel, strict=True)
    ):
        rows.append(
            {
                "index": i,
                "layer": i - 1,
                "teal_l2": tl2,
                "spon_l2": sl2,
                "teal_rel": trel,
                "spon_rel": srel,
                "drift_reduction": 1.0 - srel / trel if trel > 1e-12 else math.nan,
            }
        )
    return rows


def shift_summary(
    test_rows: Sequence[Mapping[str, Any]], prompt_rows: Mapping[str, Sequence[Mapping[str, Any]]]
) -> dict[str, Any]:
    """Final-layer relative shift on test blocks and mean drift reduction (test, per category)."""
    final = test_rows[-1]
    return {
        "test_final_teal_rel": final["teal_rel"],
        "test_final_spon_rel": final["spon_rel"],
        "test_mean_drift_reduction": nanmean([r["drift_reduction"] for r in test_rows[1:]]),
        "prompt_mean_drift_reduction": {
            c: nanmean([r["drift_reduction"] for r in rows[1:]]) for c, rows in prompt_rows.items()
        },
    }


def drift_by_layer(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """``{layer: drift reduction at that layer's output}`` from :func:`shift_rows` rows."""
    return {int(r["layer"]): r["drift_reduction"] for r in rows if r["layer"] >= 0}


def read_shift(path: Path) -> list[dict]:
    """The evaluate stage's per-layer shift.csv (test blocks) as :func:`shift_rows` rows."""
    import pandas as pd

    ev = pd.read_csv(path)
    return shift_rows(
        ev.teal_l2.tolist(), ev.spon_l2.tolist(), ev.teal_rel.tolist(), ev.spon_rel.tolist()
    )
