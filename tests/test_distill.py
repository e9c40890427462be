"""Memory-bounded distillation: top-k teacher with the rest's mass, chunked checkpointed KL."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sponlab.config import ConfigError, TrainParams, parse_params
from sponlab.method.distill import (
    TeacherTarget,
    chunked_kl,
    dense_target,
    kl_per_token,
    kl_to_teacher,
    top_k_target,
)
from sponlab.method.sparsify import SparsifySpec, sparsified
from sponlab.method.spon import SponBiases
from sponlab.method.teachers import TeacherCache, Teachers
from sponlab.method.train import train_spon
from sponlab.model.sites import Site, discover_sites
from sponlab.model.tiny import tiny_model


def test_top_k_kl_is_the_coarsened_kl_and_exact_with_the_whole_vocabulary():
    gen = torch.Generator().manual_seed(0)
    teacher = F.log_softmax(torch.randn(3, 5, 40, generator=gen) * 2, dim=-1)  # [B, T, V]
    student = torch.randn(3, 5, 40, generator=gen) * 2
    full = kl_per_token(top_k_target(teacher, 40), student)  # k = V: nothing left over
    assert torch.allclose(full, F.kl_div(F.log_softmax(student, -1), teacher, log_target=True,
                                         reduction="none").sum(-1), atol=1e-6)  # fmt: skip
    target = top_k_target(teacher, 6)
    got = kl_per_token(target, student)
    # independent reference: KL between the distributions on 7 outcomes (top-6, "the rest")
    p, q = teacher.exp().double(), F.softmax(student.double(), -1)
    idx = target.index
    p7 = torch.cat([p.gather(-1, idx), 1 - p.gather(-1, idx).sum(-1, keepdim=True)], -1)
    q7 = torch.cat([q.gather(-1, idx), 1 - q.gather(-1, idx).sum(-1, keepdim=True)], -1)
    reference = (p7 * (p7.log() - q7.log())).sum(-1)
    assert torch.allclose(got.double(), reference, atol=1e-5)
    assert (got <= full + 1e-6).all() and (got >= -1e-6).all()  # a lower bound of the full KL


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_chunked_kl_matches_the_full_kl_and_its_gradient(arch):
    model = tiny_model(arch, seed=0)
    site_map = discover_sites(model)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(2))
    target = dense_target(model, ids, topk=0, chunk=0)
    chunked_target = dense_target(model, ids, topk=0, chunk=5)
    assert torch.allclose(target.logp, chunked_target.logp, atol=1e-5)
    spec = SparsifySpec("topk", 0.5, tuple(site_map.sites))  # the student is sparsified
    grads = []
    for chunk in (None, 4):
        biases = SponBiases([Site(1, "down_proj")], {Site(1, "down_proj"): 64})
        with torch.no_grad():
            biases.vector(Site(1, "down_proj")).normal_(0, 0.1, generator=torch.Generator().manual_seed(3))  # fmt: skip
        with sparsified(model, site_map, spec), biases.attached(model, site_map):
            if chunk is None:
                loss = kl_to_teacher(target.logp, model(ids).logits)
            else:
                loss = chunked_kl(model, ids, target, chunk)
        loss.backward()
        grads.append((loss.detach(), biases.vector(Site(1, "down_proj")).grad.clone()))
    assert grads[0][0] > 0
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)


def test_bounded_training_equals_full_training_when_k_is_the_vocabulary(llama, blocks):
    model, site_map = llama
    spec = SparsifySpec("topk", 0.5, tuple(site_map.sites))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    trained = {}
    for topk, chunk in ((0, 0), (512, 7), (8, 7)):  # full; same via chunks; top-8 of 512
        biases = SponBiases.for_model(model, site_map, site_map.select(range(4), ["down_proj"]))
        settings = replace(TrainParams(), epochs=2, batch_size=2, lr=0.01, teacher_topk=topk,
                           kl_chunk=chunk)  # fmt: skip
        teachers = Teachers(TeacherCache(model, blocks, True, topk, chunk),
                            TeacherCache(model, blocks[:2], True, topk, chunk))  # fmt: skip
        result = train_spon(model, site_map, spec, biases, blocks, blocks[:2], settings, teachers)
        trained[topk] = (biases.state(), result)
        cached = next(iter(teachers.train.cache.values()))
        width = topk or 512
        assert cached.logp.shape == (blocks.shape[1], width)  # host memory: T x k per block
    full, same = trained[0], trained[512]
    for key, value in full[0].items():
        assert torch.allclose(value, same[0][key], atol=1e-5), key
    losses = [row["loss"] for row in full[1].steps]
    assert losses == pytest.approx([row["loss"] for row in same[1].steps], rel=1e-4)
    assert trained[8][1].steps[0]["loss"] < losses[0]  # the coarsened KL is a lower bound
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # only biases


def test_bounded_kl_needs_the_kl_loss(repo_params):
    raw = repo_params
    raw["train"] |= {"teacher_topk": 64, "loss": "ce"}
    with pytest.raises(ConfigError, match=r"train\.loss"):
        parse_params(raw)


def test_biases_and_bounded_kl_follow_each_layers_device():
    """``meta`` stands in for a second device (device_map: auto puts layers on other GPUs than
    the biases): every tensor the hooks and the bounded KL make must follow the layer's device."""
    model = tiny_model("llama", seed=0).to("meta")
    site_map = discover_sites(model)
    spec = SparsifySpec("topk", 0.5, tuple(site_map.sites))
    biases = SponBiases([Site(1, "down_proj")], {Site(1, "down_proj"): 64})  # on the CPU
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    target = dense_target(model, ids, topk=8, chunk=4)
    assert {t.device.type for t in (target.logp, target.index, target.rest)} == {"meta"}
    with sparsified(model, site_map, spec), biases.attached(model, site_map):
        logits = model(ids).logits
        loss = chunked_kl(model, ids, target, chunk=4)
    assert logits.device.type == loss.device.type == "meta"
    assert biases.vector(Site(1, "down_proj")).device.type == "cpu"  # never moved in place


