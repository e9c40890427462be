"""Activation sparsification of linear-layer inputs: TEAL thresholds and per-token top-k.

Sparsification is a forward *pre*-hook on each chosen ``nn.Linear``: it rewrites the input to
``x * (|x| > t)`` so the layer still performs exactly one matmul. Hooks live in the
:func:`sparsified` context manager, which always removes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from sponlab.io.data import device_batches
from sponlab.io.tensorio import check_made_for, input_error, load_tensors
from sponlab.model.hooks import capture_inputs, installed
from sponlab.model.sites import Site, SiteMap, file_sites, sort_sites

log = logging.getLogger(__name__)

METHODS = ("teal", "topk")


@dataclass
class SparsityStats:
    """Counts of zeroed vs total input entries per site (sparsified token positions only)."""

    zeros: dict[Site, torch.Tensor] = field(default_factory=dict)
    totals: dict[Site, int] = field(default_factory=dict)

    def add(self, site: Site, keep: torch.Tensor) -> None:
        dropped = (~keep).sum()
        self.zeros[site] = self.zeros.get(site, 0) + dropped
        self.totals[site] = self.totals.get(site, 0) + keep.numel()

    def achieved(self) -> dict[Site, float]:
        """Fraction of entries zeroed, per site."""
        return {s: float(self.zeros[s]) / max(self.totals[s], 1) for s in sort_sites(self.zeros)}


@dataclass(frozen=True)
class SparsifySpec:
    """What to sparsify and how.

    ``thresholds`` (``teal``) maps each site to its calibrated magnitude threshold. ``dense_prefix``
    keeps the first N positions of every sequence dense (a dense prefill followed by sparse decoding).
    """

    method: str
    sparsity: float
    sites: tuple[Site, ...]
    thresholds: Mapping[Site, float] | None = None
    dense_prefix: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sparsify method must be one of {METHODS}, got {self.method!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method == "teal":
            missing = [
                s.key for s in self.sites if self.thresholds is None or s not in self.thresholds
            ]
            if missing:
                raise ValueError(f"teal needs a threshold for every site; missing {missing[:5]}")


def teal_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Entries to keep: ``|x| > threshold``.  x: [..., D] -> bool [..., D]."""
    return x.abs() > threshold


def topk_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-token magnitude top-k: keep the ``(1 - sparsity) * D`` largest |x| of each row."""
    dim = x.shape[-1]
    drop = round(sparsity * dim)
    if drop == 0:
        return torch.ones_like(x, dtype=torch.bool)
    magnitude = x.abs()  # [..., D], computed once
    cut = magnitude.kthvalue(drop, dim=-1, keepdim=True).values  # [..., 1]
    return magnitude > cut


def _make_hook(spec: SparsifySpec, site: Site, threshold: torch.Tensor | None, stats):
    # TEAL without statistics or a dense prefix needs no explicit mask: hardshrink keeps exactly
    # the |x| > t entries in one fused pass (abs, compare and multiply cost three passes and two
    # temporaries, ~8% of a CPU forward of the default model).
    fused = threshold is not None and stats is None and spec.dense_prefix == 0
    lambd = float(threshold) if threshold is not None else 0.0  # t rounded to the model dtype

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # [B, T, D]
        if fused:
            return (F.hardshrink(x, lambd), *args[1:])
        keep = teal_mask(x, threshold) if threshold is not None else topk_mask(x, spec.sparsity)
        if spec.dense_prefix > 0:
            keep[:, : spec.dense_prefix] = True
        if stats is not None:
            stats.add(site, keep[:, spec.dense_prefix :])
        return (x * keep, *args[1:])

    return hook


@contextmanager
def sparsified(
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec | None,
    stats: SparsityStats | None = None,
) -> Iterator[None]:
    """Sparsify the inputs of ``spec.sites`` while inside the block (no-op for ``spec=None``)."""
    if spec is None:
        yield
        return

    def register(site: Site) -> RemovableHandle:
        linear = site_map.linear(model, site)
        threshold = None
        if spec.method == "teal":
            value = spec.thresholds[site]  # type: ignore[index]
            threshold = torch.tensor(value, dtype=linear.weight.dtype, device=linear.weight.device)
        return linear.register_forward_pre_hook(_make_hook(spec, site, threshold, stats))

    with installed(register(site) for site in site_map.require(spec.sites)):
        yield


# ---------------------------------------------------------------- calibration


def group_representatives(sites: Iterable[Site]) -> dict[Site, list[Site]]:
    """One site per (layer, TEAL input group) standing for all sites that share its input."""
    reps: dict[tuple[int, str], list[Site]] = {}
    for site in sort_sites(sites):
        reps.setdefault((site.layer, site.group), []).append(site)
    return {members[0]: members for members in reps.values()}


class HistogramQuantiles:
    """Streaming |x| histogram on log-spaced bins: memory O(bins) per site, for large models.

    Edges and counts live on the device of the values (the first :meth:`update` places them), so
    a GPU calibration bucketises on the GPU and never copies a batch to the host; counts are int64
    (exact at any token count). Only :meth:`quantile` reads a host copy of the ``bins + 2`` counts.
    """

    def __init__(self, bins: int = 8192, lo: float = 1e-8, hi: float = 1e4) -> None:
        self.edges = torch.logspace(
            torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), bins + 1
        )  # [bins+1] float32; moved to the values' device at the first update
        self.counts = torch.zeros(bins + 2, dtype=torch.int64)  # underflow, bins, overflow

    def update(self, values: torch.Tensor) -> None:
        """Count ``values`` (any shape) on their own device."""
        if self.edges.device != values.device:
            if self.counts.any():
                raise ValueError(
                    f"histogram counts live on {self.counts.device}; got values on {values.device}"
                )
            self.edges, self.counts = self.edges.to(values.device), self.counts.to(values.device)
        index = torch.bucketize(values.detach().flatten().float(), self.edges)  # 0 .. bins+1
        self.counts += torch.bincount(index, minlength=len(self.counts))

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of entries lie (linear inside a bin)."""
        counts = self.counts.to("cpu", torch.float64)  # [bins+2]: the one host copy
        edges = self.edges.to("cpu")
        cdf = counts.cumsum(0) / counts.sum()
        index = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
        if index == 0:
            return float(edges[0])
        if index >= len(edges):
            return float(edges[-1])
        lo_cdf = float(cdf[index - 1])
        frac = (q - lo_cdf) / max(float(counts[index] / counts.sum()), 1e-300)
        lo, hi = float(edges[index - 1]), float(edges[index])
        return lo + min(max(frac, 0.0), 1.0) * (hi - lo)


