"""How much do float-level differences move TEAL perplexity? (Why runs differ across machines.)

Multiplies every weight of the base model by ``1 + eps * N(0, 1)`` (eps = 1e-6 is the size of the
rounding differences between library versions or CPU kernels), then measures on the pipeline's
own blocks: dense test perplexity, TEAL-only perplexity with the unperturbed model's thresholds
(``models/thresholds/s<S>.safetensors``: the evaluation alone) and TEAL-only perplexity after
recalibrating sequentially on the perturbed model (calibration + evaluation, what a re-run on
another machine does). Seed 0 with eps 0 is the unperturbed reference. Needs a finished
``dvc repro`` (models/base, data/blocks, thresholds) in this checkout.

    .venv/bin/python bench/sensitivity.py          # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from benchlib import ROOT, fix_threads, print_table, save_result

from sponlab.method.calibration import calibrate_sequential
from sponlab.method.evaluate import evaluate_variant
from sponlab.method.sparsify import SparsifySpec, load_thresholds
from sponlab.model.loading import load_model
from sponlab.model.sites import discover_sites
from sponlab.stages.common import load_blocks


def perturbed_run(args: argparse.Namespace, eps: float, seed: int) -> dict[str, float]:
    """Dense / fixed-threshold TEAL / recalibrated TEAL test perplexity of one perturbed copy."""
    loaded = load_model(args.model, "cpu", "float32")
    model, site_map = loaded.model, discover_sites(loaded.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + eps * torch.randn(param.shape, generator=gen))
    test = load_blocks(args.blocks / "test.safetensors")
    calib = load_blocks(args.blocks / "calib.safetensors")
    sites = tuple(site_map.sites)

    def teal_ppl(thresholds) -> float:
        spec = SparsifySpec("teal", args.sparsity, sites, thresholds)
        return evaluate_variant(model, site_map, test, 8, spec=spec, desc="teal").ppl

    reference = load_thresholds(args.thresholds, site_map, args.sparsity)
    recalibrated = calibrate_sequential(model, site_map, calib, args.sparsity, applied=sites)
    return {
        "eps": eps,
        "seed": seed,
        "dense_ppl": evaluate_variant(model, site_map, test, 8, desc="dense").ppl,
        "teal_fixed_thresholds": teal_ppl(reference),
        "teal_recalibrated": teal_ppl(recalibrated),
        "max_threshold_change": max(
            abs(recalibrated[s] - reference[s]) / reference[s] for s in sites
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/base")
    parser.add_argument("--blocks", type=Path, default=ROOT / "data/blocks")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default="sensitivity")
    args = parser.parse_args()
    args.thresholds = ROOT / f"models/thresholds/s{args.sparsity:g}.safetensors"
    threads = fix_threads(args.threads)
    rows = [perturbed_run(args, 0.0, 0)]
    rows += [perturbed_run(args, args.eps, seed) for seed in range(1, args.seeds + 1)]
    print_table([{**r, "eps": f"{r['eps']:g}"} for r in rows], list(rows[0]))
    perturbed = rows[1:]
    spread = {
        key: {
            "min": min(r[key] for r in perturbed),
            "max": max(r[key] for r in perturbed),
            "stdev": statistics.stdev(r[key] for r in perturbed) if len(perturbed) > 1 else 0.0,
        }
        for key in ("dense_ppl", "teal_fixed_thresholds", "teal_recalibrated")
    }
    save_result(
        args.name, {"sparsity": args.sparsity, "threads": threads, "runs": rows, "spread": spread}
    )


if __name__ == "__main__":
    main()
