"""MKL reads MKL_CBWR once, when torch loads it: sponlab must set it before anything imports
torch, or the multi-threaded sgemm varies from process to process (bench/determinism.py)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = r"""
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("MKL_CBWR"))
        return None
sys.meta_path.insert(0, Watch())
{imports}
import torch  # in case nothing above loaded it
print(seen[0])
"""


def cbwr_when_torch_loads(imports: str, env: dict[str, str]) -> str:
    """MKL_CBWR as it was at the first import of torch in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}


def test_cli_sets_strict_cbwr_before_torch_loads():
    assert cbwr_when_torch_loads("import sponlab.cli", clean_env()) == "AUTO,STRICT"


def test_library_import_sets_it_too():
    assert cbwr_when_torch_loads("from sponlab import train_spon", clean_env()) == "AUTO,STRICT"


def test_users_own_setting_wins():
    env = {**clean_env(), "MKL_CBWR": "COMPATIBLE"}
    assert cbwr_when_torch_loads("import sponlab.cli", env) == "COMPATIBLE"


def test_without_sponlab_nothing_is_set():
    """The probe can fail: plain torch sees no MKL_CBWR."""
    assert cbwr_when_torch_loads("", clean_env()) == "None"
