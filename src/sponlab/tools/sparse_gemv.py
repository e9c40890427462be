"""Batch-1 sparse GEMV for TEAL decoding on CPU: skip the weight rows of zeroed inputs.

A decoding step multiplies one activation vector by each projection; that GEMV is memory-bound,
so its time follows the weight bytes read. With the weight stored transposed (``Wt`` [in, out],
the row of input i contiguous), a TEAL-sparsified input needs only the rows of its nonzero
entries: at sparsity s the traffic, and ideally the time, is (1 - s) of dense. Projections that
read the same input (q/k/v, gate/up) are concatenated along ``out`` so one call serves them.

The kernel is a few lines of C (``resources/sparse_gemv.c``) compiled on first use with the
system C compiler and cached per source and machine; without a compiler ``sparse_gemv`` falls
back to ``F.embedding_bag`` (same result, slower) and says so once. CPU, float32, batch 1 only:
the training and evaluation paths of the pipeline never use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = "sparse_gemv.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$SPONLAB_CACHE`` or ``~/.cache/sponlab``."""
    root = os.environ.get("SPONLAB_CACHE") or Path.home() / ".cache" / "sponlab"
    return Path(root) / "kernels"


def _cpu_tag() -> str:
    """The CPU model and flags: ``-march=native`` code must not run on another machine."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n".join(lines)


def build(compiler: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile the kernel (once per source, flags and CPU) and return the shared library path.

    Raises ``RuntimeError`` with the compiler's message when it fails or no compiler is found.
    """
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    source = resources.files("sponlab.resources").joinpath(SOURCE).read_text()
    key = hashlib.sha256("\n".join([source, compiler, *FLAGS, _cpu_tag()]).encode()).hexdigest()
    target = (out_dir or cache_dir()) / f"sparse_gemv-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / SOURCE
        src.write_text(source)
        lib = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(src), "-o", str(lib)], capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.decode(errors='replace')}")
        os.replace(lib, target)  # atomic: a concurrent build never sees half a library
    return target


@cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as err:
        log.warning("sparse GEMV kernel unavailable, using F.embedding_bag: %s", err)
        return None
    fn = lib.sparse_gemv_f32
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
    fn.argtypes += [ctypes.c_int, ctypes.c_void_p]  # threads, partial sums
    return lib


def transposed_group(weights: list[torch.Tensor]) -> torch.Tensor:
    """Weights [out_j, in] that read one input -> one contiguous ``Wt`` [in, sum_j out_j]."""
    return torch.cat([w.detach().t() for w in weights], dim=1).contiguous()


class SparseGemv:
    """``y = x @ Wt`` over the nonzero entries of ``x``, with reusable scratch (one input width).

    ``__call__(x, wt)``: x [in] float32 contiguous CPU, wt [in, out] (``transposed_group``);
    returns y [out], equal to ``x @ wt`` up to float summation order. ``threads`` (default:
    torch's intra-op threads) split the nonzero rows; ``compiled=False`` forces the fallback.
    """

    def __init__(self, width: int, threads: int | None = None, compiled: bool = True) -> None:
        self.width = width
        self.threads = threads or torch.get_num_threads()
        self.lib = _library() if compiled else None
        self.idx = torch.empty(width, dtype=torch.int64)
        self.val = torch.empty(width, dtype=torch.float32)
        self.partial = torch.empty(0, dtype=torch.float32)  # [(threads - 1) * out], grown on use
        self.last_nonzero = 0

    @property
    def compiled(self) -> bool:
        """Whether calls run the compiled kernel (else ``F.embedding_bag``)."""
        return self.lib is not None

    def __call__(self, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        _check(x, wt, self.width)
        if self.lib is None:
            nz = x.nonzero().squeeze(1)  # [k]
            self.last_nonzero = len(nz)
            return F.embedding_bag(nz[None], wt, per_sample_weights=x[nz][None], mode="sum")[0]
        out = wt.shape[1]
        if self.partial.numel() < (self.threads - 1) * out:
            self.partial = torch.empty((self.threads - 1) * out, dtype=torch.float32)
        y = torch.empty(out, dtype=torch.float32)
        self.last_nonzero = self.lib.sparse_gemv_f32(
            x.data_ptr(),
            wt.data_ptr(),
            y.data_ptr(),
            self.width,
            out,
            self.idx.data_ptr(),
            self.val.data_ptr(),
            self.threads,
            self.partial.data_ptr(),
        )
        return y


def _check(x: torch.Tensor, wt: torch.Tensor, width: int) -> None:
    for name, t in (("x", x), ("wt", wt)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device}"
            )
    if x.shape != (width,) or wt.shape[0] != width:
        raise ValueError(
            f"shapes x {tuple(x.shape)}, wt {tuple(wt.shape)}: expected [{width}], [{width}, out]"
        )
