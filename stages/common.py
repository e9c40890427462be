"""Shared option types and helpers for the stage entries (kept tiny: stages stay thin)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from sponlab.config import Params, load_params
from sponlab.io.layout import BASE, SPON, THRESHOLDS

log = logging.getLogger("sponlab.stages")

PARAMS_OPTION = typer.Option(
    Path("params.yaml"), "--params", help="Parameters file (validated first)."
)
MODEL_OPTION = typer.Option(BASE, "--model", help="Base model directory (stage base).")
THRESHOLDS_OPTION = typer.Option(
    THRESHOLDS, "--thresholds", help="Root of s<s>/<set>.safetensors (calibrate)."
)
SPON_OPTION = typer.Option(SPON, "--spon", help="Root of the train cells: CONFIG/s<s>/seed<k>/.")


def read_params(path: Path) -> Params:
    """Load and validate params (a ConfigError ends the CLI with a one-line message)."""
    return load_params(path)


@contextmanager
def timed(what: str) -> Iterator[None]:
    """Log how long ``what`` took."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s done in %.1fs", what, time.perf_counter() - start)


def load_base(params: Params, model_dir: Path):
    """Load the base model once per process, frozen, with its discovered sites."""
    from sponlab.model.loading import load_model
    from sponlab.model.sites import discover_sites

    base = params.base
    loaded = load_model(model_dir, base.device, base.dtype, base.device_map)
    return loaded, discover_sites(loaded.model)


def _read_blocks(path: Path):
    """A prepare stage token file: its tensors (with ``input_ids``) and metadata."""
    from sponlab.io.tensorio import input_error, load_tensors

    tensors, meta = load_tensors(path, producer="prepare")
    if "input_ids" not in tensors:
        raise input_error(path, f"holds {sorted(tensors)}, not token blocks", "prepare")
    return tensors, meta


def load_blocks(path: Path):
    """Token blocks [N, L] written by the prepare stage."""
    return _read_blocks(path)[0]["input_ids"]


def load_test_set(path: Path, sparsify):
    """Test token windows [N, T] with their first scored positions [N] (None: blocks, every
    predicted token scored) and the protocol description metrics state next to a perplexity."""
    from sponlab.io.data import describe_protocol

    tensors, meta = _read_blocks(path)
    ids = tensors["input_ids"]
    return ids, tensors.get("score_from"), describe_protocol(meta, ids, sparsify)
