"""Noise rules: seed spread, pooled sd, paired errors, measurable damage, difference vs noise."""

import math

import pytest
import torch

from sponlab.stats import damage, paired_se, pooled_sd, spread


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


def test_welch_df_and_interval_match_the_textbook():
    from scipy import stats as sps

    from sponlab.stats import welch

    a, b = [0.30, 0.35, 0.28], [0.10, 0.18, 0.12, 0.15]
    test = welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert test.difference / test.se == pytest.approx(ref.statistic)
    assert test.df == pytest.approx(ref.df)
    lo, hi = test.interval
    ci = ref.confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def test_a_lone_seed_borrows_the_pooled_floor_and_its_df():
    from sponlab.stats import pooled_floor, welch

    floor = pooled_floor([[0.1, 0.2, 0.15], [0.3, 0.32, 0.28]])
    assert floor[1] == 4
    test = welch([0.5], [0.1, 0.2, 0.15], floor)
    assert 2 < test.df < 6 and test.se > floor[0]
    assert math.isinf(welch([0.5], [0.4]).se)  # no floor: no test


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0.50, 0.52, 0.51], [0.10, 0.12, 0.11], "supported"),
        ([0.10, 0.12, 0.11], [0.50, 0.52, 0.51], "contradicted"),
        ([0.10, 0.30, 0.20], [0.15, 0.25, 0.05], "inconclusive"),
    ],
)
def test_each_outcome_comes_out(a, b, expected):
    from sponlab.stats import outcome, welch

    assert outcome(welch(a, b)) == expected


def test_one_sided_share_test_and_ratio_needs_a_denominator_beyond_noise():
    from sponlab.stats import outcome, ratio_interval, welch

    top, unif = [0.45, 0.47, 0.46], [0.50, 0.51, 0.49]  # 92% of the benefit
    assert outcome(welch(top, unif, scale_b=0.85), one_sided=True) == "supported"
    r, lo, hi = ratio_interval(welch(top, None), welch(unif, None))
    assert r == pytest.approx(0.92) and lo < r < hi
    assert ratio_interval(welch(top, None), welch([0.01, -0.02, 0.02], None)) is None


def test_block_bootstrap_se_shrinks_with_consistent_blocks():
    from sponlab.stats import block_bootstrap_se

    rng = torch.Generator().manual_seed(0)
    dense = (3.0 + 0.3 * torch.randn(64, generator=rng)).tolist()
    teal = [d + 0.4 for d in dense]
    noisy = [[t - 0.2 + 0.3 * float(torch.randn(1, generator=rng)) for t in teal]]
    steady = [[t - 0.2 for t in teal]]
    assert block_bootstrap_se(dense, teal, steady) < 0.02 < block_bootstrap_se(dense, teal, noisy)
    assert math.isnan(block_bootstrap_se(dense[:1], teal[:1], [steady[0][:1]]))
