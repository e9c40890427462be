"""Noise rules: seed spread, pooled sd, paired errors, measurable damage, difference vs noise."""

import math

import pytest

from sponlab.stats import compare, damage, paired_se, pooled_sd, spread


def test_spread_matches_hand_computed_values():
    s = spread([1.0, 2.0, 3.0, 6.0])
    assert s.mean == 3.0 and s.n == 4 and (s.lo, s.hi) == (1.0, 6.0)
    assert s.sd == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 3))
    assert s.se == pytest.approx(s.sd / 2)
    one = spread([5.0])
    assert math.isnan(one.sd) and one.as_dict()["sd"] is None
    with pytest.raises(ValueError):
        spread([])


def test_pooled_sd_ignores_single_replicates():
    assert pooled_sd([[1.0, 3.0], [10.0, 14.0], [7.0]]) == pytest.approx(math.sqrt((2 + 8) / 2))
    assert math.isnan(pooled_sd([[1.0], [2.0]]))


def test_paired_se_removes_the_shared_block_difficulty():
    # blocks differ a lot in difficulty, the variant adds a nearly constant 0.1
    dense = [1.0, 5.0, 2.0, 9.0]
    teal = [1.1, 5.1, 2.12, 9.08]
    assert paired_se(teal, dense) < 0.01 < spread(teal).se
    with pytest.raises(ValueError):
        paired_se([1.0], [1.0])


def test_damage_rules():
    dense = [3.0, 3.5, 4.0, 3.2]
    big = damage(40.0, 60.0, dense, [d + 0.4 + 0.01 * i for i, d in enumerate(dense)], 0.02, 2.0)
    assert big.measurable and big.ppl == 20.0 and big.relative == 0.5
    tiny = damage(40.0, 40.4, dense, [d + 0.01 for d in dense], 0.02, 2.0)
    assert not tiny.measurable and "< 2%" in tiny.reason
    # large enough relative damage, but inconsistent over blocks: within the paired noise
    noisy = damage(40.0, 44.0, dense, [3.0 + 1.0, 3.5 - 0.8, 4.0 + 0.9, 3.2 - 0.6], 0.02, 2.0)
    assert not noisy.measurable and "paired SE" in noisy.reason


def test_compare_uses_seed_spread_and_the_pooled_floor():
    a, b = [0.40, 0.42, 0.44], [0.30, 0.31, 0.29]
    assert not compare(a, b, math.nan, 2.0)["within_noise"]
    assert compare(a, b, math.nan, 2.0)["difference"] == pytest.approx(0.12)
    # a single replicate borrows the pooled sd; a large pool makes the same gap noise
    assert compare([0.40], b, 0.01, 2.0)["within_noise"] is False
    assert compare([0.40], b, 0.2, 2.0)["within_noise"] is True
    # no spread at all: nothing to compare against, reported as within noise
    assert compare([0.4], [0.3], math.nan, 2.0)["within_noise"] is True
