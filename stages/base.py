"""Export the base model (offline SmolLM2 or a hub/local model) to a save_pretrained directory."""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.models import export_default_model, export_hub_model
from sponlab.stages.common import PARAMS_OPTION, read_params, replace_dir, timed


def main(
    params: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("models/base"), "--out", help="Output model directory."),
) -> None:
    cfg = read_params(params).base
    with timed(f"export base model ({cfg.source}: {cfg.name})"), replace_dir(out) as tmp:
        if cfg.source == "smollm2":
            export_default_model(tmp)
        else:
            export_hub_model(cfg.name, tmp)
