"""dvc.yaml lists some stages' train cells by hand (DVC cannot loop over a params list inside
``deps``): each list must name exactly the configs params.yaml gives that stage, or a config
added in params.yaml would be read without being a dependency (stale results)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
INTERPRET = PARAMS["interpret"]


def cells(stage: str, root: str = "models/spon") -> set[str]:
    """The configs whose ``root/<CONFIG>`` folders ``stage`` lists in its deps."""
    pattern = re.compile(rf"^{re.escape(root)}/([^/]+)(/|$)")
    return {
        m.group(1) for d in DVC[stage]["deps"] if isinstance(d, str) and (m := pattern.match(d))
    }


@pytest.mark.parametrize(
    ("stage", "configs"),
    [
        ("interpret", INTERPRET["configs"] + INTERPRET["similarity"]),
        ("transfer", INTERPRET["transfer"]["configs"]),
        ("learning-curve", INTERPRET["learning_curve"]["configs"]),
    ],
)
def test_hand_listed_train_cells_match_params(stage: str, configs: list[str]):
    assert cells(stage) == set(configs), f"dvc.yaml {stage}: update its models/spon deps"


def test_interpret_reads_the_shift_of_its_configs():
    shift = cells("interpret", "metrics/eval")
    assert shift == set(INTERPRET["configs"]), "dvc.yaml interpret: update its shift.csv deps"


def test_learning_curve_tracks_the_params_of_its_configs():
    listed = {p.removeprefix("configs.") for p in DVC["learning-curve"]["params"]
              if isinstance(p, str) and p.startswith("configs.")}  # fmt: skip
    assert listed == set(INTERPRET["learning_curve"]["configs"])
