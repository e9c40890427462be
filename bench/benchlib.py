"""Shared helpers of the benchmark scripts: interleaved timing, models, blocks, tables, JSON.

Scripts in ``bench/`` import this file as a sibling module (run them as ``python bench/<x>.py``
from the repository root). Nothing here is part of the ``sponlab`` package or its tests.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sponlab.io.tensorio import load_tensors, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL = ROOT / "models" / "base"
CALIB_BLOCKS = ROOT / "data" / "blocks" / "calib.safetensors"

# A larger Llama than the 135M default (~160M parameters, 8 wide layers), random init, no download.
LARGE_LLAMA = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Timing:
    """Seconds of the repeated runs of one variant (warm-up excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "median_s": round(self.median, 5),
            "min_s": round(min(self.seconds), 5),
            "max_s": round(max(self.seconds), 5),
            "runs": [round(s, 5) for s in self.seconds],
        }


def paired_ratio(timing: Timing, base: Timing) -> float:
    """Median over rounds of ``timing / base`` within the same round.

    Robust to slow phases of a shared machine: both runs of a round see about the same load.
    """
    return statistics.median(t / b for t, b in zip(timing.seconds, base.seconds, strict=True))


Setup = Callable[[], AbstractContextManager[Any]]


def interleaved(
    variants: Mapping[str, tuple[Setup, Callable[[], Any]]], repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time every variant ``repeats`` times, interleaved round-robin after ``warmup`` rounds.

    Each variant is ``(setup, run)``: ``setup()`` returns a context manager entered outside the
    timed region (e.g. installing hooks), ``run()`` is what is timed. Interleaving spreads machine
    noise (other processes, thermal state) evenly over the variants, so their ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        names = list(variants)
        shift = round_index % len(names)  # rotate the order: no variant always runs first
        for name in names[shift:] + names[:shift]:
            setup, run = variants[name]
            with setup():
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: Timing(tuple(values)) for name, values in times.items()}


def no_setup() -> AbstractContextManager[None]:
    return nullcontext()


def fix_threads(threads: int) -> int:
    """Pin intra-op threads (0: one per available core) and return the number used."""
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:  # a copy of the tree without git (a lent GPU machine) records no commit
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def large_llama(seed: int = 0) -> nn.Module:
    """The random-init larger Llama (``LARGE_LLAMA``), fp32, eval mode, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sponlab.model.loading import freeze

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LARGE_LLAMA)).eval()
    freeze(model)
    return model


def load_default(path: Path) -> nn.Module:
    """The real default model (``models/base``) on CPU in fp32, frozen."""
    from sponlab.model.loading import load_model

    if not (path / "config.json").is_file():
        raise SystemExit(f"no model at {path}: run `sponlab base` (or `dvc repro base`) first")
    return load_model(path, device="cpu", dtype="float32").model


def token_blocks(
    vocab: int, batch: int, length: int, seed: int, real: bool, skip: int = 0
) -> torch.Tensor:
    """[batch, length] ids: real calibration text (after ``skip`` blocks) when ``real`` and
    available, else random ids."""
    if real and CALIB_BLOCKS.is_file():
        ids = load_tensors(CALIB_BLOCKS)[0]["input_ids"]
        if len(ids) >= skip + batch and ids.shape[1] >= length and int(ids.max()) < vocab:
            return ids[skip : skip + batch, :length].clone()
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """A compact fixed-width table on stdout."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return "" if value is None else str(value)

    text = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def save_result(name: str, payload: Mapping[str, Any], out_dir: Path = RESULTS) -> Path:
    """Write ``<out_dir>/<name>.json`` (atomic) with the machine description added."""
    path = out_dir / f"{name}.json"
    write_json(path, {"benchmark": name, "machine": machine(), **payload})
    print(f"wrote {path}")
    return path


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
