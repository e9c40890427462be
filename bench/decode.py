"""Batch-1 decode speed of the projections with a sparse GEMV that skips zeroed inputs, vs dense.

A micro-benchmark over the model's real weights (``models/base``; ``--large``: the random-init
larger Llama): one "token" is one GEMV through every projection of every layer (q/k/v share one
input and its nonzero index, gate/up another). Attention over the context, norms and activations
are left out (they do not change with sparsity); the dense ``lm_head`` is timed on its own and
reported in ``speedup_with_head`` (ratio of medians with its time added to both sides). Inputs
are random vectors with exactly ``s`` of their entries zeroed, for s in 0/25/50/70%. Kernels:

* ``dense``: ``F.linear(x, W)`` per projection with the usual row-major ``W`` [out, in]: the
  baseline of every ratio.
* ``dense-grouped``: ``F.linear`` once per input group on the concatenated ``W`` (q|k|v, gate|up):
  shows how much of a kernel's gain is only the grouping.
* ``bag``: ``F.embedding_bag(nz, Wt, per_sample_weights=x[nz], mode='sum')`` per projection, with
  ``Wt = W.T`` contiguous [in, out]: sums the k rows of the nonzero inputs without copying them
  (the kernel of earlier versions).
* ``compiled``: ``sponlab.tools.sparse_gemv.SparseGemv`` per input group on the concatenated ``Wt``: a small
  C kernel (compiled on first use) that streams only the nonzero rows, split over the threads.

Finding the nonzero inputs is included in the sparse kernels' time. Reported: tokens/s (median
over ``--repeats`` interleaved passes) and speed-up vs dense (median over rounds of dense / kernel
within the same round). Memory-bound GEMV time is roughly proportional to the weight bytes read,
so the ideal speed-up at sparsity s is 1 / (1 - s) over the sparsified projections.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
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
)
from torch import nn

from sponlab.model.sites import INPUT_GROUP, discover_sites
from sponlab.tools.sparse_gemv import SparseGemv, transposed_group

SPARSITIES = (0.0, 0.25, 0.5, 0.7)
SPARSE_KERNELS = ("bag", "compiled")


def layer_weights(model: nn.Module) -> list[dict[str, list[torch.Tensor]]]:
    """Per layer: TEAL input group -> the weights [out, in] reading that input."""
    site_map = discover_sites(model)
    layers: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(site_map.num_layers)]
    for site in site_map.sites:
        weight = site_map.linear(model, site).weight.detach()
        layers[site.layer].setdefault(INPUT_GROUP[site.module], []).append(weight)
    return layers


def sparse_input(dim: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A random [dim] vector with exactly ``round(sparsity * dim)`` zeros at random places."""
    x = torch.randn(dim, generator=generator)
    x[torch.randperm(dim, generator=generator)[: round(sparsity * dim)]] = 0.0
    return x


class Weights:
    """The layouts each kernel reads, built once outside the timed region."""

    def __init__(self, layers: list[dict[str, list[torch.Tensor]]], threads: int) -> None:
        self.layers = layers
        self.grouped = [{g: torch.cat(ws).contiguous() for g, ws in lay.items()} for lay in layers]
        self.transposed = [
            {g: [w.t().contiguous() for w in ws] for g, ws in lay.items()} for lay in layers
        ]
        self.grouped_t = [{g: transposed_group(ws) for g, ws in lay.items()} for lay in layers]
        widths = {ws[0].shape[1] for lay in layers for ws in lay.values()}
        self.gemv = {d: SparseGemv(d, threads) for d in widths}


def check_kernels(weights: Weights, sparsity: float = 0.5) -> bool:
    """The sparse kernels must give the dense result on the masked input; returns whether the
    compiled kernel (not its fallback) ran."""
    generator = torch.Generator().manual_seed(0)
    for group, ws in weights.layers[0].items():
        x = sparse_input(ws[0].shape[1], sparsity, generator)
        dense = F.linear(x[None], weights.grouped[0][group])[0]
        nz = x.nonzero().squeeze(1)
        bag = torch.cat(
            [
                F.embedding_bag(nz[None], wt, per_sample_weights=x[nz][None], mode="sum")[0]
                for wt in weights.transposed[0][group]
            ]
        )
        compiled = weights.gemv[len(x)](x, weights.grouped_t[0][group])
        for name, out in (("bag", bag), ("compiled", compiled)):
            if not torch.allclose(out, dense, rtol=1e-4, atol=1e-4):
                raise AssertionError(f"{name} kernel disagrees with dense GEMV on {group}")
    return all(g.compiled for g in weights.gemv.values())


