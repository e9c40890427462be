"""Alignment of each bias with the mean sparsification error and with dense activation directions.

Per site (output of one linear layer) and over the same tokens, one dense pass and one TEAL-only
pass record, with hooks inside :func:`recording` (always removed):

- the summed layer output (dense and sparse) -> ``global`` error ``E[y_dense - y_teal]``: what the
  layer's output misses in the TEAL-only model, upstream drift included;
- the summed *input* before and after sparsification -> ``local`` error ``W E[x - S(x)]``: the part
  caused by this layer's own mask (linear, so the mean is mapped through ``W`` once, after the pass;
  no linear layer is recomputed inside a hook);
- the sum of squares of the dense output -> the site's activation scale (RMS);
- optionally the dense outputs themselves -> PCA (centred, like scikit-learn's ``PCA``).

Centring removes the mean direction, which is exactly what a constant bias can match, so the cosine
with the raw (uncentred) dense mean is reported next to the principal components. Every cosine has
its random-direction chance level.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sponlab.io.data import device_batches
from sponlab.method.sparsify import SparsifySpec, sparsified
from sponlab.model.hooks import capture_inputs, capture_outputs
from sponlab.model.sites import Site, SiteMap, sort_sites
from sponlab.studies.interpret.directions import RandomBaseline, cosine, expected_abs_cos


@dataclass
class SiteMoments:
    """Sums over the tokens of one pass, per site (fp64)."""

    tokens: int = 0
    out_sum: dict[Site, torch.Tensor] = field(default_factory=dict)  # [D_out]
    out_sq: dict[Site, float] = field(default_factory=dict)
    in_raw: dict[Site, torch.Tensor] = field(default_factory=dict)  # [D_in] before the mask
    in_used: dict[Site, torch.Tensor] = field(default_factory=dict)  # [D_in] what the layer saw
    samples: dict[Site, list[torch.Tensor]] = field(default_factory=dict)  # [B*T, D_out] chunks

    def mean(self, site: Site) -> torch.Tensor:
        """Mean layer output [D_out]."""
        return self.out_sum[site] / self.tokens

    def rms(self, site: Site) -> float:
        """Root mean square of the layer output over tokens and dimensions."""
        return math.sqrt(self.out_sq[site] / (self.tokens * self.out_sum[site].numel()))

    def local_error(self, site: Site, linear: nn.Linear) -> torch.Tensor:
        """``W E[x - S(x)]`` [D_out]: the mean output error caused by this layer's own mask."""
        delta = (self.in_raw[site] - self.in_used[site]) / self.tokens  # [D_in]
        with torch.no_grad():
            weight = linear.weight
            return F.linear(delta.to(weight.device, weight.dtype), weight).double().cpu()

    def sample_matrix(self, site: Site, limit: int, seed: int = 0) -> torch.Tensor:
        """Up to ``limit`` recorded outputs [N, D_out], a fixed random subset of the tokens."""
        rows = torch.cat(self.samples[site])
        if len(rows) <= limit:
            return rows
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]
        return rows[pick.sort().values]


def _add(store: dict[Site, torch.Tensor], site: Site, value: torch.Tensor) -> None:
    store[site] = store[site] + value if site in store else value


@contextmanager
def recording(
    model: nn.Module,
    site_map: SiteMap,
    sites: Sequence[Site],
    moments: SiteMoments,
    keep_samples: bool = False,
) -> Iterator[SiteMoments]:
    """Accumulate input/output sums of ``sites`` into ``moments`` while inside the block.

    The input pre-hook is prepended so it sees the input before any sparsifying pre-hook; the
    forward hook receives the (possibly sparsified) input the layer used and its output.
    """

    def on_input(site: Site, x: torch.Tensor) -> None:  # before any sparsification
        _add(moments.in_raw, site, x.detach().double().sum(dim=(0, 1)).cpu())  # x [B, T, D_in]

    def on_output(site: Site, used: torch.Tensor, output: torch.Tensor) -> None:
        y = output.detach().double()  # [B, T, D_out]
        _add(moments.in_used, site, used.detach().double().sum(dim=(0, 1)).cpu())
        _add(moments.out_sum, site, y.sum(dim=(0, 1)).cpu())
        moments.out_sq[site] = moments.out_sq.get(site, 0.0) + float(y.pow(2).sum())
        if keep_samples:
            flat = output.detach().float().reshape(-1, output.shape[-1]).cpu()
            moments.samples.setdefault(site, []).append(flat)

    with (
        capture_inputs(model, site_map, sites, on_input, prepend=True),
        capture_outputs(model, site_map, sites, on_output),
    ):
        yield moments


