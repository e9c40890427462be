"""Run the dense model once over the training pool and the validation blocks and store its final
hidden states, so every train cell and seed gets its KL targets from the LM head alone.

The states are the decoder's output ``[T, D]`` per block (the LM head's input) in the model's
dtype, computed in batches of ``train.batch_size`` (the shape the training step uses, so a cell's
targets are bit-identical to running the dense model itself), in parts of 64 blocks:
``models/teacher/{train,val}-<part>.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.layout import BLOCKS, TEACHER
from sponlab.io.tensorio import replace_dir
from sponlab.method.teachers import write_hidden
from sponlab.model.loading import dtype_name
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    load_base,
    load_blocks,
    read_params,
    timed,
)


def main(
    params_file: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    data: Path = typer.Option(BLOCKS, "--data", help="Folder with train/val blocks (prepare)."),
    out: Path = typer.Option(TEACHER, "--out", help="Folder for the hidden-state files."),
) -> None:
    params = read_params(params_file)
    loaded, _ = load_base(params, model)
    meta = {
        "model": str(model),
        "model_fingerprint": loaded.fingerprint,
        "dtype": dtype_name(loaded.dtype),
    }
    with replace_dir(out) as tmp:
        for split in ("train", "val"):
            blocks = load_blocks(data / f"{split}.safetensors")
            with timed(f"teacher hidden states of {split} {tuple(blocks.shape)}"):
                write_hidden(tmp, split, loaded.model, blocks, params.train.batch_size, meta)
