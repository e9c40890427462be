"""Weight-spectrum building blocks: model dimensions, entropy effective rank, attention kernels
``A_h = W_Q_h^T W_K_g`` (GQA-aware), their energy counts, and the down_proj singular spectrum.

Pure functions of weight tensors; :mod:`sponlab.studies.spectrum.spectrum` runs them over a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sponlab.model.sites import SiteError, SiteMap

log = logging.getLogger(__name__)


class ShapeError(SiteError):
    """A projection whose weight shape disagrees with the model config."""


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