def collect_moments(
    model: nn.Module,
    site_map: SiteMap,
    sites: Sequence[Site],
    blocks: torch.Tensor,
    batch_size: int,
    spec: SparsifySpec | None = None,
    keep_samples: bool = False,
    desc: str = "moments",
) -> SiteMoments:
    """One pass over ``blocks`` [N, T] (dense, or TEAL-only with ``spec``) recording ``sites``."""
    device = next(model.parameters()).device
    moments = SiteMoments()
    with (
        torch.no_grad(),
        recording(model, site_map, sites, moments, keep_samples),
        sparsified(model, site_map, spec),
    ):
        for _, ids in device_batches(blocks, batch_size, device, desc):  # ids [B, T]
            model(ids)
            moments.tokens += ids.numel()
    return moments


def principal_components(samples: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``count`` principal components [K, D] of ``samples`` [N, D] and their variance ratios [K].

    Same definition as scikit-learn's ``PCA`` (data centred first), computed exactly from the
    smaller of the Gram [N, N] and covariance [D, D] matrices; components with ~zero variance are
    dropped.
    """
    x = samples.double()
    xc = x - x.mean(dim=0)  # [N, D]
    small_n = xc.shape[0] <= xc.shape[1]
    values, vectors = torch.linalg.eigh(xc @ xc.T if small_n else xc.T @ xc)
    order = torch.argsort(values, descending=True)[:count]
    top = values[order].clamp_min(0)
    keep = top > 1e-12 * max(float(values.max()), 1e-300)
    top, vecs = top[keep], vectors[:, order[keep]]
    comps = (xc.T @ vecs) / top.sqrt() if small_n else vecs  # [D, K]
    return comps.T.contiguous(), top / values.clamp_min(0).sum()


def site_components(
    dense: SiteMoments, count: int, tokens: int, seed: int = 0
) -> dict[Site, torch.Tensor]:
    """Top ``count`` principal components [K, D] of the recorded dense outputs of every site."""
    if count == 0:
        return {}
    return {
        site: principal_components(dense.sample_matrix(site, tokens, seed), count)[0]
        for site in tqdm(sort_sites(dense.samples), desc="PCA", leave=False)
    }


def error_explained(bias: torch.Tensor, error: torch.Tensor) -> float:
    """``1 - ||e - b||^2 / ||e||^2``: fraction of the mean-error energy the bias removes."""
    denom = float(error.double().pow(2).sum())
    if denom == 0:
        return math.nan
    return 1.0 - float((error.double() - bias.double()).pow(2).sum()) / denom


def alignment_row(
    bias: torch.Tensor,
    global_error: torch.Tensor,
    local_error: torch.Tensor,
    dense_mean: torch.Tensor,
    components: torch.Tensor | None,
    baseline: RandomBaseline,
) -> dict:
    """Cosines of one bias [D] with its references, plus chance levels (exact and empirical)."""
    dim = bias.numel()
    row = {
        "dim": dim,
        "cos_global": cosine(bias, global_error),
        "cos_local": cosine(bias, local_error),
        "cos_dense_mean": cosine(bias, dense_mean),
        "error_explained": error_explained(bias, global_error),
        "norm_over_error": float(bias.norm() / global_error.norm())
        if float(global_error.norm()) > 0
        else math.nan,
        "chance_abs_cos": expected_abs_cos(dim),
        "random_abs_cos": baseline(dim),
    }
    if components is not None:
        comps = components  # [K, D]
        pcs = [abs(cosine(bias, c)) for c in comps]
        row.update(
            {f"abs_cos_pc{i + 1}": v for i, v in enumerate(pcs)}
            | {
                "max_abs_cos_pc": max(pcs),
                "pc_energy": float(sum(v * v for v in pcs)),  # chance: K / D
                "pc_energy_chance": len(pcs) / dim,
                "error_max_abs_cos_pc": max(abs(cosine(global_error, c)) for c in comps),
            }
        )
    return row


def alignment_rows(
    vectors: Mapping[Site, torch.Tensor],
    dense: SiteMoments,
    sparse: SiteMoments,
    model: nn.Module,
    site_map: SiteMap,
    components: Mapping[Site, torch.Tensor],
    baseline: RandomBaseline,
) -> list[dict]:
    """One :func:`alignment_row` per site of ``vectors`` (output-space biases)."""
    rows = []
    for site in tqdm(sort_sites(vectors), desc="alignment", leave=False):
        row = alignment_row(
            vectors[site],
            dense.mean(site) - sparse.mean(site),
            sparse.local_error(site, site_map.linear(model, site)),
            dense.mean(site),
            components.get(site),
            baseline,
        )
        rows.append({"site": site.key, "layer": site.layer, "module": site.module, **row})
    return rows
