"""A finished run's cells, opened by config and sparsity (what a notebook wants after make repro).

>>> from sponlab import load_cell, load_summary
>>> cell = load_cell("UNIF-ALL", 0.5)          # in the repository root after `make repro`
>>> cell.metrics["damage_recovered"]["mean"], cell.biases[0].num_parameters()
>>> load_summary().head()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sponlab.config import Params, load_params
from sponlab.io.layout import (
    EVALS,
    SPON,
    SUMMARY_CSV,
    THRESHOLDS,
    cell_path,
    seed_path,
    threshold_path,
)
from sponlab.io.tensorio import read_json
from sponlab.method.sparsify import load_thresholds
from sponlab.method.spon import SponBiases, load_biases
from sponlab.model.sites import Site


@dataclass
class Cell:
    """One (config, sparsity) cell of a run: thresholds of its set, biases and training record
    per seed, evaluation metrics (TEAL baseline, per-seed TEAL+SPON, mean and spread)."""

    config: str
    sparsity: float
    thresholds: dict[Site, float]
    biases: dict[int, SponBiases]
    training: dict[int, dict[str, Any]]
    metrics: dict[str, Any]
    shift: pd.DataFrame


def load_cell(
    config: str, sparsity: float, root: Path | str = ".", params: Params | None = None
) -> Cell:
    """Open cell ``config`` x ``sparsity`` of the run in ``root`` (its ``params.yaml`` by default).

    Files are checked as the stages check them (a missing or foreign file names the stage that
    writes it); biases stay on the CPU until you move them.
    """
    root = Path(root)
    params = params or load_params(root / "params.yaml")
    alloc = params.config(config)
    params.check_sparsity(sparsity)
    trained = cell_path(root / SPON, config, sparsity)
    evals = cell_path(root / EVALS, config, sparsity)
    thresholds = load_thresholds(threshold_path(root / THRESHOLDS, sparsity, alloc.sparsify))
    biases, training = {}, {}
    for seed in alloc.seeds:
        folder = seed_path(trained, seed)
        biases[seed] = load_biases(folder / "biases.safetensors", sparsity=sparsity)[0]
        training[seed] = read_json(folder / "train.json", "train")
    metrics = read_json(evals / "metrics.json", "evaluate")
    shift = pd.read_csv(evals / "shift.csv")
    return Cell(config, sparsity, thresholds, biases, training, metrics, shift)


def load_summary(root: Path | str = ".") -> pd.DataFrame:
    """The sweep's summary table (``metrics/tables/summary.csv``) as a DataFrame."""
    path = Path(root) / SUMMARY_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not built yet; run `make repro` (stage summarize)")
    return pd.read_csv(path)
