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

from sponlab.config import ConfigError, Section
from sponlab.sites import PROJECTIONS, Site, SiteError, SiteMap, discover_sites

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("early", "middle", "late")
TRENDS: tuple[str, ...] = ("U-shape", "inverted-U", "monotone up", "monotone down", "flat", "other")
KERNEL_TYPE = "qk_kernel"  # phase/trend row for the per-layer mean kernel effective rank
TAG_REFERENCES: tuple[str, ...] = ("median", "absolute")


class ShapeError(SiteError):
    """A projection whose weight shape disagrees with the model config."""


# ----------------------------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class SpectrumParams:
    """The ``spectrum`` section of params.yaml."""

    modules: tuple[str, ...] = PROJECTIONS
    workers: int = 0  # 0: one thread per CPU core
    kernel_layer: int | str = "middle"  # int (negative from the end) or "middle"
    kernel_head: int = 0
    down_layer: int | str = "middle"
    energy_thresholds: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.99)
    kernel_energy: float = 0.99
    tag_reference: str = "median"
    tag_low: float = 0.8
    tag_high: float = 1.1
    trend_tolerance: float = 0.02


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
    params = SpectrumParams(
        modules=sec.modules("modules", "all"),
        workers=sec.number("workers", 0, lo=0, integer=True),
        kernel_layer=_layer_choice(sec, "kernel_layer"),
        kernel_head=sec.number("kernel_head", 0, lo=0, integer=True),
        down_layer=_layer_choice(sec, "down_layer"),
        energy_thresholds=tuple(sorted(set(thresholds))),
        kernel_energy=sec.number("kernel_energy", 0.99, lo=0, hi=1, lo_open=True),
        tag_reference=sec.choice("tag_reference", TAG_REFERENCES, "median"),
        tag_low=sec.number("tag_low", default.tag_low, lo=0),
        tag_high=sec.number("tag_high", default.tag_high, lo=0),
        trend_tolerance=sec.number("trend_tolerance", 0.02, lo=0),
    )
    if params.tag_low >= params.tag_high:
        raise sec.fail("tag_low", f"must be < tag_high ({params.tag_high}), got {params.tag_low}")
    sec.finish()
    return params


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


# ----------------------------------------------------------------------------------------------
# Model dimensions and shape checks


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from the model config (``head_dim`` falls back to hidden / heads)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size; 1 for plain multi-head attention)."""
        return self.heads // self.kv_heads

    def expected_shape(self, module: str) -> tuple[int, int]:
        """``nn.Linear.weight`` shape [out, in] of ``module`` implied by the config."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (q_out, self.hidden),
            "k_proj": (kv_out, self.hidden),
            "v_proj": (kv_out, self.hidden),
            "o_proj": (self.hidden, q_out),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }[module]


def _config_int(config: Any, name: str) -> int:
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(
            f"{type(config).__name__}.{name} = {value!r}: the spectrum analysis needs an integer "
            "(models with per-layer sizes are not supported)"
        )
    return value


