"""Cost of one SPON training step relative to a dense forward + backward of the same model/batch.

Measured (CPU, fp32, median of ``--repeats`` interleaved runs after a warm-up round):

* ``spon``: one step exactly as :func:`sponlab.method.train.train_spon` does it in epoch 1: dense teacher
  log-probs (:func:`sponlab.method.distill.dense_logprobs`, no grad), the TEAL-sparsified student (all seven projections
  at ``--sparsity``) with :class:`SponBiases` attached on every site of ``--bias-modules``,
  :func:`kl_to_teacher`, backward, grad-norm clipping and an AdamW step on the biases.
* ``spon-cached``: the same without the teacher forward (epochs >= 2 with ``train.teacher_cache``).
* ``teacher``: the teacher forward alone (for the decomposition).
* ``spon-bf16`` / ``spon-cached-bf16``: the same steps with the student's matmuls in bfloat16,
  as ``train.autocast`` runs them on CPUs with AMX / AVX512-BF16 (:class:`Bf16Student`: weights
  cast once, autocast; teacher, KL, biases and optimizer stay float32); ``speedup`` is the fp32
  step over it, same round. ``spon-cached-autocast``: plain autocast (re-casts every weight each
  step; what training did before the cached copies), for the ratio between the two.
* ``spon-cached-2026-12-03``: the float32 step as the pipeline ran it before 2026-12-04 (KL
  through autograd's ``kl_div`` / ``log_softmax`` chain instead of the written-out gradient), in
  the same run, so ``vs_before`` (it over each variant, paired by round) is issue 27's ratio
  against that day's float32 step.
* ``dense`` (the baseline): dense forward + backward with the same frozen weights and the same
  trainable bias set attached (its own copy and AdamW), next-token cross-entropy loss, clipping
  and an AdamW step; no sparsification, no teacher. Gradients flow through the same layers as in
  ``spon``, so the ratio isolates what SPON adds: the teacher forward, the masks and the KL.

``ratio`` is the median over rounds of variant / dense within the same round (robust when the
machine is shared); ``ratio_of_medians`` is also saved. Target: ``spon`` <= 1.6x ``dense``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import (
    DEFAULT_MODEL,
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

from sponlab.method.distill import dense_logprobs, kl_to_teacher
from sponlab.method.precision import Bf16Student
from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds, sparsified
from sponlab.method.spon import SponBiases
from sponlab.model.sites import PROJECTIONS, SiteMap, discover_sites

TARGET = 1.6


def optimizer_step(loss: torch.Tensor, biases: SponBiases, optimizer: torch.optim.Optimizer):
    """Backward, clip and step, as ``train_spon`` does."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(biases.parameters(), 1.0)
    optimizer.step()


