"""Typed keys for places in a model (layer + projection), discovered from ``named_modules()``.

A :class:`Site` names the input of one linear projection of one decoder block. Sites are found by
walking the module tree (never by parsing flat strings), so any architecture that uses the standard
projection names (Llama, Mistral, Qwen2/3, Gemma, ...) works without per-model tables.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sponlab.io.tensorio import input_error
from sponlab.paramcheck import Section

PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
ATTENTION_PROJECTIONS: tuple[str, ...] = PROJECTIONS[:4]
MLP_PROJECTIONS: tuple[str, ...] = PROJECTIONS[4:]

# TEAL's four input distributions per block: q/k/v share one input, gate/up share another.
INPUT_GROUP: dict[str, str] = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "down_proj": "down",
}

_KEY_RE = re.compile(r"^layers\.(\d+)\.([a-z_]+)$")


class SiteError(ValueError):
    """A site, module name or architecture that the model does not have."""


@dataclass(frozen=True)
class Site:
    """The input of projection ``module`` in decoder layer ``layer``."""

    layer: int
    module: str

    def __post_init__(self) -> None:
        if self.module not in PROJECTIONS:
            raise SiteError(f"unknown projection {self.module!r}; expected one of {PROJECTIONS}")
        if self.layer < 0:
            raise SiteError(f"layer index must be >= 0, got {self.layer}")

    @property
    def key(self) -> str:
        """Stable string form used as a safetensors key, e.g. ``layers.3.down_proj``."""
        return f"layers.{self.layer}.{self.module}"

    @property
    def group(self) -> str:
        """The TEAL input distribution this site reads (``qkv``, ``o``, ``gate_up``, ``down``)."""
        return INPUT_GROUP[self.module]

    @classmethod
    def from_key(cls, key: str) -> Site:
        """Inverse of :attr:`key`; rejects anything that is not exactly that format."""
        match = _KEY_RE.match(key)
        if match is None:
            raise SiteError(f"not a site key: {key!r} (expected 'layers.<int>.<projection>')")
        return cls(int(match.group(1)), match.group(2))

    def sort_key(self) -> tuple[int, int]:
        return (self.layer, PROJECTIONS.index(self.module))

    def __str__(self) -> str:
        return self.key


def sort_sites(sites: Iterable[Site]) -> list[Site]:
    """Sites ordered by layer, then by projection order within a block."""
    return sorted(sites, key=Site.sort_key)


@dataclass(frozen=True)
class SiteMap:
    """Where each site lives in one model: the module path of every discovered projection."""

    layers_path: str
    num_layers: int
    paths: dict[Site, str]

    @property
    def sites(self) -> list[Site]:
        return sort_sites(self.paths)

    def modules_present(self) -> list[str]:
        return [m for m in PROJECTIONS if any(s.module == m for s in self.paths)]

    def require(self, sites: Iterable[Site]) -> list[Site]:
        """Return ``sites`` sorted, or raise listing what exists if any is missing."""
        wanted = sort_sites(set(sites))
        missing = [s for s in wanted if s not in self.paths]
        if missing:
            raise SiteError(
                f"model has no site(s) {[s.key for s in missing[:8]]}"
                f"{' ...' if len(missing) > 8 else ''}; it has layers 0..{self.num_layers - 1} "
                f"with projections {self.modules_present()}"
            )
        return wanted

    def select(self, layers: Sequence[int], modules: Sequence[str]) -> list[Site]:
        """All sites for ``layers`` x ``modules``, validated against the model."""
        check_modules(modules, self.modules_present())
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise SiteError(f"layer(s) {bad} out of range: model has {self.num_layers} layers")
        return self.require(Site(i, m) for i in layers for m in modules)

    def linear(self, model: nn.Module, site: Site) -> nn.Linear:
        """The ``nn.Linear`` at ``site``."""
        return model.get_submodule(self.paths[site])  # type: ignore[return-value]

    def layer_device(self, model: nn.Module, layer: int) -> torch.device:
        """The device of decoder layer ``layer`` (with ``device_map: auto`` layers differ)."""
        site = next(s for s in self.sites if s.layer == layer)
        return self.linear(model, site).weight.device


def file_sites(
    path: Path,
    keys: Iterable[str],
    producer: str,
    site_map: SiteMap | None = None,
    complete: bool = False,
) -> list[Site]:
    """The sites a per-site file (thresholds, biases) is keyed by, checked against the model.

    Raises :class:`~sponlab.io.tensorio.InputFileError` naming the file and the stage that writes it
    for a key that is not a site, a site this model does not have or (``complete``) a site of the
    model the file has no entry for.
    """
    try:
        sites = [Site.from_key(k) for k in keys]
    except SiteError as err:
        raise input_error(path, str(err), producer) from err
    if site_map is not None:
        foreign = [s.key for s in sites if s not in site_map.paths]
        present = set(sites)
        missing = [s.key for s in site_map.sites if s not in present] if complete else []
        for problem, bad in (("sites this model does not have", foreign), ("no entry", missing)):
            if bad:
                more = " ..." if len(bad) > 4 else ""
                raise input_error(
                    path,
                    f"{problem}: {bad[:4]}{more} ({len(bad)} sites); made for another model?",
                    producer,
                )
    return sites


def check_modules(modules: Iterable[str], available: Sequence[str] = PROJECTIONS) -> None:
    """Raise a clear error for a projection name the model does not have."""
    unknown = [m for m in modules if m not in available]
    if unknown:
        raise SiteError(f"unknown module(s) {unknown}; available: {list(available)}")


def _find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ``*.layers`` list whose blocks hold q_proj."""
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or name.rpartition(".")[2] != "layers":
            continue
        if len(module) and any(
            sub.rpartition(".")[2] in PROJECTIONS for sub, _ in module[0].named_modules()
        ):
            candidates.append((name, module))
    if not candidates:
        tops = [name for name, _ in model.named_children()]
        raise SiteError(
            f"unsupported architecture {type(model).__name__}: no '*.layers' ModuleList whose "
            f"blocks contain any of {PROJECTIONS}; top-level modules: {tops}"
        )
    # Prefer the language model's stack over e.g. a vision tower: decoders are reached via
    # get_decoder() when the model offers it, else the longest stack wins.
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in candidates:
        if decoder is not None and any(module is m for m in decoder.modules()):
            return name, module
    return max(candidates, key=lambda c: len(c[1]))


