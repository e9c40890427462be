"""Weight spectra of a causal LM: effective ranks, attention kernels, down_proj SVD, layer phases.

Everything runs on CPU from the frozen weights (no data). Layers are processed in a thread pool
(``torch.linalg`` releases the GIL, intra-op threads are split between the workers) and each
worker converts one matrix (or one layer's q/k pair, for the kernels) at a time to fp32/fp64, so a
bf16 checkpoint is never held in fp32 as a whole.

Definitions used throughout:

* Entropy effective rank (Roy & Vetterli, 2007): with singular values ``s`` and ``p_i = s_i / sum s``,
  ``erank = exp(-sum p_i log p_i)``; ``n`` for the n x n identity, 1 for a rank-1 matrix.
* Attention kernel of query head ``h``: ``A_h = W_Q_h^T W_K_g`` ([hidden, hidden]) with
  ``g = h // (heads / kv_heads)`` the KV head that head ``h`` reads under GQA. ``x_i^T A_h x_j`` is the
  position-free part of the attention logit (RoPE rotates q and k per position; the per-head
  q_norm/k_norm of Qwen3/Gemma3 and the softmax scale are not part of it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sponlab.config import ConfigError, Params, Section, section_params
from sponlab.model.sites import PROJECTIONS, Site, SiteMap, discover_sites, parse_modules
from sponlab.paramcheck import choice, integer, number, read_keys
from sponlab.studies.spectrum.attention_kernels import (
    DownSVD,
    FocusKernel,
    ModelDims,
    check_shapes,
    down_svd,
    entropy_effective_rank,
    focus_kernel,
    head_weights,
    kernel_asymmetry,
    kernel_singular_values,
    kv_head_for,
    matrix_effective_rank,
    model_dims,
)
from sponlab.studies.spectrum.trends import PhaseStats, Trend, layer_trend, phase_stats

log = logging.getLogger(__name__)

KERNEL_TYPE = "qk_kernel"  # phase/trend row for the per-layer mean kernel effective rank
TAG_REFERENCES: tuple[str, ...] = ("percentile", "median", "absolute")


# ----------------------------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class SpectrumParams:
    """The ``spectrum`` section of params.yaml."""

    modules: tuple[str, ...] = PROJECTIONS
    workers: int = integer(0, "threads (0: one per CPU core)", lo=0)
    kernel_layer: int | str = "middle"  # int (negative from the end) or "middle"
    kernel_head: int = integer(0, "the attention head whose kernel is drawn", lo=0)
    down_layer: int | str = "middle"
    energy_thresholds: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.99)
    kernel_energy: float = number(0.99, "energy the kernel rank keeps", lo=0, hi=1, lo_open=True)
    tag_reference: str = choice("percentile", TAG_REFERENCES, "what layer tags compare with")
    tag_low: float = number(0.8, "below this x the reference: tagged low", lo=0)
    tag_high: float = number(1.1, "above this x the reference: tagged high", lo=0)
    trend_tolerance: float = number(0.02, "relative change a trend ignores", lo=0)


def _layer_choice(sec: Section, name: str) -> int | str:
    value = sec.get(name, "middle")
    if value == "middle" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise sec.fail(
        name, f"must be 'middle' or a layer index (negative from the end), got {value!r}"
    )


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"params.yaml: {key} must be a number in (0, 1], got {value!r}")
    return float(value)


def parse_params(sec: Section) -> SpectrumParams:
    """Validate the ``spectrum`` section (every key optional; unknown keys rejected)."""
    default = SpectrumParams()
    thresholds = sec.items("energy_thresholds", _fraction, list(default.energy_thresholds))
    by_hand = {
        "modules": parse_modules(sec, "modules", "all"),
        "kernel_layer": _layer_choice(sec, "kernel_layer"),
        "down_layer": _layer_choice(sec, "down_layer"),
        "energy_thresholds": tuple(sorted(set(thresholds))),
    }
    params = SpectrumParams(**read_keys(SpectrumParams, sec, **by_hand))
    if params.tag_low >= params.tag_high:
        raise sec.fail("tag_low", f"must be < tag_high ({params.tag_high}), got {params.tag_low}")
    sec.finish()
    return params


def spectrum_params(params: Params) -> SpectrumParams:
    """The ``spectrum`` section of loaded params (its defaults when absent)."""
    return section_params(params, "spectrum", parse_params)


def resolve_layer(choice: int | str, num_layers: int, key: str) -> int:
    """``middle`` -> ``num_layers // 2``; negative indices count from the end."""
    index = num_layers // 2 if choice == "middle" else int(choice)
    index = index + num_layers if index < 0 else index
    if not 0 <= index < num_layers:
        raise ConfigError(
            f"params.yaml: spectrum.{key} = {choice!r} is out of range: the model has "
            f"{num_layers} layers (0..{num_layers - 1}, or -{num_layers}..-1, or 'middle')"
        )
    return index


