"""Shared fixtures: tiny random-init models (offline, built from configs)."""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as sponlab sets it, before torch loads

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from sponlab.model.sites import discover_sites
from sponlab.model.tiny import tiny_model

torch.set_num_threads(2)

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def repo_params() -> dict:
    """The repository's params.yaml as a dict: a fresh copy per test, safe to edit."""
    return yaml.safe_load(REPO_PARAMS.read_text())


def write_params(path: Path, raw: dict) -> Path:
    """Write an edited params dict as YAML (the file a stage reads); returns ``path``."""
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_with_sites(arch: str = "llama", **kwargs):
    """``(model, site_map)``: a random-init model built offline from a config (``tiny_model``
    keyword arguments: layers, hidden, seed, vocab, ...) and its sites."""
    model = tiny_model(arch, **kwargs)
    return model, discover_sites(model)


@pytest.fixture
def tiny() -> Callable:
    """Factory fixture: ``tiny(arch="llama", **kwargs) -> (model, site_map)``."""
    return tiny_with_sites


@pytest.fixture
def llama():
    """A 4-layer tiny Llama and its site map."""
    return tiny_with_sites("llama", seed=0)


@pytest.fixture
def blocks():
    """Random token blocks [6, 16] over the tiny vocabulary."""
    return torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(1))
