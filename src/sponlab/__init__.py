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
    "load_model": "sponlab.model.loading",
    "LoadedModel": "sponlab.model.loading",
    "discover_sites": "sponlab.model.sites",
    "Site": "sponlab.model.sites",
    "SiteMap": "sponlab.model.sites",
    "LayerSelection": "sponlab.model.sites",
    "PROJECTIONS": "sponlab.model.sites",
    # text
    "load_corpus": "sponlab.io.data",
    "make_blocks": "sponlab.io.data",
    "BlockSpec": "sponlab.io.data",
    # sparsification
    "SparsifySpec": "sponlab.method.sparsify",
    "sparsified": "sponlab.method.sparsify",
    "SparsityStats": "sponlab.method.sparsify",
    "calibrate_thresholds": "sponlab.method.sparsify",
    "calibrate_sequential": "sponlab.method.calibration",
    # allocations and biases
    "AllocationConfig": "sponlab.allocations",
    "allocation": "sponlab.method.experiment",
    "bias_sites": "sponlab.method.experiment",
    "sparsify_spec": "sponlab.method.experiment",
    "SponBiases": "sponlab.method.spon",
    "fold_into_model": "sponlab.method.spon",
    "save_biases": "sponlab.method.spon",
    "load_biases": "sponlab.method.spon",
    "closed_form_biases": "sponlab.method.closed_form",
    "TrainParams": "sponlab.config",
    "train_spon": "sponlab.method.train",
    # evaluation
    "evaluate_variant": "sponlab.method.evaluate",
    "damage_recovered": "sponlab.method.evaluate",
    # batch-1 sparse decoding on CPU (compiled kernel)
    "SparseGemv": "sponlab.tools.sparse_gemv",
    "transposed_group": "sponlab.tools.sparse_gemv",
    # a finished run
    "load_params": "sponlab.config",
    "load_cell": "sponlab.sweep.results",
    "load_summary": "sponlab.sweep.results",
    "Cell": "sponlab.sweep.results",
    # tiny random-init models for experiments and tests
    "tiny_model": "sponlab.model.tiny",
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
    from sponlab.config import TrainParams, load_params
    from sponlab.io.data import BlockSpec, load_corpus, make_blocks
    from sponlab.method.calibration import calibrate_sequential
    from sponlab.method.closed_form import closed_form_biases
    from sponlab.method.evaluate import damage_recovered, evaluate_variant
    from sponlab.method.experiment import allocation, bias_sites, sparsify_spec
    from sponlab.method.sparsify import (
        SparsifySpec,
        SparsityStats,
        calibrate_thresholds,
        sparsified,
    )
    from sponlab.method.spon import SponBiases, fold_into_model, load_biases, save_biases
    from sponlab.method.train import train_spon
    from sponlab.model.loading import LoadedModel, load_model
    from sponlab.model.sites import PROJECTIONS, LayerSelection, Site, SiteMap, discover_sites
    from sponlab.model.tiny import tiny_model
    from sponlab.sweep.results import Cell, load_cell, load_summary
    from sponlab.tools.sparse_gemv import SparseGemv, transposed_group
