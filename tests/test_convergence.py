"""Epoch selection, convergence diagnostics, per-seed block draws and the student's bf16 path."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from sponlab.method.convergence import (
    diagnostics,
    fraction_at_bound,
    mean_se,
    paired_gain,
    replaces,
)
from sponlab.method.distill import kl_to_teacher
from sponlab.method.precision import Bf16Student, uses_autocast
from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds, sparsified
from sponlab.method.spon import SponBiases
from sponlab.method.train import draw_blocks


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


def _bf16_loss_and_grads(model, site_map, blocks, precision):
    """KL loss and bias gradients of one sparsified student step under ``precision``."""
    thresholds = calibrate_thresholds(model, site_map, blocks[:2], [0.5])[0.5]
    spec = SparsifySpec("teal", 0.5, tuple(site_map.sites), thresholds)
    sites = [s for s in site_map.sites if s.module == "down_proj"]
    biases = SponBiases.for_model(model, site_map, sites)
    with torch.no_grad():
        for v in biases.vectors:
            v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        teacher = torch.log_softmax(model(blocks).logits.float(), dim=-1)
    with sparsified(model, site_map, spec), biases.attached(model, site_map), precision:
        loss = kl_to_teacher(teacher, model(blocks).logits)
    loss.backward()
    return loss.detach(), [v.grad.clone() for v in biases.vectors]


def test_bf16_student_matches_plain_autocast_bit_for_bit_and_restores_the_weights(llama, blocks):
    """The student is plain bf16 autocast with eager attention, only faster; the float32 weights
    and SDPA come back after the step, even when it raises."""
    model, site_map = llama
    assert model.config._attn_implementation == "sdpa"
    before = {k: v.clone() for k, v in model.state_dict().items()}

    @contextmanager
    def eager_autocast():  # the teacher (computed before entering) keeps SDPA, as in training
        model.set_attn_implementation("eager")
        try:
            with torch.autocast("cpu", torch.bfloat16):
                yield
        finally:
            model.set_attn_implementation("sdpa")

    plain = _bf16_loss_and_grads(model, site_map, blocks, eager_autocast())
    sdpa = _bf16_loss_and_grads(model, site_map, blocks, torch.autocast("cpu", torch.bfloat16))
    student = Bf16Student(model)
    assert student.copies and all(c.dtype == torch.bfloat16 for c in student.copies.values())
    cached = _bf16_loss_and_grads(model, site_map, blocks, student.active())
    assert model.config._attn_implementation == "sdpa"
    fp32 = _bf16_loss_and_grads(model, site_map, blocks, torch.autocast("cpu", enabled=False))
    assert torch.equal(plain[0], cached[0]) and not torch.equal(plain[0], fp32[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], cached[1], strict=True))
    assert torch.allclose(sdpa[0], cached[0], rtol=1e-2)  # the same loss up to bf16 rounding
    with pytest.raises(RuntimeError), student.active():
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("inside the step")
    assert model.config._attn_implementation == "sdpa"
    after = model.state_dict()
    assert all(
        after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items()
    )
