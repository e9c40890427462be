"""The shared TEAL-only baseline (stage baseline) and the cells that need no model.

Every evaluate cell reads the TEAL-only numbers of its sparsified set from one file per (set,
sparsity); it must get exactly what evaluating TEAL-only itself gives, and refuse a baseline made
for another sparsity, set or model. BASELINE-TEAL (no biases) trains and evaluates without
loading the model. The dense reference every cell's KL and shift are measured against is the
model's own output.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO_PARAMS
from typer.testing import CliRunner

from sponlab.cli import app
from sponlab.io.tensorio import InputFileError, save_tensors, write_json
from sponlab.method.evaluate import (
    achieved_summary,
    baseline_payload,
    capture_dense,
    evaluate_variant,
    read_baseline,
    sparsity_rows,
)
from sponlab.method.sparsify import (
    SparsifySpec,
    SparsityStats,
    calibrate_thresholds,
    thresholds_to_tensors,
)
from sponlab.model.loading import model_fingerprint


def teal_baseline(model, site_map, blocks):
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.5], site_map.sites)[0.5]
    spec = SparsifySpec("teal", 0.5, tuple(site_map.sites), thresholds)
    stats = SparsityStats()
    teal = evaluate_variant(model, site_map, blocks, 4, spec=spec, stats=stats)
    return teal, stats


def test_baseline_round_trip_is_exact_and_checked(tmp_path, llama, blocks):
    model, site_map = llama
    teal, stats = teal_baseline(model, site_map, blocks)
    meta = {"sparsity": 0.5, "set": "all", "model_fingerprint": model_fingerprint(model)}
    path = write_json(tmp_path / "all.json", baseline_payload(teal, stats, meta))
    again, rows, _ = read_baseline(path, 0.5, "all", model_fingerprint(model))
    assert again == teal  # every float, per-block NLL included, survives JSON exactly
    assert rows == sparsity_rows(stats, 0.5)
    assert achieved_summary(rows, 0.5)["mean"] == pytest.approx(0.5, abs=0.1)
    for bad in ({"sparsity": 0.6}, {"sparsified": "o_proj"}, {"fingerprint": "0" * 16}):
        args = {"sparsity": 0.5, "sparsified": "all", "fingerprint": None, **bad}
        with pytest.raises(InputFileError, match="stage 'baseline'"):
            read_baseline(path, **args)


def test_baseline_teal_cell_needs_no_model(tmp_path, llama, blocks):
    model, site_map = llama
    fingerprint = model_fingerprint(model)
    teal, stats = teal_baseline(model, site_map, blocks)
    meta = {"sparsity": 0.5, "set": "all", "model_fingerprint": fingerprint}
    payload = baseline_payload(teal, stats, meta) | {"env": {"device": "cpu", "dtype": "float32"}}
    write_json(tmp_path / "baseline/s0.5/all.json", payload)
    thresholds = tmp_path / "thresholds/s0.5/all.safetensors"
    save_tensors(thresholds, thresholds_to_tensors({s: 0.1 for s in site_map.sites}), meta)
    write_json(tmp_path / "dense.json", {"ppl": teal.ppl * 0.8, "block_nll": teal.block_nll})
    missing = tmp_path / "no-model"  # neither stage may read it
    common = ["--params", str(REPO_PARAMS), "--config", "BASELINE-TEAL", "--sparsity", "0.5"]
    common += ["--model", str(missing), "--thresholds", str(tmp_path / "thresholds")]
    runner = CliRunner()
    trained = tmp_path / "spon"
    result = runner.invoke(app, ["train", *common, "--out", str(trained)])
    assert result.exit_code == 0, result.output
    biases_meta = json.loads((trained / "seed0/train.json").read_text())
    assert biases_meta["model_fingerprint"] == fingerprint and biases_meta["parameters"] == 0
    out = tmp_path / "eval"
    args = ["evaluate", *common, "--baselines", str(tmp_path / "baseline")]
    args += ["--dense-metrics", str(tmp_path / "dense.json"), "--trained", str(trained)]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    cell = json.loads((out / "metrics.json").read_text())
    assert cell["teal"]["ppl"] == teal.ppl == cell["spon_seeds"][0]["ppl"]
    assert cell["env"]["device"] == "cpu" and cell["env"]["dtype"] == "float32"
    assert (out / "sparsity.csv").read_text().count("\n") == len(site_map.sites) + 1


def test_dense_reference_is_the_models_own_output(llama, blocks):
    # batch 4 over 6 blocks: a full and a partial batch written into the preallocated tensors
    model, _ = llama
    ref = capture_dense(model, blocks, batch_size=4)
    with torch.no_grad():
        out = model(blocks, output_hidden_states=True)
    expect = torch.log_softmax(out.logits.float(), dim=-1).half()
    assert ref.logp.dtype == torch.float16 and torch.equal(ref.logp, expect)
    assert ref.hidden.shape == (6, len(out.hidden_states), 16, out.hidden_states[0].shape[-1])
    for layer, h in enumerate(out.hidden_states):
        torch.testing.assert_close(ref.hidden[:, layer], h.float(), rtol=1e-5, atol=1e-5)
