"""From validated params to the objects of one experiment cell (config x sparsity)."""

from __future__ import annotations

from collections.abc import Mapping

from sponlab.config import AllocationConfig, Params
from sponlab.sites import Site, SiteMap
from sponlab.sparsify import SparsifySpec


def sparsify_spec(
    params: Params,
    config: AllocationConfig,
    sparsity: float,
    site_map: SiteMap,
    thresholds: Mapping[Site, float] | None,
) -> SparsifySpec:
    """TEAL/top-k on ``config.sparsify_modules`` of every layer at ``sparsity``."""
    sites = site_map.select(range(site_map.num_layers), config.sparsify_modules)
    prefix = params.sparsify.dense_prefix if params.sparsify.prefill == "dense_prefix" else 0
    return SparsifySpec(
        method=params.sparsify.method,
        sparsity=sparsity,
        sites=tuple(sites),
        thresholds=thresholds if params.sparsify.method == "teal" else None,
        dense_prefix=prefix,
    )


def bias_sites(config: AllocationConfig, site_map: SiteMap) -> list[Site]:
    """The SPON allocation of ``config`` resolved on this model."""
    if not config.has_biases:
        return []
    layers = config.layers.resolve(site_map.num_layers)
    return site_map.select(layers, config.modules)
