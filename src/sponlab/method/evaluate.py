"""Evaluation: perplexity, KL to the dense model and per-layer hidden-state shift.

The dense reference (log-probs and residual-stream hidden states on the first ``detail`` test
blocks) is captured once by the dense stage and reused by every evaluated configuration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sponlab.io.data import device_batches
from sponlab.io.tensorio import check_made_for, input_error, load_tensors, read_json
from sponlab.method.distill import TeacherTarget, kl_per_token
from sponlab.method.sparsify import SparsifySpec, SparsityStats, sparsified
from sponlab.method.spon import SponBiases, maybe_attached
from sponlab.model.sites import SiteMap
from sponlab.stats import spread

log = logging.getLogger(__name__)


@dataclass
class DenseReference:
    """Dense outputs on the detail blocks.

    logp: [N, T, V] next-token log-probs (stored fp16: top tokens keep ~5e-4 precision).
    hidden: [N, L+1, T, D] residual stream (embeddings, then the output of each layer).
    """

    logp: torch.Tensor
    hidden: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"logp": self.logp, "hidden": self.hidden}


def load_reference(path: Path, fingerprint: str | None = None) -> DenseReference:
    """The dense stage's reference file, refused if it was made for another model."""
    tensors, meta = load_tensors(path, producer="dense")
    check_made_for(path, meta, {"model_fingerprint": fingerprint}, "dense")
    if set(tensors) != {"logp", "hidden"}:
        raise input_error(path, f"holds {sorted(tensors)}, expected logp and hidden", "dense")
    return DenseReference(**tensors)


@dataclass
class VariantMetrics:
    """Metrics of one model variant (dense, TEAL-only, TEAL+SPON) on the test blocks."""

    ppl: float
    nll: float
    tokens: int
    kl: float | None = None
    block_nll: list[float] = field(default_factory=list)  # mean next-token NLL of each block
    shift_l2: list[float] = field(default_factory=list)  # per hidden-state index, mean over tokens
    shift_rel: list[float] = field(default_factory=list)  # ||h - h_dense|| / ||h_dense||

    def summary(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "kl": self.kl}


