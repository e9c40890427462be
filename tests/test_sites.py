import pytest
import torch.nn as nn

from sponlab.model.sites import (
    PROJECTIONS,
    LayerSelection,
    Site,
    SiteError,
    discover_sites,
    parse_layer_spec,
)
from sponlab.model.tiny import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_has_all_sites(arch):
    model = tiny_model(arch, layers=3)
    site_map = discover_sites(model)
    assert site_map.num_layers == 3
    assert site_map.sites == [Site(i, m) for i in range(3) for m in PROJECTIONS]
    for site in site_map.sites:
        linear = site_map.linear(model, site)
        assert isinstance(linear, nn.Linear)
        assert site_map.paths[site].endswith(
            f"layers.{site.layer}.{'self_attn' if site.module in PROJECTIONS[:4] else 'mlp'}.{site.module}"
        )


def test_site_key_round_trip_and_strict_parsing():
    site = Site(12, "down_proj")
    assert Site.from_key(site.key) == site
    for bad in (
        "layer_3_down_proj",
        "layers.x.down_proj",
        "layers.3.dense",
        "layers.3.down_proj.x",
    ):
        with pytest.raises(SiteError):
            Site.from_key(bad)


def test_unknown_module_error_lists_available(llama):
    _, site_map = llama
    with pytest.raises(SiteError, match=r"available:.*q_proj"):
        site_map.select([0], ["dense_h_to_4h"])
    with pytest.raises(SiteError, match="out of range"):
        site_map.select([7], ["q_proj"])


def test_unsupported_architecture_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(SiteError, match="unsupported architecture Sequential"):
        discover_sites(model)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (LayerSelection("all"), list(range(30))),
        (LayerSelection("none"), []),
        (LayerSelection("first", 0.5), list(range(15))),
        (LayerSelection("first", 0.75), list(range(23))),
        (LayerSelection("last", 0.5), list(range(15, 30))),
        (LayerSelection("list", layers=(3, 1, 3)), [1, 3]),
    ],
)
def test_layer_selection(selection, expected):
    assert selection.resolve(30) == expected


def test_parse_layer_spec():
    assert parse_layer_spec("0-3,8", 10) == [0, 1, 2, 3, 8]
    assert parse_layer_spec("5") == [5]
    for bad in ("3-1", "a", "", "0-10"):
        with pytest.raises(SiteError):
            parse_layer_spec(bad, 10)
