"""The dense teacher's targets of the training and validation blocks: computed once, kept in host
memory within ``train.teacher_cache_gib``, shared by every seed and variant that trains on them.

What is not kept is recomputed when needed: the teacher is deterministic, so the values are the
same either way and only the memory/time trade-off changes (:func:`cache_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sponlab.config import TrainParams
from sponlab.method.distill import TeacherTarget, dense_target, output_vocab, target_bytes


class TeacherCache:
    """Dense targets per block index, computed on first use (kept when ``keep``): full log-probs,
    or with ``topk`` the top-k and the rest (:mod:`sponlab.method.distill`), ``chunk`` tokens at a
    time. Kept targets live in host memory (a cache, not work), each batch is moved to the
    device."""

    def __init__(
        self, model: nn.Module, blocks: torch.Tensor, keep: bool, topk: int = 0, chunk: int = 0
    ) -> None:
        self.model, self.blocks, self.keep = model, blocks, keep  # blocks: [N, T] token ids
        self.topk, self.chunk = topk, chunk
        self.cache: dict[int, TeacherTarget] = {}

    def get(self, index: torch.Tensor, device: torch.device) -> TeacherTarget:
        """Targets of the blocks ``index`` ``[B]``, stacked ``[B, T, ...]`` on ``device``."""
        missing = [int(i) for i in index if int(i) not in self.cache]
        if missing:
            ids = self.blocks[missing].to(device)
            target = dense_target(self.model, ids, self.topk, self.chunk)
            if not self.keep:
                order = {j: k for k, j in enumerate(missing)}
                return target.map(lambda t: t[[order[int(i)] for i in index]])
            pin = device.type == "cuda"  # page-locked rows copy to the GPU asynchronously
            for k, j in enumerate(missing):
                self.cache[j] = target.map(
                    lambda t, k=k: t[k].cpu().pin_memory() if pin else t[k].cpu()
                )
        return TeacherTarget.stack(
            [self.cache[int(i)].map(lambda t: t.to(device, non_blocking=True)) for i in index]
        )


@dataclass
class Teachers:
    """Dense targets of the train and validation blocks of one training."""

    train: TeacherCache
    val: TeacherCache


def cache_plan(
    settings: TrainParams, train_blocks: int, val_blocks: int, block_len: int, vocab: int
) -> tuple[bool, bool]:
    """``(keep the training targets, keep the validation targets)`` within
    ``train.teacher_cache_gib``: the validation targets first (read every epoch), then the training
    set's if ``train.teacher_cache`` and both fit, so host memory is bounded whatever the
    vocabulary and the amount of data."""
    budget = settings.teacher_cache_gib * 2**30
    val = target_bytes(val_blocks * block_len, vocab, settings.teacher_topk)
    train = target_bytes(train_blocks * block_len, vocab, settings.teacher_topk)
    keep_val = val <= budget
    return settings.teacher_cache and train + (val if keep_val else 0) <= budget, keep_val


def validation_targets(
    model: nn.Module, val_blocks: torch.Tensor, settings: TrainParams
) -> TeacherCache:
    """The validation blocks' ``[N, T]`` targets, kept when they fit the budget (shareable by
    every training that chooses its epoch on these blocks)."""
    vocab = output_vocab(model)
    keep = cache_plan(settings, 0, len(val_blocks), val_blocks.shape[1], vocab)[1]
    return TeacherCache(model, val_blocks, keep, settings.teacher_topk, settings.kl_chunk)


def teachers_for(
    model: nn.Module,
    pool: torch.Tensor,
    trained: int,
    val: TeacherCache,
    settings: TrainParams,
) -> Teachers:
    """Targets of a training pool ``[P, T]`` of which ``trained`` blocks are drawn (kept if they
    fit beside ``val``'s), with the shared validation targets ``val``."""
    vocab = output_vocab(model)
    keep = cache_plan(settings, trained, len(val.blocks), pool.shape[1], vocab)[0]
    train = TeacherCache(model, pool, keep, settings.teacher_topk, settings.kl_chunk)
    return Teachers(train, val)
