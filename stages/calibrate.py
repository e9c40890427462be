"""Calibrate TEAL thresholds for one sparsity on the calibration blocks (every site of the model).

``sparsify.calibration: sequential`` (default) calibrates each site on its inputs with the
``sparsify.modules`` sites upstream already sparsified, so the target holds when all are applied;
``dense`` calibrates every site on dense activations in one pass.
"""

from __future__ import annotations

from pathlib import Path

import typer

from sponlab.calibration import calibrate_sequential
from sponlab.sparsify import calibrate_thresholds, thresholds_to_tensors
from sponlab.stages.common import (
    MODEL_OPTION,
    PARAMS_OPTION,
    load_base,
    load_blocks,
    read_params,
    threshold_path,
    timed,
)
from sponlab.tensorio import save_tensors


def main(
    sparsity: float = typer.Option(..., "--sparsity", help="Target fraction of zeroed inputs."),
    params: Path = PARAMS_OPTION,
    model: Path = MODEL_OPTION,
    blocks: Path = typer.Option(Path("data/blocks/calib.safetensors"), "--blocks"),
    out: Path = typer.Option(
        None, "--out", help="Default: models/thresholds/s<sparsity>.safetensors"
    ),
) -> None:
    cfg = read_params(params)
    cfg.check_sparsity(sparsity)
    out = out or threshold_path(Path("models/thresholds"), sparsity)
    loaded, site_map = load_base(cfg, model)
    ids = load_blocks(blocks)
    mode, method = cfg.sparsify.calibration, cfg.sparsify.threshold
    with timed(f"calibrate {mode} {method} thresholds at s={sparsity} on {tuple(ids.shape)}"):
        if mode == "sequential":
            applied = site_map.select(list(range(site_map.num_layers)), cfg.sparsify.modules)
            thresholds = calibrate_sequential(
                loaded.model,
                site_map,
                ids,
                sparsity,
                method=method,
                batch_size=cfg.eval.batch_size,
                applied=applied,
            )
        else:
            thresholds = calibrate_thresholds(
                loaded.model,
                site_map,
                ids,
                [sparsity],
                method=method,
                batch_size=cfg.eval.batch_size,
            )[sparsity]
    meta = {
        "sparsity": sparsity,
        "calibration": mode,
        "method": method,
        "model": str(model),
        "model_fingerprint": loaded.fingerprint,
        "calib_tokens": ids.numel(),
    }
    save_tensors(out, thresholds_to_tensors(thresholds), meta)
