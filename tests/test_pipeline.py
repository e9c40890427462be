"""End-to-end: the shipped Makefile and dvc.yaml on a tiny model in a temporary git repository.

The first run is the README's documented path exactly: ``make repro`` in a fresh checkout, with
nothing activated and this venv NOT on PATH (dvc.yaml's commands call ``sponlab``; the Makefile
must provide it). It checks outputs, metrics and the results overview ``make repro`` prints.
Then, as the README says for every other command, in a shell that ran
``source .venv/bin/activate``: a second ``dvc repro`` is a no-op, ``dvc exp run -S`` adding one
sparsity runs only the new cells (and the aggregation), ``dvc metrics diff`` / ``dvc params diff``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sponlab.model.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the venv `make install` created (tests run with its python)
CONFIGS = ["BASELINE-TEAL", "UNIF-ALL", "CLOSED-FORM", "STUDY-ATTN-ONLY", "GREEDY-TEAL"]
SETS = ["all", "o_proj", "all-greedy"]
RANKED = ["RANKED-90"]  # layers from UNIF-ALL's measured ranking: layer-importance runs first
OLD = 946684800  # 2000-01-01: copied files predate the venv's install stamp (no reinstall)


def clean_env() -> dict[str, str]:
    """The environment of a fresh shell: the venv is neither activated nor on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    parts = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in parts if Path(p).resolve() != (VENV / "bin").resolve())
    return env


