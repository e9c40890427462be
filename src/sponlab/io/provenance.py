"""What produced a result: package versions, CPU, device, dtype and threads, recorded in every
metrics file.

Nothing run-specific (host name, date, timings) goes in, so two runs in the same environment write
byte-identical metrics and a difference between machines can be traced to what differs. The CPU is
recorded by vendor and model, not only by torch's kernel level: an Intel CPU with AMX and an AMD
one with AVX512-BF16 both report ``AVX512`` yet run other BLAS code paths, so their float results
differ in the last bits (and a hard-threshold pipeline amplifies that, README "Reproducibility").
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sponlab.io.tensorio import write_json

PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "gguf",
    "numpy",
    "dvc",
    "sponlab",
)


def package_version(name: str) -> str | None:
    """Installed version of ``name`` (None when it is not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# CPU features that select other matmul kernels (MKL, oneDNN) at the same torch kernel level.
KERNEL_FLAGS: tuple[str, ...] = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512_fp16")


def cpu_identity(cpuinfo: str | None = None) -> str:
    """``vendor model-name (family F, model M; flags)`` from ``/proc/cpuinfo`` (Linux), else
    :func:`platform.processor` or the machine type: which CPU a float result comes from."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "vendor_id" not in fields:
        return platform.processor() or platform.machine()
    flags = [f for f in KERNEL_FLAGS if f in fields.get("flags", "").split()]
    detail = f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}"
    detail += f"; {' '.join(flags)}" if flags else ""
    return f"{fields['vendor_id']} {fields.get('model name', '')} ({detail})".replace("  ", " ")


def environment(
    device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
) -> dict:
    """Versions, CPU, its kernel level, torch threads and (for stages that run a model) device and dtype."""
    env: dict[str, Any] = {"python": platform.python_version()}
    env.update({name: package_version(name) for name in PACKAGES})
    env["cpu"] = cpu_identity()
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["threads"] = torch.get_num_threads()
    if device is not None:
        env["device"] = str(device)
    if dtype is not None:
        env["dtype"] = str(dtype).removeprefix("torch.")
    return env


def write_metrics(
    path: Path,
    payload: Mapping[str, Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write a metrics JSON atomically with an ``env`` entry from :func:`environment`."""
    return write_json(path, {**payload, "env": environment(device, dtype)})
