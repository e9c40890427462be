"""Bias alignment with the principal directions of the residual stream (decoder-layer outputs).

A bias on ``o_proj`` or ``down_proj`` of layer ``l`` is added straight into the residual stream,
so beside its alignment with the PCs of its own linear output (:mod:`sponlab.studies.interpret.alignment`)
the study asks whether it points along the dominant directions of the hidden states themselves:
``|cos(b, PC_k)|`` with the top ``K`` principal components of the dense residual stream after layer
``l`` (``hidden_states[l + 1]``), the energy of ``b`` in that subspace (chance ``K / D``) and the
empirical random-direction chance level.

Gemma-2/3 blocks normalise the ``o_proj`` and ``down_proj`` outputs (``post_attention_layernorm``,
``post_feedforward_layernorm``) before the residual add, so there the bias is not a residual-stream
vector: :func:`post_norm_sites` finds those sites and the rows skip them, with a message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Set
from typing import Any

import torch
from torch import nn

from sponlab.io.data import device_batches
from sponlab.model.capture import post_norm
from sponlab.model.sites import Site, SiteMap, sort_sites
from sponlab.studies.interpret.alignment import principal_components
from sponlab.studies.interpret.directions import RandomBaseline, cosine, expected_abs_cos

log = logging.getLogger(__name__)


def residual_samples(
    model: nn.Module,
    ids: torch.Tensor,
    batch_size: int,
    layers: list[int],
    tokens: int,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Up to ``tokens`` dense residual-stream vectors [N, D] after each of ``layers`` (a fixed
    random subset of the positions of ``ids`` [B, T]), float32 on the host for the PCA."""
    device = next(model.parameters()).device
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for _, batch in device_batches(ids, batch_size, device, "residual"):
            hidden = model(batch, output_hidden_states=True).hidden_states  # L+1 x [B, T, D]
            for layer in layers:
                rows[layer].append(hidden[layer + 1].float().reshape(-1, hidden[0].shape[-1]).cpu())
    out = {}
    for layer, parts in rows.items():
        x = torch.cat(parts)  # [N, D]
        if len(x) > tokens:
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:tokens]
            x = x[pick.sort().values]
        out[layer] = x
    return out


def residual_components(samples: Mapping[int, torch.Tensor], count: int) -> dict[int, torch.Tensor]:
    """Top ``count`` principal components [K, D] of each layer's residual samples."""
    return {layer: principal_components(x, count)[0] for layer, x in samples.items()}


def post_norm_sites(model: nn.Module, site_map: SiteMap, sites: Iterable[Site]) -> set[Site]:
    """The ``o_proj`` / ``down_proj`` sites whose output is normalised before the residual add:
    blocks with both a pre- and a post-feedforward norm (Gemma-2/3's sandwich norm)."""
    blocks = model.get_submodule(site_map.layers_path)
    return {site for site in sites if post_norm(blocks[site.layer], site.module) is not None}


def residual_alignment_rows(
    vectors: Mapping[Site, torch.Tensor],
    components: Mapping[int, torch.Tensor],
    baseline: RandomBaseline,
    post_norm: Set[Site] = frozenset(),
) -> list[dict[str, Any]]:
    """Per site whose bias lives in the residual space (output width == hidden size and no norm
    between it and the residual add): the largest |cos| with a residual PC of its layer, the
    bias energy in the top-K subspace, chance. ``post_norm`` sites are skipped (logged once)."""
    rows = []
    skipped = sorted(s.key for s in post_norm if s in vectors)
    if skipped:
        log.info(
            "residual alignment skips %d post-norm site(s) (e.g. %s): their bias is normalised "
            "before the residual add, so it is not a residual-stream direction",
            len(skipped), skipped[0],
        )  # fmt: skip
    for site in sort_sites(vectors):
        if site in post_norm:
            continue
        comps = components.get(site.layer)
        bias = vectors[site].detach().double().cpu()
        if comps is None or bias.numel() != comps.shape[1]:
            continue  # q/k/v/gate/up outputs are not residual-stream vectors
        pcs = [abs(cosine(bias, c)) for c in comps]
        rows.append(
            {
                "site": site.key,
                "layer": site.layer,
                "module": site.module,
                "dim": bias.numel(),
                **{f"abs_cos_resid_pc{i + 1}": v for i, v in enumerate(pcs)},
                "max_abs_cos_resid_pc": max(pcs),
                "resid_pc_energy": float(sum(v * v for v in pcs)),
                "resid_pc_energy_chance": len(pcs) / bias.numel(),
                "chance_abs_cos": expected_abs_cos(bias.numel()),
                "random_abs_cos": baseline(bias.numel()),
            }
        )
    return rows
