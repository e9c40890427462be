"""Batch-1 decode speed of the projections with a sparse GEMV that skips zeroed inputs, vs dense.

A micro-benchmark over the model's real weights (``models/base``; ``--large``: the random-init
larger Llama): one "token" is one GEMV through every projection of every layer (q/k/v share one
input and its nonzero index, gate/up another) plus the dense ``lm_head``; attention over the
context, norms and activations are left out (they do not change with sparsity). Inputs are random
vectors with exactly ``s`` of their entries zeroed, for s in 0/25/50/70%. Kernels:

* ``dense``: ``F.linear(x, W)`` with the usual row-major ``W`` [out, in].
* ``gather``: ``x[nz] @ Wt[nz]`` with ``Wt = W.T`` stored contiguous [in, out]: copies the k rows of
  the nonzero inputs (advanced indexing; ``index_select`` was ~40x slower with 2 threads on
  the shared benchmark machine), then a smaller GEMV.
* ``bag``: ``F.embedding_bag(nz, Wt, per_sample_weights=x[nz], mode='sum')``: sums the k rows of
  ``Wt`` scaled by ``x[nz]`` in one pass, without materialising them (what TEAL's GEMV kernel does).

Finding ``nz`` (``nonzero``) is included in the sparse kernels' time. Reported: tokens/s (median
over ``--repeats`` interleaved passes) and speed-up vs dense (median over rounds of dense / kernel
within the same round). Memory-bound GEMV time is roughly
proportional to the weight bytes read, so the ideal speed-up at sparsity s is about 1 / (1 - s)
on the sparsified projections (the dense ``lm_head`` caps the end-to-end gain).
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

from sponlab.sites import INPUT_GROUP, discover_sites

SPARSITIES = (0.0, 0.25, 0.5, 0.7)
KERNELS = ("dense", "gather", "bag")


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


def check_kernels(weight: torch.Tensor, sparsity: float = 0.5) -> None:
    """The sparse kernels must give the dense result (up to float summation order)."""
    x = sparse_input(weight.shape[1], sparsity, torch.Generator().manual_seed(0))
    wt = weight.t().contiguous()
    nz = x.nonzero().squeeze(1)
    dense = F.linear(x[None], weight)[0]
    gather = x[nz] @ wt[nz]
    bag = F.embedding_bag(nz[None], wt, per_sample_weights=x[nz][None], mode="sum")[0]
    for name, out in (("gather", gather), ("bag", bag)):
        if not torch.allclose(out, dense, rtol=1e-4, atol=1e-4):
            raise AssertionError(f"{name} kernel disagrees with dense GEMV")


def make_token(
    kernel: str, layers, transposed, head: torch.Tensor, sparsity: float, seed: int
) -> Callable[[], None]:
    """One token's worth of GEMVs with ``kernel`` at ``sparsity``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        {g: sparse_input(ws[0].shape[1], sparsity, generator) for g, ws in layer.items()}
        for layer in layers
    ]
    hidden = torch.randn(1, head.shape[1], generator=generator)

    def token() -> None:
        with torch.no_grad():
            for index, layer in enumerate(layers):
                for group, weights in layer.items():
                    x = inputs[index][group]  # [D]
                    if kernel == "dense":
                        for w in weights:
                            F.linear(x[None], w)  # [1, out]
                        continue
                    nz = x.nonzero().squeeze(1)  # [k]
                    values = x[nz]  # [k]
                    for wt in transposed[index][group]:  # [D, out]
                        if kernel == "gather":
                            values @ wt[nz]  # [k, out] copied, then [out]
                        else:
                            F.embedding_bag(
                                nz[None], wt, per_sample_weights=values[None], mode="sum"
                            )
            F.linear(hidden, head)  # [1, V], dense in every variant

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
    layers = layer_weights(model)
    check_kernels(layers[0]["down"][0])
    transposed = [{g: [w.t().contiguous() for w in ws] for g, ws in lay.items()} for lay in layers]
    head = model.get_output_embeddings().weight.detach()  # [V, D]
    variants = {"dense": (no_setup, make_token("dense", layers, transposed, head, 0.0, 0))}
    for kernel in KERNELS[1:]:
        for s in SPARSITIES:
            token = make_token(kernel, layers, transposed, head, s, 0)
            variants[f"{kernel}@{s:g}"] = (no_setup, token)
    print(f"timing {len(variants)} variants x {args.repeats} tokens")
    timings = interleaved(variants, repeats=args.repeats, warmup=args.warmup)
    dense = timings["dense"]
    rows = []
    for key, timing in timings.items():
        kernel, _, s = key.partition("@")
        rows.append(
            {
                "kernel": kernel,
                "sparsity": float(s or 0),
                "ms_per_token": 1000 * timing.median,
                "tokens_per_s": 1 / timing.median,
                "speedup": 1 / paired_ratio(timing, dense),
                "ideal_proj": None if kernel == "dense" else 1 / (1 - float(s)),
            }
        )
    print_table(
        rows, ["kernel", "sparsity", "ms_per_token", "tokens_per_s", "speedup", "ideal_proj"]
    )
    save_result(
        args.name,
        {
            "what": "batch-1 projection GEMVs per token (+ dense lm_head), sparse kernels vs dense",
            "settings": {**vars(args), "model": name, "threads": threads},
            "rows": rows,
            "timings": {k: t.summary() for k, t in timings.items()},
        },
    )


if __name__ == "__main__":
    main()
