"""The lm-evaluation-harness adapter: lm-eval scores the network the pipeline evaluates.

Offline: a local JSONL task (lm-eval's own ``json`` dataset loader on a temporary file) and the
tiny random-init model; the per-choice log-likelihoods lm-eval reports are checked against the
model's own next-token log-probs computed here, with and without TEAL + biases attached.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds, sparsified
from sponlab.method.spon import SponBiases, maybe_attached
from sponlab.model.tiny import tiny_tokenizer
from sponlab.tools.lmeval import DEMO_TASK, evaluate_tasks, local_task, task_list

pytest.importorskip("lm_eval")

DOCS = [
    {"context": "w5 w6 w7 w8", "choices": [" w9", " w10 w11", " w12"], "answer": 0},
    {"context": "w20 w21", "choices": [" w22 w23", " w24"], "answer": 1},
    {"context": "w30 w31 w32", "choices": [" w33", " w34"], "answer": 1},
]


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return local_task(path, "words")


def reference_loglikelihoods(model, tokenizer, spec=None, biases=None, site_map=None):
    """log p(choice | context) per document and choice, from the model's own forward."""
    out = []
    with sparsified(model, site_map, spec), maybe_attached(biases, model, site_map):
        for doc in DOCS:
            context = tokenizer(doc["context"]).input_ids
            row = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["context"] + choice).input_ids
                ids = torch.tensor([whole])
                with torch.no_grad():
                    logp = F.log_softmax(model(ids).logits.float(), dim=-1)[0]  # [T, V]
                cont = range(len(context), len(whole))
                row.append(float(sum(logp[t - 1, whole[t]] for t in cont)))
            out.append(row)
    return out


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def test_lm_eval_scores_the_same_network_as_the_pipeline(llama, task):
    model, site_map = llama
    tok = tiny_tokenizer(model.config.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = evaluate_tasks(model, tok, site_map, [task], batch_size=2)
    assert dense.samples == {"words": 3}
    want = reference_loglikelihoods(model, tok, site_map=site_map)
    assert flat(dense.loglikelihoods["words"]) == pytest.approx(flat(want), abs=1e-4)
    gold = [
        max(range(len(r)), key=r.__getitem__) == d["answer"]
        for r, d in zip(want, DOCS, strict=True)
    ]
    assert dense.scores["words"]["acc"] == pytest.approx(sum(gold) / len(DOCS))

    blocks = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.7])[0.7]
    spec = SparsifySpec("teal", 0.7, tuple(site_map.sites), thresholds)
    biases = SponBiases.for_model(model, site_map, site_map.sites[:4])
    with torch.no_grad():
        for vector in biases.vectors:
            vector.normal_(std=0.05)
    sparse = evaluate_tasks(model, tok, site_map, [task], spec, biases, batch_size=2)
    want_sparse = reference_loglikelihoods(model, tok, spec, biases, site_map)
    assert flat(sparse.loglikelihoods["words"]) == pytest.approx(flat(want_sparse), abs=1e-4)
    assert flat(sparse.loglikelihoods["words"]) != pytest.approx(
        flat(want), abs=1e-3
    )  # hooks were active
    # hooks are gone afterwards: the model computes the dense numbers again, weights untouched
    assert reference_loglikelihoods(model, tok, site_map=site_map) == want
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_local_task_checks_fields_and_task_list_needs_a_task(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "choices": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="missing"):
        local_task(bad)
    with pytest.raises(ValueError, match="no task"):
        task_list([])
    demo = task_list(["hellaswag"], demo=True)
    assert demo[0] == "hellaswag" and demo[1]["task"] == "sponlab_demo"
    lines = DEMO_TASK.read_text().splitlines()
    answers = [json.loads(line)["answer"] for line in lines]
    assert len(lines) >= 20 and sorted(set(answers)) == [0, 1, 2, 3]  # answer position balanced


def with_bos_template(tok):
    """The tiny tokenizer with a Llama-3-like template that prepends <s> itself."""
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tok


def test_lm_eval_bos_follows_the_pipelines_policy(caplog):
    from sponlab.tools.lmeval import bos_for_lm_eval

    plain = tiny_tokenizer(64)  # no template BOS (as SmolLM2)
    assert bos_for_lm_eval(plain, "auto") is False and bos_for_lm_eval(plain, False) is False
    with caplog.at_level("WARNING"):
        assert bos_for_lm_eval(plain, True) is True
    assert "lm-eval cannot insert one" in caplog.text  # said, not silently different
    llama3 = with_bos_template(tiny_tokenizer(64))
    assert bos_for_lm_eval(llama3, "auto") is True
    assert bos_for_lm_eval(llama3, False) is False  # lm-eval then drops the template's BOS


def test_lm_eval_scores_with_and_without_bos(llama, task):
    model, site_map = llama
    tok = with_bos_template(tiny_tokenizer(model.config.vocab_size))
    with_bos = evaluate_tasks(model, tok, site_map, [task], batch_size=2, add_bos=True)
    without = evaluate_tasks(model, tok, site_map, [task], batch_size=2, add_bos=False)
    assert flat(with_bos.loglikelihoods["words"]) == pytest.approx(
        flat(reference_loglikelihoods(model, tok, site_map=site_map)), abs=1e-4
    )  # the reference tokenises with the template: BOS first
    assert flat(without.loglikelihoods["words"]) != pytest.approx(
        flat(with_bos.loglikelihoods["words"]), abs=1e-3
    )
