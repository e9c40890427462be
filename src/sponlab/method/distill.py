"""Memory-bounded distillation targets and losses: nothing scales with vocab x tokens x dataset.

Two independent bounds, both off by default (the default model's numbers do not change):

- ``train.teacher_topk: k`` keeps, per token, the dense teacher's top-k log-probs and the log of
  the probability mass outside them (the *rest*). The loss is then the KL between the teacher and
  student distributions coarsened to k + 1 outcomes (the top-k tokens and "any other token"): exact
  for those outcomes, a lower bound of the full KL, and equal to it when the teacher puts no mass
  outside its top-k. Host memory per token: k x 12 + 4 bytes (fp32 values, int64 ids) instead
  of vocab x 4.
- ``train.kl_chunk: n`` computes the logits n tokens at a time from the decoder's last hidden
  state under activation checkpointing, so the fp32 [tokens, vocab] log-softmax, KL and their
  gradients exist for one chunk at a time (recomputed in the backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class TeacherTarget:
    """Dense next-token targets of some tokens ``[..., *]``.

    logp: full log-probs ``[..., V]`` (``index`` None), or the top-k log-probs ``[..., k]``.
    index: ``[..., k]`` vocabulary ids of the top-k; rest: ``[...]`` log of the mass outside.
    """

    logp: torch.Tensor
    index: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    @property
    def is_full(self) -> bool:
        return self.index is None

    def map(self, fn) -> TeacherTarget:
        """Apply ``fn`` to every tensor (indexing, moving, reshaping the token dimensions)."""
        if self.is_full:
            return TeacherTarget(fn(self.logp))
        return TeacherTarget(fn(self.logp), fn(self.index), fn(self.rest))

    @staticmethod
    def stack(rows: list[TeacherTarget]) -> TeacherTarget:
        if rows[0].is_full:
            return TeacherTarget(torch.stack([r.logp for r in rows]))
        return TeacherTarget(
            torch.stack([r.logp for r in rows]),
            torch.stack([r.index for r in rows]),
            torch.stack([r.rest for r in rows]),
        )


def top_k_target(logp: torch.Tensor, k: int) -> TeacherTarget:
    """Top-k of full log-probs ``[..., V]`` with the log of the remaining mass (fp32)."""
    values, index = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [..., k]
    rest = torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1)  # [...]
    return TeacherTarget(values, index, rest)


class _FullKL(torch.autograd.Function):
    """KL(p || softmax(z)) per token against full teacher log-probs, with the gradient written out:
    d KL / d z = softmax(z) - p. The forward is ``F.kl_div``'s formula, operation for operation
    (the same values, bit for bit); the backward is 4 passes over ``[..., V]`` instead of
    autograd's chain through kl_div and log_softmax (a 49k vocabulary: 0.34 -> 0.25 s per
    4 x 128 tokens, fwd + bwd, 2 CPU cores)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(logits.float(), dim=-1)  # [..., V] fp32
        p = logp.exp()
        ctx.save_for_backward(logq, p)
        ctx.logits_dtype = logits.dtype
        return (p * (logp - logq)).sum(-1)  # [...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logq, p = ctx.saved_tensors
        dz = logq.exp_().sub_(p).mul_(grad.unsqueeze(-1))  # (q - p) * dL/dKL, in place
        return dz.to(ctx.logits_dtype), None


def kl_per_token(target: TeacherTarget, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token ``[...]`` in fp32; coarsened to top-k + rest if top-k.

    The target moves to the logits' device: with ``device_map: auto`` the LM head (and so the
    logits) may sit on another GPU than the embedding, where cached targets are kept."""
    target = target.map(lambda t: t.to(student_logits.device, non_blocking=True))
    if target.is_full:
        return _FullKL.apply(student_logits, target.logp.float())
    logq = F.log_softmax(student_logits.float(), dim=-1)  # [..., V]
    q_top = logq.gather(-1, target.index)  # [..., k]
    q_rest = torch.logsumexp(logq.scatter(-1, target.index, float("-inf")), dim=-1)  # [...]
    kl = (target.logp.exp() * (target.logp - q_top)).sum(-1)
    p_rest = target.rest.exp()
    return kl + torch.where(p_rest > 0, p_rest * (target.rest - q_rest), torch.zeros_like(kl))


def target_bytes(tokens: int, vocab: int, topk: int = 0) -> int:
    """Host bytes of the dense targets of ``tokens`` tokens: float32 log-probs over ``vocab``, or
    with ``topk`` the top-k (float32 values, int64 ids) and the rest's log-mass."""
    return tokens * (topk * 12 + 4 if topk else vocab * 4)


