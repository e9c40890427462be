"""Forward cost of the sparsified model relative to the dense model (CPU, fp32, no grad).

Measured: wall time of one ``model(ids)`` forward on a ``batch x length`` block (default 4 x 128)
for dense, TEAL (calibrated thresholds, one compare per input entry) and per-token top-k
(``kthvalue``), each sparsifying all seven projections or only ``down_proj``, at one sparsity
(default 0.5). Variants run interleaved round-robin after a warm-up round; the reported number is
the median over ``--repeats`` runs; ``ratio`` is the median over rounds of variant / dense within
the same round (robust when the machine is shared), ``ratio_of_medians`` is also saved. Hook
installation happens outside the timed region. Two models: the default model (``models/base`` or
``--model``) and a larger random-init Llama (hidden 1024, 8 layers, intermediate 2816, 16/8 heads,
vocab 32000). Thresholds are calibrated on 2 blocks (real calibration text when
``data/blocks/calib.safetensors`` exists, else random ids). Target: TEAL <= 1.10x dense.

The sparsified matmul is still dense here (masking only): this measures the *overhead* of the
mask, not a speed-up. See ``decode.py`` for a kernel that skips zeroed inputs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    DEFAULT_MODEL,
    LARGE_LLAMA,
    fix_threads,
    interleaved,
    large_llama,
    load_default,
    no_setup,
    paired_ratio,
    print_table,
    save_result,
    token_blocks,
)
from torch import nn

from sponlab.method.sparsify import SparsifySpec, SparsityStats, calibrate_thresholds, sparsified
from sponlab.model.sites import Site, SiteMap, discover_sites

TARGET_TEAL = 1.10
SCOPES: dict[str, tuple[str, ...] | None] = {"all": None, "down_proj": ("down_proj",)}


def make_specs(site_map: SiteMap, thresholds: dict[Site, float], sparsity: float):
    """The four sparsified variants: {teal, topk} x {all seven projections, down_proj only}."""
    specs: dict[str, SparsifySpec] = {}
    for scope, modules in SCOPES.items():
        sites = tuple(s for s in site_map.sites if modules is None or s.module in modules)
        specs[f"teal/{scope}"] = SparsifySpec("teal", sparsity, sites, thresholds)
        specs[f"topk/{scope}"] = SparsifySpec("topk", sparsity, sites)
    return specs


def achieved_sparsity(model: nn.Module, site_map: SiteMap, spec: SparsifySpec, ids) -> float:
    """Mean fraction of zeroed inputs over the spec's sites on ``ids`` (a sanity check)."""
    stats = SparsityStats()
    with torch.no_grad(), sparsified(model, site_map, spec, stats):
        model(ids)
    values = list(stats.achieved().values())
    return sum(values) / len(values)


def bench_model(
    name: str, model: nn.Module, args: argparse.Namespace, real_text: bool
) -> dict[str, Any]:
    """Time dense and the four sparsified variants of ``model``; return rows and raw timings."""
    site_map = discover_sites(model)
    vocab = model.config.vocab_size
    calib = token_blocks(vocab, 2, args.length, seed=1, real=real_text)
    ids = token_blocks(vocab, args.batch, args.length, seed=2, real=real_text, skip=2)
    thresholds = calibrate_thresholds(model, site_map, calib, [args.sparsity])[args.sparsity]
    specs = make_specs(site_map, thresholds, args.sparsity)

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    def setup(spec: SparsifySpec) -> Callable:
        return lambda: sparsified(model, site_map, spec)

    variants = {"dense": (no_setup, forward)}
    variants.update({key: (setup(spec), forward) for key, spec in specs.items()})
    print(f"[{name}] timing {len(variants)} variants x {args.repeats} runs on {tuple(ids.shape)}")
    timings = interleaved(variants, repeats=args.repeats, warmup=args.warmup)
    dense = timings["dense"]
    tokens = ids.numel()
    rows = []
    for key, timing in timings.items():
        method = key.partition("/")[0]
        spec = specs.get(key)
        ratio = paired_ratio(timing, dense)
        rows.append(
            {
                "model": name,
                "variant": key,
                "sites": len(spec.sites) if spec else 0,
                "median_s": timing.median,
                "tokens_per_s": tokens / timing.median,
                "ratio": ratio,
                "ratio_of_medians": timing.median / dense.median,
                "achieved": achieved_sparsity(model, site_map, spec, ids)
                if spec is not None and method == "teal"
                else None,
                "ok": ratio <= TARGET_TEAL if method == "teal" else None,
            }
        )
    return {"rows": rows, "timings": {k: t.summary() for k, t in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--skip-large", action="store_true", help="Only the default model.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="0: one per available core")
    parser.add_argument("--name", default="forward", help="Result file bench/results/<name>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = fix_threads(args.threads)
    results = {"default": bench_model(str(args.model), load_default(args.model), args, True)}
    if not args.skip_large:
        results["large"] = bench_model("llama-1024x8 (random)", large_llama(), args, False)
    rows = [row for result in results.values() for row in result["rows"]]
    columns = ["model", "variant", "sites", "median_s", "tokens_per_s", "ratio", "achieved", "ok"]
    print_table(rows, columns)
    save_result(
        args.name,
        {
            "what": "forward wall time of sparsified vs dense model, no_grad, fp32, CPU",
            "settings": {**vars(args), "model": str(args.model), "threads": threads},
            "large_config": LARGE_LLAMA,
            "target": {"teal_ratio_max": TARGET_TEAL},
            "rows": rows,
            "timings": {k: r["timings"] for k, r in results.items()},
        },
    )


if __name__ == "__main__":
    main()