def model_dims(config: Any) -> ModelDims:
    """Dimensions of the text decoder (``config.get_text_config()`` for multimodal configs)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = _config_int(text, "num_attention_heads")
    hidden = _config_int(text, "hidden_size")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    if heads % kv_heads:
        raise ShapeError(f"num_attention_heads {heads} is not a multiple of kv heads {kv_heads}")
    return ModelDims(
        layers=_config_int(text, "num_hidden_layers"),
        hidden=hidden,
        intermediate=_config_int(text, "intermediate_size"),
        heads=heads,
        kv_heads=int(kv_heads),
        vocab=_config_int(text, "vocab_size"),
        head_dim=int(head_dim),
    )


def check_shapes(model: nn.Module, site_map: SiteMap, dims: ModelDims) -> None:
    """Raise :class:`ShapeError` naming the first projection whose shape contradicts ``dims``."""
    if site_map.num_layers != dims.layers:
        raise ShapeError(
            f"config says {dims.layers} layers but the model has {site_map.num_layers} blocks"
        )
    for site in site_map.sites:
        shape = tuple(site_map.linear(model, site).weight.shape)
        expected = dims.expected_shape(site.module)
        if shape != expected:
            raise ShapeError(
                f"{site.key}: weight shape {shape} != {expected} expected from the config "
                f"(hidden={dims.hidden}, intermediate={dims.intermediate}, heads={dims.heads}, "
                f"kv_heads={dims.kv_heads}, head_dim={dims.head_dim})"
            )


def kv_head_for(head: int, heads: int, kv_heads: int) -> int:
    """The KV head that query ``head`` attends with (HF ``repeat_kv``: consecutive groups)."""
    if not 0 <= head < heads or heads % kv_heads:
        raise ValueError(f"head {head} invalid for {heads} query heads / {kv_heads} KV heads")
    return head // (heads // kv_heads)


# ----------------------------------------------------------------------------------------------
# Effective rank


def entropy_effective_rank(singular_values: torch.Tensor) -> float:
    """exp(Shannon entropy of p = s / sum s); 0 for an all-zero spectrum."""
    s = singular_values.double().clamp_min(0)  # [r]
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def matrix_effective_rank(weight: torch.Tensor) -> float:
    """Entropy effective rank of one matrix (converted to fp32 here, one matrix at a time)."""
    return entropy_effective_rank(torch.linalg.svdvals(weight.detach().float()))


# ----------------------------------------------------------------------------------------------
# Attention kernels A_h = W_Q_h^T W_K_g


def head_weights(
    q_weight: torch.Tensor, k_weight: torch.Tensor, dims: ModelDims
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-head W_Q_h [H, d, D] and the matching GQA W_K_g [H, d, D] (fp64)."""
    q = q_weight.detach().double().view(dims.heads, dims.head_dim, dims.hidden)  # [H, d, D]
    k = k_weight.detach().double().view(dims.kv_heads, dims.head_dim, dims.hidden)  # [G, d, D]
    index = torch.arange(dims.heads) // dims.group  # [H] KV head of each query head
    return q, k[index]