def discover_sites(model: nn.Module) -> SiteMap:
    """Find every standard projection of every decoder block of ``model``."""
    layers_path, layers = _find_layer_list(model)
    paths: dict[Site, str] = {}
    for index, block in enumerate(layers):
        for sub, module in block.named_modules():
            leaf = sub.rpartition(".")[2]
            if leaf in PROJECTIONS and isinstance(module, nn.Linear):
                paths[Site(index, leaf)] = f"{layers_path}.{index}.{sub}"
    if not paths:
        raise SiteError(
            f"{type(model).__name__}: found decoder layers but no nn.Linear projections"
        )
    return SiteMap(layers_path=layers_path, num_layers=len(layers), paths=paths)


@dataclass(frozen=True)
class LayerSelection:
    """A named choice of layers: ``all``, ``none``, the ``first``/``last`` fraction, a list, or
    ``ranked``: taken from a measured layer ranking of config ``source`` (:mod:`sponlab.method.ranked`),
    by ``rule`` (``coverage`` | ``top`` | ``above``) with ``fraction`` as its value."""

    kind: str  # "all" | "none" | "first" | "last" | "list" | "ranked"
    fraction: float = 1.0
    layers: tuple[int, ...] = ()
    source: str = ""  # ranked: the config whose layer ranking is used
    rule: str = ""  # ranked: coverage (fraction of benefit) | top (count) | above (median)

    def resolve(self, num_layers: int) -> list[int]:
        """Concrete layer indices for a model with ``num_layers`` blocks."""
        if self.kind == "all":
            return list(range(num_layers))
        if self.kind == "none":
            return []
        if self.kind == "ranked":
            raise SiteError(
                f"layers ranked by {self.source}'s importance need that ranking: "
                "resolve them with sponlab.method.ranked.ranked_layers"
            )
        if self.kind == "list":
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise SiteError(f"layer(s) {bad} out of range: model has {num_layers} layers")
            return sorted(set(self.layers))
        count = max(1, math.floor(self.fraction * num_layers + 0.5))  # round half up
        count = min(count, num_layers)
        if self.kind == "first":
            return list(range(count))
        return list(range(num_layers - count, num_layers))

    def describe(self) -> str:
        if self.kind in ("all", "none"):
            return self.kind
        if self.kind == "list":
            return ",".join(map(str, self.layers))
        if self.kind == "ranked":
            value = "median" if self.rule == "above" else f"{self.fraction:g}"
            return f"ranked {self.source} {self.rule} {value}"
        return f"{self.kind} {self.fraction:g}"


def parse_layer_spec(spec: str, num_layers: int | None = None) -> list[int]:
    """Parse ``"0-23"`` ranges and ``"0,5,10"`` lists (mixable: ``"0-3,8"``) into sorted indices."""
    out: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise SiteError(
                f"bad layer spec {spec!r}: use ranges like '0-23' or lists like '0,5,10'"
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise SiteError(f"bad layer range {part!r} in {spec!r}: end before start")
        out.update(range(lo, hi + 1))
    if not out:
        raise SiteError(f"layer spec {spec!r} selects no layers")
    if num_layers is not None and max(out) >= num_layers:
        raise SiteError(
            f"layer spec {spec!r} exceeds the model's {num_layers} layers (0..{num_layers - 1})"
        )
    return sorted(out)


def parse_modules(
    sec: Section, name: str, default: Any = ..., allow_empty: bool = False
) -> tuple[str, ...]:
    """``sec[name]``: ``all`` or a list of projection names, in :data:`PROJECTIONS` order."""
    value = sec.get(name, default)
    if value == "all":
        return PROJECTIONS
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise sec.fail(name, f"must be 'all' or a list of projections from {list(PROJECTIONS)}")
    unknown = [v for v in value if v not in PROJECTIONS]
    if unknown:
        raise sec.fail(name, f"has unknown module(s) {unknown}; allowed: {list(PROJECTIONS)}")
    if not value and not allow_empty:
        raise sec.fail(name, "must name at least one projection")
    return tuple(m for m in PROJECTIONS if m in value)
