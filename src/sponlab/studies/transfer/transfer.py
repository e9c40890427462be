"""Does SPON's gain carry over to text unlike its training (C4) and test (Wikipedia) text?

Every chosen config is evaluated at every sweep sparsity on blocks of other text domains that no
stage saw (the offline corpora ship source code, technical documentation, multilingual text and
simple stories): dense, TEAL-only on the config's sparsified set (once per set and sparsity) and
TEAL+SPON for each training seed. A row per (domain, config, sparsity) has the columns of the
summary table the findings read (``damage_recovered_seeds``, ``damage_measurable``, ...), so the
study's claims are re-tested per domain with the same noise rules, plus the achieved sparsity:
thresholds calibrated on C4 + Wikipedia may not hit their target on code.

Each domain's documents are split in two fixed halves: evaluation blocks come from one, and the
transfer-training stage draws training text from the other (:func:`mixed_blocks`) to measure
how the size and domain mix of the training set change transfer.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import nn

from sponlab.config import TrainParams
from sponlab.io.data import BlockSpec, make_blocks, read_builtin_file
from sponlab.io.tables import is_missing, markdown_table, pm
from sponlab.method.evaluate import VariantMetrics, damage_recovered, evaluate_variant
from sponlab.method.sparsify import SparsifySpec, SparsityStats
from sponlab.method.spon import SponBiases
from sponlab.method.teachers import teachers_for, validation_targets
from sponlab.method.train import train_spon
from sponlab.model.sites import Site, SiteMap
from sponlab.stats import block_bootstrap_se, damage, spread
from sponlab.sweep.summary import pareto_front

log = logging.getLogger(__name__)

# domain name -> file of the builtin corpora (exllamav3's calibration text, read as data)
DOMAIN_FILES: dict[str, str] = {
    "code": "code",
    "technical": "technical",
    "multilingual": "multilingual",
    "stories": "tiny",
}
_PARAGRAPHS = re.compile(r"\n\s*\n")


PARTS = ("eval", "train")  # the two disjoint halves of each domain's documents


def domain_documents(domain: str, part: str = "eval") -> list[str]:
    """One half (``eval`` or ``train``) of the domain's text, split into documents at blank
    lines; the halves are fixed (shuffle seed 0) and share no text (repeated documents, which
    the code corpus has, are kept once)."""
    if domain not in DOMAIN_FILES:
        raise ValueError(f"unknown domain {domain!r}; available: {sorted(DOMAIN_FILES)}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    text = read_builtin_file(DOMAIN_FILES[domain])
    docs = list(dict.fromkeys(p.strip() for p in _PARAGRAPHS.split(text) if p.strip()))
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    half = order[: len(order) // 2] if part == "eval" else order[len(order) // 2 :]
    return [docs[i] for i in sorted(half)]


def domain_blocks(domain: str, tokenizer: Any, spec: BlockSpec) -> torch.Tensor:
    """``spec.count`` evaluation blocks [N, T] of the domain (documents shuffled with
    ``spec.seed``)."""
    return make_blocks(domain_documents(domain, "eval"), tokenizer, spec)


def mix_counts(mix: Mapping[str, float], size: int) -> dict[str, int]:
    """Blocks per source for ``size`` blocks in proportion to the weights (largest remainder)."""
    total = sum(mix.values())
    exact = {k: size * w / total for k, w in mix.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (counts[k] - exact[k], list(mix).index(k)))
    for key in by_remainder[: size - sum(counts.values())]:
        counts[key] += 1
    return counts


def mixed_blocks(
    mix: Mapping[str, float],
    size: int,
    sources: Mapping[str, Sequence[str]],
    tokenizer: Any,
    spec: BlockSpec,
) -> torch.Tensor:
    """``size`` training blocks [size, T]: each source's share of them cut from its documents
    (``sources``: name -> documents, e.g. the pipeline's training text and domain halves)."""
    parts = [
        make_blocks(sources[name], tokenizer, BlockSpec(spec.block_len, n, spec.bos, spec.seed))
        for name, n in mix_counts(mix, size).items()
        if n > 0
    ]
    return torch.cat(parts)  # [size, T], sources in the mix's order


@dataclass(frozen=True)
class CellModels:
    """One pipeline cell to transfer: its sparsification and its biases per training seed."""

    config: str
    sparsity: float
    sparsify: str  # the sparsified set's name
    spec: SparsifySpec
    seeds: dict[int, SponBiases]
    relative_parameters: float


def evaluate_cells(
    model: nn.Module,
    site_map: SiteMap,
    blocks: torch.Tensor,
    batch_size: int,
    cells: Sequence[CellModels],
    min_damage: float,
    sigmas: float,
) -> list[dict[str, Any]]:
    """Dense once, TEAL-only once per (set, sparsity), TEAL+SPON per seed: one row per cell."""
    run = {"model": model, "site_map": site_map, "blocks": blocks, "batch_size": batch_size}
    dense = evaluate_variant(**run, desc="dense")
    teal: dict[tuple[str, float], tuple[VariantMetrics, SparsityStats]] = {}
    rows = []
    for cell in cells:
        key = (cell.sparsify, cell.sparsity)
        if key not in teal:
            stats = SparsityStats()
            teal[key] = (evaluate_variant(**run, spec=cell.spec, stats=stats, desc="teal"), stats)
        base, stats = teal[key]
        spon = {
            seed: evaluate_variant(**run, spec=cell.spec, biases=b, desc=f"spon {seed}")
            for seed, b in cell.seeds.items()
        }
        rows.append(cell_row(cell, dense, base, spon, stats, min_damage, sigmas))
    return rows


def cell_row(
    cell: CellModels,
    dense: VariantMetrics,
    teal: VariantMetrics,
    spon: Mapping[int, VariantMetrics],
    stats: SparsityStats,
    min_damage: float,
    sigmas: float,
) -> dict[str, Any]:
    """The summary-table columns the findings use, for one cell on one domain."""
    hurt = damage(dense.ppl, teal.ppl, dense.block_nll, teal.block_nll, min_damage, sigmas)
    recovered = [damage_recovered(dense.ppl, teal.ppl, m.ppl) for m in spon.values()]
    values = [v for v in recovered if v is not None]
    gain = spread(values) if values else None
    achieved = list(stats.achieved().values())
    ppl = spread([m.ppl for m in spon.values()]) if spon else None
    return {
        "config": cell.config,
        "sparsity": cell.sparsity,
        "sparsify": cell.sparsify,
        "relative_parameters": cell.relative_parameters,
        "seeds": len(spon),
        "dense_ppl": dense.ppl,
        "teal_ppl": teal.ppl,
        "spon_ppl": ppl.mean if ppl else teal.ppl,
        "spon_ppl_sd": ppl.sd if ppl else float("nan"),
        "teal_damage": hurt.ppl,
        "damage_measurable": hurt.measurable,
        "damage_recovered": gain.mean if gain else float("nan"),
        "damage_recovered_sd": gain.sd if gain else float("nan"),
        "damage_recovered_seeds": ";".join(f"{v:.6f}" for v in values),
        "damage_recovered_block_se": block_bootstrap_se(
            dense.block_nll, teal.block_nll, [m.block_nll for m in spon.values()]
        ),  # test-block noise of the mean (paired bootstrap over this domain's blocks)
        "achieved_sparsity": spread(achieved).mean,
        "achieved_sparsity_worst_offset": max(abs(a - cell.sparsity) for a in achieved),
        "pareto": False,  # set per domain by the stage (summary.pareto_front)
    }


def with_pareto(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``pareto`` per sparsity among the rows: fewer parameters and lower SPON perplexity."""
    out = [dict(r) for r in rows]
    for s in {r["sparsity"] for r in out}:
        group = [r for r in out if r["sparsity"] == s]
        flags = pareto_front(
            [r["relative_parameters"] for r in group], [r["spon_ppl"] for r in group]
        )
        for row, flag in zip(group, flags, strict=True):
            row["pareto"] = flag
    return out


def _recovered(row: Mapping[str, Any]) -> str:
    if not row["damage_measurable"]:
        return f"n/a (TEAL +{row['teal_damage']:.2f} ppl within noise)"
    return pm(row["damage_recovered"], row["damage_recovered_sd"], 100, 1, "%")


def transfer_markdown(frame: pd.DataFrame) -> str:
    """One row per (domain, sparsity, config): perplexities, damage recovered, sparsity hit."""
    head = ["domain", "sparsity", "config", "dense ppl", "TEAL ppl", "SPON ppl",
            "damage recovered", "achieved sparsity (worst site offset)"]  # fmt: skip
    rows = []
    for row in frame.sort_values(["domain", "sparsity", "config"], kind="stable").to_dict(
        "records"
    ):
        worst = row.get("achieved_sparsity_worst_offset")
        offset = "" if is_missing(worst) else f" ({100 * worst:.1f} pts)"
        rows.append(
            [row["domain"], f"{row['sparsity']:g}", row["config"], f"{row['dense_ppl']:.2f}",
             f"{row['teal_ppl']:.2f}", f"{row['spon_ppl']:.2f}", _recovered(row),
             f"{row['achieved_sparsity']:.3f}{offset}"]
        )  # fmt: skip
    return markdown_table(head, rows) + "\n"


def transfer_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """``{domain: {config: {s50: {...}}}}`` for ``dvc metrics`` (NaN as null)."""
    out: dict[str, Any] = {}
    for row in frame.to_dict("records"):
        cell = {
            k: (None if isinstance(row[k], float) and math.isnan(row[k]) else row[k])
            for k in (
                "teal_ppl",
                "spon_ppl",
                "damage_recovered",
                "damage_recovered_sd",
                "damage_measurable",
                "achieved_sparsity",
            )
        }
        key = f"s{round(100 * row['sparsity'])}"
        out.setdefault(row["domain"], {}).setdefault(row["config"], {})[key] = cell
    return out


def train_variants(
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec,
    sites: Sequence[Site],
    training_sets: Mapping[tuple[str, int], torch.Tensor],
    val_blocks: torch.Tensor,
    settings: TrainParams,
    seeds: Sequence[int],
    parametrization: str = "output",
) -> dict[tuple[str, int], dict[int, SponBiases]]:
    """SPON biases on ``sites`` trained from zeros on each training set, once per seed.

    ``training_sets``: (mix, size) -> blocks [size, T]. Every variant shares the validation
    blocks (and their dense targets) that choose its kept epoch.
    """
    val = validation_targets(model, val_blocks, settings)
    out: dict[tuple[str, int], dict[int, SponBiases]] = {}
    for (mix, size), blocks in training_sets.items():
        teachers = teachers_for(model, blocks, len(blocks), val, settings)
        out[(mix, size)] = {}
        for seed in seeds:
            biases = SponBiases.for_model(model, site_map, sites, parametrization)
            start = time.perf_counter()
            train_spon(model, site_map, spec, biases, blocks, val_blocks,
                       replace(settings, seed=seed), teachers)  # fmt: skip
            log.info("trained on %s x %d blocks, seed %d in %.1fs",
                     mix, size, seed, time.perf_counter() - start)  # fmt: skip
            out[(mix, size)][seed] = biases
    return out


def training_markdown(frame: pd.DataFrame) -> str:
    """Damage recovered per training set (mix, blocks) and domain, mean ± sd over seeds."""
    domains = list(dict.fromkeys(frame["domain"]))
    rows = []
    for (mix, size), group in frame.groupby(["mix", "size"], sort=False):
        cells = group.set_index("domain")
        rows.append([mix, size, *(_recovered(cells.loc[d]) for d in domains)])
    return markdown_table(["mix", "blocks", *domains], rows) + "\n"


def training_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """``{mix: {"b<size>": {domain: damage recovered}}}`` for ``dvc metrics`` (NaN as null)."""
    out: dict[str, Any] = {}
    for row in frame.to_dict("records"):
        value = row["damage_recovered"] if row["damage_measurable"] else math.nan
        cell = out.setdefault(row["mix"], {}).setdefault(f"b{row['size']}", {})
        cell[row["domain"]] = None if math.isnan(value) else value
    return out
