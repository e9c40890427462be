from pathlib import Path

import pytest
import yaml

from sponlab.config import ConfigError, Section, load_params, parse_params
from sponlab.studies.importance import importance, sae

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_parse():
    params = load_params(ROOT / "params.yaml")
    for name in ("BASELINE-TEAL", "UNIF-ALL", "TOP-50", "TOP-75", "BOTTOM-50", "ATTN-ONLY"):
        assert name in params.sweep_configs
    assert params.sparsities[:2] == (0.5, 0.6)
    assert not params.configs["BASELINE-TEAL"].has_biases
    assert params.configs["ATTN-ONLY"].modules == ("o_proj",)
    # the study's sites, one TEAL set for the fair comparison, the study's own sets beside it
    for name in ("UNIF-ALL", "TOP-50", "TOP-75", "BOTTOM-50", "CLOSED-FORM"):
        assert params.configs[name].modules == ("down_proj",)
        assert params.configs[name].sparsify == "all"
    assert params.configs["STUDY-UNIF-ALL"].sparsify_modules == ("down_proj",)
    assert params.configs["STUDY-ATTN-ONLY"].sparsify_modules == ("o_proj",)
    for name in ("UNIF-ALL", "TOP-50", "ATTN-ONLY"):
        assert len(params.configs[name].seeds) >= 3
    assert params.configs["CLOSED-FORM"].bias == "closed_form"
    assert params.configs["UNIF-ALL-CF-INIT"].init == "closed_form"
    assert params.configs["UNIF-ALL"].init == params.train.init == "zeros"
    assert params.summary.reference == "UNIF-ALL"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("sparsify", "method"),
            "tael",
            r"sparsify.method must be one of \['teal', 'topk'\], got 'tael'",
        ),
        (
            ("sweep", "sparsities"),
            [0.5, 1.2],
            r"sweep.sparsities\[1\] must be a number in \[0, 1\)",
        ),
        (("sweep", "configs"), ["NOPE"], r"sweep.configs\[0\] names unknown config 'NOPE'"),
        (("train", "lr"), -1, r"train.lr must be > 0"),
        (("train", "epochs"), 1.5, r"train.epochs must be an integer"),
        (("base", "device"), "gpu", r"base.device has an invalid value 'gpu'"),
        (("configs", "TOP-50", "layers"), {"first": 2}, r"configs.TOP-50.layers must be"),
        (
            ("configs", "UNIF-ALL", "modules"),
            ["mlp"],
            r"configs.UNIF-ALL.modules has unknown module",
        ),
        (("train", "lrr"), 0.1, r"unknown key\(s\) \['train.lrr'\]"),
        # names other sections refer to are checked at load time, before any stage runs
        (
            ("interpret", "configs"),
            ["UNIF-ALL", "ATN-ONLY"],
            r"interpret.configs names unknown config 'ATN-ONLY'; defined in configs: \[",
        ),
        (("interpret", "similarity"), ["UNIF-ALL", "TOP50"], r"interpret.similarity names unknown"),
        (("interpret", "layers", "config"), "UNIF", r"interpret.layers.config names unknown"),
        # sparsified sets, seeds, closed form, summary
        (("sparsify", "sets", "mlp"), ["gate"], r"sparsify.sets.mlp has unknown module"),
        (("sparsify", "sets"), [], r"sparsify.sets must map set names"),
        (
            ("configs", "ATTN-ONLY", "sparsify"),
            "attn",
            r"configs.ATTN-ONLY.sparsify must be one of \['all', 'down_proj', 'o_proj', 'all-greedy'",
        ),
        (("configs", "UNIF-ALL", "seeds"), [0, 0], r"configs.UNIF-ALL.seeds has duplicates"),
        (("configs", "UNIF-ALL", "seeds"), [-1], r"configs.UNIF-ALL.seeds\[0\] must be an integer"),
        (("configs", "CLOSED-FORM", "seeds"), [0, 1], r"closed_form is computed, not trained"),
        (("configs", "UNIF-ALL", "init"), "ones", r"configs.UNIF-ALL.init must be one of"),
        (("train", "init"), "random", r"train.init must be one of \['zeros', 'closed_form'\]"),
        (("summary", "reference"), "ALL7-UNIF-ALL", r"summary.reference names unknown config"),
        (("summary", "min_damage"), -0.1, r"summary.min_damage must be >= 0"),
        (("sparsify", "modules"), "all", r"unknown key\(s\) \['sparsify.modules'\]"),
        (("sweep", "sets"), ["al"], r"sweep.sets\[0\] names unknown set 'al'"),
        # allocation of the sparsified sets (uniform / TEAL's greedy search)
        (("sparsify", "allocation"), "best", r"sparsify.allocation must be one of \['uniform'"),
        (
            ("sparsify", "sets", "all-greedy", "allocation"),
            "best",
            r"sparsify.sets.all-greedy.allocation must be one of \['uniform', 'greedy'\]",
        ),
        (("sparsify", "sets", "all-greedy", "step"), 0.9, r"sparsify.sets.all-greedy.step must"),
        (
            ("sparsify", "sets", "all"),
            {"modules": "all", "step": 0.1},
            r"unknown key\(s\) \['sparsify.sets.all.step'\]",
        ),
        (
            ("sparsify", "calibration"),
            "dense",
            r"sparsify.calibration must be 'sequential' for the greedy allocation of set\(s\) "
            r"\['all-greedy'\], got 'dense'",
        ),
        (
            ("sweep", "configs"),
            ["UNIF-ALL", "STUDY-ATTN-ONLY"],
            r"'STUDY-ATTN-ONLY', which sparsifies set 'o_proj'; add it to sweep.sets",
        ),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(path, value, message, repo_params):
    raw = repo_params
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_cli_reports_bad_params_without_traceback(tmp_path, repo_params):
    from typer.testing import CliRunner

    from sponlab.cli import app

    raw = repo_params
    raw["sparsify"]["method"] = "tael"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["calibrate", "--sparsity", "0.5", "--params", str(bad)])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("section", ["importance", "sae"])