def make_steps(
    model: nn.Module, site_map: SiteMap, spec: SparsifySpec, ids: torch.Tensor, modules
) -> dict[str, Callable[[], None]]:
    """The timed callables: spon, spon-cached (fp32, bf16, plain autocast), teacher, dense."""
    bias_sites = [s for s in site_map.sites if s.module in modules]
    spon_biases = SponBiases.for_model(model, site_map, bias_sites)
    dense_biases = SponBiases.for_model(model, site_map, bias_sites)
    spon_opt = torch.optim.AdamW(spon_biases.parameters(), lr=1e-3)
    dense_opt = torch.optim.AdamW(dense_biases.parameters(), lr=1e-3)
    cached = dense_logprobs(model, ids)  # [B, T, V]

    bf16_student = Bf16Student(model)
    precisions = {
        "fp32": nullcontext,
        "bf16": bf16_student.active,
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }

    def autograd_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(logits.float(), dim=-1)  # the 2026-12-03 KL, autograd's backward
        return F.kl_div(logq, target, log_target=True, reduction="none").sum(-1).mean()

    def student(target: torch.Tensor, precision: str = "fp32", kl=kl_to_teacher) -> None:
        with (
            sparsified(model, site_map, spec),
            spon_biases.attached(model, site_map),
            precisions[precision](),
        ):
            loss = kl(target, model(ids).logits)
        optimizer_step(loss, spon_biases, spon_opt)

    def dense() -> None:
        with dense_biases.attached(model, site_map):
            logits = model(ids).logits  # [B, T, V]
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
        optimizer_step(loss, dense_biases, dense_opt)

    def teacher() -> None:
        dense_logprobs(model, ids)

    return {
        "dense": dense,
        "spon": lambda: student(dense_logprobs(model, ids)),
        "spon-cached": lambda: student(cached),
        "spon-cached-2026-12-03": lambda: student(cached, kl=autograd_kl),
        "spon-bf16": lambda: student(dense_logprobs(model, ids), "bf16"),
        "spon-cached-bf16": lambda: student(cached, "bf16"),
        "spon-cached-autocast": lambda: student(cached, "autocast"),
        "teacher": teacher,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--large", action="store_true", help="Use the random-init larger Llama.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--bias-modules", default="all", help="'all' or comma list, e.g. o_proj,down_proj"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="0: one per available core")
    parser.add_argument("--name", default="train_step", help="Result: bench/results/<name>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = fix_threads(args.threads)
    modules = PROJECTIONS if args.bias_modules == "all" else tuple(args.bias_modules.split(","))
    model = large_llama() if args.large else load_default(args.model)
    name = "llama-1024x8 (random)" if args.large else str(args.model)
    site_map = discover_sites(model)
    vocab = model.config.vocab_size
    calib = token_blocks(vocab, 2, args.length, seed=1, real=not args.large)
    ids = token_blocks(vocab, args.batch, args.length, seed=2, real=not args.large, skip=2)
    thresholds = calibrate_thresholds(model, site_map, calib, [args.sparsity])[args.sparsity]
    spec = SparsifySpec("teal", args.sparsity, tuple(site_map.sites), thresholds)
    steps = make_steps(model, site_map, spec, ids, modules)
    print(f"timing {len(steps)} variants x {args.repeats} runs on {tuple(ids.shape)}")
    timings = interleaved(
        {k: (no_setup, fn) for k, fn in steps.items()}, repeats=args.repeats, warmup=args.warmup
    )
    dense = timings["dense"]
    rows = []
    for key, timing in timings.items():
        ratio = paired_ratio(timing, dense)
        rows.append(
            {
                "model": name,
                "variant": key,
                "median_s": timing.median,
                "tokens_per_s": ids.numel() / timing.median,
                "ratio": ratio,
                "ratio_of_medians": timing.median / dense.median,
                "ok": ratio <= TARGET if key == "spon" else None,
                "speedup": (
                    paired_ratio(timings[key.rsplit("-", 1)[0]], timing)
                    if key.endswith(("-bf16", "-autocast")) else None
                ),
                "vs_before": (
                    paired_ratio(timings["spon-cached-2026-12-03"], timing)
                    if key.startswith("spon-cached") else None
                ),
            }
        )  # fmt: skip
    columns = [
        "model",
        "variant",
        "median_s",
        "tokens_per_s",
        "ratio",
        "speedup",
        "vs_before",
        "ok",
    ]
    print_table(rows, columns)
    save_result(
        args.name,
        {
            "what": "SPON training step vs dense forward+backward (same frozen weights and bias "
            "set, CE loss, no teacher), fp32, CPU; -bf16: student under bf16 autocast",
            "settings": {**vars(args), "model": name, "threads": threads},
            "bias_sites": sum(1 for s in site_map.sites if s.module in modules),
            "sparsified_sites": len(spec.sites),
            "target": {"spon_ratio_max": TARGET},
            "rows": rows,
            "timings": {k: t.summary() for k, t in timings.items()},
        },
    )


if __name__ == "__main__":
    main()
