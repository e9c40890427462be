"""End-to-end: the shipped dvc.yaml on a tiny model in a temporary git repository.

Runs ``dvc repro`` of the sweep, checks outputs and metrics, checks a second repro is a no-op,
adds one sparsity with ``dvc exp run -S`` and checks from DVC's own output that only the new cells
(and the aggregation) ran, then ``dvc metrics diff`` / ``dvc params diff``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sponlab.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = ["BASELINE-TEAL", "UNIF-ALL", "ATTN-ONLY"]


def run(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    """Run a command with this venv first on PATH; its output (DVC logs progress on stderr)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def tiny_params(model_dir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"] = {"source": "hub", "name": str(model_dir), "device": "cpu", "dtype": "float32"}
    params["data"].update(block_len=16, calib_blocks=4, train_blocks=4, val_blocks=2, test_blocks=4)
    params["sweep"] = {"configs": CONFIGS, "sparsities": [0.5]}
    params["train"].update(epochs=1, batch_size=2, warmup_steps=0)
    params["eval"] = {"batch_size": 2, "detail_blocks": 2}
    return params


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = save_tiny(root / "tiny-model", "llama", layers=2, hidden=32)
    work = root / "repo"
    files = run(["git", "ls-files"], ROOT).split()
    for name in [*files, "dvc.yaml", "params.yaml", ".dvcignore"]:
        source = ROOT / name
        if source.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(model_dir), sort_keys=False))
    shutil.rmtree(work / ".dvc", ignore_errors=True)
    (work / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], work)
    run([str(BIN / "dvc"), "init", "-q"], work)
    run([*git, "add", "-A"], work)
    run([*git, "commit", "-qm", "tiny"], work)
    return work


def test_tiny_dvc_pipeline_end_to_end(repo: Path):
    dvc = str(BIN / "dvc")
    first = run([dvc, "repro", "plots"], repo)
    expected = {"base", "prepare", "calibrate@0.5", "dense", "summarize", "plots"}
    expected |= {f"{kind}@{c}-0.5" for kind in ("train", "evaluate") for c in CONFIGS}
    assert ran_stages(first) == expected

    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary["ppl"]) == set(CONFIGS)
    baseline = summary["teal_ppl"]["BASELINE-TEAL"]["s50"]
    # BASELINE-TEAL has no biases: its SPON ppl is its TEAL ppl; every cell's TEAL-only baseline
    # sparsifies the same modules, so they agree
    assert summary["ppl"]["BASELINE-TEAL"]["s50"] == baseline
    assert summary["teal_ppl"]["UNIF-ALL"]["s50"] == baseline
    assert summary["dense_ppl"] > 0 and all(v["s50"] > 0 for v in summary["ppl"].values())
    cell = json.loads((repo / "metrics/eval/UNIF-ALL/s0.5/metrics.json").read_text())
    assert abs(cell["achieved_sparsity"]["mean"] - 0.5) < 0.1
    for name in ("summary.csv", "summary.md", "summary.tex"):
        assert (repo / "metrics/tables" / name).stat().st_size > 0
    for name in ("ppl_by_config.png", "pareto.png", "loss_curves.png", "shift_s50.png"):
        assert (repo / "plots/sweep" / name).stat().st_size > 1000

    second = run([dvc, "repro", "plots"], repo)
    assert ran_stages(second) == set()

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "reference run"], repo)
    third = run([dvc, "exp", "run", "-S", "sweep.sparsities=[0.5,0.7]", "plots"], repo)
    new = {"calibrate@0.7", "summarize", "plots"}
    new |= {f"{kind}@{c}-0.7" for kind in ("train", "evaluate") for c in CONFIGS}
    assert ran_stages(third) == new

    metrics = run([dvc, "metrics", "diff", "--json"], repo, stdout_only=True)
    diff = json.loads(metrics)["metrics/summary.json"]
    assert "ppl.UNIF-ALL.s70" in diff
    assert "sweep.sparsities" in run([dvc, "params", "diff"], repo)
