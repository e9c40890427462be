"""What trained SPON biases encode: parameters, bias statistics, chance levels, hidden shift.

Every bias is compared in the *output space* of its linear layer (``b``, or ``W a`` for the input
parametrisation), where it is added to the layer's output. Norms are also reported relative to the
site's dense activation scale (RMS of the dense output of that layer on test tokens), so sites of
different width and magnitude can be ranked together. Every cosine comes with its chance level
(:mod:`sponlab.studies.interpret.directions`). Sibling modules: :mod:`sponlab.studies.interpret.alignment` (mean error, PCA),
:mod:`sponlab.studies.interpret.prompts` (prompt categories), :mod:`sponlab.studies.interpret.similarity` (cross-
config / cross-seed cosine), :mod:`sponlab.studies.layers.leave_one_out` (leave-one-layer-out importance).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sponlab.allocations import AllocationConfig
from sponlab.config import ConfigError, Params, Section, section_params
from sponlab.method.spon import SponBiases
from sponlab.model.sites import Site, SiteMap, sort_sites
from sponlab.paramcheck import choice, integer, number, read_keys, text
from sponlab.studies.interpret.directions import nanmean
from sponlab.studies.transfer.params import (
    LearningCurveParams,
    TransferParams,
    parse_learning_curve,
    parse_transfer,
)

CUMULATIVE = ("measured", "estimated")
PHASES = ("early", "middle", "late")


# --- params -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerImportanceParams:
    """``interpret.layers``: leave-one-layer-out perplexity on validation blocks."""

    config: str = text("UNIF-ALL", "the trained config whose layers are left out one by one")
    val_blocks: int = integer(4, "first validation blocks scored", lo=1)
    batch_size: int = integer(4, "blocks per forward", lo=1)
    cumulative: str = choice("measured", CUMULATIVE, "cumulative benefit: measured or estimated")
    targets: tuple[float, ...] = (0.8, 0.9, 0.95)  # coverage fractions (_targets)


@dataclass(frozen=True)
class InterpretParams:
    """The ``interpret`` section of params.yaml."""

    sparsity: float = 0.5  # in [0, 1): checked in parse_params
    configs: tuple[str, ...] = ("UNIF-ALL", "ATTN-ONLY")
    similarity: tuple[str, ...] = (
        "UNIF-ALL",
        "TOP-50",
        "TOP-75",
        "BOTTOM-50",
        "ATTN-ONLY",
    )
    blocks: int = integer(4, "first test blocks: activation scale, mean error, PCA", lo=1)
    batch_size: int = integer(4, "blocks per forward", lo=1)
    pca_components: int = integer(8, "principal components each bias is compared with", lo=0)
    pca_tokens: int = integer(256, "tokens sampled per layer for the PCA", lo=2)
    random_vectors: int = integer(100, "random directions of the chance level", lo=2)
    seed: int = integer(0, "seed of the token samples and random directions", lo=0)
    near_zero: float = number(1e-3, "|b| below this x the site's scale counts as zero", lo=0, hi=1)
    heatmap_dims: int = integer(64, "bias coordinates drawn in the heatmaps", lo=1)
    prompts: str = text("builtin", "builtin or a YAML file of prompt categories")
    categories: tuple[str, ...] | None = None  # None: every category of the prompt file
    prompts_per_category: int = integer(20, "prompts scored per category", lo=1)
    prompt_batch: int = integer(8, "prompts per forward", lo=1)
    max_prompt_tokens: int = integer(64, "tokens per prompt", lo=2)
    layers: LayerImportanceParams = field(default_factory=LayerImportanceParams)
    transfer: TransferParams = field(default_factory=TransferParams)
    learning_curve: LearningCurveParams = field(default_factory=LearningCurveParams)


def _names(sec: Section, name: str, default: Any, allow_all: bool = False) -> Any:
    value = sec.get(name, default if isinstance(default, str) else list(default))
    if allow_all and value == "all":
        return None
    ok = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
    if not ok or len(set(value)) != len(value):
        extra = "'all' or " if allow_all else ""
        raise sec.fail(name, f"must be {extra}a non-empty list of distinct names, got {value!r}")
    return tuple(value)


def _targets(sec: Section) -> tuple[float, ...]:
    value = sec.get("targets", list(LayerImportanceParams.targets))
    ok = isinstance(value, list) and value
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not all(0 < v <= 1 for v in value):
        raise sec.fail("targets", f"must be a non-empty list of fractions in (0, 1], got {value!r}")
    return tuple(sorted(float(v) for v in value))


def parse_layer_params(sec: Section) -> LayerImportanceParams:
    params = LayerImportanceParams(**read_keys(LayerImportanceParams, sec, targets=_targets(sec)))
    sec.finish()
    return params


def parse_params(sec: Section) -> InterpretParams:
    """Validate the ``interpret`` section (config names are checked against ``configs`` later)."""
    sparsity = sec.number("sparsity", InterpretParams.sparsity, lo=0, hi=1)
    if sparsity >= 1:
        raise sec.fail("sparsity", f"must be in [0, 1), got {sparsity}")
    by_hand = {
        "sparsity": sparsity,
        "configs": _names(sec, "configs", InterpretParams.configs),
        "similarity": _names(sec, "similarity", InterpretParams.similarity),
        "categories": _names(sec, "categories", "all", allow_all=True),
        "layers": parse_layer_params(sec.section("layers")),
        "transfer": parse_transfer(sec.section("transfer")),
        "learning_curve": parse_learning_curve(sec.section("learning_curve")),
    }
    params = InterpretParams(**read_keys(InterpretParams, sec, **by_hand))
    sec.finish()
    if len(params.similarity) < 2:
        raise sec.fail(
            "similarity", f"must name at least two configs, got {list(params.similarity)}"
        )
    return params


def interpret_params(params: Params) -> InterpretParams:
    """The ``interpret`` section of loaded params (its defaults when absent)."""
    return section_params(params, "interpret", parse_params)


def check_config_names(
    params: InterpretParams, configs: Mapping[str, AllocationConfig], source: str = "params.yaml"
) -> None:
    """Every config the section names is defined in ``configs:`` (a typo fails at load time).

    Whether it is also swept and has biases is checked by the stages (:func:`check_configs`), so
    a reduced ``sweep.configs`` does not stop the stages that do not read these checkpoints.
    """
    named = [("configs", n) for n in params.configs]
    named += [("similarity", n) for n in params.similarity] + [
        ("layers.config", params.layers.config)
    ]
    named += [("transfer.configs", n) for n in params.transfer.configs]
    named += [("transfer.training.config", params.transfer.training.config)]
    named += [("learning_curve.configs", n) for n in params.learning_curve.configs]
    for key, name in named:
        require_defined(name, configs, f"interpret.{key}", source)


def require_defined(
    name: str, configs: Mapping[str, AllocationConfig], key: str, source: str = "params.yaml"
) -> None:
    """Refuse a config name that ``configs:`` does not define, naming ``key`` and what exists."""
    if name not in configs:
        raise ConfigError(
            f"{source}: {key} names unknown config {name!r}; defined in configs: {sorted(configs)}"
        )


def check_configs(
    names: Sequence[str], configs: Mapping[str, AllocationConfig], swept: Sequence[str], key: str
) -> None:
    """Each name must be a swept config with biases (otherwise no trained checkpoint exists)."""
    for name in names:
        require_defined(name, configs, key)
        if name not in swept:
            raise ConfigError(
                f"params.yaml: {key}: config {name!r} is not swept (sweep.configs, sweep.ranked) {list(swept)}, "
                "so it has no trained biases"
            )
        if not configs[name].has_biases:
            raise ConfigError(f"params.yaml: {key}: config {name!r} has no SPON biases (TEAL-only)")


def seed_checkpoints(
    names: Sequence[str], configs: Mapping[str, AllocationConfig]
) -> dict[str, tuple[str, int]]:
    """Checkpoint name -> (config, seed) for every seed of each config; the first seed keeps the
    config's name, the others are ``NAME@seed<k>``."""
    out = {}
    for name in names:
        seeds = configs[name].seeds
        for seed in seeds:
            out[name if seed == seeds[0] else f"{name}@seed{seed}"] = (name, seed)
    return out


