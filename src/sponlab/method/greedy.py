"""TEAL's block-wise greedy sparsity allocation: how sparse each input group of a layer should be.

Uniform TEAL gives every site the same sparsity. TEAL's greedy procedure instead searches, layer by
layer, for per-group sparsities with the same parameter-weighted average but less damage: starting
from a dense layer, each step raises the sparsity of one input group (q/k/v, o, gate/up, down: the
inputs a sparse kernel masks once) by a fixed step, choosing the group whose raise adds the least
error to the layer's output, until the layer's parameter-weighted sparsity reaches the target.

As in TEAL (``teal/greedyopt.py``): a group's step is ``step x hidden^2 / params(group)``, so every
step adds the same weighted sparsity (``step`` per q_proj-sized matrix); thresholds during the
search are quantiles of the group's dense inputs; the error is measured on the layer output against
its dense output, for the layer's dense inputs, on the last ``last_fraction`` of the positions.
Here the error is the mean over those tokens of the L2 norm over the hidden size (TEAL's norm runs
over the sequence axis), and the search stops at the first step whose weighted sparsity reaches the
target (TEAL stores the whole path and looks the target up; the final rows coincide). The
deployment thresholds are then calibrated for each site's own sparsity
(:func:`sponlab.method.calibration.calibrate_sequential` with ``targets``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from sponlab.method.calibration import LayerCall, decoder_layers, record_layer_calls, run_layer
from sponlab.method.sparsify import (
    SparsifySpec,
    group_representatives,
    sorted_threshold,
    sparsified,
)
from sponlab.model.hooks import capture_inputs
from sponlab.model.sites import Site, SiteMap, sort_sites

log = logging.getLogger(__name__)

MAX_SPARSITY = 0.99  # no group is pushed beyond this (a fully zeroed input is never a candidate)


@dataclass(frozen=True)
class GreedyRow:
    """One step of one layer's search: the group raised and the layer's state after it."""

    layer: int
    step: int
    group: str
    effective: float  # parameter-weighted sparsity of the layer's sparsified groups
    error: float  # output error with these per-group sparsities
    uniform_error: float  # output error with every group at ``effective`` (uniform TEAL)
    sparsities: dict[str, float]  # group -> sparsity

    def as_row(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "sparsities"} | {
            f"s_{g}": s for g, s in self.sparsities.items()
        }


class LayerSearch:
    """One decoder layer with its dense inputs and outputs: output error for given sparsities."""

    def __init__(
        self,
        model: nn.Module,
        site_map: SiteMap,
        index: int,
        batches: list[tuple[torch.Tensor, LayerCall]],
        sites: Sequence[Site],
        last_fraction: float,
    ) -> None:
        self.model, self.site_map, self.index = model, site_map, index
        self.layer = decoder_layers(model, site_map)[index]
        self.batches = batches
        self.reps = {rep.group: members for rep, members in group_representatives(sites).items()}
        self.outputs, self.magnitudes = self._dense_pass()
        self.thresholds: dict[tuple[str, float], float] = {}  # (group, sparsity) -> threshold
        self.dense = [out.float() for out in self.outputs]  # [B, T, H] fp32 error reference
        length = batches[0][0].shape[1]
        self.start = min(round(length * (1 - last_fraction)), length - 1)  # scored positions

    @torch.no_grad()
    def _dense_pass(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """One dense pass of the layer: its outputs per batch (the next layer's dense inputs,
        in the model's dtype) and, per group, the flat |x| of the group's dense inputs, sorted
        ascending once, so each threshold of the search is a lookup instead of a selection."""
        found: dict[str, list[torch.Tensor]] = {g: [] for g in self.reps}
        group_of = {members[0]: g for g, members in self.reps.items()}

        def sink(site: Site, x: torch.Tensor) -> None:
            found[group_of[site]].append(x.detach().abs().float().flatten())

        with capture_inputs(self.model, self.site_map, list(group_of), sink):
            outputs = [run_layer(self.layer, h, call) for h, call in self.batches]
        return outputs, {g: torch.cat(values).sort().values for g, values in found.items()}

    def spec(self, sparsities: dict[str, float]) -> SparsifySpec | None:
        thresholds = {}
        for group, s in sparsities.items():
            if (group, s) not in self.thresholds:  # a step re-asks the unchanged groups
                self.thresholds[group, s] = sorted_threshold(self.magnitudes[group], s)
            thresholds.update({site: self.thresholds[group, s] for site in self.reps[group]})
        nominal = min(max(sparsities.values(), default=0.0), MAX_SPARSITY)
        return SparsifySpec("teal", nominal, tuple(thresholds), thresholds)

    @torch.no_grad()
    def error(self, sparsities: dict[str, float]) -> float:
        """Mean over the scored tokens of ||y - y_dense||_2 (fp32)."""
        total, count = 0.0, 0
        with sparsified(self.model, self.site_map, self.spec(sparsities)):
            for (h, call), dense in zip(self.batches, self.dense, strict=True):
                out = run_layer(self.layer, h, call).float()[:, self.start :]  # [B, T', H]
                norms = (out - dense[:, self.start :]).norm(dim=-1)  # [B, T']
                total += float(norms.sum())
                count += norms.numel()
        return total / max(count, 1)


def group_parameters(model: nn.Module, site_map: SiteMap, sites: Sequence[Site]) -> dict:
    """Weight parameters per input group of one layer's ``sites`` (all sites reading it)."""
    params: dict[str, int] = {}
    for site in sites:
        params[site.group] = params.get(site.group, 0) + site_map.linear(model, site).weight.numel()
    return params


def search_layer(
    search: LayerSearch, params: dict[str, int], unit: int, target: float, step: float
) -> list[GreedyRow]:
    """Raise one group per step (least added error) until the weighted sparsity reaches target."""
    total = sum(params.values())
    steps = {g: step * unit / n for g, n in params.items()}  # equal weighted sparsity per step
    state = dict.fromkeys(params, 0.0)
    rows: list[GreedyRow] = []

    def effective(s: dict[str, float]) -> float:
        return sum(s[g] * params[g] for g in params) / total

    while effective(state) < target - 1e-9:
        candidates = [g for g in params if state[g] + steps[g] <= MAX_SPARSITY]
        if not candidates:
            log.warning("layer %d: every group at its limit below %.3f", search.index, target)
            break
        errors = {g: search.error(state | {g: state[g] + steps[g]}) for g in candidates}
        best = min(candidates, key=lambda g: (errors[g], g))
        state[best] += steps[best]
        eff = effective(state)
        uniform = search.error(dict.fromkeys(params, min(eff, MAX_SPARSITY)))
        rows.append(
            GreedyRow(search.index, len(rows) + 1, best, eff, errors[best], uniform, {**state})
        )
    return rows


def greedy_allocation(
    model: nn.Module,
    site_map: SiteMap,
    blocks: torch.Tensor,
    target: float,
    sites: Sequence[Site],
    step: float = 0.05,
    last_fraction: float = 0.25,
    batch_size: int = 8,
) -> tuple[dict[Site, float], list[GreedyRow]]:
    """Per-site sparsities (equal within an input group) reaching ``target`` in every layer, and
    every layer's search path. ``blocks`` [N, T] are calibration token ids."""
    sites = sort_sites(sites)
    unit = model.get_input_embeddings().weight.shape[1] ** 2  # one q_proj-sized matrix
    layers = decoder_layers(model, site_map)
    allocation: dict[Site, float] = {}
    path: list[GreedyRow] = []
    with torch.no_grad():
        hidden, calls = record_layer_calls(model, layers, blocks, batch_size)
        for index in tqdm(range(site_map.num_layers), desc=f"greedy s={target:g}"):
            batches = list(zip(hidden, calls[index], strict=True))
            own = [s for s in sites if s.layer == index]
            if not own:
                hidden = [run_layer(layers[index], h, call) for h, call in batches]
                continue
            search = LayerSearch(model, site_map, index, batches, own, last_fraction)
            params = group_parameters(model, site_map, own)
            rows = search_layer(search, params, unit, target, step)
            final = rows[-1].sparsities if rows else {}
            allocation.update({s: final.get(s.group, 0.0) for s in own})
            path += rows
            hidden = search.outputs  # the next layer's dense inputs, from the search's own pass
    return allocation, path


ALLOCATION_FIELDS = ["site", "layer", "module", "group", "sparsity", "threshold"]
PATH_FIELDS = [
    "layer", "step", "group", "effective", "error", "uniform_error",
    "s_qkv", "s_o", "s_gate_up", "s_down",
]  # fmt: skip


def allocation_rows(
    sites: Sequence[Site], thresholds: Mapping[Site, float], targets: Mapping[Site, float]
) -> list[dict]:
    """Per site: its target sparsity and calibrated threshold (the calibrate stage's CSV)."""
    return [
        {
            "site": s.key,
            "layer": s.layer,
            "module": s.module,
            "group": s.group,
            "sparsity": targets[s],
            "threshold": thresholds[s],
        }
        for s in sort_sites(sites)
    ]
