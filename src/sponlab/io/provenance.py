"""What produced a result: package versions, device, dtype and threads, recorded in every metrics file.

Nothing run-specific (host name, date, timings) goes in, so two runs in the same environment write
byte-identical metrics and a difference between machines can be traced to the versions that differ.
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


def environment(
    device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
) -> dict:
    """Versions, CPU kernel level, torch threads and (for stages that run a model) device and dtype."""
    env: dict[str, Any] = {"python": platform.python_version()}
    env.update({name: package_version(name) for name in PACKAGES})
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
