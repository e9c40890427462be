"""SPON: learned input-independent bias vectors ("spontaneous neurons") on chosen sites.

Each site gets a vector trained to compensate the sparsification residual. ``output``
parametrisation adds ``b`` to the layer output (``y = W S(x) + b``); ``input`` adds ``W a`` (a vector
in the layer's input space). Parameters are fp32 and the addition happens in fp32 so a ~1e-3 bias is
not lost in bf16. After training, :func:`fold_into_model` writes ``b`` (or ``W a``) into the layer's
own bias: zero inference cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sponlab.io.tensorio import check_made_for, load_tensors, save_tensors
from sponlab.model.hooks import installed
from sponlab.model.sites import Site, SiteMap, file_sites, sort_sites

PARAMETRIZATIONS = ("output", "input")


class SponBiases(nn.Module):
    """One fp32 vector per site, zero-initialised. ``vector(site)`` returns its parameter."""

    def __init__(
        self, sites: Sequence[Site], dims: Mapping[Site, int], parametrization: str = "output"
    ) -> None:
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}"
            )
        self.sites: list[Site] = sort_sites(sites)
        self.parametrization = parametrization
        self.vectors = nn.ParameterList(
            nn.Parameter(torch.zeros(dims[s], dtype=torch.float32)) for s in self.sites
        )
        self._index = {s: i for i, s in enumerate(self.sites)}

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        site_map: SiteMap,
        sites: Sequence[Site],
        parametrization: str = "output",
    ) -> SponBiases:
        """Zero biases sized from the model's linear layers (out_features or in_features)."""
        dims = {}
        for site in site_map.require(sites):
            linear = site_map.linear(model, site)
            dims[site] = linear.out_features if parametrization == "output" else linear.in_features
        return cls(sites, dims, parametrization)

    def vector(self, site: Site) -> nn.Parameter:
        return self.vectors[self._index[site]]

    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.vectors)

    def output_bias(self, site: Site, linear: nn.Linear) -> torch.Tensor:
        """The output-space bias of ``site`` in fp32: ``b`` or ``W a``.  -> [out_features]."""
        vec = self.vector(site)
        if self.parametrization == "output":
            return vec
        return F.linear(vec.to(linear.weight.device, linear.weight.dtype), linear.weight).float()

    def state(self) -> dict[str, torch.Tensor]:
        return {s.key: self.vector(s).detach().clone() for s in self.sites}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state` (same sites; values copied onto the vectors' device)."""
        if set(state) != {s.key for s in self.sites}:
            raise ValueError(f"state has sites {sorted(state)}, biases have {len(self.sites)}")
        with torch.no_grad():
            for site in self.sites:
                self.vector(site).copy_(state[site.key])

    @contextmanager
    def attached(self, model: nn.Module, site_map: SiteMap) -> Iterator[None]:
        """Add each site's bias to its layer's output while inside the block."""

        def hook(module: nn.Linear, _args: tuple, output: torch.Tensor, site: Site):
            bias = self.output_bias(site, module).to(output.device)  # [out] fp32, layer's device
            return (output.float() + bias).to(output.dtype)  # accumulate in fp32

        with installed(
            site_map.linear(model, site).register_forward_hook(
                lambda m, a, o, site=site: hook(m, a, o, site)
            )
            for site in site_map.require(self.sites)
        ):
            yield


@contextmanager
def maybe_attached(
    biases: SponBiases | None, model: nn.Module, site_map: SiteMap
) -> Iterator[None]:
    """``biases.attached`` or a no-op when there are no biases."""
    if biases is None or not biases.sites:
        yield
        return
    with biases.attached(model, site_map):
        yield


def fold_into_model(model: nn.Module, site_map: SiteMap, biases: SponBiases) -> None:
    """Write each bias permanently into its layer's ``bias`` (created if the layer has none)."""
    with torch.no_grad():
        for site in biases.sites:
            linear = site_map.linear(model, site)
            w = linear.weight  # the folded bias lives where the layer does (device_map: auto)
            add = biases.output_bias(site, linear).to(w.device)  # [out] float32
            if linear.bias is None:
                linear.bias = nn.Parameter(add.to(w.dtype), requires_grad=False)
            else:
                linear.bias.copy_((linear.bias.float() + add).to(linear.bias.dtype))


def save_biases(path: Path, biases: SponBiases, metadata: Mapping[str, Any]) -> Path:
    """Safetensors keyed by site (``layers.3.down_proj``) with parametrisation in the metadata."""
    meta = {**metadata, "parametrization": biases.parametrization, "format": "sponlab-biases/1"}
    return save_tensors(path, biases.state(), meta)


def load_biases(
    path: Path,
    site_map: SiteMap | None = None,
    sparsity: float | None = None,
    fingerprint: str | None = None,
) -> tuple[SponBiases, dict[str, Any]]:
    """Inverse of :func:`save_biases`, checked against this run where given.

    Every site must be a site of ``site_map``; the file must have been trained at ``sparsity`` on
    the model with ``fingerprint``; otherwise an ``InputFileError`` names the file and the stage.
    """
    tensors, meta = load_tensors(path, producer="train")
    check_made_for(path, meta, {"sparsity": sparsity, "model_fingerprint": fingerprint}, "train")
    sites = file_sites(path, tensors, "train", site_map)
    biases = SponBiases(
        sites, {s: tensors[s.key].numel() for s in sites}, meta.get("parametrization", "output")
    )
    with torch.no_grad():
        for site in sites:
            biases.vector(site).copy_(tensors[site.key])
    return biases, meta
