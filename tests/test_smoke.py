"""Every stage's library function on the tiny model in float32 and bfloat16 (CPU): the dtype and
device invariants of sponlab.tools.smoke hold, and bf16 stays close to fp32 where it should."""

from __future__ import annotations

import pytest
import torch

from sponlab.method.spon import SponBiases
from sponlab.model.tiny import tiny_model
from sponlab.tools.smoke import SmokeError, StageRun, _check_biases, run_smoke

STAGES = ["calibrate", "calibrate (greedy)", "dense", "baseline", "train (closed form)", "train",
          "train (top-k, chunked KL)", "evaluate", "evaluate (sliding windows)"]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_stage_runs_in_dtype_with_fp32_biases(dtype, blocks):
    model = tiny_model("llama", seed=0).to(dtype).eval()
    runs = run_smoke(model, blocks, batch_size=2)
    assert [r.stage for r in runs] == STAGES
    assert all(isinstance(r, StageRun) and r.seconds > 0 for r in runs)
    assert "fp32 biases on cpu" in runs[STAGES.index("train")].checked
    assert next(model.parameters()).dtype == dtype  # nothing converted the model


def test_bias_check_refuses_wrong_dtype_and_device(llama):
    model, site_map = llama
    biases = SponBiases.for_model(model, site_map, site_map.sites[:1])
    assert "1 fp32 biases" in _check_biases(biases, torch.device("cpu"))
    with pytest.raises(SmokeError, match="not fp32 on meta"):
        _check_biases(biases, torch.device("meta"))
    biases.to(torch.device("cpu"))
    with torch.no_grad():
        biases.vector(site_map.sites[0]).fill_(float("nan"))
    with pytest.raises(SmokeError, match="not finite"):
        _check_biases(biases, torch.device("cpu"))
