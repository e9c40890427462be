"""How SPON's recovery grows with distinct training tokens: the learning curve.

Each config of ``learning_curve.configs`` is retrained at ``learning_curve.sparsity`` on the
first ``size`` blocks of each seed's permutation of the training pool (so a seed's sets are
nested: 16 of its 32, 32 of its 64, ...), with the default run's training settings; the size the
default trains on is read from the default train cells instead of retrained (same blocks, same
order, same biases). Every variant is scored on the test blocks and on one transfer domain, and
its kept validation KL is recorded. A result is about the method only where this curve has
flattened: the slope at the default budget (points of damage recovered per doubling) says how far
it is from that.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from sponlab.config import TrainParams
from sponlab.io.tables import pm
from sponlab.io.tensorio import read_json, write_json
from sponlab.method.sparsify import SparsifySpec
from sponlab.method.spon import SponBiases, load_biases, save_biases
from sponlab.method.teachers import TeacherCache, teachers_for
from sponlab.method.train import train_spon
from sponlab.model.sites import Site, SiteMap
from sponlab.paramcheck import ConfigError
from sponlab.stats import Test, outcome, spread, welch
from sponlab.studies.transfer.params import LearningCurveParams


def check_trained(lc: LearningCurveParams, configs: Mapping[str, Any]) -> None:
    """Every curve config is trained, with biases on fixed layers (names are checked by
    ``interpret``'s parser)."""
    for name in lc.configs:
        alloc = configs[name]
        if alloc.bias != "trained" or alloc.ranked or not alloc.has_biases:
            raise ConfigError(
                f"params.yaml: interpret.learning_curve.configs: {name!r} must be a trained "
                "config with biases on fixed layers"
            )


def train_variant(
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec,
    sites: Sequence[Site],
    pool: torch.Tensor,
    val_targets: TeacherCache,
    settings: TrainParams,
    parametrization: str = "output",
) -> tuple[SponBiases, dict[str, Any]]:
    """Biases trained from zeros on ``settings.blocks`` blocks of ``pool`` [P, T] (the seed's
    draw), sharing the validation targets; returns them and the train.json fields the curve
    reads (epochs, kept epoch, steps, diagnostics)."""
    biases = SponBiases.for_model(model, site_map, sites, parametrization)
    teachers = teachers_for(model, pool, settings.blocks or len(pool), val_targets, settings)
    result = train_spon(model, site_map, spec, biases, pool, val_targets.blocks, settings, teachers)
    info = {"epochs": result.epochs, "best_epoch": result.best_epoch,
            "steps": len(result.steps), "diagnostics": result.diagnostics}  # fmt: skip
    return biases, info


def variant_recipe(
    settings: TrainParams,
    spec: SparsifySpec,
    sites: Sequence[Site],
    parametrization: str,
    pool: torch.Tensor,
    val: torch.Tensor,
) -> str:
    """SHA-256 of everything a variant's training reads: settings (seed and size included),
    thresholds, bias sites, the token pool and validation blocks. A saved variant is reused only
    under the same recipe, so an interrupted curve resumes and a changed one retrains.
    ``teacher_cache_gib`` is left out: a memory bound that decides whether targets are kept or
    recomputed, never their values."""
    h = hashlib.sha256()
    thresholds = {s.key: repr(float(v)) for s, v in (spec.thresholds or {}).items()}
    train = {k: v for k, v in asdict(settings).items() if k != "teacher_cache_gib"}
    head = {"train": train, "method": spec.method, "sparsity": spec.sparsity,
            "dense_prefix": spec.dense_prefix, "sparsified": [s.key for s in spec.sites],
            "thresholds": thresholds, "bias_sites": [s.key for s in sites],
            "parametrization": parametrization}  # fmt: skip
    h.update(json.dumps(head, sort_keys=True).encode())
    for blocks in (pool, val):
        h.update(blocks.to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_variant(
    folder: Path, biases: SponBiases, info: Mapping[str, Any], recipe: str, meta: Mapping[str, Any]
) -> None:
    """A retrained variant's biases and curve fields, keyed by its recipe (atomic writes)."""
    save_biases(folder / "biases.safetensors", biases, {**meta, "recipe": recipe})
    write_json(folder / "variant.json", {**info, "recipe": recipe})


def load_variant(
    folder: Path, recipe: str, sparsity: float, fingerprint: str
) -> tuple[SponBiases, dict[str, Any]] | None:
    """The variant saved in ``folder`` under this very recipe, or None (absent or stale)."""
    info_file, bias_file = folder / "variant.json", folder / "biases.safetensors"
    if not (info_file.is_file() and bias_file.is_file()):
        return None
    info = read_json(info_file, "learning-curve")
    if info.get("recipe") != recipe:
        return None
    biases, meta = load_biases(bias_file, None, sparsity, fingerprint)
    if meta.get("recipe") != recipe:
        return None
    return biases, info


def curve_row(config: str, size: int, block_len: int, seed: int, info: dict, reused: bool) -> dict:
    """One row of curve.csv from a variant's train.json fields (scores are added later)."""
    kept = info["epochs"][info["best_epoch"]]
    return {
        "config": config, "size": size, "tokens": size * block_len, "seed": seed,
        "steps": info["steps"], "val_kl": kept["val_kl"],
        "budget": info["diagnostics"].get("budget_note", "-"),
        "source": "default train cell" if reused else "retrained",
    }  # fmt: skip


CURVE_FIELDS = [
    "config", "size", "tokens", "seed", "steps", "val_kl", "budget",
    "test_recovered", "test_block_se", "domain_recovered", "domain_block_se", "source",
]  # fmt: skip


def curve_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and seed sd per (config, size) of the curve's quantities."""
    frame = pd.DataFrame(rows)
    out = []
    for (config, size), group in frame.groupby(["config", "size"], sort=False):
        row: dict[str, Any] = {"config": config, "size": size, "tokens": group["tokens"].iloc[0],
                               "seeds": len(group)}  # fmt: skip
        for key in ("test_recovered", "domain_recovered", "val_kl"):
            values = [float(v) for v in group[key] if v is not None and not pd.isna(v)]
            s = spread(values) if values else None
            row[key] = s.mean if s else math.nan
            row[f"{key}_sd"] = s.sd if s else math.nan
        row["budget_limited"] = int((group["budget"] != "converged").sum())
        out.append(row)
    return pd.DataFrame(out)


def seed_slopes(rows: pd.DataFrame, config: str, size: int, key: str) -> list[float]:
    """Per-seed change of ``key`` per doubling of training blocks around ``size`` (between the
    neighbouring sizes, one-sided at the ends). A seed's training sets are nested, so each slope
    pairs one seed's own variants; empty when ``size`` is not on the curve."""
    part = rows[rows["config"] == config]
    sizes = sorted({int(v) for v in part["size"]})
    if len(sizes) < 2 or size not in sizes:
        return []
    i = sizes.index(size)
    lo, hi = sizes[max(i - 1, 0)], sizes[min(i + 1, len(sizes) - 1)]
    slopes = []
    for _, seed in part.groupby("seed", sort=True):
        value = {int(r["size"]): r[key] for r in seed.to_dict("records")}
        ends = [value.get(lo), value.get(hi)]
        if all(v is not None and not pd.isna(v) for v in ends):
            slopes.append((float(ends[1]) - float(ends[0])) / math.log2(hi / lo))
    return slopes


def slope_test(rows: pd.DataFrame, config: str, size: int, key: str) -> Test | None:
    """Mean per-seed slope against zero (t with seeds - 1 df); None without two seeds."""
    slopes = seed_slopes(rows, config, size, key)
    return welch(slopes, None) if len(slopes) > 1 else None


def _slope_value(test: Test | None, scale: float, digits: int) -> str:
    if test is None:
        return "n/a"
    return f"{scale * test.difference:+.{digits}f} ± {scale * test.se:.{digits}f}"


def _slope_text(test: Test | None, scale: float, digits: int) -> str:
    """``+x ± se (t(df); more data helps: verdict)``: the one-sided test of a positive slope."""
    if test is None:
        return "n/a"
    verdict = outcome(test, one_sided=True)
    return f"{_slope_value(test, scale, digits)} (t({test.df:.0f}); more data helps: {verdict})"


def curve_markdown(table: pd.DataFrame, rows: pd.DataFrame, default_size: int, domain: str) -> str:
    """The table the report shows, and per config the slope at the default budget: mean ± SE of
    the per-seed slopes, tested one-sided against zero (a positive slope: data-limited)."""
    head = (
        f"| config | blocks | tokens | test: damage recovered (%) | {domain}: damage recovered (%)"
        " | val KL | seeds budget-limited |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        mark = " (default)" if r.size == default_size else ""
        lines.append(
            f"| {r.config} | {r.size}{mark} | {r.tokens:,} | "
            f"{pm(r.test_recovered, r.test_recovered_sd, 100, 1)} | "
            f"{pm(r.domain_recovered, r.domain_recovered_sd, 100, 1)} | "
            f"{pm(r.val_kl, r.val_kl_sd, 1, 4)} | {r.budget_limited}/{r.seeds} |"
        )
    lines += ["", f"Slope at the default {default_size} blocks per seed, between the neighbouring "
              "sizes (points of damage recovered, or val KL, per doubling of training tokens):", ""]  # fmt: skip
    for config in dict.fromkeys(table["config"]):
        test = slope_test(rows, config, default_size, "test_recovered")
        dom = slope_test(rows, config, default_size, "domain_recovered")
        kl = slope_test(rows, config, default_size, "val_kl")
        lines.append(
            f"- {config}: test text {_slope_text(test, 100, 1)}; {domain} {_slope_text(dom, 100, 1)}; "
            f"val KL {_slope_value(kl, 1, 4)}."
        )
    return "\n".join(lines) + "\n"


def curve_metrics(table: pd.DataFrame, rows: pd.DataFrame, default_size: int) -> dict[str, Any]:
    """``{config: {"b<size>": {...}, "default_blocks": n, "slope_at_default": {...},
    "data_limited": ...}}`` for ``dvc metrics``; ``data_limited``: the test-text slope's one-sided
    verdict against zero at ``default_blocks`` (``train.blocks`` when the curve ran)."""
    out: dict[str, Any] = {}
    for r in table.to_dict("records"):
        cell = {k: (None if pd.isna(r[k]) else float(r[k]))
                for k in ("test_recovered", "domain_recovered", "val_kl")}  # fmt: skip
        out.setdefault(r["config"], {})[f"b{r['size']}"] = cell
    for config in out:
        tests = {k: slope_test(rows, config, default_size, k)
                 for k in ("test_recovered", "domain_recovered", "val_kl")}  # fmt: skip
        out[config]["default_blocks"] = default_size
        out[config]["slope_at_default"] = {
            k: None if t is None else {"slope": t.difference, "se": t.se, "df": t.df}
            for k, t in tests.items()
        }
        test = tests["test_recovered"]
        out[config]["data_limited"] = None if test is None else outcome(test, one_sided=True)
    return out