def next_token_nll(
    logits: torch.Tensor, ids: torch.Tensor, score_from: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-block summed NLL of predicting ``ids[:, s:]`` from ``logits[:, s-1:-1]``: [B] fp32,
    ``s`` = ``score_from`` per block (default 1: every predicted token; a sliding window scores
    only its last tokens). Row by row, so the fp32 copy of the logits is [T, V], not the batch.
    """
    starts = [1] * len(ids) if score_from is None else [int(s) for s in score_from]
    return torch.stack(
        [
            F.cross_entropy(row[s - 1 : -1].float(), target[s:], reduction="sum")
            for row, target, s in zip(logits, ids, starts, strict=True)
        ]
    )


def hidden_stack(hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """HF ``hidden_states`` tuple -> [B, L+1, T, D] fp32."""
    return torch.stack([h.float() for h in hidden_states], dim=1)


def capture_dense(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> DenseReference:
    """Dense log-probs and hidden states for ``blocks`` ([N, T]), written into host tensors
    allocated once (no list-then-stack copy at the peak) one block and one layer at a time, so
    the device holds one [T, V] fp32 log-softmax and one layer's [B, T, D] fp32 copy at most."""
    device = next(model.parameters()).device
    logp = hidden = None
    with torch.no_grad():
        for start, ids in device_batches(blocks, batch_size, device, "dense capture"):
            out = model(ids, output_hidden_states=True)
            if logp is None or hidden is None:
                n, t = blocks.shape
                layers, dim = len(out.hidden_states), out.hidden_states[0].shape[-1]
                logp = torch.empty(n, t, out.logits.shape[-1], dtype=torch.float16)  # [N, T, V]
                hidden = torch.empty(n, layers, t, dim, dtype=torch.float32)  # [N, L+1, T, D]
                log.info("dense reference: %.2f GiB on the host", _gib(logp) + _gib(hidden))
            end = start + len(ids)
            for i, row in enumerate(out.logits):
                logp[start + i] = F.log_softmax(row.float(), dim=-1).half()
            for layer, h in enumerate(out.hidden_states):
                hidden[start:end, layer] = h.float()
    assert logp is not None and hidden is not None, "capture_dense needs at least one block"
    return DenseReference(logp=logp, hidden=hidden)


def _gib(t: torch.Tensor) -> float:
    return t.numel() * t.element_size() / 2**30


KL_CHUNK_TOKENS = 512  # detail KL: at most [512, V] fp32 temporaries at once


def row_kl(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(dense || variant) of one block: logits [T, V], dense log-probs [T, V] -> [T]
    (fp32), computed KL_CHUNK_TOKENS tokens at a time so memory does not grow with T x V."""
    parts = []
    for start in range(0, len(logits), KL_CHUNK_TOKENS):
        part = slice(start, start + KL_CHUNK_TOKENS)
        parts.append(kl_per_token(TeacherTarget(ref_logp[part]), logits[part]))
    return torch.cat(parts)


def hidden_shift(
    hidden: torch.Tensor, ref_hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift of hidden states from the dense model's, per layer and token: ``||h - h_ref||`` and
    ``||h - h_ref|| / ||h_ref||``, each ``[..., L+1, T]`` from ``[..., L+1, T, D]`` stacks."""
    diff = (hidden - ref_hidden).norm(dim=-1)
    return diff, diff / ref_hidden.norm(dim=-1).clamp_min(1e-12)


def evaluate_variant(
    model: nn.Module,
    site_map: SiteMap,
    blocks: torch.Tensor,
    batch_size: int,
    spec: SparsifySpec | None = None,
    biases: SponBiases | None = None,
    reference: DenseReference | None = None,
    stats: SparsityStats | None = None,
    desc: str = "eval",
    score_from: torch.Tensor | None = None,
) -> VariantMetrics:
    """Perplexity on ``blocks``; with ``reference``, KL and hidden shift on its first blocks.

    ``score_from`` [N]: first scored position of each block (a protocol's windows; None: all)."""
    device = next(model.parameters()).device
    detail = len(reference.logp) if reference is not None else 0
    nll, tokens, block_nll = 0.0, 0, []
    kl_sum, kl_tokens = 0.0, 0
    l2_sum: torch.Tensor | None = None
    rel_sum: torch.Tensor | None = None
    with (
        torch.no_grad(),
        sparsified(model, site_map, spec, stats),
        maybe_attached(biases, model, site_map),
    ):
        for start, ids in device_batches(blocks, batch_size, device, desc):  # ids [B, T]
            want_detail = start < detail
            out = model(ids, output_hidden_states=want_detail)
            starts = None if score_from is None else score_from[start : start + len(ids)]
            per_block = next_token_nll(out.logits, ids, starts)  # [B]
            nll += float(per_block.sum())
            if starts is None:  # every predicted token of every block
                tokens += ids.shape[0] * (ids.shape[1] - 1)
                block_nll += (per_block / (ids.shape[1] - 1)).tolist()
            else:
                scored = (ids.shape[1] - starts).tolist()
                tokens += sum(scored)
                block_nll += [float(v) / n for v, n in zip(per_block, scored, strict=True)]
            if not want_detail:
                continue
            stop = min(start + len(ids), detail)
            n = stop - start
            kl_tok = torch.stack(  # [n, T]
                [row_kl(out.logits[i], reference.logp[start + i].to(device)) for i in range(n)]
            )
            kl_sum += float(kl_tok.sum())
            kl_tokens += kl_tok.numel()
            hidden = hidden_stack(out.hidden_states)[:n]  # [n, L+1, T, D]
            ref_hidden = reference.hidden[start:stop].to(device)
            diff, rel = hidden_shift(hidden, ref_hidden)  # [n, L+1, T] each
            l2 = diff.sum(dim=(0, 2)).cpu()
            rl = rel.sum(dim=(0, 2)).cpu()
            l2_sum = l2 if l2_sum is None else l2_sum + l2
            rel_sum = rl if rel_sum is None else rel_sum + rl
    metrics = VariantMetrics(math.exp(nll / tokens), nll / tokens, tokens, block_nll=block_nll)
    if reference is not None and kl_tokens:
        per_token = kl_tokens  # number of (block, position) pairs
        metrics.kl = kl_sum / per_token
        metrics.shift_l2 = (l2_sum / per_token).tolist()  # type: ignore[operator]
        metrics.shift_rel = (rel_sum / per_token).tolist()  # type: ignore[operator]
    return metrics


def damage_recovered(ppl_dense: float, ppl_teal: float, ppl_spon: float) -> float | None:
    """(ppl_teal - ppl_spon) / (ppl_teal - ppl_dense); None when TEAL did no damage."""
    damage = ppl_teal - ppl_dense
    if abs(damage) < 1e-9:
        return None
    return (ppl_teal - ppl_spon) / damage


def cell_metrics(
    config: str,
    sparsity: float,
    sparsified: str,
    dense_ppl: float,
    teal: VariantMetrics,
    seeds: dict[int, VariantMetrics],
) -> dict:
    """TEAL, per-seed TEAL+SPON and their mean / spread (ppl, KL, damage recovered)."""
    per_seed = [
        {"seed": k, **m.summary(), "damage_recovered": damage_recovered(dense_ppl, teal.ppl, m.ppl),
         "block_nll": m.block_nll}  # paired with dense's and TEAL's: the block bootstrap
        for k, m in seeds.items()
    ]  # fmt: skip

    def over_seeds(key: str) -> dict | None:
        values = [row[key] for row in per_seed if row[key] is not None]
        return spread(values).as_dict() if values else None

    return {
        "config": config,
        "sparsity": sparsity,
        "sparsify": sparsified,
        "dense_ppl": dense_ppl,
        "teal": teal.summary(),
        "spon_seeds": per_seed,
        "spon": {key: over_seeds(key) for key in ("ppl", "nll", "kl")},
        "damage_recovered": over_seeds("damage_recovered"),
    }


SHIFT_FIELDS = ["index", "layer", "teal_l2", "spon_l2", "teal_rel", "spon_rel"]


def shift_rows(teal: VariantMetrics, seeds: list[VariantMetrics]) -> list[dict]:
    """Per hidden-state index: TEAL shift and TEAL+SPON shift averaged over the seeds."""
    n = len(seeds)
    return [
        {
            "index": i,
            "layer": "embed" if i == 0 else i - 1,
            "teal_l2": teal.shift_l2[i],
            "spon_l2": sum(m.shift_l2[i] for m in seeds) / n,
            "teal_rel": teal.shift_rel[i],
            "spon_rel": sum(m.shift_rel[i] for m in seeds) / n,
        }
        for i in range(len(teal.shift_l2))
    ]


SPARSITY_FIELDS = ["site", "layer", "module", "target", "achieved"]


def sparsity_rows(stats: SparsityStats, target: float) -> list[dict]:
    """Achieved sparsity per site (fraction of zeroed inputs on the evaluated tokens)."""
    return [
        {"site": s.key, "layer": s.layer, "module": s.module, "target": target, "achieved": v}
        for s, v in stats.achieved().items()
    ]


def achieved_summary(rows: list[dict], target: float) -> dict:
    """Mean, sd and range over sites of the achieved sparsity in ``rows``, with the target."""
    return spread([row["achieved"] for row in rows]).as_dict() | {"target": target}


BASELINE_FORMAT = "sponlab-teal-baseline/1"


def baseline_payload(teal: VariantMetrics, stats: SparsityStats, meta: Mapping) -> dict:
    """TEAL-only metrics of one (sparsified set, sparsity) with its per-site achieved sparsity:
    what every evaluate cell of that set and sparsity shares instead of recomputing it."""
    rows = sparsity_rows(stats, meta["sparsity"])
    return {"format": BASELINE_FORMAT, **meta, "metrics": asdict(teal), "sparsity_rows": rows}


def read_baseline(
    path: Path, sparsity: float, sparsified: str, fingerprint: str | None = None
) -> tuple[VariantMetrics, list[dict], dict]:
    """The baseline stage's TEAL-only metrics, checked against the cell that reads them; returns
    the metrics, the per-site sparsity rows and the file's metadata."""
    payload = read_json(path, producer="baseline")
    if payload.get("format") != BASELINE_FORMAT:
        raise input_error(path, f"is not a {BASELINE_FORMAT} file", "baseline")
    expect = {"sparsity": sparsity, "set": sparsified, "model_fingerprint": fingerprint}
    check_made_for(path, payload, expect, "baseline")
    return VariantMetrics(**payload["metrics"]), payload["sparsity_rows"], payload


def same_for_all_seeds(sizes: Mapping[int, dict[str, int]], cell: Path) -> dict[str, int]:
    """The one value of per-seed sizes (bias sites, parameters); seeds of a cell that disagree
    were trained for different allocations, which is an error in the train cell ``cell``."""
    first = next(iter(sizes.values()))
    if any(v != first for v in sizes.values()):
        raise input_error(cell, f"seeds differ in their biases: {dict(sizes)}", "train")
    return dict(first)
