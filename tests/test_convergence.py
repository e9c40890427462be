"""Epoch selection, convergence diagnostics, per-seed block draws and the autocast switch."""

from __future__ import annotations

import math

import pytest
import torch

from sponlab.convergence import diagnostics, fraction_at_bound, mean_se, paired_gain, replaces
from sponlab.train import draw_blocks, uses_autocast


def test_mean_se_matches_the_textbook_formula():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, se = mean_se(values)
    assert mean == pytest.approx(3.5)
    sd = math.sqrt(sum((v - 3.5) ** 2 for v in [1, 2, 4, 7]) / 3)
    assert se == pytest.approx(sd / 2)


def test_an_epoch_replaces_the_kept_one_only_beyond_the_paired_se():
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0])
    noisy = kept + torch.tensor([-0.1, 0.1, -0.08, 0.06])  # mean gain 0.005, SE ~0.045
    assert not replaces(kept, noisy)
    clear = kept - torch.tensor([0.2, 0.22, 0.19, 0.21])  # gain 0.205, SE ~0.006
    assert replaces(kept, clear)
    gain, se = paired_gain(kept, clear)
    assert gain == pytest.approx(0.205) and 0 < se < 0.01


def test_fraction_at_bound_counts_coordinates_that_moved_the_summed_lr():
    initial = [torch.zeros(4)]
    final = [torch.tensor([0.1, -0.095, 0.05, 0.0])]
    assert fraction_at_bound(final, initial, summed_lr=0.1) == pytest.approx(0.5)
    assert fraction_at_bound(final, initial, summed_lr=0.0) == 0.0


def test_diagnostics_flag_step_limited_and_still_improving_cells():
    epochs = [torch.tensor([1.0, 1.1, 0.9, 1.0]), torch.tensor([0.5, 0.6, 0.4, 0.5])]
    falling = [*epochs, torch.tensor([0.3, 0.41, 0.2, 0.3])]
    flat = [*epochs, torch.tensor([0.52, 0.58, 0.41, 0.49])]
    assert diagnostics(falling, 0.3, 0.0)["budget_note"] == "still improving"
    assert diagnostics(flat, 0.3, 0.0)["budget_limited"] is False
    limited = diagnostics(flat, 0.3, 0.2)
    assert limited["step_limited"] and limited["budget_note"] == "step-limited"


def test_seeds_draw_different_blocks_and_zero_draws_the_pool():
    a, b = draw_blocks(64, 16, 0), draw_blocks(64, 16, 1)
    assert len(a) == len(set(a.tolist())) == 16 and a.max() < 64
    assert not torch.equal(a, b)
    assert torch.equal(a, draw_blocks(64, 16, 0))  # deterministic
    assert torch.equal(draw_blocks(8, 0, 3), torch.arange(8))
    assert torch.equal(draw_blocks(8, 8, 3), torch.arange(8))


def test_autocast_auto_is_off_for_a_bf16_model_and_explicit_settings_win(llama):
    model, _ = llama
    assert uses_autocast("bfloat16", model) and not uses_autocast("off", model)
    assert not uses_autocast("auto", model.to(torch.bfloat16))
