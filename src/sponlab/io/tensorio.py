"""Safetensors and JSON I/O with metadata, written atomically and byte-deterministically.

Files are written to a temporary path and renamed only on success, so a failed stage never leaves
a half-written output. The safetensors header is rewritten with sorted keys: the safetensors
library serialises ``__metadata__`` from a hash map whose order changes from process to process,
which made equal tensors hash differently and DVC see changes where there were none.

Reading checks what can be checked without a model: a missing, truncated or corrupt file raises
:class:`InputFileError` naming the file, what is wrong and the stage that writes it; so does a file
whose metadata says it was made for something else (another model, sparsity, ...).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

HEADER_SIZE = 8  # little-endian uint64 length of the JSON header


class InputFileError(ValueError):
    """An input file that is missing, unreadable or made for another run (message says which)."""


def input_error(path: Path, problem: str, producer: str | None) -> InputFileError:
    """An :class:`InputFileError` that names the file, the problem and how to re-create it."""
    fix = (
        f"; it is written by stage '{producer}': re-run `dvc repro {producer}`" if producer else ""
    )
    return InputFileError(f"{path}: {problem}{fix}")


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def replace_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``out`` only if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header in place with sorted keys (same length, same tensor bytes)."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(HEADER_SIZE))
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        data = text.encode("utf-8")
        if len(data) > length:  # cannot happen for the same content; never write a bad file
            raise RuntimeError(f"{path}: canonical safetensors header longer than the original")
        handle.seek(HEADER_SIZE)
        handle.write(data + b" " * (length - len(data)))  # the format allows trailing spaces


def save_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save ``tensors`` (made contiguous, on CPU) with JSON-encoded ``metadata``, deterministically."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta)
        canonicalize_header(tmp)
    return Path(path)


def load_tensors(
    path: Path, producer: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and metadata written by :func:`save_tensors` (JSON values decoded).

    ``producer`` names the stage that writes the file, for the error message when it is missing
    or unreadable.
    """
    return _read(Path(path), producer, with_tensors=True)


def read_metadata(path: Path, producer: str | None = None) -> dict[str, Any]:
    """The metadata :func:`save_tensors` wrote (JSON values decoded), without reading tensors."""
    return _read(Path(path), producer, with_tensors=False)[1]


def _read(
    path: Path, producer: str | None, with_tensors: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One owner of opening a safetensors file: missing or unreadable is an error naming it."""
    if not path.is_file():
        raise input_error(path, "file not found", producer)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            for key in handle.keys() if with_tensors else ():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as err:
        problem = f"not a readable safetensors file, truncated or corrupt ({err})"
        raise input_error(path, problem, producer) from err
    return tensors, {k: _decode(v) for k, v in raw.items()}


def check_made_for(
    path: Path, metadata: Mapping[str, Any], expected: Mapping[str, Any], producer: str | None
) -> None:
    """Refuse a file whose metadata records other values than ``expected`` for the same keys.

    An expected value of None (the caller does not know it) and keys absent from the metadata
    (files written before the key existed) are not checked. Numbers compare with a relative
    tolerance of 1e-9 (sparsities go through JSON).
    """
    for key, want in expected.items():
        if want is None or key not in metadata:
            continue
        have = metadata[key]
        same = (
            abs(float(have) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
            if isinstance(want, float) and isinstance(have, (int, float))
            else have == want
        )
        if not same:
            problem = f"was made for {key}={have!r}, but this run needs {key}={want!r}"
            raise input_error(path, problem, producer)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def write_json(path: Path, payload: Any) -> Path:
    """Write indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return Path(path)


def read_json(path: Path, producer: str | None = None) -> Any:
    """Read a JSON file; missing or invalid JSON is an :class:`InputFileError`."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "file not found", producer)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise input_error(path, f"not valid JSON ({err})", producer) from err


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with the columns ``fields`` (values as ``str()`` gives them), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as CSV through pandas (floats to 6 significant digits), atomically."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(list(rows)).to_csv(tmp, index=False, float_format="%.6g")
    return Path(path)
