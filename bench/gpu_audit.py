"""GPU audit: every stage's library function at real model shapes, timed, checked, against the
memory model.

``python bench/gpu_audit.py`` builds random-init Llama models with the shapes of Llama-3.2-1B and
Llama-3.1-8B (``--shapes``; on CPU the default is a tiny shape) in ``--dtype`` on ``--device`` and
runs, per model: :func:`sponlab.tools.smoke.run_smoke` (calibration, greedy allocation, dense reference,
TEAL-only baseline, closed-form and trained biases, top-k/chunked KL training, evaluation, sliding
windows), histogram calibration, SAE activation capture and training, importance (values and
gradients, with SAE features), the interpret captures (input moments, residual samples, prompt
effects), and a ``device_map: auto`` load of a saved tiny model run through the smoke stages.
Each row: seconds, peak CUDA memory, and for the stages the memory model sizes
(bench/memory_model.py) its estimate. A stage that breaks a device, dtype or finiteness invariant
fails the run. Result: ``bench/results/<name>.json``. The test suite runs it on CPU as pasted.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from benchlib import RESULTS, fix_threads, print_table, save_result
from memory_model import MODELS, Shapes, Workload, stage_terms
from transformers import AutoModelForCausalLM, LlamaConfig

from sponlab.io.batches import TokenBatch
from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds
from sponlab.method.spon import SponBiases
from sponlab.model.capture import collect_activations, feature_targets, run_importance
from sponlab.model.loading import freeze, load_model, no_kv_cache, resolve_device, resolve_dtype
from sponlab.model.sites import discover_sites
from sponlab.model.tiny import save_tiny
from sponlab.studies.importance.sae import train_sae
from sponlab.studies.interpret.alignment import collect_moments
from sponlab.studies.interpret.prompts import prompt_effects, prompt_variants
from sponlab.studies.interpret.residual import residual_samples
from sponlab.tools.smoke import SmokeError, run_smoke, timed_on

TINY = Shapes("tiny Llama", 4, 128, 256, 4, 2, 1024, False)
SHAPES = {"tiny": TINY, "llama-1b": MODELS["llama-1b"], "llama-8b": MODELS["llama-8b"]}
ESTIMATED = ("calibrate", "dense", "train", "evaluate")  # smoke stages the memory model sizes


def build(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-init Llama with ``shapes``, made on ``device`` in ``dtype`` (no fp32 detour)."""
    config = LlamaConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads, tie_word_embeddings=shapes.tied,
        max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(default)
    freeze(model)
    no_kv_cache(model)
    return model


def _on(device: torch.device, tensors, what: str) -> None:
    for t in tensors:
        if t.device != device or not torch.isfinite(t.float()).all():
            raise SmokeError(f"{what}: {t.dtype} on {t.device} (finite: {torch.isfinite(t).all()})")


def analyses(model, blocks: torch.Tensor, batch_size: int) -> dict[str, Callable[[], str]]:
    """The analysis stages' functions on ``model``, each returning what it checked."""
    site_map = discover_sites(model)
    device = next(model.parameters()).device
    layer = site_map.num_layers // 2
    down = site_map.select([layer], ["down_proj"])
    batches = [TokenBatch(b, torch.ones_like(b)) for b in blocks.split(batch_size)]
    state: dict = {}

    def histogram() -> str:
        found = calibrate_thresholds(model, site_map, blocks, [0.5], method="histogram",
                                     batch_size=batch_size)[0.5]  # fmt: skip
        state["spec"] = SparsifySpec("teal", 0.5, tuple(found), found)
        return f"{sum(math.isfinite(t) for t in found.values())} of {len(found)} finite"

    def sae() -> str:
        acts = collect_activations(model, site_map, [layer], batches, progress=False)[layer]
        result = train_sae(acts, expansion=1, steps=5, token_batch=64, progress=False,
                           device=site_map.layer_device(model, layer))  # fmt: skip
        state["sae"] = result.sae
        _on(device, [result.sae.W_enc], "sae")
        return (f"acts {tuple(acts.shape)} on {acts.device}, trained on {result.sae.W_enc.device}; "
                f"fve {result.metrics['fve']:.3f}")  # fmt: skip

    def importance(aggregate_by: str) -> str:
        targets = feature_targets([layer], {layer: state["sae"]}, aggregate_by)
        result = run_importance(model, site_map, batches, aggregate_by, targets, progress=False)
        totals = [agg.total for per in result.aggregates.values() for agg in per.values()]
        _on(device, totals, f"importance {aggregate_by}")
        return f"{len(totals)} aggregates on {device}, {result.tokens} tokens"

    def interpret() -> str:
        moments = collect_moments(model, site_map, down, blocks, batch_size, state["spec"], True)
        residual = residual_samples(model, blocks, batch_size, [layer], 64)
        biases = SponBiases.for_model(model, site_map, down)
        variants, _ = prompt_variants(["UNIF"], {"UNIF": state["spec"]}, {"UNIF": biases})
        totals = prompt_effects(model, site_map, batches, variants)
        kls = {name: t.kl for name, t in totals.items()}
        if not all(math.isfinite(v) for v in kls.values()):
            raise SmokeError(f"prompt effects not finite: {kls}")
        return f"moments of {moments.tokens} tokens, residual {tuple(residual[layer].shape)}"

    return {
        "calibrate (histogram)": histogram,
        "sae (capture + train)": sae,
        "importance (values, SAE)": lambda: importance("values"),
        "importance (gradients, SAE)": lambda: importance("gradients"),
        "interpret captures": interpret,
    }


