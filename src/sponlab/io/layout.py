"""Where the pipeline keeps its outputs: the paths ``dvc.yaml`` uses, for stages and notebooks.

One place for the conventions, so a stage, a test and a notebook user reading a finished run's
cells (:mod:`sponlab.sweep.results`) agree on them.
"""

from __future__ import annotations

from pathlib import Path

BASE = Path("models/base")  # the de-quantised / downloaded base model (stage base)
BLOCKS = Path("data/blocks")  # <split>.safetensors token blocks (stage prepare)
THRESHOLDS = Path("models/thresholds")  # s<sparsity>/<set>.safetensors
SPON = Path("models/spon")  # <config>/s<sparsity>/seed<k>/{biases.safetensors,train.json,...}
DENSE_METRICS = Path("metrics/dense.json")  # dense perplexity and protocol (stage dense)
BASELINES = Path("data/baseline")  # s<sparsity>/<set>.json (TEAL-only, shared by the cells)
EVALS = Path("metrics/eval")  # <config>/s<sparsity>/{metrics.json,shift.csv,sparsity.csv}
TEACHER = Path("models/teacher")  # <split>-<part>.safetensors: dense final hidden states (teacher)
CURVE_VARIANTS = Path("models/learning_curve")  # <config>/s<sparsity>/b<size>/seed<k>/...
ALLOCATIONS = Path("metrics/allocation")  # s<sparsity>/<set>/ per-site sparsity (calibrate)
SUMMARY_CSV = Path("metrics/tables/summary.csv")  # one row per cell (stage summarize)
SUMMARY_MD = Path("metrics/tables/summary.md")
REPORT = Path("metrics/report.md")  # stage report
LMEVAL = Path("metrics/lmeval")  # <config>/s<sparsity>/<variant>.json (sponlab lmeval)


def block_path(split: str, root: Path = BLOCKS) -> Path:
    """The prepare stage's token blocks of one split: ``data/blocks/test.safetensors``."""
    return Path(root) / f"{split}.safetensors"


def teacher_path(root: Path, split: str, part: int) -> Path:
    """One file of the teacher stage's hidden states of a split: ``root/train-0003.safetensors``."""
    return Path(root) / f"{split}-{part:04d}.safetensors"


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


def curve_variant_path(root: Path, config: str, sparsity: float, size: int, seed: int) -> Path:
    """One learning-curve variant's folder: ``root/CONFIG/s0.5/b64/seed1``."""
    return seed_path(cell_path(root, config, sparsity) / f"b{size}", seed)
