"""The DVC pipeline's stage commands on a machine without DVC (a lent GPU), level by level.

A GPU machine here has PyTorch and CUDA but no DVC and no network, so the pipeline cannot run
there as ``dvc repro``. This script splits the job:

``prepare --out .gpu`` (here): everything ``bench/gpu_session.sh`` needs in one folder to carry:
the tiny pipeline project (bench/tiny_params.yaml with ``base.device`` / ``base.dtype`` set), its
planned commands, sponlab's wheel and the builtin text the ``prepare`` stage reads.

``plan`` (here, with DVC): read a prepared project's ``dvc.yaml`` through DVC's own stage graph
and write every stage's resolved command with its level (the longest chain of stages it waits
for) to a TSV; ``--targets`` keeps only those stages and what they need.

``run`` (there, no DVC): run the TSV's commands in the project folder exactly as DVC would, the
stages of one level in parallel (``--jobs``), a level only after the one before succeeded; each
stage's seconds, exit code and log tail go to ``<out>/<name>.json``, then a check that every
metrics file's ``env`` names the device and dtype asked for.

``compare A B``: the outputs of two runs file by file (JSON without timings and environment, as
``bench/determinism.py`` digests them): same command, same machine, same bytes. Files that differ
are split into those that hold a wall-clock time (``reproduce.TIMED_OUTPUTS``) and the rest.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from benchlib import ROOT
from determinism import digest

from sponlab.tools.reproduce import TIMED_OUTPUTS

OUTPUT_DIRS = ("models", "data", "metrics", "plots")
TEXT = ("exllamav3", "conversion", "standard_cal_data")  # where io.data finds the builtin text


def plan(project: Path, targets: list[str]) -> list[tuple[int, str, str]]:
    """(level, stage, command) of every stage of ``project`` (or of ``targets`` and their deps)."""
    import networkx as nx
    from dvc.repo import Repo

    graph = Repo(str(project)).index.graph  # edges point from a stage to the stages it needs
    stages = {s.name: s for s in graph.nodes}
    if targets:
        unknown = [t for t in targets if t not in stages]
        if unknown:
            raise SystemExit(f"--targets: unknown stages {unknown}")
        keep = set().union(*({t} | {d.name for d in nx.descendants(graph, stages[t])}
                             for t in targets))  # fmt: skip
        graph = graph.subgraph([stages[k] for k in keep])
    level: dict = {}
    for stage in reversed(list(nx.topological_sort(graph))):
        level[stage] = 1 + max((level[d] for d in graph.successors(stage)), default=-1)
    rows = []
    for stage, lvl in level.items():
        if stage.frozen or not getattr(stage, "cmd", None):
            continue  # a frozen or command-less stage: its outputs are committed
        cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
        rows.append((lvl, stage.name, cmd))
    return sorted(rows)


def write_commands(path: Path, rows: list[tuple[int, str, str]]) -> None:
    """The planned commands as ``level<TAB>stage<TAB>command`` lines (what ``run`` reads)."""
    path.write_text("".join(f"{lvl}\t{stage}\t{cmd}\n" for lvl, stage, cmd in rows))


def read_commands(path: Path) -> list[tuple[int, str, str]]:
    """The rows :func:`write_commands` wrote."""
    lines = path.read_text().splitlines()
    return [(int(lvl), stage, cmd) for lvl, stage, cmd in (ln.split("\t", 2) for ln in lines)]


def tiny_project(project: Path, device: str, dtype: str) -> list[tuple[int, str, str]]:
    """A copy of this project with bench/tiny_params.yaml and ``base`` on ``device`` in
    ``dtype`` (its tiny model in ``tiny-model/``, named relatively), and its planned commands."""
    from pipeline import TINY_OVERLAY, deep_merge, prepare_copy

    from sponlab.model.tiny import save_tiny

    save_tiny(project / "tiny-model", "llama")
    base = {"source": "hub", "name": "tiny-model", "device": device, "dtype": dtype}
    overlay = deep_merge(yaml.safe_load(TINY_OVERLAY.read_text()), {"base": base})
    prepare_copy(project, [overlay])  # a git + DVC project, so DVC can plan it
    rows = plan(project, [])
    for meta in (".git", ".dvc"):
        shutil.rmtree(project / meta)
    return rows


def prepare(out: Path, device: str, dtype: str) -> None:
    """The tiny project, its commands, sponlab's wheel and the builtin text, under ``out``."""
    from sponlab.io.data import builtin_text_dir

    shutil.rmtree(out, ignore_errors=True)
    rows = tiny_project(out / "tiny", device, dtype)
    write_commands(out / "tiny.tsv", rows)
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*wheel, "-w", str(out / "whl"), str(ROOT)], check=True)
    text = out / "site" / Path(*TEXT)
    shutil.copytree(builtin_text_dir(), text, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "site" / TEXT[0] / "__init__.py").touch()
    print(f"{len(rows)} stages planned; carry {out} and run: bash bench/gpu_session.sh {out}")


