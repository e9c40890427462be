"""Tokenise the corpus into disjoint calib/train/val/test token blocks (safetensors)."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.data import SPLITS, BlockSpec, load_corpus, make_blocks, wants_bos
from sponlab.models import load_tokenizer
from sponlab.stages.common import MODEL_OPTION, PARAMS_OPTION, read_params, timed
from sponlab.tensorio import save_tensors


def main(
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    out: Path = typer.Option(Path("data/blocks"), "--out", help="Folder for <split>.safetensors."),
) -> None:
    cfg = read_params(params).data
    tokenizer = load_tokenizer(model)
    bos = wants_bos(tokenizer, cfg.bos)
    counts = {
        "calib": cfg.calib_blocks,
        "train": cfg.train_blocks,
        "val": cfg.val_blocks,
        "test": cfg.test_blocks,
    }
    with timed(f"load corpus {cfg.source}"):
        corpus = load_corpus(cfg.source, cfg.seed)
    for offset, split in enumerate(SPLITS):
        spec = BlockSpec(cfg.block_len, counts[split], bos, cfg.seed + offset)
        with timed(f"tokenise {split}: {spec.count} x {spec.block_len}"):
            blocks = make_blocks(corpus[split], tokenizer, spec)
        meta = {
            "split": split,
            "source": cfg.source,
            "block_len": cfg.block_len,
            "bos": bos,
            "seed": spec.seed,
            "documents": len(corpus[split]),
            "tokenizer": str(model),
        }
        save_tensors(out / f"{split}.safetensors", {"input_ids": blocks}, meta)
