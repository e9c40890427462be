"""Prompt-category effects: KL to dense and residual-stream shift per category and variant.

Prompt sets are YAML mappings ``{category: [prompt, ...]}``; the built-in set (math, code,
commonsense, factual, safety) ships as package data ``sponlab/resources/prompts.yaml``. Prompts of
one category are batched longest-first and padded on the right with an attention mask; every
average runs over real tokens only (pad positions never count), so a padded batch gives the same
numbers as one prompt at a time.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sponlab.config import ConfigError
from sponlab.io.batches import TokenBatch, ensure_pad_token, pad_batches
from sponlab.method.distill import TeacherTarget, kl_per_token
from sponlab.method.evaluate import hidden_shift, hidden_stack
from sponlab.method.sparsify import SparsifySpec, sparsified
from sponlab.method.spon import SponBiases, maybe_attached
from sponlab.model.sites import SiteMap

BUILTIN = "builtin"


def load_prompt_sets(source: str = BUILTIN) -> dict[str, list[str]]:
    """``builtin`` (package data) or a YAML file path -> ``{category: [prompt, ...]}``."""
    if source == BUILTIN:
        text = importlib.resources.files("sponlab").joinpath("resources/prompts.yaml").read_text()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"params.yaml: interpret.prompts: no file {source!r} (or 'builtin')")
        text = path.read_text()
    data = yaml.safe_load(text)
    ok = isinstance(data, dict) and data
    ok = ok and all(
        isinstance(v, list) and v and all(isinstance(p, str) and p.strip() for p in v)
        for v in data.values()
    )
    if not ok:
        raise ConfigError(f"prompt set {source!r} must map categories to non-empty lists of text")
    return {str(k): [p.strip() for p in v] for k, v in data.items()}


def select_prompts(
    sets: Mapping[str, list[str]], categories: Sequence[str] | None, per_category: int
) -> dict[str, list[str]]:
    """The first ``per_category`` prompts of each chosen category (None: all categories)."""
    chosen = list(sets) if categories is None else list(categories)
    unknown = [c for c in chosen if c not in sets]
    if unknown:
        raise ConfigError(
            f"params.yaml: interpret.categories has unknown {unknown}; available: {list(sets)}"
        )
    return {c: sets[c][:per_category] for c in chosen}


def prompt_batches(
    prompts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_tokens: int,
    bos: bool = False,
) -> list[TokenBatch]:
    """Tokenise (optional BOS, cut at ``max_tokens``), sort longest-first, right-pad into batches."""
    pad_id = ensure_pad_token(tokenizer)
    seqs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = ([tokenizer.bos_token_id] if bos else []) + ids
        seqs.append(ids[:max_tokens])
    seqs.sort(key=len, reverse=True)
    return pad_batches(seqs, batch_size, pad_id)


@dataclass(frozen=True)
class Variant:
    """A sparsified model variant: TEAL-only (``biases=None``) or TEAL+SPON."""

    spec: SparsifySpec | None
    biases: SponBiases | None = None


@dataclass
class ShiftTotals:
    """Token-summed KL to dense and per-hidden-state shift (L2 and relative) of one variant."""

    tokens: int = 0
    kl_sum: float = 0.0
    l2_sum: torch.Tensor | None = None  # [L+1]
    rel_sum: torch.Tensor | None = None  # [L+1]

    def add(self, kl: float, l2: torch.Tensor, rel: torch.Tensor, tokens: int) -> None:
        self.kl_sum += kl
        self.tokens += tokens
        self.l2_sum = l2 if self.l2_sum is None else self.l2_sum + l2
        self.rel_sum = rel if self.rel_sum is None else self.rel_sum + rel

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens

    @property
    def shift_l2(self) -> list[float]:
        return (self.l2_sum / self.tokens).tolist()  # type: ignore[operator]

    @property
    def shift_rel(self) -> list[float]:
        return (self.rel_sum / self.tokens).tolist()  # type: ignore[operator]


def masked_comparison(
    logits: torch.Tensor,
    ref_logp: torch.Tensor,
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Sums over real tokens of KL(dense || variant) and of per-layer hidden shift.

    logits/ref_logp: [B, T, V]; hidden/ref_hidden: [B, L+1, T, D]; mask: [B, T] (1 = real token).
    Returns (kl_sum, l2_sum [L+1], rel_sum [L+1]).
    """
    keep = mask.bool()  # [B, T]
    kl_tok = kl_per_token(TeacherTarget(ref_logp), logits)  # [B, T]
    diff, rel = hidden_shift(hidden, ref_hidden)  # [B, L+1, T] each
    weight = keep[:, None, :].to(diff.dtype)  # [B, 1, T]
    return (
        float(kl_tok[keep].sum()),
        (diff * weight).sum(dim=(0, 2)).cpu(),
        (rel * weight).sum(dim=(0, 2)).cpu(),
    )


