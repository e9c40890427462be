"""Wall time of pipeline (re-)runs: ``dvc repro`` from scratch, a no-op ``dvc repro``, and one
added sparsity with ``dvc exp run -S sweep.sparsities=[...]``, in a fresh copy of the project.

The copy (tracked and untracked-but-not-ignored files, so no ``models/``, ``data/`` or DVC cache) is
made in a temporary folder and committed to a new git repository there; this repository is not
touched. Stage commands run with this venv's ``sponlab`` (an editable install of this checkout).
For each phase the script streams DVC's output, notes when each ``Running stage '...'`` line
appears (per-stage wall time = time until the next stage starts) and lists the stages that ran.
An added sparsity should re-run only the cells of that sparsity (``calibrate@s``, ``train@*-s``,
``evaluate@*-s``) plus the aggregating stages, and cost about one sparsity's share of the
scratch run (sum of the scratch times of the stages of the first sparsity), not a full rebuild.
Afterwards the peak RSS of one train and one evaluate cell is measured in the copy (memory.py).

``--tiny`` runs everything on a tiny random-init Llama (bench/tiny_params.yaml overlay, about a
minute); ``--params FILE`` deep-merges another YAML overlay into the copy's params.yaml.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from benchlib import ROOT, print_table, save_result
from memory import measure, stage_env

TINY_OVERLAY = ROOT / "bench" / "tiny_params.yaml"
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
GIT_ID = ["-c", "user.name=sponlab-bench", "-c", "user.email=bench@localhost"]


@dataclass
class Phase:
    """One timed DVC command: wall time, stages run (with durations) and stages skipped."""

    name: str
    command: list[str]
    seconds: float = 0.0
    rc: int = 0
    ran: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "command": " ".join(self.command),
            "seconds": round(self.seconds, 2),
            "rc": self.rc,
            "stages_ran": {k: round(v, 2) for k, v in self.ran.items()},
            "stages_skipped": len(self.skipped),
        }


def run_phase(name: str, command: list[str], cwd: Path, log_dir: Path) -> Phase:
    """Run ``command`` streaming its output into ``log_dir/<name>.log``; time every stage."""
    phase = Phase(name, command)
    print(f"[pipeline] {name}: {' '.join(command)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    current: tuple[str, float] | None = None
    with (log_dir / f"{name}.log").open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=stage_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            now = time.perf_counter()
            started, skipped = RUNNING.search(line), SKIPPED.search(line)
            if (started or skipped) and current is not None:
                phase.ran[current[0]] = now - current[1]
                current = None
            if started:
                current = (started.group(1), now)
                print(f"  running {started.group(1)}", flush=True)
            elif skipped:
                phase.skipped.append(skipped.group(1))
        phase.rc = process.wait()
    phase.seconds = time.perf_counter() - start
    if current is not None:
        phase.ran[current[0]] = phase.seconds - (current[1] - start)
    if phase.rc != 0:
        tail = (log_dir / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"{name} failed with exit code {phase.rc}:\n{tail}")
    return phase


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` merged into ``base`` (mappings recursively, everything else replaced)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# Pipeline state that would make the copy not "from scratch": the lock file and metrics outputs.
NOT_COPIED = ("dvc.lock", "metrics/")


def copy_project(dest: Path) -> None:
    """Copy tracked and untracked-not-ignored files of this checkout into ``dest``, except the
    pipeline state in ``NOT_COPIED``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if rel.startswith(NOT_COPIED):
            continue
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def prepare_copy(dest: Path, overlays: list[dict]) -> dict:
    """Copy the project, apply the params overlays, git-commit it (and ``dvc init`` if needed)."""
    copy_project(dest)
    params_path = dest / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    for overlay in overlays:
        params = deep_merge(params, overlay)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env()
    git = ["git", *GIT_ID]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    if not (dest / ".dvc").is_dir():
        subprocess.run(["dvc", "init", "-q"], cwd=dest, check=True, env=env)
    commit(dest, "benchmark copy")
    return params


def commit(dest: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(
        ["git", *GIT_ID, "commit", "-q", "--allow-empty", "-m", message], cwd=dest, check=True
    )


def tiny_overlay(workdir: Path) -> dict:
    """bench/tiny_params.yaml with ``base.name`` pointing at a freshly saved tiny Llama."""
    from sponlab.model.tiny import save_tiny

    model_dir = save_tiny(workdir / "tiny-model", "llama")
    overlay = yaml.safe_load(TINY_OVERLAY.read_text())
    return deep_merge(overlay, {"base": {"source": "hub", "name": str(model_dir)}})


def stage_kind(stage: str) -> str:
    """``train@UNIF-ALL-0.5`` -> ``train``: the stage of dvc.yaml a matrix entry belongs to."""
    return stage.partition("@")[0]


def report_scratch(name: str, scratch: Phase, memory: list[dict]) -> None:
    """Per dvc.yaml stage: entries run, total and mean seconds, share of the scratch time."""
    kinds: dict[str, list[float]] = {}
    for stage, seconds in scratch.ran.items():
        kinds.setdefault(stage_kind(stage), []).append(seconds)
    rows = [
        {
            "stage": kind,
            "entries": len(times),
            "seconds": sum(times),
            "mean_s": sum(times) / len(times),
            "share": sum(times) / scratch.seconds,
        }
        for kind, times in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))
    ]
    print(f"dvc repro from scratch: {scratch.seconds:.0f} s, {len(scratch.ran)} stages")
    print_table(rows, ["stage", "entries", "seconds", "mean_s", "share"])
    if memory:
        print_table(memory, ["stage", "config", "sparsity", "seconds", "max_rss_mib", "rc"])
    save_result(
        name,
        {
            "what": "wall time of dvc repro from scratch, per stage",
            "phases": {"scratch": scratch.summary()},
            "by_stage": rows,
            "memory": memory,
        },
    )