def first_blocks(blocks: torch.Tensor, count: int, key: str) -> torch.Tensor:
    """The first ``count`` blocks [count, T]; a clear error when there are fewer."""
    if count > len(blocks):
        raise ConfigError(f"params.yaml: {key} = {count} but only {len(blocks)} blocks exist")
    return blocks[:count]


# --- vectors and statistics -------------------------------------------------------------------


def output_vectors(
    biases: SponBiases, model: nn.Module, site_map: SiteMap
) -> dict[Site, torch.Tensor]:
    """Output-space bias of every site (``b`` or ``W a``), fp32 on CPU.  -> {site: [out]}."""
    with torch.no_grad():
        return {
            s: biases.output_bias(s, site_map.linear(model, s)).detach().float().cpu()
            for s in biases.sites
        }


def excess_kurtosis(x: torch.Tensor) -> float:
    """Population excess kurtosis ``E[(x-μ)^4] / σ^4 - 3`` (0 for a Gaussian; nan if constant)."""
    x = x.double().flatten()
    centred = x - x.mean()
    var = centred.pow(2).mean()
    if float(var) == 0.0:
        return math.nan
    return float(centred.pow(4).mean() / var.pow(2) - 3.0)


def vector_stats(b: torch.Tensor, act_rms: float | None = None, near_zero: float = 1e-3) -> dict:
    """Statistics of one bias vector ``b`` [D]; ``*_rel`` divide by the dense activation RMS.

    ``l2_rel = ||b|| / (act_rms sqrt(D))`` is the bias RMS over the activation RMS; ``frac_zero`` counts
    entries with ``|b_i| <= near_zero * act_rms`` (or ``<= near_zero`` without a scale).
    """
    b = b.double().flatten()
    dim = b.numel()
    l2 = float(b.norm())
    max_abs = float(b.abs().max())
    scale = act_rms if act_rms else 1.0
    row = {
        "dim": dim,
        "mean": float(b.mean()),
        "std": float(b.std(unbiased=False)),
        "l2": l2,
        "max_abs": max_abs,
        "kurtosis": excess_kurtosis(b),
        "frac_pos": float((b > 0).double().mean()),
        "frac_zero": float((b.abs() <= near_zero * scale).double().mean()),
        "act_rms": act_rms if act_rms is not None else math.nan,
        "l2_rel": l2 / (scale * math.sqrt(dim)) if act_rms else math.nan,
        "max_rel": max_abs / scale if act_rms else math.nan,
    }
    return row


