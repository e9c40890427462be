"""The compiled sparse GEMV equals the dense matmul on the masked input (sponlab.tools.sparse_gemv)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from sponlab.tools.sparse_gemv import SparseGemv, _library, build, transposed_group

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def masked(width: int, sparsity: float, seed: int) -> torch.Tensor:
    """[width] Gaussian input with TEAL's mask applied: |x| below the s-quantile zeroed."""
    x = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    if sparsity > 0:
        t = x.abs().quantile(sparsity)
        x = F.hardshrink(x, float(t))
    return x


@needs_cc
def test_compiles_here():
    assert _library() is not None  # else the embedding_bag fallback would run


@needs_cc
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.97, 1.0])
@pytest.mark.parametrize(("width", "outs"), [(64, [48, 16, 16]), (37, [5]), (96, [250, 250])])
def test_compiled_equals_dense_on_masked_input(threads, sparsity, width, outs):
    weights = [torch.randn(o, width, generator=torch.Generator().manual_seed(o)) for o in outs]
    x = masked(width, sparsity, seed=width)
    gemv = SparseGemv(width, threads)
    assert gemv.compiled
    y = gemv(x, transposed_group(weights))
    dense = F.linear(x[None], torch.cat(weights))[0]  # [sum outs]
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
    assert gemv.last_nonzero == int((x != 0).sum())


def test_fallback_equals_dense():
    weight = torch.randn(40, 24)
    x = masked(24, 0.5, seed=1)
    gemv = SparseGemv(24, compiled=False)
    assert not gemv.compiled
    torch.testing.assert_close(gemv(x, transposed_group([weight])), weight @ x)


def test_refuses_wrong_dtype_and_shape():
    gemv = SparseGemv(8, compiled=False)
    wt = torch.randn(8, 4)
    with pytest.raises(ValueError, match="float32"):
        gemv(torch.randn(8, dtype=torch.float64), wt)
    with pytest.raises(ValueError, match="shapes"):
        gemv(torch.randn(7), wt)


@needs_cc
def test_build_is_cached_and_failure_is_reported(tmp_path):
    first = build(out_dir=tmp_path)
    assert build(out_dir=tmp_path) == first  # the second call finds the library
    with pytest.raises(RuntimeError, match="failed"):
        build(compiler="false", out_dir=tmp_path / "bad")
