"""Directions and their chance levels: cosine, the exact expected ``|cos|`` of a random direction
in ``d`` dimensions, ``Γ(d/2) / (√π Γ((d+1)/2)) ≈ sqrt(2 / (π d))``, and an empirical one over
random Gaussian vectors; shared by bias statistics, alignment, residual and similarity analyses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors (nan when either is zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def expected_abs_cos(dim: int) -> float:
    """Exact E|cos| between a fixed vector and a uniform random direction in ``dim`` dimensions."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


def random_abs_cos(reference: torch.Tensor, count: int, generator: torch.Generator) -> float:
    """Mean |cos| between ``reference`` [D] and ``count`` random Gaussian vectors (chance level)."""
    ref = reference.double().flatten()
    noise = torch.randn(count, ref.numel(), generator=generator, dtype=torch.float64)  # [n, D]
    cos = (noise @ ref) / (noise.norm(dim=1) * ref.norm()).clamp_min(1e-300)
    return float(cos.abs().mean())


class RandomBaseline:
    """Empirical chance level of |cos| per dimension, cached: the mean |cos| between a fixed random
    reference and ``count`` random Gaussian vectors (by symmetry the same for any reference)."""

    def __init__(self, count: int, seed: int = 0) -> None:
        self.count, self.seed = count, seed
        self.cache: dict[int, float] = {}

    def __call__(self, dim: int) -> float:
        if dim not in self.cache:
            generator = torch.Generator().manual_seed(self.seed + dim)
            reference = torch.randn(dim, generator=generator, dtype=torch.float64)
            self.cache[dim] = random_abs_cos(reference, self.count, generator)
        return self.cache[dim]


def nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if arr.size and not np.isnan(arr).all() else math.nan