def test_min_tokens_above_max_length_names_both_keys(section):
    parse = {"importance": importance.parse_params, "sae": sae.parse_params}[section]
    data = {"min_tokens": 64, "max_length": 32}
    with pytest.raises(
        ConfigError, match=rf"{section}.min_tokens \(64\) must be <= {section}.max_length \(32\)"
    ):
        parse(Section(data, section, "params.yaml"))


def test_defaults_live_once_on_the_dataclasses():
    """A section left out of params.yaml parses to its dataclass's own defaults (no second copy
    of a default in the parser that could drift)."""
    from dataclasses import fields

    from sponlab.config import BaseModelParams, DataParams, EvalParams, SparsifyParams, TrainParams
    from sponlab.studies.interpret import params as interpret
    from sponlab.studies.spectrum import spectrum

    minimal = {
        "configs": {"UNIF-ALL": {"layers": "all", "modules": ["down_proj"]}},
        "sweep": {"sparsities": [0.5], "configs": ["UNIF-ALL"]},
    }
    got = parse_params(minimal)
    for section, cls in (
        ("base", BaseModelParams),
        ("data", DataParams),
        ("sparsify", SparsifyParams),
        ("train", TrainParams),
        ("eval", EvalParams),
    ):
        assert getattr(got, section) == cls(), section
    assert got.summary.reference == "UNIF-ALL"  # the swept reference config, as documented
    for module, cls in (
        (interpret, interpret.InterpretParams),
        (importance, importance.ImportanceParams),
        (sae, sae.SAEParams),
        (spectrum, spectrum.SpectrumParams),
    ):
        parsed = module.parse_params(Section({}, "x", "params.yaml"))
        assert {f.name: getattr(parsed, f.name) for f in fields(cls)} == {
            f.name: getattr(cls(), f.name) for f in fields(cls)
        }, cls.__name__


def test_each_core_key_is_declared_once_with_its_default_help_and_check():
    """Data, train, eval and summary keys are declared by their dataclass fields alone: reading an
    empty section gives the dataclass's defaults, and every field but the hand-parsed ones (they
    need another section) carries a help line and a check."""
    from dataclasses import fields

    from sponlab.config import DataParams, EvalParams, SummaryParams, TrainParams
    from sponlab.paramcheck import Section, help_of, read_keys

    by_hand = {"bos", "reference"}
    for cls in (DataParams, TrainParams, EvalParams, SummaryParams):
        declared = {f.name for f in fields(cls) if "check" in f.metadata}
        assert declared | by_hand >= {f.name for f in fields(cls)}, cls
        assert all(help_of(cls)[k].strip() for k in declared)
        given = {k: getattr(cls, k) for k in by_hand if k in {f.name for f in fields(cls)}}
        assert cls(**read_keys(cls, Section({}, "x", "t"), **given)) == cls()
    with pytest.raises(ConfigError, match=r"x\.epochs must be >= 1, got 0"):
        read_keys(TrainParams, Section({"epochs": 0}, "x", "t"))
