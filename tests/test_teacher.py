"""The teacher stage's stored hidden states: the targets a train cell builds from them through the
LM head alone are bit-identical to running the dense model, whatever batch a block was stored in;
a file made for other blocks or another model is refused; training never runs the dense decoder
when the states are given."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sponlab.config import TrainParams
from sponlab.io.tensorio import InputFileError
from sponlab.method import teachers as teachers_module
from sponlab.method.distill import dense_target, hidden_target, last_hidden
from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds
from sponlab.method.spon import SponBiases
from sponlab.method.teachers import (
    HiddenStates,
    read_hidden,
    teachers_for,
    validation_targets,
    write_hidden,
)
from sponlab.method.train import train_spon
from sponlab.model.tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: soft-capped logits
@pytest.mark.parametrize(("topk", "chunk"), [(0, 0), (0, 5), (8, 7)])
def test_targets_from_hidden_states_equal_the_dense_models(arch, topk, chunk):
    model = tiny_model(arch, seed=0)
    ids = torch.randint(0, 512, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = last_hidden(model, ids)  # [B, T, D]
    want, got = dense_target(model, ids, topk, chunk), hidden_target(model, hidden, topk, chunk)
    assert torch.equal(want.logp, got.logp)
    assert (want.index is None) == (got.index is None)
    if topk:
        assert torch.equal(want.index, got.index) and torch.equal(want.rest, got.rest)


def test_stored_rows_equal_the_decoder_output_in_any_batch(tmp_path: Path, llama):
    model, _ = llama
    ids = torch.randint(0, 512, (70, 8), generator=torch.Generator().manual_seed(3))  # 2 parts
    parts = write_hidden(tmp_path, "train", model, ids, 4, {"model_fingerprint": "abc"})
    assert parts == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        "train-0000.safetensors",
        "train-0001.safetensors",
    ]
    stored = HiddenStates(tmp_path, "train", ids, "abc")
    index = [66, 3, 64, 10]  # across both parts, in a training batch's random order
    with torch.no_grad():
        assert torch.equal(stored[index], last_hidden(model, ids[index]))


def test_hidden_states_of_other_blocks_or_another_model_are_refused(tmp_path: Path, llama):
    model, _ = llama
    ids = torch.randint(0, 512, (6, 8), generator=torch.Generator().manual_seed(4))
    write_hidden(tmp_path, "val", model, ids, 2, {"model_fingerprint": "abc"})
    with pytest.raises(InputFileError, match=r"blocks_md5.*dvc repro teacher"):
        HiddenStates(tmp_path, "val", ids.flip(0), "abc")
    with pytest.raises(InputFileError, match="model_fingerprint"):
        HiddenStates(tmp_path, "val", ids, "other")
    with pytest.raises(InputFileError, match=r"train-0000\.safetensors: file not found"):
        read_hidden(tmp_path, ids, ids, "abc")


def test_training_from_stored_states_is_bit_identical_and_never_runs_the_decoder(
    tmp_path: Path, llama, monkeypatch
):
    model, site_map = llama
    pool = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(3))
    val = pool  # in-sample validation: an epoch is kept, so the kept biases are trained ones
    thresholds = calibrate_thresholds(model, site_map, pool, [0.7])[0.7]
    spec = SparsifySpec("teal", 0.7, tuple(site_map.sites), thresholds)
    settings = replace(TrainParams(), epochs=2, batch_size=4, lr=1e-3, warmup_steps=0, blocks=0)
    sites = site_map.sites
    runs = []
    for stored in (False, True):
        hidden = (None, None)
        if stored:
            meta = {"model_fingerprint": "m"}
            write_hidden(tmp_path, "train", model, pool, settings.batch_size, meta)
            write_hidden(tmp_path, "val", model, val, settings.batch_size, meta)
            hidden = read_hidden(tmp_path, pool, val, "m")

            def refuse(*_args, **_kwargs):
                raise AssertionError("the dense decoder ran for a target")

            monkeypatch.setattr(teachers_module, "dense_target", refuse)
        val_targets = validation_targets(model, val, settings, hidden[1])
        teachers = teachers_for(model, pool, settings.blocks, val_targets, settings, hidden[0])
        biases = SponBiases.for_model(model, site_map, sites)
        result = train_spon(model, site_map, spec, biases, pool, val, settings, teachers)
        epochs = json.dumps(result.epochs)  # NaN-aware (epoch 0 has no train KL)
        runs.append((biases.state(), [row["loss"] for row in result.steps], epochs))
    (plain, plain_loss, plain_epochs), (shared, shared_loss, shared_epochs) = runs
    assert plain_loss == shared_loss and plain_epochs == shared_epochs
    assert all(torch.equal(plain[k], shared[k]) for k in plain)
    assert any(v.abs().sum() > 0 for v in shared.values())  # an epoch was kept: it trained
