"""train.loss: kl | ce | kl+logit_l2, each checked against a value computed another way."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_spon import settings, teal_setup

from sponlab.config import TrainParams
from sponlab.method.distill import TeacherTarget, kl_to_teacher
from sponlab.method.spon import SponBiases
from sponlab.method.train import centred_logit_l2, next_token_ce, train_spon, training_loss


class FixedLogits(torch.nn.Module):
    """A stand-in student whose forward returns the given logits whatever the ids."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, ids: torch.Tensor):
        return type("Output", (), {"logits": self.logits})()


def test_next_token_ce_equals_the_mean_negative_log_prob_of_the_next_token():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 1]])
    terms = [
        -math.log(torch.softmax(logits[b, t].double(), -1)[ids[b, t + 1]].item())
        for b in range(2)
        for t in range(3)  # the last position has no next token
    ]
    assert next_token_ce(logits, ids).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_centred_logit_l2_ignores_a_per_token_shift_and_matches_a_hand_value():
    teacher = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    teacher_logp = torch.log_softmax(teacher, -1)
    shift = torch.randn(2, 3, 1)  # logits are defined up to a constant per token
    assert centred_logit_l2(teacher_logp, teacher + shift).item() == pytest.approx(0, abs=1e-6)
    delta = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0])  # centred already: mean 0, mean square 0.4
    assert centred_logit_l2(teacher_logp, teacher + delta).item() == pytest.approx(0.4, rel=1e-5)


def test_kl_plus_logit_l2_adds_its_weighted_term_and_ce_needs_no_teacher():
    student = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(2))
    teacher_logp = torch.log_softmax(torch.randn(1, 3, 5), -1)
    ids = torch.tensor([[0, 1, 2]])
    kl = kl_to_teacher(teacher_logp, student)
    model, target = FixedLogits(student), TeacherTarget(teacher_logp)
    mixed = training_loss(replace(TrainParams(), loss="kl+logit_l2", logit_l2=0.5),
                          target, model, ids)  # fmt: skip
    assert mixed.item() == pytest.approx(
        (kl + 0.5 * centred_logit_l2(teacher_logp, student)).item(), rel=1e-6
    )
    assert torch.equal(training_loss(TrainParams(loss="kl"), target, model, ids), kl)
    ce = training_loss(TrainParams(loss="ce"), None, model, ids)
    assert ce.item() == pytest.approx(next_token_ce(student, ids).item())
    with pytest.raises(ValueError, match="needs the dense teacher"):
        training_loss(TrainParams(loss="kl"), None, model, ids)


@pytest.mark.parametrize("loss", ["ce", "kl+logit_l2"])
def test_each_loss_trains_only_the_biases(llama, loss):
    model, site_map = llama
    train, spec = teal_setup(model, site_map, 0.7, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    biases = SponBiases.for_model(model, site_map, site_map.sites)
    result = train_spon(
        model, site_map, spec, biases, train, train, settings(lr=1e-3, epochs=2, loss=loss)
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(math.isfinite(s["loss"]) for s in result.steps)
    assert result.steps[-1]["loss"] < result.steps[0]["loss"]  # it optimises its own objective
    # the epoch kept is chosen by validation KL to the dense model, whatever the loss
    kept = result.epochs[result.best_epoch]["val_kl"]
    assert kept == min(e["val_kl"] for e in result.epochs)