def kernel_matrix(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The full kernel A = W_Q_h^T W_K_g [D, D] of one head (direct; for checks and small D)."""
    return q.transpose(-1, -2) @ k


def kernel_singular_values(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Singular values of A = Q^T K for [..., d, D] inputs, computed in the d x d space.

    With reduced QR factorisations Q^T = U1 R1 and K^T = U2 R2 (U orthonormal columns [D, d]),
    A = U1 (R1 R2^T) U2^T, so the nonzero singular values of the D x D matrix A are exactly those
    of the small R1 R2^T [d, d]; the remaining D - d are zero and add nothing to the entropy.
    """
    r1 = torch.linalg.qr(q.transpose(-1, -2))[1]  # [..., d, d]
    r2 = torch.linalg.qr(k.transpose(-1, -2))[1]  # [..., d, d]
    return torch.linalg.svdvals(r1 @ r2.transpose(-1, -2))  # [..., d]


def kernel_eigenvalues(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of A = Q^T K via the d x d matrix K Q^T, sorted by decreasing magnitude.

    For X [D, d] and Y [d, D], XY and YX have the same nonzero eigenvalues with multiplicities
    (Sylvester); with X = Q^T, Y = K: eig(Q^T K) = eig(K Q^T) plus D - d zeros, which we drop.
    """
    eig = torch.linalg.eigvals(k @ q.transpose(-1, -2))  # [..., d] complex
    order = eig.abs().argsort(dim=-1, descending=True)
    return eig.gather(-1, order)


def kernel_asymmetry(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """||A - A^T||_F / ||A||_F for A = Q^T K, from d x d products only.

    ||A - A^T||^2 = 2 ||A||^2 - 2 tr(A A), ||A||^2 = tr((Q Q^T)(K K^T)) and tr(A A) = tr(M M)
    with M = K Q^T (cyclic trace). 0 for a symmetric kernel, 2 for an antisymmetric one and
    about sqrt(2) when W_Q and W_K are unrelated (tr(A A) ~ 0).
    """
    frob2 = ((q @ q.transpose(-1, -2)) * (k @ k.transpose(-1, -2))).sum(dim=(-1, -2))  # [...]
    m = k @ q.transpose(-1, -2)  # [..., d, d]
    trace_aa = (m * m.transpose(-1, -2)).sum(dim=(-1, -2))  # [...]
    diff2 = (2 * (frob2 - trace_aa)).clamp_min(0)
    return torch.where(frob2 > 0, diff2.sqrt() / frob2.clamp_min(1e-300).sqrt(), 0.0)


def energy_count(values: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """Cumulative energy of ``values`` squared (sorted descending) and the count reaching it."""
    energy = np.sort(np.abs(values) ** 2)[::-1]
    total = energy.sum()
    if total <= 0:
        return np.zeros_like(energy), 0
    cumulative = np.cumsum(energy) / total
    count = int(np.searchsorted(cumulative, fraction - 1e-12) + 1)
    return cumulative, min(count, len(cumulative))


@dataclass(frozen=True)
class FocusKernel:
    """Spectrum of one head's kernel A_h (the chosen layer and head)."""

    layer: int
    head: int
    kv_head: int
    eigenvalues: np.ndarray  # [d] complex, by decreasing magnitude
    singular_values: np.ndarray  # [d]
    asymmetry: float
    effective_rank: float
    energy_fraction: float
    eig_energy: np.ndarray  # [d] cumulative |lambda|^2 energy
    eig_count: int  # eigenvalues needed for energy_fraction of sum |lambda|^2
    sv_energy: np.ndarray  # [d] cumulative sigma^2 (Frobenius) energy
    sv_count: int


def focus_kernel(
    q: torch.Tensor, k: torch.Tensor, layer: int, head: int, kv_head: int, fraction: float
) -> FocusKernel:
    """Eigen- and singular spectrum of one head from its W_Q_h, W_K_g [d, D]."""
    eig = kernel_eigenvalues(q, k).numpy()
    sv = kernel_singular_values(q, k)
    eig_energy, eig_count = energy_count(eig, fraction)
    sv_energy, sv_count = energy_count(sv.numpy(), fraction)
    return FocusKernel(
        layer=layer,
        head=head,
        kv_head=kv_head,
        eigenvalues=eig,
        singular_values=sv.numpy(),
        asymmetry=float(kernel_asymmetry(q, k)),
        effective_rank=entropy_effective_rank(sv),
        energy_fraction=fraction,
        eig_energy=eig_energy,
        eig_count=eig_count,
        sv_energy=sv_energy,
        sv_count=sv_count,
    )


def tag_heads(erank: np.ndarray, params: SpectrumParams) -> tuple[np.ndarray, float, float]:
    """``low`` / ``mid`` / ``high`` per head [L, H] and the (low, high) thresholds used."""
    scale = float(np.median(erank)) if params.tag_reference == "median" else 1.0
    low, high = params.tag_low * scale, params.tag_high * scale
    tags = np.where(erank < low, "low", np.where(erank > high, "high", "mid"))
    return tags, low, high


# ----------------------------------------------------------------------------------------------
# down_proj SVD


@dataclass(frozen=True)
class DownSVD:
    """Singular spectrum of one layer's down_proj."""

    layer: int
    singular_values: np.ndarray  # [r] descending
    explained: np.ndarray  # [r] s^2 / sum s^2
    components: dict[float, int]  # energy fraction -> components needed
    condition_number: float  # s_max / s_min (inf when s_min == 0)

    @property
    def top(self) -> float:
        return float(self.singular_values[0])

    @property
    def smallest(self) -> float:
        return float(self.singular_values[-1])


def down_svd(weight: torch.Tensor, layer: int, thresholds: Sequence[float]) -> DownSVD:
    """Variance explained, components per energy threshold and condition number of a matrix."""
    s = torch.linalg.svdvals(weight.detach().float()).double().numpy()  # [r]
    energy = s**2
    explained = energy / energy.sum() if energy.sum() > 0 else np.zeros_like(energy)
    components = {t: energy_count(s, t)[1] for t in thresholds}
    condition = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    return DownSVD(layer, s, explained, components, condition)


# ----------------------------------------------------------------------------------------------
# Phases and trends


def phase_layers(num_layers: int) -> dict[str, list[int]]:
    """Early / middle / late thirds (``np.array_split``: the first thirds get any extra layer)."""
    parts = np.array_split(np.arange(num_layers), len(PHASES))
    return {name: part.tolist() for name, part in zip(PHASES, parts, strict=True)}


@dataclass(frozen=True)
class PhaseStats:
    """Summary of one weight type's per-layer values over one phase."""

    phase: str
    layers: tuple[int, ...]
    mean: float
    std: float  # population (ddof=0)
    min: float
    max: float
    median: float
    range: float
    cv: float  # std / mean


def phase_stats(values: Sequence[float]) -> list[PhaseStats]:
    """Statistics of ``values`` (one per layer) for each phase; NaN for an empty phase."""
    values = np.asarray(values, dtype=float)
    out = []
    for phase, layers in phase_layers(len(values)).items():
        v = values[layers]
        if v.size == 0:
            out.append(PhaseStats(phase, (), *([math.nan] * 7)))
            continue
        mean, std = float(v.mean()), float(v.std())
        out.append(
            PhaseStats(
                phase=phase,
                layers=tuple(layers),
                mean=mean,
                std=std,
                min=float(v.min()),
                max=float(v.max()),
                median=float(np.median(v)),
                range=float(v.max() - v.min()),
                cv=std / mean if mean != 0 else math.nan,
            )
        )
    return out


def classify_trend(means: Sequence[float], tolerance: float) -> str:
    """Label the early -> middle -> late shape of three phase means.

    With d1 = middle - early, d2 = late - middle, net = late - early and
    tol = ``tolerance`` * mean(|means|) (differences within tol count as "no change"):

    * ``U-shape``: d1 < -tol and d2 > tol (the middle dips below both ends);
    * ``inverted-U``: d1 > tol and d2 < -tol (the middle rises above both ends);
    * ``monotone up``: d1 >= -tol, d2 >= -tol and net > tol;
    * ``monotone down``: d1 <= tol, d2 <= tol and net < -tol;
    * ``flat``: |d1|, |d2| and |net| all <= tol;
    * ``other``: anything else (including NaN means from fewer than three layers).
    """
    early, middle, late = (float(m) for m in means)
    if any(math.isnan(m) for m in (early, middle, late)):
        return "other"
    tol = tolerance * float(np.mean(np.abs([early, middle, late])))
    d1, d2, net = middle - early, late - middle, late - early
    if d1 < -tol and d2 > tol:
        return "U-shape"
    if d1 > tol and d2 < -tol:
        return "inverted-U"
    if d1 >= -tol and d2 >= -tol and net > tol:
        return "monotone up"
    if d1 <= tol and d2 <= tol and net < -tol:
        return "monotone down"
    if max(abs(d1), abs(d2), abs(net)) <= tol:
        return "flat"
    return "other"


@dataclass(frozen=True)
class Trend:
    """Shape label of a per-layer sequence and its largest single-step rise and fall."""

    label: str
    means: tuple[float, float, float]  # early, middle, late
    jump: tuple[int, float] | None  # (layer l, value[l+1] - value[l]) with the largest rise
    drop: tuple[int, float] | None  # (layer l, value[l+1] - value[l]) with the largest fall


def layer_trend(values: Sequence[float], tolerance: float) -> Trend:
    """:func:`classify_trend` of the phase means plus the largest layer-to-layer jump and drop."""
    values = np.asarray(values, dtype=float)
    means = tuple(p.mean for p in phase_stats(values))
    steps = np.diff(values)  # [L-1]
    jump = drop = None
    if steps.size:
        up, down = int(np.argmax(steps)), int(np.argmin(steps))
        jump = (up, float(steps[up])) if steps[up] > 0 else None
        drop = (down, float(steps[down])) if steps[down] < 0 else None
    return Trend(classify_trend(means, tolerance), means, jump, drop)  # type: ignore[arg-type]


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

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
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
