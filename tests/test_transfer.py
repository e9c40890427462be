"""Transfer to unseen text domains: blocks from the shipped corpora, one TEAL baseline per set,
rows the findings can read, claims re-tested per domain."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sponlab.config import TrainParams
from sponlab.io.data import BlockSpec
from sponlab.method.evaluate import damage_recovered
from sponlab.method.sparsify import SparsifySpec, calibrate_thresholds
from sponlab.method.spon import SponBiases
from sponlab.model.tiny import tiny_tokenizer
from sponlab.studies.transfer import transfer as tr
from sponlab.sweep.findings import transfer_findings


@pytest.mark.parametrize("domain", sorted(tr.DOMAIN_FILES))
def test_every_domain_gives_blocks(domain):
    docs = tr.domain_documents(domain)
    assert len(docs) > 20 and all(d.strip() for d in docs)
    blocks = tr.domain_blocks(domain, tiny_tokenizer(), BlockSpec(32, 4, False, 0))
    assert blocks.shape == (4, 32)
    with pytest.raises(ValueError, match="unknown domain"):
        tr.domain_documents("poetry")


def test_cells_share_one_teal_pass_per_set_and_match_direct_evaluation(llama, monkeypatch):
    model, site_map = llama
    blocks = torch.randint(4, 512, (4, 16), generator=torch.Generator().manual_seed(2))
    thresholds = calibrate_thresholds(model, site_map, blocks, [0.6])[0.6]
    spec = SparsifySpec("teal", 0.6, tuple(site_map.sites), thresholds)
    seeds = {}
    for seed in (0, 1):
        biases = SponBiases.for_model(model, site_map, site_map.select([0, 1], ["down_proj"]))
        with torch.no_grad():
            for v in biases.vectors:
                v.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        seeds[seed] = biases
    cells = [
        tr.CellModels("A", 0.6, "all", spec, seeds, 1.0),
        tr.CellModels("B", 0.6, "all", spec, {0: seeds[0]}, 0.5),
    ]
    calls = []
    real = tr.evaluate_variant

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "evaluate_variant", counting)
    rows = tr.with_pareto(tr.evaluate_cells(model, site_map, blocks, 2, cells, 0.0, 0.0))
    assert calls.count("teal") == 1 and calls.count("dense") == 1  # shared by both cells
    run = {"model": model, "site_map": site_map, "blocks": blocks, "batch_size": 2}
    dense, teal = real(**run), real(**run, spec=spec)
    spon = real(**run, spec=spec, biases=seeds[1])
    a = rows[0]
    assert a["teal_ppl"] == pytest.approx(teal.ppl) and a["dense_ppl"] == pytest.approx(dense.ppl)
    assert float(a["damage_recovered_seeds"].split(";")[1]) == pytest.approx(
        damage_recovered(dense.ppl, teal.ppl, spon.ppl), abs=1e-6
    )
    assert a["seeds"] == 2 and rows[1]["seeds"] == 1
    assert 0.5 < a["achieved_sparsity"] < 0.7
    assert isinstance(rows[1]["pareto"], bool)


def _row(domain, config, values, measurable=True):
    return {
        "domain": domain,
        "config": config,
        "sparsity": 0.5,
        "sparsify": "all",
        "relative_parameters": 0.5 if config == "TOP-50" else 1.0,
        "dense_ppl": 10.0,
        "teal_ppl": 12.0,
        "spon_ppl": 11.0,
        "teal_damage": 2.0,
        "damage_measurable": measurable,
        "damage_recovered": sum(values) / len(values),
        "damage_recovered_sd": 0.01,
        "damage_recovered_seeds": ";".join(map(str, values)),
        "achieved_sparsity": 0.5,
        "achieved_sparsity_worst_offset": 0.03,
        "pareto": True,
    }


def test_claims_are_retested_per_domain_with_the_same_rules():
    frame = pd.DataFrame(
        [
            _row("wikipedia (test)", "ATTN-ONLY", [0.3, 0.31, 0.29]),
            _row("code", "ATTN-ONLY", [0.30, 0.31, 0.29]),
            _row("code", "UNIF-ALL", [0.10, 0.11, 0.09]),
            _row("code", "TOP-50", [0.02, 0.03, 0.01]),
            _row("stories", "ATTN-ONLY", [0.1, 0.1, 0.1], measurable=False),
            _row("stories", "UNIF-ALL", [0.1, 0.1, 0.1]),
        ]
    )
    found = {(f.claim, f.statement.split(":")[0]): f for f in transfer_findings(frame)}
    claims = {claim for claim, _ in found}
    assert claims == {"transfer@code", "a@code", "a-size@code", "b@code",
                      "transfer@stories", "a@stories", "b@stories"}  # fmt: skip
    a_code = next(f for (c, _), f in found.items() if c == "a@code")
    assert a_code.verdict == "supported"  # +20 points, beyond the seed noise
    b_code = next(f for (c, _), f in found.items() if c == "b@code")
    assert b_code.verdict == "contradicted"  # 20% of UNIF-ALL's benefit
    assert found[("transfer@code", "TOP-50")].verdict == "inconclusive"  # 2 ± 1%, df 2
    assert found[("transfer@code", "ATTN-ONLY")].verdict == "supported"
    assert found[("transfer@stories", "ATTN-ONLY")].verdict == "not testable"  # damage in noise
    a_stories = next(f for (c, _), f in found.items() if c == "a@stories")
    assert a_stories.verdict == "not testable"
    assert a_code.evidence == "metrics/transfer/summary.csv"
    text = tr.transfer_markdown(frame)
    assert "| code | 0.5 | ATTN-ONLY |" in text and "n/a (TEAL +2.00 ppl within noise)" in text
    nested = tr.transfer_metrics(frame)
    assert nested["code"]["UNIF-ALL"]["s50"]["damage_recovered"] == pytest.approx(0.1)


@pytest.mark.parametrize("domain", sorted(tr.DOMAIN_FILES))
def test_domain_halves_are_disjoint_and_evaluation_uses_one(domain):
    evaluation, training = tr.domain_documents(domain, "eval"), tr.domain_documents(domain, "train")
    text = tr.read_builtin_file(tr.DOMAIN_FILES[domain])
    everything = {p.strip() for p in tr._PARAGRAPHS.split(text) if p.strip()}
    # a partition of the distinct documents: no text is in both halves
    assert not set(evaluation) & set(training)
    assert set(evaluation) | set(training) == everything
    assert len(set(evaluation)) == len(evaluation)
    assert abs(len(evaluation) - len(training)) <= 1
    with pytest.raises(ValueError, match="unknown part"):
        tr.domain_documents(domain, "test")


def test_mix_counts_split_the_blocks_by_weight_and_sum_to_the_size():
    mix = {"train": 0.5, "code": 0.125, "technical": 0.125, "stories": 0.25, "none": 0.0}
    assert tr.mix_counts(mix, 32) == {"train": 16, "code": 4, "technical": 4, "stories": 8,
                                      "none": 0}  # fmt: skip
    # 10 blocks: exact 5, 1.25, 1.25, 2.5, 0 -> floors 5, 1, 1, 2; the leftover block goes to the
    # largest remainder (stories); equal remainders go to the earlier source
    assert tr.mix_counts(mix, 10) == {"train": 5, "code": 1, "technical": 1, "stories": 3,
                                      "none": 0}  # fmt: skip
    assert tr.mix_counts({"a": 1, "b": 1, "c": 1}, 4) == {"a": 2, "b": 1, "c": 1}


def test_mixed_blocks_stack_each_sources_share():
    tok, spec = tiny_tokenizer(), BlockSpec(16, 0, False, 3)
    sources = {
        "train": ["alpha beta gamma delta " * 40],
        "code": tr.domain_documents("code", "train"),
    }
    blocks = tr.mixed_blocks({"train": 0.75, "code": 0.25}, 4, sources, tok, spec)
    assert blocks.shape == (4, 16)
    alone = tr.make_blocks(sources["code"], tok, BlockSpec(16, 1, False, 3))
    assert torch.equal(blocks[3:], alone)  # the mix's last source comes last


def test_train_variants_trains_every_set_and_seed(llama):
    model, site_map = llama
    sets = {
        (name, 8): torch.randint(4, 512, (8, 16), generator=torch.Generator().manual_seed(k))
        for k, name in enumerate(("a", "b"))
    }
    thresholds = calibrate_thresholds(model, site_map, sets[("a", 8)], [0.7])[0.7]
    spec = SparsifySpec("teal", 0.7, tuple(site_map.sites), thresholds)
    sites = list(site_map.sites)
    settings = TrainParams(lr=1e-3, epochs=4, batch_size=4)
    # validation on the first set itself, so a random model's KL can improve there
    out = tr.train_variants(model, site_map, spec, sites, sets, sets[("a", 8)], settings, [0, 1])
    assert set(out) == set(sets) and all(set(v) == {0, 1} for v in out.values())
    assert all(b.sites == sites for v in out.values() for b in v.values())
    first = out[("a", 8)]
    assert any(v.abs().max() > 0 for v in first[0].vectors)
    assert not torch.equal(first[0].vectors[0], out[("b", 8)][0].vectors[0])
