"""bench/gpu_pipeline.py: the pipeline's stage commands where DVC is absent (a lent GPU). Its
levels come from DVC's own graph, a failed level stops the run, the env check catches a stage
that ran elsewhere than asked, and the comparison tells timed outputs from real differences."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_pipeline as gp  # noqa: E402


def test_plan_levels_follow_the_dvc_graph():
    rows = gp.plan(ROOT, ["evaluate@UNIF-ALL-0.5"])
    level = {stage: lvl for lvl, stage, _ in rows}
    assert level["base"] == 0 and level["prepare"] == 1
    assert level["dense"] < level["baseline@all-0.5"] < level["evaluate@UNIF-ALL-0.5"]
    assert level["calibrate@all-0.5"] < level["train@UNIF-ALL-0.5"] < level["evaluate@UNIF-ALL-0.5"]
    assert "summarize" not in level  # only the target and what it needs
    assert all(cmd.startswith("sponlab ") for _, _, cmd in rows)
    assert "learning-curve" not in {s for _, s, _ in gp.plan(ROOT, [])}  # frozen: committed


def test_plan_names_an_unknown_target():
    with pytest.raises(SystemExit, match="unknown stages"):
        gp.plan(ROOT, ["evaluate@NOPE-0.5"])


def test_run_stops_after_the_first_failed_level(tmp_path: Path):
    rows = [(0, "a", "touch a"), (0, "b", "touch b"), (1, "c", "false"), (2, "d", "touch d")]
    results = gp.run(tmp_path, rows, jobs=2, sponlab="unused")
    assert [(r["stage"], r["rc"]) for r in results] == [("a", 0), ("b", 0), ("c", 1)]
    assert (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_env_check_names_a_stage_that_ran_on_another_device(tmp_path: Path):
    metrics = tmp_path / "metrics"
    (metrics / "eval").mkdir(parents=True)
    (metrics / "dense.json").write_text(json.dumps({"env": {"device": "cuda:0", "dtype": "bf16"}}))
    (metrics / "eval" / "m.json").write_text(
        json.dumps({"env": {"device": "cpu", "dtype": "bf16"}})
    )
    (metrics / "summary.json").write_text(json.dumps({"env": {"torch": "2"}}))  # no model ran
    bad = gp.env_check(tmp_path, "cuda", "bf16")
    assert bad == ['metrics/eval/m.json: {"device": "cpu", "dtype": "bf16"}']


def test_compare_separates_timed_outputs_from_differences(tmp_path: Path):
    for side, (seconds, number, spectrum) in {"a": (1, 1, 1), "b": (2, 2, 2)}.items():
        metrics = tmp_path / side / "metrics"
        metrics.mkdir(parents=True)
        (metrics / "dense.json").write_text(json.dumps({"ppl": 3.0, "seconds": seconds}))
        (metrics / "table.csv").write_text(f"x\n{number}\n")
        (metrics / "spectrum.json").write_text(json.dumps({"took": spectrum}))
    (tmp_path / "a" / "metrics" / "extra.csv").write_text("x\n")
    result = gp.compare(tmp_path / "a", tmp_path / "b")
    assert result == {"identical": 1, "differ_timed": ["metrics/spectrum.json"],
                      "differ": ["metrics/table.csv"], "only_one": ["metrics/extra.csv"]}  # fmt: skip


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_in_bf16(tmp_path: Path):
    # what a GPU session runs, on CPU in bf16: every stage command, each model stage's env says so
    project = tmp_path / "tiny"
    rows = gp.tiny_project(project, "cpu", "bfloat16")
    results = gp.run(project, rows, jobs=2, sponlab=f"{sys.executable} -m sponlab.cli")
    failed = [(r["stage"], r["tail"]) for r in results if r["rc"] != 0]
    assert not failed and len(results) == len(rows) > 40
    assert gp.env_check(project, "cpu", "bfloat16") == []
    dense = json.loads((project / "metrics" / "dense.json").read_text())
    assert dense["env"]["dtype"] == "bfloat16" and (project / "metrics" / "report.md").is_file()


def test_commands_round_trip_through_the_tsv(tmp_path: Path):
    rows = [(0, "base", "sponlab base --out models/base"), (3, "train@A-0.5", "a\tb && c")]
    gp.write_commands(tmp_path / "c.tsv", rows)
    assert gp.read_commands(tmp_path / "c.tsv") == rows


def test_digest_ignores_what_check_repro_ignores(tmp_path: Path):
    """The determinism bench and check-repro agree on what a timing is: a JSON output that
    differs only in a wall-clock key (here ``tokens_per_s``, which capture writes) has one
    digest, one that differs in a result does not."""
    from determinism import digest

    from sponlab.tools.reproduce import IGNORED_KEYS

    def write(name: str, value: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.json").write_text(json.dumps(value))
        return tmp_path / name

    base = {"ppl": 42.4, "layers": [{"kl": 0.1, "seconds": 3.0}], "env": {"cpu": "a"}}
    for n, key in enumerate(IGNORED_KEYS):
        timed = json.loads(json.dumps(base))
        timed["layers"][0][key] = n + 1.5  # nested, as the importance files hold them
        assert digest(write(f"t{n}", timed)) == digest(write(f"b{n}", base)), key
    moved = base | {"ppl": 42.5}
    assert digest(write("moved", moved)) != digest(write("base", base))
