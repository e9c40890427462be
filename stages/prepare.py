"""Tokenise the corpus into disjoint calib/train/val/test token blocks (test: per eval.protocol)."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.data import (
    SPLITS,
    BlockSpec,
    joined_test_text,
    load_corpus,
    make_blocks,
    text_windows,
    wants_bos,
)
from sponlab.io.layout import BLOCKS
from sponlab.io.tensorio import save_tensors
from sponlab.model.loading import load_tokenizer
from sponlab.stages.common import MODEL_OPTION, PARAMS_OPTION, read_params, timed


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    out: Path = typer.Option(BLOCKS, "--out", help="Folder for <split>.safetensors."),
) -> None:
    params = read_params(params_file)
    settings = params.data
    tokenizer = load_tokenizer(model)
    bos = wants_bos(tokenizer, settings.bos)
    counts = {
        "calib": settings.calib_blocks,
        "train": settings.train_blocks,
        "val": settings.val_blocks,
        "test": settings.test_blocks,
    }
    with timed(f"load corpus {settings.source}"):
        corpus = load_corpus(settings.source, settings.seed)
    protocol = params.eval.resolved_protocol(settings.source)  # decides what the test file holds
    for offset, split in enumerate(SPLITS):
        spec = BlockSpec(settings.block_len, counts[split], bos, settings.seed + offset)
        meta = {
            "split": split,
            "source": settings.source,
            "block_len": settings.block_len,
            "bos": bos,
            "seed": spec.seed,
            "documents": len(corpus[split]),
            "tokenizer": str(model),
        }
        if split == "test":
            meta["protocol"] = protocol
        if split == "test" and protocol != "block":
            tensors, meta = test_set(params, tokenizer, corpus["test"], protocol, meta)
        else:
            with timed(f"tokenise {split}: {spec.count} x {spec.block_len}"):
                tensors = {"input_ids": make_blocks(corpus[split], tokenizer, spec)}
        save_tensors(out / f"{split}.safetensors", tensors, meta)


def test_set(params, tokenizer, docs: list[str], protocol: str, meta: dict) -> tuple[dict, dict]:
    """Protocol A (gptq) / B (sliding) windows over the whole test text instead of blocks."""
    ev = params.eval
    stride = ev.context if protocol == "gptq" else ev.stride
    with timed(f"tokenise the test text: {protocol} windows of {ev.context}, stride {stride}"):
        windows = text_windows(
            joined_test_text(params.data.source, docs),
            tokenizer,
            ev.context,
            stride,
            ev.max_windows,
        )
    meta = {**meta, "block_len": ev.context, "context": ev.context, "stride": stride,
            "windows": len(windows.ids), "scored_tokens": windows.scored_tokens, "bos": "text"}  # fmt: skip
    return {"input_ids": windows.ids, "score_from": windows.score_from}, meta