def quantile_threshold(values: torch.Tensor, sparsity: float) -> float:
    """Exact threshold t such that ``round(sparsity * n)`` of ``values`` satisfy ``v <= t``.

    ``-inf`` for sparsity 0, so ``|x| > t`` keeps everything (identity).
    """
    flat = values.flatten()
    k = round(sparsity * flat.numel())
    if k == 0:
        return float("-inf")
    return float(flat.float().kthvalue(k).values)


def sorted_threshold(ascending: torch.Tensor, sparsity: float) -> float:
    """:func:`quantile_threshold` of values already sorted ascending (flat): the same number, in
    O(1) per query, for searches that ask one sample for many sparsities (greedy allocation)."""
    k = round(sparsity * ascending.numel())
    return float("-inf") if k == 0 else float(ascending[k - 1])


class MagnitudeSample:
    """The |x| of one input across calibration batches, and thresholds from it.

    ``quantile`` keeps every value (exact quantiles); ``histogram`` streams them into
    :class:`HistogramQuantiles` (memory O(bins), approximate).
    """

    def __init__(self, method: str = "quantile") -> None:
        self.values: list[torch.Tensor] = []  # [B*T, D] fp32 chunks (quantile)
        self.hist = HistogramQuantiles() if method == "histogram" else None

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().abs().reshape(-1, x.shape[-1])  # [B*T, D]
        if self.hist is not None:
            self.hist.update(values)
        else:
            self.values.append(values.float().cpu())

    def thresholds(self, sparsities: Sequence[float]) -> dict[float, float]:
        """Threshold per sparsity (``-inf`` for 0: keep everything)."""
        if self.hist is not None:
            hist = self.hist
            return {s: float("-inf") if s == 0 else hist.quantile(s) for s in sparsities}
        values = torch.cat(self.values)
        return {s: quantile_threshold(values, s) for s in sparsities}


def calibrate_thresholds(
    model: nn.Module,
    site_map: SiteMap,
    blocks: torch.Tensor,
    sparsities: Sequence[float],
    sites: Sequence[Site] | None = None,
    method: str = "quantile",
    batch_size: int = 8,
) -> dict[float, dict[Site, float]]:
    """Per-site thresholds that zero a fraction ``s`` of calibration inputs, for each ``s``.

    One dense pass over ``blocks`` ([N, L] token ids). Sites sharing an input (q/k/v, gate/up) are
    captured once and get the same threshold. ``method`` is ``quantile`` (exact; keeps all |x| of
    the calibration set in CPU memory) or ``histogram`` (streaming, approximate).
    """
    sites = list(sites) if sites is not None else site_map.sites
    reps = group_representatives(sites)
    store = {rep: MagnitudeSample(method) for rep in reps}

    def sink(site: Site, x: torch.Tensor) -> None:
        store[site].add(x)

    device = next(model.parameters()).device
    with torch.no_grad(), capture_inputs(model, site_map, list(reps), sink):
        for _, ids in device_batches(blocks, batch_size, device, "calibrate"):
            model(ids)

    out: dict[float, dict[Site, float]] = {s: {} for s in sparsities}
    for rep, members in tqdm(reps.items(), desc="thresholds", leave=False):
        for sparsity, t in store.pop(rep).thresholds(sparsities).items():
            out[sparsity].update({site: t for site in members})
    return out


def thresholds_to_tensors(thresholds: Mapping[Site, float]) -> dict[str, torch.Tensor]:
    """Safetensors payload: one fp32 scalar per site key."""
    return {s.key: torch.tensor(t, dtype=torch.float32) for s, t in thresholds.items()}


def load_thresholds(
    path: Path,
    site_map: SiteMap | None = None,
    sparsity: float | None = None,
    fingerprint: str | None = None,
    sites: Sequence[Site] | None = None,
) -> dict[Site, float]:
    """Per-site thresholds from a safetensors file written by the calibrate stage.

    Checked against this run where given: every key is a site of ``site_map``, every one of
    ``sites`` (default: all sites of ``site_map``) has a threshold, and the file was calibrated
    for ``sparsity`` on the model with ``fingerprint`` (:func:`sponlab.model.loading.model_fingerprint`).
    Anything else is an ``InputFileError``.
    """
    tensors, meta = load_tensors(path, producer="calibrate")
    check_made_for(
        path, meta, {"sparsity": sparsity, "model_fingerprint": fingerprint}, "calibrate"
    )
    found = file_sites(path, tensors, "calibrate", site_map, complete=sites is None)
    missing = sorted({s.key for s in sites or ()} - {s.key for s in found})
    if missing:
        more = " ..." if len(missing) > 4 else ""
        raise input_error(
            path, f"no threshold for {missing[:4]}{more} ({len(missing)} sites)", "calibrate"
        )
    return {site: float(tensors[site.key]) for site in found}