def output_vocab(model: nn.Module) -> int:
    """Width of the model's logits (the LM head's rows; may exceed the tokenizer's vocabulary)."""
    return model.get_output_embeddings().weight.shape[0]


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states ``[n, D]`` -> ``[n, V]``, with the model's logit soft-capping."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states ``[B, T, D]``: what the LM head reads."""
    return model.get_decoder()(input_ids=ids).last_hidden_state


def chunks(total: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` (0: one slice) covering ``range(total)``."""
    size = size or total
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def dense_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Dense next-token log-probabilities [B, T, V] (fp32, no grad)."""
    with torch.no_grad():
        return F.log_softmax(model(ids).logits.float(), dim=-1)


def dense_target(model: nn.Module, ids: torch.Tensor, topk: int, chunk: int) -> TeacherTarget:
    """The dense teacher's targets for ``ids`` ``[B, T]`` (no grad): full log-probs, or the top-k
    and rest computed ``chunk`` tokens at a time so no [B, T, V] fp32 tensor is ever built."""
    if chunk == 0 and topk == 0:
        return TeacherTarget(dense_logprobs(model, ids))
    with torch.no_grad():
        return hidden_target(model, last_hidden(model, ids), topk, chunk)


def hidden_target(model: nn.Module, hidden: torch.Tensor, topk: int, chunk: int) -> TeacherTarget:
    """:func:`dense_target` from the decoder's final hidden states ``[B, T, D]`` (the LM head's
    input, e.g. stored by the teacher stage): only the LM head runs. The same operations on the
    same values, so the targets are bit-identical to :func:`dense_target`'s (tested)."""
    with torch.no_grad():
        if chunk == 0 and topk == 0:  # [B, T, V]
            return TeacherTarget(F.log_softmax(output_logits(model, hidden).float(), dim=-1))
        flat = hidden.flatten(0, 1)  # [B*T, D]
        parts = []
        for part in chunks(len(flat), chunk):
            logp = F.log_softmax(output_logits(model, flat[part]).float(), dim=-1)  # [n, V]
            parts.append(top_k_target(logp, topk) if topk else TeacherTarget(logp))
    joined = TeacherTarget(
        torch.cat([p.logp for p in parts]),
        None if parts[0].is_full else torch.cat([p.index for p in parts]),
        None if parts[0].is_full else torch.cat([p.rest for p in parts]),
    )
    return joined.map(lambda t: t.unflatten(0, hidden.shape[:2]))


def chunked_kl(
    model: nn.Module, ids: torch.Tensor, target: TeacherTarget, chunk: int
) -> torch.Tensor:
    """Mean KL(teacher || student) over the tokens of ``ids`` ``[B, T]``, the student's logits
    built ``chunk`` tokens at a time under activation checkpointing (differentiable)."""
    hidden = last_hidden(model, ids).flatten(0, 1)  # [B*T, D]
    flat = target.map(lambda t: t.flatten(0, 1))

    def piece(h: torch.Tensor, part: slice) -> torch.Tensor:
        return kl_per_token(flat.map(lambda t: t[part]), output_logits(model, h)).sum()

    total = sum(
        checkpoint(piece, hidden[part], part, use_reentrant=False)
        for part in chunks(len(hidden), chunk)
    )
    return total / len(hidden)


def kl_to_teacher(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), computed in fp32.

    teacher_logp: [B, T, V] log-probabilities; student_logits: [B, T, V] raw logits.
    """
    return kl_per_token(TeacherTarget(teacher_logp), student_logits).mean()


def student_kl(
    model: nn.Module, ids: torch.Tensor, target: TeacherTarget, chunk: int
) -> torch.Tensor:
    """Mean KL(teacher || student) on ``ids`` [B, T] (hooks active): one forward and full
    log-probs, or the memory-bounded path when the target is top-k or ``chunk`` is set."""
    if target.is_full and chunk == 0:
        return kl_to_teacher(target.logp, model(ids).logits)
    return chunked_kl(model, ids, target, chunk)


def block_kls(
    model: nn.Module, ids: torch.Tensor, target: TeacherTarget, chunk: int
) -> torch.Tensor:
    """Per-block mean KL(teacher || student) ``[B]`` on ``ids`` [B, T] (no grad, hooks active)."""
    if target.is_full and chunk == 0:
        return kl_per_token(target, model(ids).logits).mean(-1)  # [B]
    return torch.stack(
        [student_kl(model, ids[b : b + 1], target.map(lambda t, b=b: t[b : b + 1]), chunk)
         for b in range(len(ids))]
    )  # fmt: skip
