"""A wheel built from the repository is complete: every package, the stage entries, the prompt set.

The default test installs the wheel (without dependencies) into an empty target folder and runs
it from there with this environment's dependencies, from a directory outside the checkout, so
nothing can come from the source tree. The slow test does the same in a brand-new venv with the
locked dependencies, as a user who runs ``pip install sponlab-*.whl`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def check(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel (built offline from this checkout) and the build's output."""
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"]
    log = check([*pip, "-w", str(out), str(ROOT)], cwd=out)
    (path,) = out.glob("sponlab-*.whl")
    return path, log


def test_wheel_ships_every_package_and_the_prompt_set(wheel):
    path, log = wheel
    assert "is absent from the `packages` configuration" not in log
    names = set(zipfile.ZipFile(path).namelist())
    expected = {
        "sponlab/resources/prompts.yaml",
        "sponlab/stages/train.py",
        "sponlab/stages/common.py",
        "sponlab/studies/interpret/params.py",
        "sponlab/sweep/plots.py",
    }
    assert expected <= names, sorted(expected - names)
    sources = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("*.py")}
    assert sources <= names, sorted(sources - names)


def test_installed_wheel_runs_the_cli_and_finds_its_prompts(wheel, tmp_path):
    path, _ = wheel
    target = tmp_path / "site"
    check(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-t", str(target), str(path)],
        tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import sponlab, sponlab.studies.interpret.prompts as p; "
        "print(sponlab.__file__); print(len(p.load_prompt_sets()))"
    )
    where, categories = check([sys.executable, "-c", probe], tmp_path, env).split()[:2]
    assert Path(where).is_relative_to(target), f"imported {where}, not the installed wheel"
    assert int(categories) >= 5
    help_text = check([sys.executable, str(target / "bin/sponlab"), "--help"], tmp_path, env)
    assert "calibrate" in help_text and "layer-importance" in help_text


@pytest.mark.slow
def test_wheel_in_a_clean_venv_with_the_locked_dependencies(wheel, tmp_path):
    path, _ = wheel
    venv = tmp_path / "venv"
    check([sys.executable, "-m", "venv", str(venv)], tmp_path)
    pip = [str(venv / "bin/pip"), "install", "-q"]
    check([*pip, "torch==2.13.0"], tmp_path)
    check([*pip, "--no-deps", "--require-hashes", "-r", str(ROOT / "requirements.lock")], tmp_path)
    check([*pip, "--no-deps", str(path)], tmp_path)
    assert "calibrate" in check([str(venv / "bin/sponlab"), "--help"], tmp_path)
    probe = "import sponlab.studies.interpret.prompts as p; print(len(p.load_prompt_sets()))"
    assert int(check([str(venv / "bin/python"), "-c", probe], tmp_path)) >= 5