def tag_heads(erank: np.ndarray, params: SpectrumParams) -> tuple[np.ndarray, float, float]:
    """``low`` / ``mid`` / ``high`` per head [L, H] and the (low, high) thresholds used.

    ``percentile`` (the notebook's rule): a query head's mean over layers at or below the 25th
    percentile of the head means is ``low``, at or above the 75th ``high``, the same tag in every
    layer. ``median`` / ``absolute``: each (layer, head) against ``tag_low`` / ``tag_high`` times
    the median kernel erank, or as absolute values.
    """
    if params.tag_reference == "percentile":
        means = erank.mean(axis=0)  # [H]
        low, high = float(np.percentile(means, 25)), float(np.percentile(means, 75))
        per_head = np.where(means <= low, "low", np.where(means >= high, "high", "mid"))
        return np.broadcast_to(per_head, erank.shape).copy(), low, high
    scale = float(np.median(erank)) if params.tag_reference == "median" else 1.0
    low, high = params.tag_low * scale, params.tag_high * scale
    tags = np.where(erank < low, "low", np.where(erank > high, "high", "mid"))
    return tags, low, high


# ----------------------------------------------------------------------------------------------
# Whole model


@dataclass(frozen=True)
class LayerSpectrum:
    """Effective ranks of one decoder layer's projections and of its heads' kernels."""

    layer: int
    erank: dict[str, float]
    shapes: dict[str, tuple[int, int]]
    kernel_erank: np.ndarray  # [H]
    kernel_frobenius: np.ndarray  # [H]
    kernel_asymmetry: np.ndarray  # [H]


def layer_spectrum(
    model: nn.Module, site_map: SiteMap, dims: ModelDims, layer: int, modules: Sequence[str]
) -> LayerSpectrum:
    """Effective rank of each projection of ``layer`` and of each head's attention kernel."""
    erank, shapes = {}, {}
    for module in modules:
        weight = site_map.linear(model, Site(layer, module)).weight
        shapes[module] = tuple(weight.shape)
        erank[module] = matrix_effective_rank(weight)
    q, k = head_weights(
        site_map.linear(model, Site(layer, "q_proj")).weight,
        site_map.linear(model, Site(layer, "k_proj")).weight,
        dims,
    )  # [H, d, D] each
    sv = kernel_singular_values(q, k)  # [H, d]
    return LayerSpectrum(
        layer=layer,
        erank=erank,
        shapes=shapes,
        kernel_erank=np.array([entropy_effective_rank(row) for row in sv]),
        kernel_frobenius=sv.norm(dim=-1).numpy(),
        kernel_asymmetry=kernel_asymmetry(q, k).numpy(),
    )


@dataclass(frozen=True)
class SpectrumResult:
    """Everything the report, tables, figures and metrics are made from."""

    dims: ModelDims
    modules: tuple[str, ...]
    layers: list[LayerSpectrum]
    series: dict[str, np.ndarray]  # weight type (projections + qk_kernel) -> value per layer [L]
    head_tags: np.ndarray  # [L, H] low | mid | high
    tag_thresholds: tuple[float, float]
    focus: FocusKernel
    down: DownSVD
    phases: dict[str, list[PhaseStats]]
    trends: dict[str, Trend]
    params: SpectrumParams
    seconds: float = 0.0
    workers: int = 1

    def erank(self, module: str) -> np.ndarray:
        """Effective rank of ``module`` per layer [L] (``qk_kernel``: mean over heads)."""
        return self.series[module]

    def max_rank(self, module: str) -> int:
        """The largest possible rank: min(rows, cols) (head_dim for the kernels)."""
        if module == KERNEL_TYPE:
            return self.dims.head_dim
        return min(self.dims.expected_shape(module))

    @property
    def kernel_erank(self) -> np.ndarray:
        return np.stack([layer.kernel_erank for layer in self.layers])  # [L, H]

    @property
    def kernel_asymmetry(self) -> np.ndarray:
        return np.stack([layer.kernel_asymmetry for layer in self.layers])  # [L, H]


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Split the cores between the worker threads (no oversubscription), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers(workers: int) -> int:
    return workers or os.cpu_count() or 1


