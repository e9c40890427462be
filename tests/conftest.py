"""Shared fixtures: tiny random-init models (offline, built from configs)."""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as sponlab sets it, before torch loads

import pytest
import torch

from sponlab.model.sites import discover_sites
from sponlab.model.tiny import tiny_model

torch.set_num_threads(2)


@pytest.fixture
def llama():
    """A 4-layer tiny Llama and its site map."""
    model = tiny_model("llama", seed=0)
    return model, discover_sites(model)


@pytest.fixture
def blocks():
    """Random token blocks [6, 16] over the tiny vocabulary."""
    return torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(1))
