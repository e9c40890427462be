"""Text to padded token batches for the analysis passes (importance, SAE, prompt categories).

Documents are tokenised (optional BOS), cut to a maximum length, sorted longest-first and padded
on the right (with EOS when the tokenizer has no pad token); the attention mask marks real tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class BatchError(ValueError):
    """Text that cannot be batched as asked (too few documents, no pad token)."""


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids and their mask (1 = real token, 0 = pad)."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Pad on the right with the tokenizer's pad token, or EOS when it has none; return its id."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise BatchError("tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return int(tokenizer.pad_token_id)


def tokenize_documents(
    docs: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    samples: int,
    max_length: int,
    min_tokens: int = 2,
    bos: bool = False,
) -> list[list[int]]:
    """Token ids of the first ``samples`` documents with >= ``min_tokens`` tokens (<= max_length).

    With ``bos`` each sample starts with the BOS token (counted in ``max_length``).
    """
    out: list[list[int]] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        if bos:
            ids = [tokenizer.bos_token_id, *ids]
        ids = ids[:max_length]
        if len(ids) >= min_tokens:
            out.append(ids)
        if len(out) == samples:
            return out
    raise BatchError(
        f"only {len(out)} of {len(docs)} documents have >= {min_tokens} tokens; "
        f"{samples} samples requested (lower samples or min_tokens)"
    )


def pad_batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> list[TokenBatch]:
    """Consecutive right-padded batches of at most ``batch_size`` sequences."""
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append(TokenBatch(ids, mask))
    return batches


def build_batches(
    docs: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    samples: int,
    max_length: int,
    batch_size: int,
    min_tokens: int = 2,
    bos: bool = False,
) -> list[TokenBatch]:
    """Tokenise the first documents and batch them, longest first (less padding to compute)."""
    pad_id = ensure_pad_token(tokenizer)
    seqs = tokenize_documents(docs, tokenizer, samples, max_length, min_tokens, bos)
    seqs = sorted(seqs, key=len, reverse=True)  # aggregates are sums: order does not matter
    return pad_batches(seqs, batch_size, pad_id)