def bias_stat_rows(
    vectors: Mapping[Site, torch.Tensor], act_rms: Mapping[Site, float], near_zero: float
) -> list[dict]:
    """One row per site: layer, module and :func:`vector_stats`."""
    return [
        {
            "site": s.key,
            "layer": s.layer,
            "module": s.module,
            **vector_stats(vectors[s], act_rms.get(s), near_zero),
        }
        for s in sort_sites(vectors)
    ]


def layer_norm_rows(stat_rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per layer: L2 over all its sites, relative L2 (bias energy over activation energy), ranks."""
    layers: dict[int, dict[str, float]] = {}
    for row in stat_rows:
        acc = layers.setdefault(row["layer"], {"sq": 0.0, "act_sq": 0.0, "sites": 0})
        acc["sq"] += row["l2"] ** 2
        acc["act_sq"] += (
            (row["act_rms"] ** 2) * row["dim"] if not math.isnan(row["act_rms"]) else math.nan
        )
        acc["sites"] += 1
    rows = [
        {
            "layer": layer,
            "sites": int(acc["sites"]),
            "l2": math.sqrt(acc["sq"]),
            "l2_rel": math.sqrt(acc["sq"] / acc["act_sq"]) if acc["act_sq"] > 0 else math.nan,
        }
        for layer, acc in sorted(layers.items())
    ]
    for key in ("l2", "l2_rel"):
        order = sorted(rows, key=lambda r: -r[key] if not math.isnan(r[key]) else math.inf)
        for rank, row in enumerate(order, start=1):
            row[f"rank_{key}"] = rank
    return rows


def bias_summary(
    rows: Sequence[Mapping[str, Any]], layer_rows: Sequence[Mapping[str, Any]], num_layers: int
) -> dict[str, Any]:
    """Headline bias statistics: site means, top layers by norm, early/middle/late energy share."""
    energy = {r["layer"]: r["l2"] ** 2 for r in layer_rows}
    total = max(sum(energy.values()), 1e-300)
    return {
        "sites": len(rows),
        **summarize(rows, ("l2", "l2_rel", "max_rel", "kurtosis", "frac_pos", "frac_zero")),
        "top_layers_l2": [r["layer"] for r in sorted(layer_rows, key=lambda r: r["rank_l2"])[:5]],
        "top_layers_l2_rel": [
            r["layer"] for r in sorted(layer_rows, key=lambda r: r["rank_l2_rel"])[:5]
        ],
        "phase_l2_share": {
            phase: sum(v for k, v in energy.items() if phase_of(k, num_layers) == phase) / total
            for phase in PHASES
        },
    }


# --- cosines and chance levels ----------------------------------------------------------------


# --- summaries --------------------------------------------------------------------------------


def summarize(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Mean (nan-aware) of each ``key`` over ``rows``."""
    return {k: nanmean([r[k] for r in rows]) for k in keys if rows and k in rows[0]}


# --- small shared helpers ---------------------------------------------------------------------


def phase_of(layer: int, num_layers: int) -> str:
    """``early`` / ``middle`` / ``late``: thirds of the layer stack (``np.array_split`` sizes)."""
    for name, chunk in zip(PHASES, np.array_split(np.arange(num_layers), 3), strict=True):
        if layer in chunk:
            return name
    raise ValueError(f"layer {layer} outside 0..{num_layers - 1}")


def clean(obj: Any) -> Any:
    """JSON-safe copy: nan/inf -> None, numpy scalars -> Python, floats rounded to 6 significant."""
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else float(f"{obj:.6g}")
    return obj
