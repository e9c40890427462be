"""The learning curve's slope at the default budget: per-seed slopes over nested training sets,
worked out by hand, and the one-sided test that says whether the default is data-limited."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sponlab.studies.transfer.learning_curve import (
    curve_markdown,
    curve_metrics,
    curve_table,
    seed_slopes,
    slope_test,
)

# damage recovered per seed at 16 / 32 / 64 blocks (a seed's sets are nested)
VALUES = {0: (0.10, 0.20, 0.30), 1: (0.12, 0.18, 0.34), 2: (0.08, 0.22, 0.26)}


def rows(values=VALUES, config="A") -> list[dict]:
    out = []
    for seed, per_size in values.items():
        for size, v in zip((16, 32, 64), per_size, strict=True):
            out.append({"config": config, "size": size, "tokens": size * 128, "seed": seed,
                        "steps": size // 2, "val_kl": 0.5 - v, "budget": "converged",
                        "test_recovered": v, "domain_recovered": None if seed == 2 else v / 2})  # fmt: skip
    return out


def test_slopes_pair_each_seeds_own_variants():
    frame = pd.DataFrame(rows())
    # centred at 32: (value at 64 - value at 16) / 2 doublings
    assert seed_slopes(frame, "A", 32, "test_recovered") == pytest.approx([0.10, 0.11, 0.09])
    # one-sided at the end: 32 -> 64 is one doubling
    assert seed_slopes(frame, "A", 64, "test_recovered") == pytest.approx([0.10, 0.16, 0.04])
    assert seed_slopes(frame, "A", 128, "test_recovered") == []  # not on the curve
    assert len(seed_slopes(frame, "A", 32, "domain_recovered")) == 2  # a missing score is skipped
    test = slope_test(frame, "A", 32, "test_recovered")
    assert test.difference == pytest.approx(0.10) and test.df == 2
    assert test.se == pytest.approx(0.01 / math.sqrt(3))


def test_a_rising_curve_is_data_limited_and_a_flat_one_is_not():
    rising = pd.DataFrame(rows())
    falling = pd.DataFrame(rows({k: tuple(reversed(v)) for k, v in VALUES.items()}))
    assert curve_metrics(curve_table(rows()), rising, 32)["A"]["data_limited"] == "supported"
    flat = curve_metrics(curve_table(rows()), falling, 32)["A"]
    assert flat["data_limited"] == "contradicted"
    assert flat["slope_at_default"]["test_recovered"]["slope"] == pytest.approx(-0.10)
    text = curve_markdown(curve_table(rows()), rising, 32, "stories")
    assert "| A | 32 (default) | 4,096 |" in text
    assert "test text +10.0 ± 0.6 (t(2); more data helps: supported)" in text
