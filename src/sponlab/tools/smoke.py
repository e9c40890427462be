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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from sponlab.config import TrainParams
from sponlab.io.data import stream_windows
from sponlab.method.calibration import calibrate_sequential
from sponlab.method.closed_form import closed_form_biases
from sponlab.method.evaluate import capture_dense, evaluate_variant
from sponlab.method.greedy import greedy_allocation
from sponlab.method.sparsify import SparsifySpec, SparsityStats
from sponlab.method.spon import SponBiases
from sponlab.method.train import train_spon
from sponlab.model.sites import SiteMap, discover_sites


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
def timed_on(device: torch.device, out: dict[str, float | None]) -> Iterator[None]:
    """Wall seconds and (CUDA) peak device MiB of the block, into ``out["seconds"]``, ``out["peak"]``."""
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


class _Smoke:
    """The stages in order; each method runs one and says what it checked."""

    def __init__(self, model, blocks, sparsity, batch_size, site_map) -> None:
        self.model, self.sparsity, self.batch_size = model, sparsity, batch_size
        self.site_map = site_map or discover_sites(model)
        self.device = next(model.parameters()).device
        half = max(len(blocks) // 2, 1)
        self.calib, self.test = blocks[:half], blocks[half:] if len(blocks) > 1 else blocks
        self.down = self.site_map.select(range(self.site_map.num_layers), ["down_proj"])

    def calibrate(self) -> str:
        thresholds = calibrate_sequential(
            self.model, self.site_map, self.calib, self.sparsity, batch_size=self.batch_size
        )
        self.spec = SparsifySpec("teal", self.sparsity, tuple(thresholds), thresholds)
        finite = [t for t in thresholds.values() if math.isfinite(t)]
        return f"{len(finite)} of {len(thresholds)} thresholds finite"

    def greedy(self) -> str:
        targets, path = greedy_allocation(
            self.model, self.site_map, self.calib[:2], self.sparsity, self.site_map.sites, 0.2
        )
        return f"{len(targets)} site sparsities, {len(path)} search steps"

    def dense(self) -> str:
        self.reference = capture_dense(self.model, self.test, self.batch_size)
        logp = self.reference.logp  # kept on the host in fp16 on purpose: it is saved to disk
        if logp.device.type != "cpu" or logp.dtype != torch.float16:
            raise SmokeError(f"dense reference logp is {logp.dtype} on {logp.device}")
        dense = evaluate_variant(self.model, self.site_map, self.test, self.batch_size)
        return _check_finite("dense", {"ppl": dense.ppl})

    def _variant(self, biases=None, stats=None):
        return evaluate_variant(
            self.model, self.site_map, self.test, self.batch_size, self.spec, biases,
            self.reference, stats,
        )  # fmt: skip

    def baseline(self) -> str:
        stats = SparsityStats()
        teal = self._variant(stats=stats)
        first = next(iter(stats.achieved().values()))
        return _check_finite("teal", {"ppl": teal.ppl, "kl": teal.kl, "sparsity": first})

    def closed_form(self) -> str:
        biases = closed_form_biases(
            self.model, self.site_map, self.spec, self.down, self.calib, self.batch_size
        )
        return _check_biases(biases, self.device)

    def train(self) -> str:
        self.biases = SponBiases.for_model(self.model, self.site_map, self.down)
        settings = replace(TrainParams(), epochs=1, batch_size=self.batch_size)
        result = train_spon(
            self.model, self.site_map, self.spec, self.biases, self.calib, self.test, settings
        )
        kl = _check_finite("train", {"val_kl": result.epochs[-1]["val_kl"]})
        return f"{_check_biases(self.biases, self.device)}; {kl}"

    def train_bounded(self) -> str:
        """The memory-bounded KL of large models: top-64 teacher, KL 64 tokens at a time."""
        biases = SponBiases.for_model(self.model, self.site_map, self.down)
        settings = replace(
            TrainParams(), epochs=1, batch_size=self.batch_size, teacher_topk=64, kl_chunk=64
        )
        result = train_spon(
            self.model, self.site_map, self.spec, biases, self.calib, self.test, settings
        )
        kl = _check_finite("train", {"val_kl (top-64)": result.epochs[-1]["val_kl"]})
        return f"{_check_biases(biases, self.device)}; {kl}"

    def evaluate(self) -> str:
        spon = self._variant(biases=self.biases)
        return _check_finite("spon", {"ppl": spon.ppl, "kl": spon.kl})

    def sliding(self) -> str:
        """Protocol B on the test blocks as one stream: the scored-token path of evaluation."""
        stream = self.test.flatten()
        context = self.test.shape[1]
        windows = stream_windows(stream, context, max(context // 4, 1))
        spon = evaluate_variant(
            self.model, self.site_map, windows.ids, self.batch_size, self.spec, self.biases,
            score_from=windows.score_from,
        )  # fmt: skip
        return _check_finite("sliding", {"ppl": spon.ppl, "scored": spon.tokens})


def run_smoke(
    model: nn.Module,
    blocks: torch.Tensor,
    sparsity: float = 0.5,
    batch_size: int = 4,
    site_map: SiteMap | None = None,
) -> list[StageRun]:
    """Run the stages' functions on ``model`` (its device and dtype) with ``blocks`` [N, T]:
    the first half calibrates and trains, the second half is evaluated."""
    smoke = _Smoke(model, blocks, sparsity, batch_size, site_map)
    runs = []
    for name, fn in [
        ("calibrate", smoke.calibrate),
        ("calibrate (greedy)", smoke.greedy),
        ("dense", smoke.dense),
        ("baseline", smoke.baseline),
        ("train (closed form)", smoke.closed_form),
        ("train", smoke.train),
        ("train (top-k, chunked KL)", smoke.train_bounded),
        ("evaluate", smoke.evaluate),
        ("evaluate (sliding windows)", smoke.sliding),
    ]:
        timing: dict[str, float | None] = {}
        with timed_on(smoke.device, timing):
            checked = fn()
        runs.append(StageRun(name, float(timing["seconds"]), timing["peak"], checked))
    return runs
