"""Transfer to unseen text domains: blocks from the shipped corpora, one TEAL baseline per set,
rows the findings can read, claims re-tested per domain."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sponlab import transfer as tr
from sponlab.data import BlockSpec
from sponlab.evaluate import damage_recovered
from sponlab.findings import transfer_findings
from sponlab.sparsify import SparsifySpec, calibrate_thresholds
from sponlab.spon import SponBiases
from sponlab.tiny import tiny_tokenizer


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
    found = {f.claim: f for f in transfer_findings(frame, 2.0)}
    assert set(found) == {"a@code", "b@code", "a@stories", "b@stories"}
    assert found["a@code"].verdict == "reproduced (direction)"
    assert found["b@code"].verdict == "not reproduced"  # 20% of UNIF-ALL's benefit
    assert found["a@stories"].verdict == "not testable"  # TEAL damage within noise there
    assert found["a@code"].evidence == "metrics/transfer/summary.csv"
    text = tr.transfer_markdown(frame)
    assert "| code | 0.5 | ATTN-ONLY |" in text and "n/a (TEAL +2.00 ppl within noise)" in text
    nested = tr.transfer_metrics(frame)
    assert nested["code"]["UNIF-ALL"]["s50"]["damage_recovered"] == pytest.approx(0.1)