def mentions_sparsity(stage: str, sparsity: float) -> bool:
    """Whether a matrix stage name (``train@UNIF-ALL-0.5``, ``calibrate@0.5``) is that sparsity's."""
    return re.search(rf"(?<![\d.]){re.escape(f'{sparsity:g}')}(?![\d.])", stage) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny random-init model pipeline.")
    parser.add_argument("--params", type=Path, action="append", default=[], help="YAML overlay.")
    parser.add_argument("--add-sparsity", type=float, default=0.7)
    parser.add_argument("--no-memory", action="store_true", help="Skip the RSS measurement.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary copy.")
    parser.add_argument(
        "--scratch-only", action="store_true", help="Only `dvc repro` from scratch (no re-runs)."
    )
    parser.add_argument(
        "--name", default=None, help="Default: pipeline or pipeline-tiny (+ -scratch)"
    )
    args = parser.parse_args()
    name = args.name or ("pipeline-tiny" if args.tiny else "pipeline")
    name = name if args.name or not args.scratch_only else f"{name}-scratch"
    work = Path(tempfile.mkdtemp(prefix="sponlab-bench-"))
    copy = work / "project"
    log_dir = ROOT / "bench" / "results" / f"{name}-logs"
    try:
        overlays = [tiny_overlay(work)] if args.tiny else []
        overlays += [yaml.safe_load(p.read_text()) or {} for p in args.params]
        params = prepare_copy(copy, overlays)
        sparsities = [float(s) for s in params["sweep"]["sparsities"]]
        if args.add_sparsity in sparsities:
            raise SystemExit(f"--add-sparsity {args.add_sparsity} is already swept: {sparsities}")
        scratch = run_phase("scratch", ["dvc", "repro"], copy, log_dir)
        if args.scratch_only:
            report_scratch(name, scratch, [] if args.no_memory else measure(copy))
            return
        commit(copy, "after dvc repro")
        noop = run_phase("noop", ["dvc", "repro"], copy, log_dir)
        new = [*sparsities, args.add_sparsity]
        setting = f"sweep.sparsities=[{','.join(f'{s:g}' for s in new)}]"
        added = run_phase("add_sparsity", ["dvc", "exp", "run", "-S", setting], copy, log_dir)
        memory = [] if args.no_memory else measure(copy)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report_full(name, args, sparsities, [scratch, noop, added], setting, memory)


def report_full(name, args, sparsities, phases: list[Phase], setting: str, memory) -> None:
    """Tables and result file of the three phases (scratch, no-op, added sparsity)."""
    scratch, _, added = phases
    share_stages = [s for s in scratch.ran if mentions_sparsity(s, sparsities[0])]
    share = sum(scratch.ran[s] for s in share_stages)
    other = [s for s in added.ran if not mentions_sparsity(s, args.add_sparsity)]
    rows = [
        {
            "phase": p.name,
            "seconds": p.seconds,
            "ran": len(p.ran),
            "skipped": len(p.skipped),
            "vs_scratch": p.seconds / scratch.seconds,
        }
        for p in phases
    ]
    print_table(rows, ["phase", "seconds", "ran", "skipped", "vs_scratch"])
    print(
        f"add_sparsity ran {len(added.ran) - len(other)} stages of s={args.add_sparsity:g} and "
        f"{len(other)} others {other}; one sparsity's share of scratch "
        f"(s={sparsities[0]:g}, {len(share_stages)} stages) = {share:.1f}s, "
        f"add_sparsity / share = {added.seconds / max(share, 1e-9):.2f}"
    )
    if memory:
        print_table(memory, ["stage", "config", "sparsity", "seconds", "max_rss_mib", "rc"])
    save_result(
        name,
        {
            "what": "wall time of dvc repro from scratch, no-op dvc repro, one added sparsity",
            "settings": {"tiny": args.tiny, "overlays": [str(p) for p in args.params]},
            "stages_total": len(scratch.ran),
            "phases": {p.name: p.summary() for p in phases},
            "add_sparsity": {
                "setting": setting,
                "stages_of_new_sparsity": len(added.ran) - len(other),
                "other_stages": other,
                "share_of_one_sparsity_s": round(share, 2),
                "ratio_to_share": round(added.seconds / max(share, 1e-9), 3),
            },
            "memory": memory,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
