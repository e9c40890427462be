"""Allocations from measured layer importance: parsing, validation and the layers they take."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from sponlab.allocations import parse_layers
from sponlab.config import ConfigError, parse_params
from sponlab.method.ranked import LayerRanking, layers_needed, ranked_layers, read_ranking
from sponlab.model.sites import LayerSelection, SiteError

ROOT = Path(__file__).resolve().parents[1]

# importance of 6 layers; ranked 3, 1, 4, 0, 5, 2 (ties by index); measured top-k curve
IMPORTANCE = {0: 0.5, 1: 2.0, 2: -0.3, 3: 3.0, 4: 1.0, 5: 0.0}
RANKING = LayerRanking(
    order=(3, 1, 4, 0, 5, 2),
    importance=IMPORTANCE,
    coverage=(-0.2, 0.55, 0.85, 0.93, 0.97, 1.0),  # noisy, non-monotone at k = 1
    curve="measured",
)


def ranked(**rule) -> LayerSelection:
    return parse_layers({"ranked": "UNIF-ALL", **rule}, "configs.X.layers")


def test_ranked_selections_take_the_layers_their_rule_names():
    assert ranked_layers(ranked(coverage=0.9), RANKING) == [0, 1, 3, 4]  # k = 4 reaches 0.93
    assert ranked_layers(ranked(coverage=0.5), RANKING) == [1, 3]
    assert ranked_layers(ranked(top=2), RANKING) == [1, 3]
    assert ranked_layers(ranked(top=99), RANKING) == [0, 1, 2, 3, 4, 5]
    # median of (0.5, 2, -0.3, 3, 1, 0) is 0.75: layers strictly above it
    assert ranked_layers(ranked(above="median"), RANKING) == [1, 3, 4]
    never = LayerRanking(RANKING.order, IMPORTANCE, (0.1,) * 5 + (math.nan,), "measured")
    assert ranked_layers(ranked(coverage=0.9), never) == [0, 1, 2, 3, 4, 5]  # all, warned
    assert layers_needed([0.2, 0.9], 0.9) == 2 and layers_needed([math.nan], 0.5) is None


def test_a_ranked_selection_does_not_resolve_without_its_ranking():
    selection = ranked(top=3)
    assert selection.describe() == "ranked UNIF-ALL top 3"
    with pytest.raises(SiteError, match="need that ranking"):
        selection.resolve(6)


def test_read_ranking_reads_the_layer_importance_tables(tmp_path):
    rows = ["layer,phase,ppl_without,importance,share,rank"]
    rows += [f"{k},early,1,{v},0,0" for k, v in IMPORTANCE.items()]
    (tmp_path / "layers.csv").write_text("\n".join(rows) + "\n")
    curve = ["k,layer_added,estimated,measured,ppl_topk"]
    curve += [f"{k + 1},{layer},0.5,{RANKING.coverage[k]},1"
              for k, layer in enumerate(RANKING.order)]  # fmt: skip
    (tmp_path / "curves.csv").write_text("\n".join(curve) + "\n")
    assert read_ranking(tmp_path) == RANKING
    # without a measured curve (interpret.layers.cumulative: estimated) the estimate is used
    (tmp_path / "curves.csv").write_text("\n".join(c.rsplit(",", 2)[0] for c in curve) + "\n")
    assert read_ranking(tmp_path).curve == "estimated"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"ranked": "UNIF-ALL"}, "exactly one of"),
        ({"ranked": "UNIF-ALL", "top": 2, "coverage": 0.5}, "exactly one of"),
        ({"ranked": "UNIF-ALL", "coverage": 1.5}, r"coverage must be a fraction in \(0, 1\]"),
        ({"ranked": "UNIF-ALL", "top": 0}, "top must be an integer >= 1"),
        ({"ranked": "UNIF-ALL", "above": "mean"}, "above must be 'median'"),
        ({"ranked": 3, "top": 2}, "ranked must name a config"),
    ],
)
def test_bad_ranked_layers_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_layers(value, "configs.X.layers")


def params_with(**sweep) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    out = copy.deepcopy(raw)
    out["sweep"].update(sweep)
    return out


def test_sweep_ranked_holds_exactly_the_ranked_configs():
    assert parse_params(params_with(ranked=[])).sweep_ranked == ()
    with pytest.raises(ConfigError, match=r"list it in sweep\.ranked instead"):
        parse_params(params_with(configs=["UNIF-ALL", "RANKED-90"]))
    with pytest.raises(ConfigError, match=r"list it in sweep\.configs instead"):
        parse_params(params_with(ranked=["TOP-50"]))


def test_a_ranking_must_be_the_one_layer_importance_measures():
    raw = params_with(ranked=["RANKED-90"])
    raw["interpret"]["layers"]["config"] = "TOP-50"
    with pytest.raises(ConfigError, match=r"interpret.layers.config \('TOP-50'\)"):
        parse_params(raw)
    raw = params_with(configs=["BASELINE-TEAL", "TOP-50"], ranked=["RANKED-90"])
    raw["interpret"]["layers"]["config"] = "UNIF-ALL"
    raw["summary"]["reference"] = "TOP-50"
    with pytest.raises(ConfigError, match=r"must be in sweep\.configs"):
        parse_params(raw)
    raw = params_with(sparsities=[0.6], ranked=["RANKED-90"])  # interpret.sparsity is 0.5
    with pytest.raises(ConfigError, match=r"interpret.sparsity \(0.5\), which is not in"):
        parse_params(raw)
