"""Peak memory per stage computed from shapes: the model's device and the host, for any model.

The terms are the tensors today's code holds at each stage's peak (read from the code, named in
``TERMS``): the weights, the largest activations of one batch, the logits and their fp32 copies,
the dense-teacher cache of training (host, ``train.teacher_cache``), the calibration samples of
exact quantiles (host) and the dense reference of the detail blocks. ``--check`` compares the
estimate of one train and one evaluate cell of the default model with their measured peak RSS
(bench/memory.py runs them; on CPU device and host are the same memory), so the model is
checked where it can be, then applied to Llama-3.2-1B and Llama-3.1-8B at 128 and 2048 tokens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from typing import Any

from benchlib import RESULTS, print_table, save_result

GIB = 2**30


@dataclass(frozen=True)
class Shapes:
    """A decoder-only Llama-style model: what sets its memory."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + embed + self.hidden


MODELS = {
    "default": Shapes("SmolLM2-135M (default)", 30, 576, 1536, 9, 3, 49152, True),
    "llama-1b": Shapes("Llama-3.2-1B", 16, 2048, 8192, 32, 8, 128256, True),
    "llama-8b": Shapes("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),
}


@dataclass(frozen=True)
class Workload:
    """The params that size a run (params.yaml names)."""

    tokens: int = 128  # data.block_len
    calib: int = 64  # data.calib_blocks
    train: int = 256  # train.blocks: the training blocks of one seed (a draw from the pool)
    val: int = 32  # data.val_blocks
    detail: int = 16  # eval.detail_blocks
    train_batch: int = 4  # train.batch_size
    eval_batch: int = 8  # eval.batch_size
    weight_bytes: int = 4  # 4: float32, 2: bfloat16
    teacher_cache: bool = True  # train.teacher_cache
    teacher_cache_gib: float = 8.0  # train.teacher_cache_gib: kept training targets up to this
    teacher_topk: int = 0  # train.teacher_topk (0: full distribution)
    kl_chunk: int = 0  # train.kl_chunk (0: the whole batch at once)
    exact_quantile: bool = True  # sparsify.threshold: quantile (False: histogram)


def stage_terms(m: Shapes, w: Workload) -> dict[str, dict[str, dict[str, float]]]:
    """stage -> {"device" | "host": {term: bytes}} at the stage's peak."""
    t, wb = w.tokens, w.weight_bytes
    weights = m.parameters * wb
    # autograd keeps per layer about 10 hidden-wide and 4 intermediate-wide tensors per token
    saved = m.layers * w.train_batch * t * (10 * m.hidden + 4 * m.intermediate) * wb
    hidden_states = (m.layers + 1) * w.eval_batch * t * m.hidden * (wb + 4)  # HF tuple + fp32 stack
    # the dense stage copies one layer at a time into its preallocated host reference
    dense_hidden = (
        m.layers + 1
    ) * w.eval_batch * t * m.hidden * wb + w.eval_batch * t * m.hidden * 4
    eval_logits = w.eval_batch * t * m.vocab * wb + t * m.vocab * 4  # logits + one fp32 row
    # detail KL, one block at a time in chunks of <= 512 tokens: reference and logits in fp32,
    # log-softmax, and kl_div's exp(target), difference and product: six [<=512, V] fp32 tensors
    detail_kl = 6 * min(t, 512) * m.vocab * 4
    reference = w.detail * t * (m.vocab * 2 + (m.layers + 1) * m.hidden * 4)  # fp16 logp, hidden
    per_token = w.teacher_topk * 12 + 4 if w.teacher_topk else m.vocab * 4  # target bytes
    kl_tokens = min(w.kl_chunk or w.train_batch * t, w.train_batch * t)  # tokens per KL piece
    # logits (model dtype) of the whole batch unless chunked; per KL piece the fp32 copy, logp,
    # KL and gradient [tokens, V]; the batch's teacher targets on the device
    train_logits = (
        (0 if w.kl_chunk else w.train_batch * t * m.vocab * wb)
        + kl_tokens * m.vocab * 4 * 4
        + w.train_batch * t * per_token
    )
    samples = w.calib * t * m.intermediate * 4 * (3 if w.exact_quantile else 0)  # |x|, cat, sort
    # sponlab.method.teachers.cache_plan: validation targets first, then the training set, within
    # the cap; what does not fit is recomputed when needed
    budget, val_bytes, train_bytes = (
        w.teacher_cache_gib * 2**30,
        w.val * t * per_token,
        w.train * t * per_token,
    )
    keep_val = val_bytes <= budget
    keep_train = w.teacher_cache and train_bytes + (val_bytes if keep_val else 0) <= budget
    teacher = (train_bytes if keep_train else 0) + (val_bytes if keep_val else 0)
    layer_inputs = 2 * w.calib * t * m.hidden * wb  # recorded layer inputs, in and out
    one_layer = w.eval_batch * t * 4 * m.intermediate * wb
    return {
        "calibrate": {
            "device": {"weights": weights, "layer inputs": layer_inputs, "one layer": one_layer},
            "host": {"|x| samples": samples},
        },
        "dense": {
            "device": {"weights": weights, "logits": eval_logits, "hidden states": dense_hidden},
            "host": {"dense reference": reference},
        },
        "train": {
            "device": {"weights": weights, "logits + KL": train_logits, "autograd": saved},
            "host": {"teacher cache": teacher},
        },
        "evaluate": {
            "device": {
                "weights": weights,
                "logits": eval_logits,
                "detail KL": detail_kl,
                "hidden states": hidden_states,
            },
            "host": {"dense reference": reference},
        },
    }


def table(models: dict[str, Shapes], workloads: dict[str, Workload]) -> list[dict[str, Any]]:
    """One row per (model, workload, stage): device and host peak in GiB, the largest term."""
    rows = []
    for m in models.values():
        for label, w in workloads.items():
            for stage, parts in stage_terms(m, w).items():
                terms = {**parts["device"], **parts["host"]}
                rows.append({
                    "model": m.name, "workload": label, "stage": stage,
                    "device_gib": round(sum(parts["device"].values()) / GIB, 2),
                    "host_gib": round(sum(parts["host"].values()) / GIB, 2),
                    "largest": max(terms, key=terms.get),
                })  # fmt: skip
    return rows


def workloads(weight_bytes: int) -> dict[str, Workload]:
    """The default workload, and the SPON study's (2048 training samples) at 128 / 2048 tokens."""
    study = Workload(train=2048, val=64, weight_bytes=weight_bytes, exact_quantile=False)
    return {
        "default params": Workload(weight_bytes=weight_bytes),
        "study, 128 tok": study,
        "study, 2048 tok": replace(study, tokens=2048, calib=16),
        "study, 2048 tok, no teacher cache": replace(
            study, tokens=2048, calib=16, teacher_cache=False
        ),
        # README "A real model on a GPU": top-64 teacher, KL 1024 tokens at a time, smaller batches
        "study, 2048 tok, bounded": replace(
            study,
            tokens=2048,
            calib=16,
            teacher_topk=64,
            kl_chunk=1024,
            train_batch=2,
            eval_batch=2,
            detail=4,
        ),
        "study, 128 tok, bounded": replace(study, teacher_topk=64, kl_chunk=1024),
    }


def check(measured_path: str) -> list[dict[str, Any]]:
    """Estimate vs measured peak RSS of bench/memory.py's train and evaluate rows (CPU, fp32)."""
    with open(measured_path) as handle:
        rows = json.load(handle)["rows"]
    overhead = 0.45 * GIB  # Python, torch, transformers and the tokenizer, loaded
    terms = stage_terms(MODELS["default"], Workload())
    out = []
    for row in rows:
        parts = terms[row["stage"]]
        estimate = (sum(parts["device"].values()) + sum(parts["host"].values()) + overhead) / GIB
        measured = row["max_rss_mib"] / 1024
        out.append({"stage": row["stage"], "estimate_gib": round(estimate, 2),
                    "measured_gib": round(measured, 2), "ratio": round(estimate / measured, 2)})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", default=str(RESULTS / "memory.json"),
                        help="bench/memory.py result to check the default model against")  # fmt: skip
    parser.add_argument("--name", default="memory_model")
    args = parser.parse_args()
    rows = table({"default": MODELS["default"]}, {"default params": Workload()})
    rows += table({k: MODELS[k] for k in ("llama-1b", "llama-8b")}, workloads(2))
    print_table(rows, ["model", "workload", "stage", "device_gib", "host_gib", "largest"])
    checked = []
    try:
        checked = check(args.check)
        print_table(checked, ["stage", "estimate_gib", "measured_gib", "ratio"])
    except FileNotFoundError:
        print(f"no measured peaks at {args.check}: run bench/memory.py first to check the model")
    save_result(args.name, {"what": "peak memory per stage from shapes", "rows": rows,
                            "check": checked})  # fmt: skip


if __name__ == "__main__":
    main()