def _forward(model: nn.Module, batch: TokenBatch, device: torch.device):
    return model(
        batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        output_hidden_states=True,
    )


def prompt_effects(
    model: nn.Module,
    site_map: SiteMap,
    batches: Sequence[TokenBatch],
    variants: Mapping[str, Variant],
    desc: str = "prompts",
) -> dict[str, ShiftTotals]:
    """KL and hidden shift of each variant vs the dense model over ``batches`` (real tokens only).

    The dense pass runs once per batch and is shared by all variants.
    """
    device = next(model.parameters()).device
    totals = {name: ShiftTotals() for name in variants}
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, leave=False):
            dense = _forward(model, batch, device)
            ref_logp = F.log_softmax(dense.logits.float(), dim=-1)  # [B, T, V]
            ref_hidden = hidden_stack(dense.hidden_states)  # [B, L+1, T, D]
            mask = batch.attention_mask.to(device)
            for name, variant in variants.items():
                with (
                    sparsified(model, site_map, variant.spec),
                    maybe_attached(variant.biases, model, site_map),
                ):
                    out = _forward(model, batch, device)
                kl, l2, rel = masked_comparison(
                    out.logits, ref_logp, hidden_stack(out.hidden_states), ref_hidden, mask
                )
                totals[name].add(kl, l2, rel, batch.tokens)
    return totals


def prompt_variants(
    configs: Sequence[str],
    specs: Mapping[str, SparsifySpec],
    biases: Mapping[str, SponBiases],
) -> tuple[dict[str, Variant], dict[str, str]]:
    """``TEAL-only`` variants (one per distinct sparsified site set) and ``SPON[config]`` ones.

    Also returns the name of each config's own TEAL-only baseline (same sparsified modules).
    """
    variants: dict[str, Variant] = {}
    baseline: dict[str, str] = {}
    for name in configs:
        same = [v for v, var in variants.items() if var.biases is None and var.spec == specs[name]]
        baseline[name] = same[0] if same else "TEAL-only" + (f"[{name}]" if variants else "")
        variants.setdefault(baseline[name], Variant(specs[name]))
        variants[f"SPON[{name}]"] = Variant(specs[name], biases[name])
    return variants, baseline


def effect_rows(category: str, prompts: int, totals: Mapping[str, ShiftTotals]) -> list[dict]:
    """One row per variant: tokens, KL to dense, final and mean (over layers) relative shift."""
    return [
        {
            "category": category,
            "variant": name,
            "prompts": prompts,
            "tokens": t.tokens,
            "kl": t.kl,
            "shift_rel_final": t.shift_rel[-1],
            "shift_rel_mean": sum(t.shift_rel[1:]) / max(len(t.shift_rel) - 1, 1),
        }
        for name, t in totals.items()
    ]


def layer_rows(category: str, totals: Mapping[str, ShiftTotals]) -> list[dict]:
    """Long format: one row per variant and hidden state (0 = embeddings)."""
    return [
        {"category": category, "variant": name, "index": i, "l2": l2, "rel": rel}
        for name, t in totals.items()
        for i, (l2, rel) in enumerate(zip(t.shift_l2, t.shift_rel, strict=True))
    ]


def kl_reduction(rows: Sequence[Mapping[str, Any]], config: str, baseline: str) -> dict[str, float]:
    """Per category ``1 - KL(SPON[config]) / KL(its TEAL-only baseline)``."""
    kl = {(r["category"], r["variant"]): r["kl"] for r in rows}
    categories = dict.fromkeys(r["category"] for r in rows)
    return {
        c: 1 - kl[c, f"SPON[{config}]"] / kl[c, baseline] if kl[c, baseline] > 0 else math.nan
        for c in categories
    }