def timed_rows(model, stages: dict, label: str) -> list[dict]:
    """Run ``stages`` in order: seconds and peak CUDA memory (MiB) of each."""
    device = next(model.parameters()).device
    rows = []
    for stage, fn in stages.items():
        timing: dict[str, float | None] = {}
        with timed_on(device, timing):
            checked = fn()
        rows.append({"model": label, "stage": stage, "seconds": timing["seconds"],
                     "peak_mib": timing["peak"], "checked": checked})  # fmt: skip
    return rows


def estimates(shapes: Shapes, n: int, length: int, batch: int, dtype: torch.dtype) -> dict:
    """The memory model's device peak (MiB) for the smoke stages at this audit's sizes."""
    half = max(n // 2, 1)
    work = Workload(tokens=length, calib=half, train=half, val=n - half, detail=n - half,
                    train_batch=batch, eval_batch=batch,
                    weight_bytes=torch.finfo(dtype).bits // 8)  # fmt: skip
    terms = stage_terms(shapes, work)
    return {stage: sum(terms[stage]["device"].values()) / 2**20 for stage in ESTIMATED}


def audit_model(key: str, device, dtype, n: int, length: int, batch: int) -> list[dict]:
    """Smoke and analysis stages on a random-init model with ``SHAPES[key]``."""
    shapes = SHAPES[key]
    start = time.perf_counter()
    model = build(shapes, device, dtype)
    print(f"{shapes.name}: built on {device} in {dtype} in {time.perf_counter() - start:.1f}s")
    blocks = torch.randint(0, shapes.vocab, (n, length), generator=torch.Generator())
    rows = [{"model": shapes.name, **asdict(r)} for r in run_smoke(model, blocks, batch_size=batch)]
    rows += timed_rows(model, analyses(model, blocks[: n // 2], batch), shapes.name)
    estimate = estimates(shapes, n, length, batch, dtype)
    for row in rows:
        row["estimate_mib"] = estimate.get(row["stage"])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def audit_device_map(device, dtype, n: int, length: int, batch: int) -> list[dict]:
    """``base.device_map: auto`` on a saved tiny model: loaded through load_model, then smoked."""
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny(Path(tmp), layers=4, hidden=64, vocab=512)
        loaded = load_model(tmp, str(device), str(dtype).removeprefix("torch."), "auto")
        placed = sorted({str(p.device) for p in loaded.model.parameters()})
        blocks = torch.randint(0, 512, (n, length), generator=torch.Generator())
        label = f"tiny, device_map auto on {placed}"
        return [{"model": label, **asdict(r), "estimate_mib": None}
                for r in run_smoke(loaded.model, blocks, batch_size=batch)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of {sorted(SHAPES)} (default: llama-1b,llama-8b on "
                             "cuda, tiny elsewhere)")  # fmt: skip
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default="gpu_audit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json")
    args = parser.parse_args()
    fix_threads(args.threads)
    device = resolve_device(args.device)  # a clear error when CUDA is requested but absent
    dtype = resolve_dtype(args.dtype, device)
    keys = (args.shapes or ("llama-1b,llama-8b" if device.type == "cuda" else "tiny")).split(",")
    unknown = [k for k in keys if k not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    sizes = (args.blocks, args.length, args.batch_size)
    rows = [row for key in keys for row in audit_model(key, device, dtype, *sizes)]
    rows += audit_device_map(device, dtype, *sizes)
    print_table(rows, ["model", "stage", "seconds", "peak_mib", "estimate_mib", "checked"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings = {**vars(args), "out": str(args.out), "device_name": name}
    save_result(args.name, {"settings": settings, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
