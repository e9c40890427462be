"""Closed-form SPON biases: the constant that minimises each site's expected output error.

For ``y = W x`` sparsified to ``W S(x)``, the constant ``b`` minimising ``E||W x - W S(x) - b||^2``
is ``b = W E[x - S(x)]`` (``a = E[x - S(x)]`` in the input parametrisation): the mean output the
sparsification loses. No training, one sequential walk over the calibration blocks: as in
:func:`sponlab.method.calibration.calibrate_sequential`, decoder layer ``l`` is evaluated on hidden states
that already went through layers ``< l`` sparsified *and* with their closed-form biases added, so
each bias compensates what its site loses in the deployed model; inside a layer the sites are
taken in forward order (q/k/v, o, gate/up, down), each with the biases before it attached. Means are accumulated in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sponlab.method.calibration import decoder_layers, record_layer_calls, run_layer
from sponlab.method.sparsify import SparsifySpec, sparsified
from sponlab.method.spon import SponBiases
from sponlab.model.hooks import capture_inputs
from sponlab.model.sites import Site, SiteMap, sort_sites


class _LostMean:
    """Running fp32 sum of ``x - S(x)`` ([D]) per site and the token count."""

    def __init__(self) -> None:
        self.sums: dict[Site, torch.Tensor] = {}
        self.tokens: dict[Site, int] = {}

    def add(self, site: Site, x: torch.Tensor, sign: float) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])  # [B*T, D]
        total = flat.sum(0) * sign
        self.sums[site] = self.sums[site] + total if site in self.sums else total
        if sign > 0:
            self.tokens[site] = self.tokens.get(site, 0) + flat.shape[0]

    def mean(self, site: Site) -> torch.Tensor:
        return self.sums[site] / max(self.tokens[site], 1)  # [D] fp32


def closed_form_biases(
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec,
    sites: Sequence[Site],
    blocks: torch.Tensor,
    batch_size: int,
    parametrization: str = "output",
) -> SponBiases:
    """Closed-form biases of ``sites`` under ``spec`` on ``blocks`` ([N, T] token ids).

    A site whose input ``spec`` does not sparsify gets zero (nothing is lost there).
    """
    device = next(model.parameters()).device
    biases = SponBiases.for_model(model, site_map, sites, parametrization).to(device)
    layers = decoder_layers(model, site_map)
    with torch.no_grad():
        hidden, calls = record_layer_calls(model, layers, blocks, batch_size)
        for index in tqdm(range(site_map.num_layers), desc="closed form", leave=False):
            for group in _forward_groups(s for s in biases.sites if s.layer == index):
                lost = _lost_means(
                    model, site_map, spec, biases, group, layers[index], hidden, calls[index]
                )
                for site in group:
                    mean = lost.mean(site)  # [D_in]
                    weight = site_map.linear(model, site).weight.float()  # [D_out, D_in]
                    biases.vector(site).copy_(mean if parametrization == "input" else weight @ mean)
            with sparsified(model, site_map, spec), biases.attached(model, site_map):
                hidden = [
                    run_layer(layers[index], h, call)
                    for h, call in zip(hidden, calls[index], strict=True)
                ]
    return biases


def _lost_means(model, site_map, spec, biases, group, layer, hidden, calls) -> _LostMean:
    """Run one decoder layer over every batch, recording ``x - S(x)`` at the ``group`` sites."""
    lost = _LostMean()
    with (
        capture_inputs(model, site_map, group, lambda s, x: lost.add(s, x, 1.0)),
        sparsified(model, site_map, spec),
        capture_inputs(model, site_map, group, lambda s, x: lost.add(s, x, -1.0)),
        biases.attached(model, site_map),  # earlier groups' biases (the rest are still 0)
    ):
        for h, call in zip(hidden, calls, strict=True):
            run_layer(layer, h, call)
    return lost


def _forward_groups(sites: Iterable[Site]) -> list[list[Site]]:
    """Sites of one layer grouped by shared input (q/k/v, o, gate/up, down), in forward order:
    a group's inputs depend on the biases of the groups before it, never on its own."""
    groups: dict[str, list[Site]] = {}
    for site in sort_sites(sites):
        groups.setdefault(site.group, []).append(site)
    return list(groups.values())