def make_token(kernel: str, weights: Weights, sparsity: float, seed: int) -> Callable[[], None]:
    """One token's worth of projection GEMVs with ``kernel`` at ``sparsity``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        {g: sparse_input(ws[0].shape[1], sparsity, generator) for g, ws in layer.items()}
        for layer in weights.layers
    ]

    def token() -> None:
        with torch.no_grad():
            for index, layer in enumerate(weights.layers):
                for group, ws in layer.items():
                    x = inputs[index][group]  # [D]
                    if kernel == "dense":
                        for w in ws:
                            F.linear(x[None], w)  # [1, out]
                    elif kernel == "dense-grouped":
                        F.linear(x[None], weights.grouped[index][group])  # [1, sum out]
                    elif kernel == "compiled":
                        weights.gemv[len(x)](x, weights.grouped_t[index][group])  # [sum out]
                    else:
                        nz = x.nonzero().squeeze(1)  # [k]
                        values = x[nz][None]  # [1, k]
                        for wt in weights.transposed[index][group]:  # [D, out]
                            F.embedding_bag(nz[None], wt, per_sample_weights=values, mode="sum")

    return token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--large", action="store_true", help="Random-init larger Llama shapes.")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: one per available core")
    parser.add_argument("--name", default="decode", help="Result: bench/results/<name>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = fix_threads(args.threads)
    model = large_llama() if args.large else load_default(args.model)
    name = "llama-1024x8 (random)" if args.large else str(args.model)
    weights = Weights(layer_weights(model), threads)
    compiled = check_kernels(weights)
    head = model.get_output_embeddings().weight.detach()  # [V, D]
    hidden = torch.randn(1, head.shape[1])
    variants = {
        "dense": (no_setup, make_token("dense", weights, 0.0, 0)),
        "dense-grouped": (no_setup, make_token("dense-grouped", weights, 0.0, 0)),
        "lm_head": (no_setup, lambda: F.linear(hidden, head)),
    }
    for kernel in SPARSE_KERNELS:
        for s in SPARSITIES:
            variants[f"{kernel}@{s:g}"] = (no_setup, make_token(kernel, weights, s, 0))
    print(f"timing {len(variants)} variants x {args.repeats} tokens (compiled kernel: {compiled})")
    timings = interleaved(variants, repeats=args.repeats, warmup=args.warmup)
    rows = speed_rows(timings)
    columns = ["kernel", "sparsity", "ms_per_token", "speedup", "ideal", "speedup_with_head"]
    print_table(rows, columns)
    save_result(
        args.name,
        {
            "what": "batch-1 projection GEMVs per token, sparse kernels vs dense (lm_head apart)",
            "settings": {**vars(args), "model": name, "threads": threads, "compiled": compiled},
            "rows": rows,
            "timings": {k: t.summary() for k, t in timings.items()},
        },
    )


def speed_rows(timings: dict) -> list[dict]:
    """Per kernel and sparsity: ms/token, paired speed-up vs dense, ideal, and with the head."""
    dense, head = timings["dense"], timings["lm_head"].median
    rows = []
    for key, timing in timings.items():
        if key == "lm_head":
            continue
        kernel, _, s = key.partition("@")
        sparsity = float(s or 0)
        rows.append(
            {
                "kernel": kernel,
                "sparsity": sparsity,
                "ms_per_token": 1000 * timing.median,
                "tokens_per_s": 1 / timing.median,
                "speedup": 1 / paired_ratio(timing, dense),
                "ideal": 1 / (1 - sparsity),
                "speedup_with_head": (dense.median + head) / (timing.median + head),
            }
        )
    return rows


if __name__ == "__main__":
    main()