def run(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    """Run a command in a clean environment; its output (DVC logs progress on stderr)."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=clean_env())
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def activated(command: str, cwd: Path, stdout_only: bool = False) -> str:
    """``command`` in a shell after ``source .venv/bin/activate``, as the README documents."""
    script = f"source {shlex.quote(str(VENV / 'bin/activate'))} && {command}"
    return run(["bash", "-c", script], cwd, stdout_only)


def tiny_params(model_dir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"] = {"source": "hub", "name": str(model_dir), "device": "cpu", "dtype": "float32"}
    params["data"].update(block_len=16, calib_blocks=4, train_blocks=6, val_blocks=2, test_blocks=4)
    params["sweep"] = {"configs": CONFIGS, "ranked": RANKED, "sparsities": [0.5], "sets": SETS}
    greedy = {"modules": "all", "allocation": "greedy", "step": 0.2, "blocks": 2}
    params["sparsify"]["sets"] = {"all": "all", "o_proj": ["o_proj"], "all-greedy": greedy}
    params["configs"] = {k: v for k, v in params["configs"].items() if k != "STUDY-UNIF-ALL"}
    params["configs"]["UNIF-ALL"]["seeds"] = [0, 1]
    params["train"].update(epochs=1, batch_size=2, warmup_steps=0, blocks=4)  # seeds draw 4 of 6
    params["eval"] = {"batch_size": 2, "detail_blocks": 2}
    params["interpret"]["layers"].update(val_blocks=2, batch_size=2)
    params["interpret"]["learning_curve"].update(sizes=[2, 4], seeds=[0, 1], domain_blocks=2)
    return params


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return tiny_repo(tmp_path_factory.mktemp("pipeline"))


def tiny_repo(root: Path) -> Path:
    """A fresh checkout of this tree (tracked and new files) with tiny params, committed."""
    model_dir = save_tiny(root / "tiny-model", "llama", layers=2, hidden=32)
    work = root / "repo"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    for name in run(listed, ROOT).split():
        source = ROOT / name
        if source.is_file() and not name.startswith((".dvc/", "dvc.lock")):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
            os.utime(work / name, (OLD, OLD))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(model_dir), sort_keys=False))
    os.utime(work / "params.yaml", (OLD, OLD))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], work)
    run([str(VENV / "bin/dvc"), "init", "-q"], work)
    run([*git, "add", "-A"], work)
    run([*git, "commit", "-qm", "tiny"], work)
    return work


def test_tiny_dvc_pipeline_end_to_end(repo: Path):
    # the README's command, venv not on PATH; VENV points make at the installed environment
    first = run(["make", "repro", f"VENV={VENV}", "TARGETS=plots"], repo)
    assert "pip install" not in first, "make repro reinstalled although the venv is current"
    expected = {"base", "prepare", "teacher", "dense", "summarize", "plots", "layer-importance"}
    expected |= {f"{kind}@{s}-0.5" for kind in ("calibrate", "baseline") for s in SETS}
    expected |= {f"{kind}@{c}-0.5" for kind in ("train", "evaluate") for c in CONFIGS}
    expected |= {f"{kind}-ranked@{c}-0.5" for kind in ("train", "evaluate") for c in RANKED}
    assert ran_stages(first) == expected
    check_ranked_cell(repo)

    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary["ppl"]) == set(CONFIGS + RANKED)
    baseline = summary["teal_ppl"]["BASELINE-TEAL"]["s50"]
    # BASELINE-TEAL has no biases: its SPON ppl is its TEAL ppl; every cell's TEAL-only baseline
    # sparsifies the same modules, so they agree
    assert summary["ppl"]["BASELINE-TEAL"]["s50"] == baseline
    assert summary["teal_ppl"]["UNIF-ALL"]["s50"] == baseline
    assert summary["teal_ppl"]["CLOSED-FORM"]["s50"] == baseline
    assert summary["teal_ppl"]["STUDY-ATTN-ONLY"]["s50"] != baseline  # its own set: o_proj only
    assert summary["teal_ppl"]["GREEDY-TEAL"]["s50"] != baseline  # per-layer greedy allocation
    check_greedy_allocation(repo)
    check_learning_curve(repo)
    assert summary["dense_ppl"] > 0 and all(v["s50"] > 0 for v in summary["ppl"].values())
    cell = json.loads((repo / "metrics/eval/UNIF-ALL/s0.5/metrics.json").read_text())
    assert abs(cell["achieved_sparsity"]["mean"] - 0.5) < 0.1
    assert [row["seed"] for row in cell["spon_seeds"]] == [0, 1]
    assert cell["spon"]["ppl"]["n"] == 2
    for seed in (0, 1):
        assert (repo / f"models/spon/UNIF-ALL/s0.5/seed{seed}/biases.safetensors").is_file()
    study = json.loads((repo / "metrics/eval/STUDY-ATTN-ONLY/s0.5/metrics.json").read_text())
    assert abs(study["achieved_sparsity"]["mean"] - 0.5) < 0.1  # calibrated for o_proj alone
    for name in ("summary.csv", "summary.md", "summary.tex"):
        assert (repo / "metrics/tables" / name).stat().st_size > 0
    for name in ("ppl_by_config.png", "pareto.png", "loss_curves.png", "shift_s50.png"):
        assert (repo / "plots/sweep" / name).stat().st_size > 1000

    assert "metrics/tables/summary.md" in first and "| config | sparsity |" in first

    second = activated("dvc repro plots", repo)
    assert ran_stages(second) == set()

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "reference run"], repo)
    # the committed run compared with itself: every output identical, no metric off
    check = activated("sponlab check-repro", repo)
    assert re.search(r"bit-identical to the reference: (\d+) of \1\n", check), check
    assert "beyond rtol=0: 0" in check
    third = activated("dvc exp run -S 'sweep.sparsities=[0.5,0.7]' plots", repo)
    new = {"summarize", "plots"}
    new |= {f"{kind}@{s}-0.7" for kind in ("calibrate", "baseline") for s in SETS}
    new |= {f"{kind}@{c}-0.7" for kind in ("train", "evaluate") for c in CONFIGS}
    new |= {f"{kind}-ranked@{c}-0.7" for kind in ("train", "evaluate") for c in RANKED}
    assert ran_stages(third) == new  # the ranking (at interpret.sparsity) is not re-measured

    metrics = activated("dvc metrics diff --json", repo, stdout_only=True)
    diff = json.loads(metrics)["metrics/summary.json"]
    assert "ppl.UNIF-ALL.s70" in diff
    assert "sweep.sparsities" in activated("dvc params diff", repo)


def check_greedy_allocation(repo: Path) -> None:
    """The greedy set's sites get different sparsities, averaging the target when weighted by
    their weights; its search path and figure exist; the uniform set is uniform."""
    folder = repo / "metrics/allocation/s0.5"
    rows = list(csv.DictReader((folder / "all-greedy/allocation.csv").open()))
    assert len({row["sparsity"] for row in rows}) > 1
    assert {row["sparsity"] for row in csv.DictReader((folder / "all/allocation.csv").open())} == {
        "0.5"
    }
    path = list(csv.DictReader((folder / "all-greedy/path.csv").open()))
    finals = {row["layer"]: float(row["effective"]) for row in path}  # last row of each layer
    assert len(finals) == 2 and all(0.5 <= eff < 0.75 for eff in finals.values())
    assert (repo / "plots/sweep/allocation_all-greedy_s50.png").stat().st_size > 1000


def check_ranked_cell(repo: Path) -> None:
    """RANKED-90's biases sit on the fewest top layers of the measured ranking reaching 90%."""
    curves = list(csv.DictReader((repo / "metrics/interpret/layers/curves.csv").open()))
    needed = next(
        (int(r["k"]) for r in curves if r["measured"] and float(r["measured"]) >= 0.9 - 1e-12),
        len(curves),
    )
    layers = sorted(int(r["layer_added"]) for r in curves[:needed])
    train = json.loads((repo / "models/spon/RANKED-90/s0.5/seed0/train.json").read_text())
    assert train["layers"] == "ranked UNIF-ALL coverage 0.9: " + ",".join(map(str, layers))
    assert train["sites"] == len(layers)


def check_learning_curve(repo: Path) -> None:
    """The second sweep runs by hand as documented: every (config, size, seed) row, the default
    size read from the default train cell (identical biases to a retraining), the others
    retrained on nested draws; table, figure and metrics written. A second run resumes from the
    saved variants and writes the same bytes; a variant whose recipe changed is retrained."""
    activated("sponlab learning-curve --params params.yaml", repo)
    curve = repo / "metrics/learning_curve/curve.csv"
    first = curve.read_bytes()
    saved = repo / "models/learning_curve/ATTN-ONLY/s0.5/b2/seed1/variant.json"
    stale = repo / "models/learning_curve/UNIF-ALL/s0.5/b2/seed0/variant.json"
    stale.write_text(stale.read_text().replace('"recipe": "', '"recipe": "0'))
    before = saved.stat().st_mtime_ns
    activated("sponlab learning-curve --params params.yaml", repo)
    assert curve.read_bytes() == first
    assert saved.stat().st_mtime_ns == before  # reused, not retrained
    assert '"recipe": "0' not in stale.read_text()  # retrained under the current recipe
    rows = list(csv.DictReader(curve.open()))
    assert [(r["config"], r["size"], r["seed"]) for r in rows] == [
        (c, str(n), str(k)) for c in ("UNIF-ALL", "ATTN-ONLY") for n in (2, 4) for k in (0, 1)
    ]
    sources = {(r["config"], r["size"]): r["source"] for r in rows}
    assert sources[("UNIF-ALL", "4")] == "default train cell"  # train.blocks: 4
    assert sources[("UNIF-ALL", "2")] == sources[("ATTN-ONLY", "4")] == "retrained"
    assert all(float(r["val_kl"]) > 0 and int(r["steps"]) > 0 for r in rows)
    # damage recovered: empty only where the tiny model's TEAL damage is within noise
    cell = json.loads((repo / "metrics/eval/UNIF-ALL/s0.5/metrics.json").read_text())
    scored = [r["test_recovered"] != "" for r in rows]
    assert all(scored) == cell["teal_damage"]["measurable"] and len(set(scored)) == 1
    assert "(default)" in (repo / "metrics/learning_curve/curve.md").read_text()
    assert (repo / "plots/learning_curve/curve.png").stat().st_size > 1000
    metrics = json.loads((repo / "metrics/learning_curve.json").read_text())
    assert set(metrics["UNIF-ALL"]) == {
        "b2",
        "b4",
        "default_blocks",
        "slope_at_default",
        "data_limited",
    }
    assert metrics["UNIF-ALL"]["default_blocks"] == 4
