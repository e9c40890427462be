"""sponlab: TEAL activation sparsification and SPON bias compensation, as a library.

The names below are the functions the pipeline's stages call (no second implementation), so a
notebook reproduces a stage step by step::

    from sponlab import (load_model, discover_sites, calibrate_sequential, SparsifySpec,
                         sparsified, allocation, bias_sites, SponBiases, train_spon,
                         evaluate_variant, damage_recovered, load_cell)

Imports are lazy: ``import sponlab`` is instant, each name loads its module on first use.
"""

from __future__ import annotations

import os

# Bit-reproducible BLAS before anything loads torch (MKL reads this once, when it loads): without
# a conditional-numerical-reproducibility mode, MKL's multi-threaded sgemm picks its reduction
# split per call, and 2 of 12 identical processes wrote different TEAL logits (bench/
# determinism.py). AUTO,STRICT keeps the machine's fastest kernels at no measured cost. A user's
# own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models and places in them
    "load_model": "sponlab.models",
    "LoadedModel": "sponlab.models",
    "discover_sites": "sponlab.sites",
    "Site": "sponlab.sites",
    "SiteMap": "sponlab.sites",
    "LayerSelection": "sponlab.sites",
    "PROJECTIONS": "sponlab.sites",
    # text
    "load_corpus": "sponlab.data",
    "make_blocks": "sponlab.data",
    "BlockSpec": "sponlab.data",
    # sparsification
    "SparsifySpec": "sponlab.sparsify",
    "sparsified": "sponlab.sparsify",
    "SparsityStats": "sponlab.sparsify",
    "calibrate_thresholds": "sponlab.sparsify",
    "calibrate_sequential": "sponlab.calibration",
    # allocations and biases
    "AllocationConfig": "sponlab.allocations",
    "allocation": "sponlab.experiment",
    "bias_sites": "sponlab.experiment",
    "sparsify_spec": "sponlab.experiment",
    "SponBiases": "sponlab.spon",
    "fold_into_model": "sponlab.spon",
    "save_biases": "sponlab.spon",
    "load_biases": "sponlab.spon",
    "closed_form_biases": "sponlab.closed_form",
    "TrainParams": "sponlab.config",
    "train_spon": "sponlab.train",
    # evaluation
    "evaluate_variant": "sponlab.evaluate",
    "damage_recovered": "sponlab.evaluate",
    # batch-1 sparse decoding on CPU (compiled kernel)
    "SparseGemv": "sponlab.kernels",
    "transposed_group": "sponlab.kernels",
    # a finished run
    "load_params": "sponlab.config",
    "load_cell": "sponlab.results",
    "load_summary": "sponlab.results",
    "Cell": "sponlab.results",
    # tiny random-init models for experiments and tests
    "tiny_model": "sponlab.tiny",
}

__all__ = [
    "PROJECTIONS",
    "AllocationConfig",
    "BlockSpec",
    "Cell",
    "LayerSelection",
    "LoadedModel",
    "Site",
    "SiteMap",
    "SparseGemv",
    "SparsifySpec",
    "SparsityStats",
    "SponBiases",
    "TrainParams",
    "allocation",
    "bias_sites",
    "calibrate_sequential",
    "calibrate_thresholds",
    "closed_form_biases",
    "damage_recovered",
    "discover_sites",
    "evaluate_variant",
    "fold_into_model",
    "load_biases",
    "load_cell",
    "load_corpus",
    "load_model",
    "load_params",
    "load_summary",
    "make_blocks",
    "save_biases",
    "sparsified",
    "sparsify_spec",
    "tiny_model",
    "train_spon",
    "transposed_group",
]  # the same names as _EXPORTS (a test checks)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sponlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from sponlab.allocations import AllocationConfig
    from sponlab.calibration import calibrate_sequential
    from sponlab.closed_form import closed_form_biases
    from sponlab.config import TrainParams, load_params
    from sponlab.data import BlockSpec, load_corpus, make_blocks
    from sponlab.evaluate import damage_recovered, evaluate_variant
    from sponlab.experiment import allocation, bias_sites, sparsify_spec
    from sponlab.kernels import SparseGemv, transposed_group
    from sponlab.models import LoadedModel, load_model
    from sponlab.results import Cell, load_cell, load_summary
    from sponlab.sites import PROJECTIONS, LayerSelection, Site, SiteMap, discover_sites
    from sponlab.sparsify import SparsifySpec, SparsityStats, calibrate_thresholds, sparsified
    from sponlab.spon import SponBiases, fold_into_model, load_biases, save_biases
    from sponlab.tiny import tiny_model
    from sponlab.train import train_spon
