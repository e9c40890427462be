"""Where the pipeline keeps its outputs: the paths ``dvc.yaml`` uses, for stages and notebooks.

One place for the conventions, so a stage, a test and a notebook user reading a finished run's
cells (:mod:`sponlab.results`) agree on them.
"""

from __future__ import annotations

from pathlib import Path

THRESHOLDS = Path("models/thresholds")  # s<sparsity>/<set>.safetensors
SPON = Path("models/spon")  # <config>/s<sparsity>/seed<k>/{biases.safetensors,train.json,...}
BASELINES = Path("data/baseline")  # s<sparsity>/<set>.json (TEAL-only, shared by the cells)
EVALS = Path("metrics/eval")  # <config>/s<sparsity>/{metrics.json,shift.csv,sparsity.csv}


def threshold_path(root: Path, sparsity: float, sparsified: str) -> Path:
    """The calibrate stage's file for one sparsity and sparsified set:
    ``root/s0.5/all.safetensors``."""
    return Path(root) / f"s{sparsity:g}" / f"{sparsified}.safetensors"


def baseline_path(root: Path, sparsity: float, sparsified: str) -> Path:
    """The baseline stage's TEAL-only metrics of one sparsity and set: ``root/s0.5/all.json``."""
    return Path(root) / f"s{sparsity:g}" / f"{sparsified}.json"


def cell_path(root: Path, config: str, sparsity: float) -> Path:
    """Per-cell location under ``root``: ``root/CONFIG/s0.5`` (dvc.yaml's matrix paths)."""
    return Path(root) / config / f"s{sparsity:g}"


def seed_path(cell: Path, seed: int) -> Path:
    """One training seed's folder inside a train cell: ``cell/seed0``."""
    return Path(cell) / f"seed{seed}"
