"""How the pipeline's time and memory grow: model size, configs x sparsities, block counts.

Reads what ``pipeline.py --scratch-only`` measured for the tiny and the default pipeline (per-stage
wall time of ``dvc repro`` from scratch) and combines it with shapes:

* per stage of ``dvc.yaml``: how many entries it has (in terms of the sweep: C configs, R ranked
  configs, K sparsified sets, S sparsities), which block count its work grows with, its measured
  mean and total seconds on the tiny and the default model;
* forward FLOPs per token of each model (projections, ``lm_head``, attention scores at the block
  length) and the time a stage would take on Llama-3.2-1B / Llama-3.1-8B on the same CPU, scaled
  from the default model's by that ratio after a fixed per-process overhead (an extrapolation:
  these models are never run here);
* peak device / host memory per stage from ``memory_model.py`` for every model, at the default
  params (tiny and default in fp32 as they run here, 1B / 8B in bf16 as on a GPU).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from benchlib import RESULTS, print_table, save_result
from memory_model import GIB, MODELS, Shapes, Workload, stage_terms

TINY = Shapes("tiny Llama (bench)", 4, 64, 128, 4, 2, 512, False)
OVERHEAD_S = 6.0  # per stage process: imports, model load, DVC bookkeeping (measured: ~5-7 s)

# stage -> (entries in sweep terms, what its work grows with)
STAGES = {
    "base": ("1", "model size (export)"),
    "prepare": ("1", "all block counts (tokenization)"),
    "calibrate": ("K x S", "data.calib_blocks (+ greedy search: layers x steps x groups)"),
    "baseline": ("K x S", "data.test_blocks"),
    "dense": ("1", "data.test_blocks"),
    "train": ("C x S", "seeds x epochs x data.train_blocks (+ teacher: train + val blocks)"),
    "evaluate": ("C x S", "seeds x data.test_blocks"),
    "train-ranked": ("R x S", "as train"),
    "evaluate-ranked": ("R x S", "as evaluate"),
    "layer-importance": ("1", "layers x interpret.layers.val_blocks"),
    "transfer": ("1", "transfer configs x seeds x S x domains x blocks"),
    "transfer-training": ("1", "sizes x mixes x seeds (training) + domains x blocks"),
    "interpret": ("1", "interpret.configs x blocks + prompts"),
    "spectrum": ("1", "weights only (SVD / eigenvalues per layer)"),
    "sae": ("1", "sae.samples x layers + sae.steps"),
    "importance": ("1", "importance.samples x 2 passes"),
    "summarize": ("1", "C x S cells (light)"),
    "findings": ("1", "light"),
    "plots": ("1", "C x S cells (light)"),
    "report": ("1", "light"),
}


def flops_per_token(m: Shapes, tokens: int) -> float:
    """Forward FLOPs of one token: 2 x (projection + lm_head weights) + attention scores."""
    head_dim = m.hidden // m.heads
    linear = m.layers * (
        2 * m.hidden * m.hidden
        + 2 * m.hidden * m.kv_heads * head_dim
        + 3 * m.hidden * m.intermediate
    )
    attention = m.layers * 2 * 2 * tokens * m.hidden  # QK^T and AV over the block
    return 2 * (linear + m.vocab * m.hidden) + attention


def by_stage(result: dict) -> dict[str, list[float]]:
    """dvc.yaml stage -> seconds of each of its entries in a scratch run."""
    out: dict[str, list[float]] = {}
    for stage, seconds in result["phases"]["scratch"]["stages_ran"].items():
        out.setdefault(stage.partition("@")[0], []).append(seconds)
    return out


def time_rows(tiny: dict, default: dict, tokens: int) -> list[dict]:
    base = flops_per_token(MODELS["default"], tokens)
    ratio = {k: flops_per_token(MODELS[k], tokens) / base for k in ("llama-1b", "llama-8b")}
    t, d = by_stage(tiny), by_stage(default)
    rows = []
    for stage, (entries, grows) in STAGES.items():
        dt, tt = d.get(stage, []), t.get(stage, [])
        mean = sum(dt) / len(dt) if dt else None
        row = {
            "stage": stage,
            "entries": entries,
            "grows_with": grows,
            "tiny_n": len(tt),
            "tiny_s": round(sum(tt), 1),
            "default_n": len(dt),
            "default_s": round(sum(dt), 1),
            "default_mean_s": round(mean, 1) if mean else None,
        }
        for key, r in ratio.items():
            row[f"{key}_mean_s"] = (
                round(OVERHEAD_S + max(mean - OVERHEAD_S, 0) * r) if mean else None
            )
        rows.append(row)
    return rows


def memory_rows(tokens: int) -> list[dict]:
    models = {"tiny": (TINY, 4), **{k: (MODELS[k], 4 if k == "default" else 2) for k in MODELS}}
    rows = []
    for label, (m, wb) in models.items():
        terms = stage_terms(m, replace(Workload(), tokens=tokens, weight_bytes=wb))
        for stage, parts in terms.items():
            rows.append({
                "model": label, "dtype": "fp32" if wb == 4 else "bf16", "stage": stage,
                "device_gib": round(sum(parts["device"].values()) / GIB, 3),
                "host_gib": round(sum(parts["host"].values()) / GIB, 3),
            })  # fmt: skip
    return rows


def memory_check(measured: dict[str, list[dict]], tokens: int) -> list[dict]:
    """Estimate (terms + a fixed 0.45 GiB of loaded libraries) vs measured peak RSS per cell."""
    shapes = {"tiny": (TINY, Workload(tokens=32, calib=4, train=8, val=4, detail=4, eval_batch=4)),
              "default": (MODELS["default"], Workload(tokens=tokens))}  # fmt: skip
    rows = []
    for label, cells in measured.items():
        m, w = shapes[label]
        terms = stage_terms(m, w)
        for cell in cells:
            parts = terms[cell["stage"]]
            estimate = sum(parts["device"].values()) + sum(parts["host"].values()) + 0.45 * GIB
            measured_gib = cell["max_rss_mib"] / 1024
            rows.append({
                "model": label, "stage": cell["stage"], "estimate_gib": round(estimate / GIB, 3),
                "measured_gib": round(measured_gib, 3),
                "ratio": round(estimate / GIB / measured_gib, 2),
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", default=str(RESULTS / "pipeline-tiny-scratch.json"))
    parser.add_argument("--default", default=str(RESULTS / "pipeline-scratch.json"))
    parser.add_argument("--memory", default=str(RESULTS / "memory.json"), help="default's RSS")
    parser.add_argument("--tokens", type=int, default=128, help="data.block_len")
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args()
    tiny, default = (json.load(open(p)) for p in (args.tiny, args.default))  # noqa: SIM115
    flops = {
        k: round(flops_per_token(m, args.tokens) / 1e9, 4)
        for k, m in {"tiny": TINY, **MODELS}.items()
    }
    print("forward GFLOP per token:", flops)
    times = time_rows(tiny, default, args.tokens)
    print_table(times, [c for c in times[0] if c != "grows_with"])
    memory = memory_rows(args.tokens)
    print_table(memory, ["model", "dtype", "stage", "device_gib", "host_gib"])
    measured = {"tiny": tiny.get("memory", []), "default": default.get("memory", [])}
    if not measured["default"]:
        measured["default"] = json.load(open(args.memory))["rows"]  # noqa: SIM115
    checked = memory_check(measured, args.tokens)
    print_table(checked, ["model", "stage", "estimate_gib", "measured_gib", "ratio"])
    totals = {
        "tiny_s": tiny["phases"]["scratch"]["seconds"],
        "default_s": default["phases"]["scratch"]["seconds"],
    }
    save_result(
        args.name,
        {"what": "time and memory scaling", "gflop_per_token": flops, "totals": totals,
         "stages": times, "memory": memory, "memory_check": checked},
    )  # fmt: skip


if __name__ == "__main__":
    main()