def _one(project: Path, stage: str, cmd: str, sponlab: str) -> dict:
    """Run one stage command (``sponlab`` replaced by ``sponlab``'s invocation)."""
    args = shlex.split(cmd)
    if args[0] == "sponlab":
        args = [*shlex.split(sponlab), *args[1:]]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=project, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"  {stage}: rc {done.returncode} in {seconds:.1f}s", flush=True)
    tail = (done.stdout + done.stderr)[-2000:]
    return {"stage": stage, "seconds": round(seconds, 2), "rc": done.returncode, "tail": tail}


def run(project: Path, rows: list[tuple[int, str, str]], jobs: int, sponlab: str) -> list[dict]:
    """Every command, level by level; stops after the first level with a failed stage."""
    results: list[dict] = []
    for lvl in sorted({r[0] for r in rows}):
        batch = [r for r in rows if r[0] == lvl]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(lambda r: _one(project, r[1], r[2], sponlab), batch))
        print(f"level {lvl}: {len(batch)} stages in {time.perf_counter() - start:.1f}s", flush=True)
        results += [{"level": lvl, **d} for d in done]
        failed = [d for d in done if d["rc"] != 0]
        if failed:
            for d in failed:
                print(f"FAILED {d['stage']}:\n{d['tail']}", flush=True)
            break
    return results


def env_check(project: Path, device: str, dtype: str) -> list[str]:
    """Metrics files of stages that ran the model whose ``env`` does not name ``device`` (its
    type) and ``dtype``."""
    bad = []
    for path in sorted((project / "metrics").rglob("*.json")):
        env = json.loads(path.read_text()).get("env") if path.stat().st_size else None
        if not isinstance(env, dict) or "device" not in env:
            continue  # an aggregate of other files' numbers: no model ran in it
        text = json.dumps({k: env.get(k) for k in ("device", "dtype")})
        if device not in text or dtype not in text:
            bad.append(f"{path.relative_to(project)}: {text}")
    return bad


def compare(a: Path, b: Path) -> dict:
    """Files under the output folders of two runs: identical, differing, or on one side only."""

    def files(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for d in OUTPUT_DIRS if (root / d).is_dir()
                for p in (root / d).rglob("*") if p.is_file()}  # fmt: skip

    fa, fb = files(a), files(b)
    same = [k for k in sorted(fa.keys() & fb.keys()) if digest(fa[k]) == digest(fb[k])]
    differ = sorted((fa.keys() & fb.keys()) - set(same))
    timed = [k for k in differ if k.startswith(TIMED_OUTPUTS)]  # they hold a wall-clock time
    return {"identical": len(same), "differ_timed": timed,
            "differ": [k for k in differ if k not in timed],
            "only_one": sorted(fa.keys() ^ fb.keys())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p_plan = sub.add_parser("plan", help="write the stage commands (needs DVC)")
    p_plan.add_argument("--project", type=Path, default=Path("."))
    p_plan.add_argument("--targets", default="", help="comma list of stages (default: all)")
    p_plan.add_argument("--out", type=Path, required=True)
    p_prep = sub.add_parser("prepare", help="the folder a GPU session carries (needs DVC)")
    p_prep.add_argument("--out", type=Path, default=Path(".gpu"))
    p_prep.add_argument("--device", default="cuda")
    p_prep.add_argument("--dtype", default="bfloat16")
    p_run = sub.add_parser("run", help="run planned commands (no DVC needed)")
    p_run.add_argument("--project", type=Path, required=True)
    p_run.add_argument("--commands", type=Path, required=True)
    p_run.add_argument("--jobs", type=int, default=8)
    p_run.add_argument("--sponlab", default=f"{sys.executable} -m sponlab.cli")
    p_run.add_argument("--device", default="cuda")
    p_run.add_argument("--dtype", default="bfloat16")
    p_run.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    p_cmp = sub.add_parser("compare", help="outputs of two runs, file by file")
    p_cmp.add_argument("a", type=Path)
    p_cmp.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.verb == "prepare":
        prepare(args.out, args.device, args.dtype)
    elif args.verb == "plan":
        rows = plan(args.project, [t for t in args.targets.split(",") if t])
        write_commands(args.out, rows)
        print(f"{len(rows)} stages in {1 + max(r[0] for r in rows)} levels -> {args.out}")
    elif args.verb == "run":
        rows = read_commands(args.commands)
        start = time.perf_counter()
        results = run(args.project, rows, args.jobs, args.sponlab)
        bad_env = env_check(args.project, args.device, args.dtype)
        summary = {"seconds": round(time.perf_counter() - start, 1), "planned": len(rows),
                   "ok": sum(r["rc"] == 0 for r in results), "env_mismatch": bad_env,
                   "stages": results}  # fmt: skip
        args.out.write_text(json.dumps(summary, indent=1))
        print(f"{summary['ok']} of {len(rows)} stages ok in {summary['seconds']}s; "
              f"env mismatches: {bad_env or 'none'}")  # fmt: skip
        raise SystemExit(0 if summary["ok"] == len(rows) and not bad_env else 1)
    else:
        print(json.dumps(compare(args.a, args.b), indent=1))


if __name__ == "__main__":
    main()
