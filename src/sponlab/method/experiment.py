"""From validated params to the objects of one experiment cell (config x sparsity)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sponlab.allocations import AllocationConfig, parse_layers
from sponlab.config import Params
from sponlab.io.layout import threshold_path
from sponlab.method.sparsify import SparsifySpec, load_thresholds
from sponlab.model.sites import PROJECTIONS, Site, SiteMap


def sparsify_spec(
    params: Params,
    config: AllocationConfig,
    sparsity: float,
    site_map: SiteMap,
    thresholds: Mapping[Site, float] | None,
) -> SparsifySpec:
    """TEAL/top-k on ``config.sparsify_modules`` of every layer at ``sparsity``."""
    return _spec(params, sparsified_sites(config, site_map), sparsity, thresholds)


def _spec(
    params: Params, sites: Sequence[Site], sparsity: float, thresholds: Mapping[Site, float] | None
) -> SparsifySpec:
    prefix = params.sparsify.dense_prefix if params.sparsify.prefill == "dense_prefix" else 0
    return SparsifySpec(
        method=params.sparsify.method,
        sparsity=sparsity,
        sites=tuple(sites),
        thresholds=thresholds if params.sparsify.method == "teal" else None,
        dense_prefix=prefix,
    )


def sparsified_sites(config: AllocationConfig, site_map: SiteMap) -> list[Site]:
    """The sites ``config``'s sparsified set covers on this model (every layer)."""
    return site_map.select(range(site_map.num_layers), config.sparsify_modules)


def set_spec(
    params: Params,
    name: str,
    modules: Sequence[str],
    sparsity: float,
    site_map: SiteMap,
    thresholds_root: Path,
    fingerprint: str,
) -> SparsifySpec:
    """TEAL on the sparsified set ``name`` (``modules`` of every layer) with its calibrated
    thresholds at ``sparsity``, checked against this model and set by
    :func:`sponlab.method.sparsify.load_thresholds`."""
    file = threshold_path(thresholds_root, sparsity, name)
    sites = site_map.select(range(site_map.num_layers), modules)
    thresholds = load_thresholds(file, site_map, sparsity, fingerprint, sites)
    return _spec(params, sites, sparsity, thresholds)


def cell_spec(
    params: Params,
    config: AllocationConfig,
    sparsity: float,
    site_map: SiteMap,
    thresholds_root: Path,
    fingerprint: str,
) -> SparsifySpec:
    """The sparsification of a pipeline cell: its set's calibrated thresholds at ``sparsity``."""
    return set_spec(
        params,
        config.sparsify,
        config.sparsify_modules,
        sparsity,
        site_map,
        thresholds_root,
        fingerprint,
    )


def allocation(
    layers: Any = "all",
    modules: Sequence[str] = ("down_proj",),
    sparsify_modules: Sequence[str] = PROJECTIONS,
    name: str = "custom",
    parametrization: str = "output",
) -> AllocationConfig:
    """An allocation outside params.yaml: biases on ``layers`` x ``modules``, TEAL on
    ``sparsify_modules``. ``layers`` as in params.yaml: ``"all"``, ``"none"``, ``{"first": 0.5}``,
    ``{"last": 0.5}`` or a list of indices."""
    unknown = [m for m in (*modules, *sparsify_modules) if m not in PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown projection(s) {unknown}; allowed: {list(PROJECTIONS)}")
    return AllocationConfig(
        name=name,
        layers=parse_layers(layers, "layers", "allocation()"),
        modules=tuple(m for m in PROJECTIONS if m in modules),
        sparsify="custom",
        sparsify_modules=tuple(m for m in PROJECTIONS if m in sparsify_modules),
        parametrization=parametrization,
    )


def bias_sites(config: AllocationConfig, site_map: SiteMap) -> list[Site]:
    """The SPON allocation of ``config`` resolved on this model."""
    if not config.has_biases:
        return []
    layers = config.layers.resolve(site_map.num_layers)
    return site_map.select(layers, config.modules)
