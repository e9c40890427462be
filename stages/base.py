"""The base model: export the offline SmolLM2, or check and pin a hub / local model (no copy)."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.model.loading import build_base
from sponlab.stages.common import PARAMS_OPTION, read_params, replace_dir, timed


def main(
    params: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("models/base"), "--out", help="Output model directory."),
) -> None:
    cfg = read_params(params).base
    with timed(f"base model ({cfg.source}: {cfg.name})"), replace_dir(out) as tmp:
        build_base(cfg, tmp)
