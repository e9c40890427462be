"""Every pipeline stage's library function once, on any device and dtype, timed and checked.

``run_smoke`` is what ``bench/gpu_smoke.py`` runs on a GPU (bf16) and what the tests run on CPU in
float32 and bfloat16: calibration (sequential and greedy), the dense reference, the TEAL-only
baseline, closed-form and trained biases, and the TEAL+SPON evaluation, each with its wall time
and peak device memory (CUDA) and the checks that hold on every device: the biases and the
statistics are float32, every tensor a function returns lives on the model's device (or is a
CPU copy kept on purpose, like the dense reference), every number is finite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from sponlab.calibration import calibrate_sequential
from sponlab.closed_form import closed_form_biases
from sponlab.config import TrainParams
from sponlab.evaluate import capture_dense, evaluate_variant
from sponlab.greedy import greedy_allocation
from sponlab.sites import SiteMap, discover_sites
from sponlab.sparsify import SparsifySpec, SparsityStats
from sponlab.spon import SponBiases
from sponlab.train import train_spon


@dataclass
class StageRun:
    """One stage's function: seconds, peak device memory (CUDA, MiB) and what it checked."""

    stage: str
    seconds: float
    peak_mib: float | None
    checked: str


class SmokeError(AssertionError):
    """A stage broke a device, dtype or finiteness invariant."""


@contextmanager
def _timed(device: torch.device, out: dict[str, float | None]) -> Iterator[None]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
    out["seconds"] = time.perf_counter() - start
    out["peak"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None


def _check_biases(biases: SponBiases, device: torch.device) -> str:
    for site in biases.sites:
        vector = biases.vector(site)
        if vector.dtype != torch.float32 or vector.device != device:
            raise SmokeError(
                f"bias {site.key}: {vector.dtype} on {vector.device}, not fp32 on {device}"
            )
        if not torch.isfinite(vector).all():
            raise SmokeError(f"bias {site.key} is not finite")
    return f"{len(biases.sites)} fp32 biases on {device}"


def _check_finite(name: str, values: dict[str, float]) -> str:
    bad = {k: v for k, v in values.items() if v is None or not math.isfinite(v)}
    if bad:
        raise SmokeError(f"{name}: non-finite {bad}")
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def run_smoke(
    model: nn.Module,
    blocks: torch.Tensor,
    sparsity: float = 0.5,
    batch_size: int = 4,
    site_map: SiteMap | None = None,
) -> list[StageRun]:
    """Run the stages' functions on ``model`` (its device and dtype) with ``blocks`` [N, T]."""
    site_map = site_map or discover_sites(model)
    device = next(model.parameters()).device
    half = max(len(blocks) // 2, 1)
    calib, test = blocks[:half], blocks[half:] if len(blocks) > 1 else blocks
    runs: list[StageRun] = []
    state: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], str]) -> None:
        timing: dict[str, float | None] = {}
        with _timed(device, timing):
            checked = fn()
        runs.append(StageRun(name, float(timing["seconds"]), timing["peak"], checked))

    def calibrate() -> str:
        thresholds = calibrate_sequential(model, site_map, calib, sparsity, batch_size=batch_size)
        state["spec"] = SparsifySpec("teal", sparsity, tuple(thresholds), thresholds)
        finite = [t for t in thresholds.values() if math.isfinite(t)]
        return f"{len(finite)} of {len(thresholds)} thresholds finite"

    def greedy() -> str:
        targets, path = greedy_allocation(
            model, site_map, calib[:2], sparsity, site_map.sites, 0.2, 0.25, batch_size
        )
        return f"{len(targets)} site sparsities, {len(path)} search steps"

    def dense() -> str:
        state["reference"] = capture_dense(model, test, batch_size)
        ref = state["reference"]
        if ref.logp.device.type != "cpu" or ref.logp.dtype != torch.float16:
            raise SmokeError(f"dense reference logp is {ref.logp.dtype} on {ref.logp.device}")
        dense_metrics = evaluate_variant(model, site_map, test, batch_size)
        return _check_finite("dense", {"ppl": dense_metrics.ppl})

    def baseline() -> str:
        stats = SparsityStats()
        teal = evaluate_variant(
            model, site_map, test, batch_size, state["spec"], None, state["reference"], stats
        )
        achieved = list(stats.achieved().values())
        return _check_finite("teal", {"ppl": teal.ppl, "kl": teal.kl, "sparsity": achieved[0]})

    def closed_form() -> str:
        sites = site_map.select(range(site_map.num_layers), ["down_proj"])
        cf = closed_form_biases(model, site_map, state["spec"], sites, calib, batch_size)
        return _check_biases(cf, device)

    def train() -> str:
        sites = site_map.select(range(site_map.num_layers), ["down_proj"])
        biases = SponBiases.for_model(model, site_map, sites)
        settings = replace(TrainParams(), epochs=1, batch_size=batch_size, lr=1e-3)
        result = train_spon(model, site_map, state["spec"], biases, calib, test, settings)
        state["biases"] = biases
        kl = result.epochs[-1]["val_kl"]
        return _check_biases(biases, device) + "; " + _check_finite("train", {"val_kl": kl})

    def evaluate() -> str:
        spon = evaluate_variant(
            model, site_map, test, batch_size, state["spec"], state["biases"], state["reference"]
        )
        return _check_finite("spon", {"ppl": spon.ppl, "kl": spon.kl})

    for name, fn in [
        ("calibrate", calibrate),
        ("calibrate (greedy)", greedy),
        ("dense", dense),
        ("baseline", baseline),
        ("train (closed form)", closed_form),
        ("train", train),
        ("evaluate", evaluate),
    ]:
        stage(name, fn)
    return runs
