"""Scale-out with DVC's own machinery, as the README documents it: experiments queued and run by
two workers, results shared through a DVC remote (a local directory here; S3, GCS or SSH alike)
and a git remote, so a second clone pulls finished cells instead of recomputing them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_pipeline import activated, ran_stages, run, tiny_repo

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    """``dvc queue status`` once no task is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = activated("dvc queue status", repo)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(5)
    raise AssertionError(f"queue still busy after {timeout}s:\n{status}")


@pytest.mark.slow
def test_two_queue_workers_and_a_shared_remote_let_a_clone_pull_instead_of_recompute(tmp_path):
    work = tiny_repo(tmp_path)
    hub = tmp_path / "hub.git"  # the team's git remote
    run(["git", "init", "-q", "--bare", str(hub)], tmp_path)
    activated(f"dvc remote add -d shared {tmp_path / 'dvc-remote'}", work)
    run(["git", "remote", "add", "origin", str(hub)], work)
    run([*GIT, "commit", "-qam", "shared remote"], work)

    # two experiments, two workers (one per GPU on a real machine: README "Scale-out"). The tiny
    # sweep lacks the configs the interpret stages read, so the runs stop at summarize.
    for name, s in (("s50", 0.5), ("s60", 0.6)):
        sweep = f"-S 'sweep.sparsities=[{s}]' -S 'interpret.sparsity={s}'"
        activated(f"dvc exp run --queue -n {name} {sweep} summarize", work)
    try:
        activated("dvc queue start -j 2", work)
        status = wait_for_queue(work)
    finally:
        activated("dvc queue stop", work)
    assert status.count("Success") == 2, status

    # the workspace's params are s50's: its stages are in the run-cache the workers filled, so
    # the workspace restores them; only summarize, whose outputs are git-tracked (cache: false)
    # and so never in the run-cache, runs again (seconds)
    assert "s60" in activated("dvc exp show --md", work)
    restored = activated("dvc repro summarize", work)
    assert ran_stages(restored) <= {"summarize"}, restored
    assert "Stage 'train@UNIF-ALL-0.5' is cached - skipping run" in restored
    run([*GIT, "add", "-A"], work)
    run([*GIT, "commit", "-qm", "run"], work)
    activated("dvc push", work)
    run(["git", "push", "-q", "origin", "HEAD:main"], work)
    activated("dvc exp push origin s60", work)  # the other experiment: git refs and cache

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "-b", "main", str(hub), str(clone)], tmp_path)
    activated("dvc pull --with-deps summarize", clone)  # the tiny run stops there
    assert ran_stages(activated("dvc repro summarize", clone)) == set()  # nothing recomputed
    # the shared experiment, in a clone of its own (a clone that pulled the main run keeps those
    # cells in metrics/eval/, which summarize's directory dependency would see)
    other = tmp_path / "other"
    run(["git", "clone", "-q", "-b", "main", str(hub), str(other)], tmp_path)
    activated("dvc exp pull origin s60 && dvc exp branch s60 s60-run", other)
    run(["git", "checkout", "-q", "s60-run"], other)
    activated("dvc pull --with-deps summarize", other)
    assert ran_stages(activated("dvc repro summarize", other)) == set()
    assert "sparsity: 0.6" in (other / "params.yaml").read_text()
