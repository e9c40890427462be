"""The base model: export the offline SmolLM2, or check and pin a hub / local model (no copy)."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.io.layout import BASE
from sponlab.io.tensorio import replace_dir
from sponlab.model.loading import build_base
from sponlab.stages.common import PARAMS_OPTION, read_params, timed


def main(
    params_file: Path = PARAMS_OPTION,
    out: Path = typer.Option(BASE, "--out", help="Output model directory."),
) -> None:
    base = read_params(params_file).base
    with timed(f"base model ({base.source}: {base.name})"), replace_dir(out) as tmp:
        build_base(base, tmp)