def analyse(model: nn.Module, params: SpectrumParams) -> SpectrumResult:
    """Run every spectrum analysis on ``model``'s weights (CPU, threads over layers)."""
    start = time.perf_counter()
    dims = model_dims(model.config)
    site_map = discover_sites(model)
    check_shapes(model, site_map, dims)
    every = range(dims.layers)
    site_map.select(list(every), sorted({*params.modules, "q_proj", "k_proj", "down_proj"}))
    kernel_layer = resolve_layer(params.kernel_layer, dims.layers, "kernel_layer")
    down_layer = resolve_layer(params.down_layer, dims.layers, "down_layer")
    if params.kernel_head >= dims.heads:
        raise ConfigError(
            f"params.yaml: spectrum.kernel_head = {params.kernel_head} is out of range: the "
            f"model has {dims.heads} query heads (0..{dims.heads - 1})"
        )
    workers = min(default_workers(params.workers), dims.layers)
    log.info(
        "spectrum of %d layers x %d types on %d threads", dims.layers, len(params.modules), workers
    )
    layers: dict[int, LayerSpectrum] = {}
    with (
        _torch_threads(max(1, torch.get_num_threads() // workers)),
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        jobs = [
            pool.submit(layer_spectrum, model, site_map, dims, i, params.modules) for i in every
        ]
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="spectrum layers"):
            done = job.result()
            layers[done.layer] = done
    ordered = [layers[i] for i in every]
    series = {m: np.array([layer.erank[m] for layer in ordered]) for m in params.modules}
    series[KERNEL_TYPE] = np.stack([layer.kernel_erank for layer in ordered]).mean(axis=1)
    tags, low, high = tag_heads(np.stack([layer.kernel_erank for layer in ordered]), params)

    h = params.kernel_head
    q, k = head_weights(
        site_map.linear(model, Site(kernel_layer, "q_proj")).weight,
        site_map.linear(model, Site(kernel_layer, "k_proj")).weight,
        dims,
    )  # [H, d, D] each
    kv = kv_head_for(h, dims.heads, dims.kv_heads)
    focus = focus_kernel(q[h], k[h], kernel_layer, h, kv, params.kernel_energy)
    down_weight = site_map.linear(model, Site(down_layer, "down_proj")).weight
    down = down_svd(down_weight, down_layer, params.energy_thresholds)
    seconds = time.perf_counter() - start
    log.info("spectrum analysis done in %.1fs", seconds)
    return SpectrumResult(
        dims=dims,
        modules=params.modules,
        layers=ordered,
        series=series,
        head_tags=tags,
        tag_thresholds=(low, high),
        focus=focus,
        down=down,
        phases={name: phase_stats(v) for name, v in series.items()},
        trends={name: layer_trend(v, params.trend_tolerance) for name, v in series.items()},
        params=params,
        seconds=seconds,
        workers=workers,
    )


def load_weights(model_dir: Path | str) -> nn.Module:
    """Load a causal LM on CPU in its checkpoint dtype (no fp32 copy of a bf16 model)."""
    from transformers import AutoModelForCausalLM

    from sponlab.model.base import pretrained_source

    start = time.perf_counter()
    source, kwargs = pretrained_source(model_dir)  # a models/base manifest: the pinned hub weights
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", **kwargs)
    model.eval().requires_grad_(False)
    log.info("loaded %s (%s) in %.1fs", model_dir, model.dtype, time.perf_counter() - start)
    return model


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def headline_metrics(result: SpectrumResult) -> dict[str, Any]:
    """Small nested dict of headline numbers for ``metrics/spectrum.json`` (no NaN/inf)."""
    erank = {name: _finite(float(result.erank(name).mean())) for name in result.series}
    ratio = {
        name: _finite(float(result.erank(name).mean()) / result.max_rank(name))
        for name in result.series
    }
    tags = result.head_tags
    return {
        "erank_mean": erank,
        "erank_ratio_mean": ratio,
        "kernel": {
            "erank_median": float(np.median(result.kernel_erank)),
            "asymmetry_mean": float(result.kernel_asymmetry.mean()),
            "low_heads": int((tags == "low").sum()),
            "high_heads": int((tags == "high").sum()),
            "focus_layer": result.focus.layer,
            "focus_head": result.focus.head,
            "focus_asymmetry": result.focus.asymmetry,
            "focus_eig_count": result.focus.eig_count,
        },
        "down_proj": {
            "layer": result.down.layer,
            "condition_number": _finite(result.down.condition_number),
            **{f"k{round(t * 100):d}": n for t, n in result.down.components.items()},
        },
        "seconds": round(result.seconds, 2),
    }
