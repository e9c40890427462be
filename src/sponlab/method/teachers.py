"""The dense teacher's targets of the training and validation blocks: computed once, kept in host
memory within ``train.teacher_cache_gib``, shared by every seed and variant that trains on them.

What is not kept is recomputed when needed: the teacher is deterministic, so the values are the
same either way and only the memory/time trade-off changes (:func:`cache_plan`).

The teacher stage runs the dense decoder once over the training pool and the validation blocks and
stores its final hidden states (:func:`write_hidden`; ``[T, D]`` per block, the vocabulary never
enters the file). A train cell reads them (:class:`HiddenStates`) and runs only the LM head to get
its targets, bit-identical to running the whole model (the same operations on the same values, in
batches of the same shape), so no train cell runs the dense decoder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from sponlab.config import TrainParams
from sponlab.io.layout import teacher_path
from sponlab.io.tensorio import check_made_for, read_metadata, save_tensors
from sponlab.method.distill import (
    TeacherTarget,
    chunks,
    dense_target,
    hidden_target,
    last_hidden,
    output_vocab,
    target_bytes,
)

PART_BLOCKS = 64  # blocks per teacher file: the stage holds one part in host memory at a time


class Rows(Protocol):
    """Hidden states ``[N, T, D]`` indexable by a list of block indices (a tensor, or
    :class:`HiddenStates` reading them from the teacher stage's files)."""

    def __getitem__(self, index: list[int]) -> torch.Tensor: ...


class TeacherCache:
    """Dense targets per block index, computed on first use (kept when ``keep``): full log-probs,
    or with ``topk`` the top-k and the rest (:mod:`sponlab.method.distill`), ``chunk`` tokens at a
    time. Kept targets live in host memory (a cache, not work), each batch is moved to the
    device."""

    def __init__(
        self,
        model: nn.Module,
        blocks: torch.Tensor,
        keep: bool,
        topk: int = 0,
        chunk: int = 0,
        hidden: Rows | None = None,
    ) -> None:
        self.model, self.blocks, self.keep = model, blocks, keep  # blocks: [N, T] token ids
        self.topk, self.chunk = topk, chunk
        self.hidden = hidden  # the blocks' dense final hidden states: only the LM head runs
        self.cache: dict[int, TeacherTarget] = {}

    def _compute(self, missing: list[int], device: torch.device) -> TeacherTarget:
        if self.hidden is None:
            return dense_target(self.model, self.blocks[missing].to(device), self.topk, self.chunk)
        head = self.model.get_output_embeddings().weight.device  # [B, T, D] on the LM head's
        return hidden_target(self.model, self.hidden[missing].to(head), self.topk, self.chunk)

    def get(self, index: torch.Tensor, device: torch.device) -> TeacherTarget:
        """Targets of the blocks ``index`` ``[B]``, stacked ``[B, T, ...]`` on ``device``."""
        missing = [int(i) for i in index if int(i) not in self.cache]
        if missing:
            target = self._compute(missing, device)
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
    model: nn.Module, val_blocks: torch.Tensor, settings: TrainParams, hidden: Rows | None = None
) -> TeacherCache:
    """The validation blocks' ``[N, T]`` targets, kept when they fit the budget (shareable by
    every training that chooses its epoch on these blocks); from their stored ``hidden`` states
    when given."""
    vocab = output_vocab(model)
    keep = cache_plan(settings, 0, len(val_blocks), val_blocks.shape[1], vocab)[1]
    return TeacherCache(model, val_blocks, keep, settings.teacher_topk, settings.kl_chunk, hidden)


def teachers_for(
    model: nn.Module,
    pool: torch.Tensor,
    trained: int,
    val: TeacherCache,
    settings: TrainParams,
    hidden: Rows | None = None,
) -> Teachers:
    """Targets of a training pool ``[P, T]`` of which ``trained`` blocks are drawn (kept if they
    fit beside ``val``'s), with the shared validation targets ``val``; from the pool's stored
    ``hidden`` states when given."""
    vocab = output_vocab(model)
    keep = cache_plan(settings, trained, len(val.blocks), pool.shape[1], vocab)[0]
    train = TeacherCache(model, pool, keep, settings.teacher_topk, settings.kl_chunk, hidden)
    return Teachers(train, val)


def blocks_digest(blocks: torch.Tensor) -> str:
    """md5 of token blocks ``[N, T]``: ties stored hidden states to the blocks they came from."""
    return hashlib.md5(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def write_hidden(
    root: Path, split: str, model: nn.Module, blocks: torch.Tensor, batch_size: int, meta: dict
) -> int:
    """Run the dense decoder over ``blocks`` ``[N, T]`` in batches of ``batch_size`` (the
    training step's, so every batch has the shape training gives it) and save the final hidden
    states ``[N, T, D]`` (model dtype) in parts of :data:`PART_BLOCKS` blocks; returns the parts."""
    device = model.get_input_embeddings().weight.device
    parts = chunks(len(blocks), PART_BLOCKS)
    meta = {**meta, "split": split, "blocks": len(blocks), "blocks_md5": blocks_digest(blocks)}
    bar = tqdm(total=len(blocks), desc=f"teacher {split}", leave=False)
    for number, part in enumerate(parts):
        ids = blocks[part]
        hidden = []
        with torch.no_grad():
            for batch in chunks(len(ids), batch_size):
                hidden.append(last_hidden(model, ids[batch].to(device)).cpu())  # [B, T, D]
                bar.update(len(ids[batch]))
        first = {"first_block": part.start, "parts": len(parts)}
        save_tensors(teacher_path(root, split, number), {"hidden": torch.cat(hidden)}, meta | first)
    bar.close()
    return len(parts)


class HiddenStates:
    """A split's stored hidden states, read by rows from the teacher stage's files (memory-mapped:
    only the rows asked for are read). Checked when opened against the blocks they must belong to
    and the model fingerprint."""

    def __init__(self, root: Path, split: str, blocks: torch.Tensor, fingerprint: str | None):
        first = teacher_path(root, split, 0)
        meta = read_metadata(first, "teacher")
        expected = {"blocks_md5": blocks_digest(blocks), "model_fingerprint": fingerprint}
        check_made_for(first, meta, expected, "teacher")
        self.files = [teacher_path(root, split, k) for k in range(meta["parts"])]
        for path in self.files[1:]:
            check_made_for(path, read_metadata(path, "teacher"), expected, "teacher")

    def __getitem__(self, index: list[int]) -> torch.Tensor:
        rows = []  # [T, D] each
        for i in index:
            with safe_open(str(self.files[i // PART_BLOCKS]), framework="pt") as handle:
                rows.append(handle.get_slice("hidden")[i % PART_BLOCKS])
        return torch.stack(rows)  # [len(index), T, D]


def read_hidden(
    root: Path, pool: torch.Tensor, val: torch.Tensor, fingerprint: str | None
) -> tuple[HiddenStates, HiddenStates]:
    """The stored hidden states of the training pool ``[P, T]`` and the validation blocks
    ``[V, T]``, checked against them and the model."""
    return HiddenStates(root, "train", pool, fingerprint), HiddenStates(
        root, "val", val, fingerprint
    )