def test_every_per_token_kl_is_the_one_kl_bit_for_bit():
    """evaluate's detail KL (chunked rows) and the prompt-category KL go through kl_per_token:
    the same bits as the textbook KL(p || q) = sum p (log p - log q) written out directly."""
    import torch.nn.functional as F

    from sponlab.method.evaluate import KL_CHUNK_TOKENS, hidden_shift, row_kl

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(KL_CHUNK_TOKENS + 7, 33, generator=gen)  # two chunks
    ref = torch.log_softmax(torch.randn(KL_CHUNK_TOKENS + 7, 33, generator=gen), dim=-1)
    direct = F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="none").sum(-1)
    assert torch.equal(row_kl(logits, ref), direct)
    textbook = (ref.exp() * (ref - F.log_softmax(logits.double(), -1).float())).sum(-1)
    assert torch.allclose(direct, textbook, atol=1e-5)
    hidden, ref_hidden = (
        torch.randn(2, 3, 5, 4, generator=gen),
        torch.randn(2, 3, 5, 4, generator=gen),
    )
    l2, rel = hidden_shift(hidden, ref_hidden)
    assert l2.shape == rel.shape == (2, 3, 5)
    assert torch.allclose(rel * ref_hidden.norm(dim=-1), l2)
    assert torch.allclose(l2[1, 2, 3], (hidden[1, 2, 3] - ref_hidden[1, 2, 3]).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_kl_gradient_matches_finite_differences_and_autograd(dtype):
    """The written-out backward of the full KL (softmax(z) - p) against central differences of
    the textbook KL in float64 and against autograd through kl_div and log_softmax; the gradient
    comes back in the logits' dtype."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 5, 11, generator=gen) * 2).to(dtype).requires_grad_()
    teacher = F.log_softmax(torch.randn(3, 5, 11, generator=gen) * 2, dim=-1)
    weights = torch.rand(3, 5, generator=gen)  # a non-uniform upstream gradient
    (kl_per_token(TeacherTarget(teacher), logits) * weights).sum().backward()
    assert logits.grad.dtype == dtype

    z0 = logits.detach().double()

    def textbook(z: torch.Tensor) -> torch.Tensor:
        p = teacher.double().exp()
        return ((p * (teacher.double() - F.log_softmax(z, -1))).sum(-1) * weights.double()).sum()

    eps, numeric = 1e-6, torch.zeros_like(z0)
    for index in [(0, 0, 0), (1, 2, 3), (2, 4, 10), (0, 3, 7)]:
        step = torch.zeros_like(z0)
        step[index] = eps
        numeric[index] = (textbook(z0 + step) - textbook(z0 - step)) / (2 * eps)
        tol = 1e-6 if dtype == torch.float32 else 1e-2 * abs(numeric[index]) + 1e-4
        assert abs(float(logits.grad[index]) - float(numeric[index])) < tol, index
    chain = logits.detach().clone().requires_grad_()
    kl = F.kl_div(F.log_softmax(chain.float(), -1), teacher, log_target=True, reduction="none")
    (kl.sum(-1) * weights).sum().backward()
    assert torch.allclose(logits.grad.float(), chain.grad.float(), atol=1e-6)
