"""Perplexity protocols: A (GPTQ non-overlapping windows), B (sliding windows), C (blocks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_params
from typer.testing import CliRunner

from sponlab.cli import app
from sponlab.io.data import stream_windows
from sponlab.io.tensorio import load_tensors
from sponlab.method.evaluate import evaluate_variant
from sponlab.model.tiny import save_tiny


def scored_positions(windows, stride: int) -> list[int]:
    """Absolute stream positions each window scores (its start is i * stride)."""
    out = []
    for i, s in enumerate(windows.score_from.tolist()):
        out += [i * stride + t for t in range(s, windows.ids.shape[1])]
    return out


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_windows_score_every_token_once(stride):
    stream = torch.arange(100)
    windows = stream_windows(stream, 16, stride)
    assert windows.ids.shape[1] == 16
    assert torch.equal(windows.ids[1], stream[stride : stride + 16])
    positions = scored_positions(windows, stride)
    assert len(positions) == len(set(positions)) == windows.scored_tokens  # never twice
    last_end = (len(windows.ids) - 1) * stride + 16
    if stride == 16:  # A: non-overlapping, each window's first token has no history (GPTQ)
        assert len(windows.ids) == 100 // 16 and (windows.score_from == 1).all()
        assert sorted(positions) == [t for t in range(last_end) if t % 16]
    else:  # B: every token after the first scored exactly once, with >= context - stride history
        assert sorted(positions) == list(range(1, last_end))
    with pytest.raises(ValueError, match="stride"):
        stream_windows(stream, 16, 17)


def test_sliding_window_nll_matches_transformers_masked_loss(llama):
    model, site_map = llama
    stream = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(4))
    windows = stream_windows(stream, 24, 8)
    got = evaluate_variant(model, site_map, windows.ids, 3, score_from=windows.score_from)
    # independent reference: HF's own shifted loss with unscored labels set to -100
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, start in zip(windows.ids, windows.score_from.tolist(), strict=True):
            labels = ids.clone()
            labels[:start] = -100
            n = int((labels[1:] != -100).sum())
            nll += float(model(ids[None], labels=labels[None]).loss) * n
            count += n
    assert got.tokens == count == windows.scored_tokens
    assert got.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    blocks = evaluate_variant(model, site_map, windows.ids, 3)  # every token of every window
    assert blocks.tokens == windows.ids.numel() - len(windows.ids) and blocks.ppl != got.ppl


def test_prepare_and_dense_state_the_protocol(tmp_path, monkeypatch, repo_params):
    monkeypatch.chdir(tmp_path)
    model = save_tiny(tmp_path / "tiny", vocab=512)
    params = repo_params
    params["base"] = {"source": "hub", "name": str(model), "device": "cpu", "dtype": "float32"}
    params["data"] |= {"calib_blocks": 2, "train_blocks": 2, "val_blocks": 2, "test_blocks": 2}
    params["train"]["blocks"] = 0
    params["eval"] |= {"protocol": "sliding", "context": 32, "stride": 8, "max_windows": 5,
                       "detail_blocks": 2}  # fmt: skip
    write_params(Path("params.yaml"), params)
    runner = CliRunner()
    for args in (["base"], ["prepare"], ["dense"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    tensors, meta = load_tensors(Path("data/blocks/test.safetensors"))
    assert (
        tensors["input_ids"].shape == (5, 32) and tensors["score_from"].tolist() == [1] + [24] * 4
    )
    assert meta["protocol"] == "sliding" and meta["stride"] == 8
    dense = json.loads(Path("metrics/dense.json").read_text())
    assert dense["tokens"] == 31 + 4 * 8
    assert dense["protocol"]["protocol"] == "sliding" and dense["protocol"]["context"] == 32
    assert dense["protocol"]["sparsified_tokens"] == "all" and dense["env"]["dtype"] == "float32"
