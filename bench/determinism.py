"""Stress test of bit-reproducibility: re-run stages exactly as DVC does and count differing outputs.

Runs ``sponlab calibrate`` (s=--sparsity, set all), ``sponlab train`` and ``sponlab evaluate`` of
one cell (--config) ``--runs`` times each into a scratch folder, every other run with a busy
process beside it (a CPU-bound loop on one core), and digests every output file (JSON without
the wall-clock and environment keys ``sponlab check-repro`` ignores, ``reproduce.IGNORED_KEYS``). Each stage must give one digest over all runs; the
calibrate digest is also compared with the thresholds file the committed ``dvc.lock`` records.

Needs the default pipeline's inputs up to the s=--sparsity baseline (``dvc repro
baseline@all-0.5``: blocks, thresholds, dense reference, TEAL baselines). The train runs use
params.yaml with ``train.blocks`` set to ``--train-blocks`` (the same code path on fewer steps;
0 keeps params.yaml's), the evaluate runs score the biases the last train run wrote, so no trained
cell of the workspace is needed::

    python bench/determinism.py --runs 10 --train-blocks 64   # ~35 min on 2 cores

``--mkl-cbwr VALUE`` sets MKL's conditional-numerical-reproducibility mode for the runs (MKL reads
it when torch loads it, so only from the environment; default: inherit). Measured on an Intel
CPU (AVX512/AMX, 2 threads): unset, 2 of 12 processes gave different TEAL-sparsified logits on
their first forward; ``AUTO`` keeps the default kernels (a retrained cell's biases are byte-identical to
the committed ones) but still let a validation KL differ in the 6th digit; ``AUTO,STRICT`` gave
10 of 10 identical calibrations, 9 of 9 identical trainings and 15 of 15 identical forwards. On
an AMD EPYC (Zen 4, 2026-12-04, ``--runs 10 --train-blocks 64``): one digest per stage over 10
calibrate, 10 train and 10 evaluate runs.

Writes bench/results/determinism.json; exit 1 if any stage gave more than one digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sponlab.io.provenance import cpu_identity
from sponlab.tools.reproduce import leaves

ROOT = Path(__file__).resolve().parent.parent
SPONLAB = str(Path(sys.executable).with_name("sponlab"))


def _busy(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def digest(path: Path) -> str:
    """md5 over every file under ``path`` (sorted); a JSON file by its leaves without the keys
    check-repro ignores (timings, env), so both call the same files identical."""
    md5 = hashlib.md5()
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    for file in files:
        md5.update(file.name.encode())
        if file.suffix == ".json":
            md5.update(json.dumps(sorted(leaves(json.loads(file.read_text())))).encode())
        else:
            md5.update(file.read_bytes())
    return md5.hexdigest()


def run(args: list[str], busy: bool, cbwr: str | None) -> float:
    """Run one ``sponlab`` command in the repo root (optionally beside a busy process)."""
    stop = multiprocessing.Event()
    load = multiprocessing.Process(target=_busy, args=(stop,)) if busy else None
    if load:
        load.start()
    start = time.perf_counter()
    try:
        env = dict(os.environ) | ({} if cbwr is None else {"MKL_CBWR": cbwr})
        subprocess.run([SPONLAB, *args], cwd=ROOT, env=env, check=True, capture_output=True)
    finally:
        if load:
            stop.set()
            load.join()
    return time.perf_counter() - start


def locked_md5(out: str) -> str | None:
    """The md5 dvc.lock records for the output ``out``."""
    for stage in yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"].values():
        for entry in stage.get("outs", []):
            if entry["path"] == out:
                return entry["md5"]
    return None


def train_params(scratch: Path, blocks: int) -> str:
    """params.yaml, or a copy in ``scratch`` with ``train.blocks`` set to ``blocks`` (> 0)."""
    if blocks <= 0:
        return "params.yaml"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["blocks"] = blocks
    path = scratch / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def commands(
    scratch: Path, config: str, sparsity: float, train_blocks: int
) -> dict[str, tuple[list[str], Path]]:
    """The three stage commands of dvc.yaml, writing to ``scratch`` instead of the workspace;
    evaluate scores the biases train wrote."""
    thresholds = scratch / "thresholds" / f"s{sparsity}" / "all.safetensors"
    trained = scratch / "spon"
    evals = scratch / "eval"
    common = ["--params", "params.yaml", "--sparsity", str(sparsity), "--model", "models/base"]
    calibrate = ["calibrate", *common, "--set", "all", "--blocks", "data/blocks/calib.safetensors"]
    calibrate += ["--out", str(thresholds), "--allocation", str(scratch / "allocation")]
    train = ["train", "--params", train_params(scratch, train_blocks), *common[2:]]
    train += ["--config", config, "--data", "data/blocks"]
    train += ["--thresholds", "models/thresholds", "--out", str(trained)]
    evaluate = ["evaluate", *common, "--config", config, "--blocks", "data/blocks/test.safetensors"]
    evaluate += ["--dense", "data/dense", "--dense-metrics", "metrics/dense.json"]
    evaluate += ["--thresholds", "models/thresholds", "--baselines", "data/baseline"]
    evaluate += ["--trained", str(trained), "--out", str(evals)]
    return {
        "calibrate": (calibrate, thresholds),
        "train": (train, trained),
        "evaluate": (evaluate, evals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--config", default="TOP-75")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--stages", default="calibrate,train,evaluate")
    parser.add_argument("--train-blocks", type=int, default=64, help="train.blocks (0: params')")
    parser.add_argument("--mkl-cbwr", default=None, help="MKL_CBWR for the runs (default: inherit)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/determinism.json")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="sponlab-determinism-"))
    plan = commands(scratch, args.config, args.sparsity, args.train_blocks)
    result: dict = {"runs": args.runs, "config": args.config, "sparsity": args.sparsity}
    result["train_blocks"] = args.train_blocks
    result["cpu"] = cpu_identity()
    result["mkl_cbwr"] = args.mkl_cbwr if args.mkl_cbwr is not None else os.environ.get("MKL_CBWR")
    for stage in args.stages.split(","):
        argv, out = plan[stage]
        digests, seconds = [], []
        for i in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            seconds.append(run(argv, busy=i % 2 == 1, cbwr=args.mkl_cbwr))
            digests.append(digest(out))
            print(
                f"{stage} run {i + 1}/{args.runs}: {digests[-1][:12]} ({seconds[-1]:.0f}s)",
                flush=True,
            )
        result[stage] = {
            "distinct_outputs": len(set(digests)),
            "digests": digests,
            "busy_runs": list(range(1, args.runs, 2)),
            "seconds": seconds,
        }
    if "calibrate" in result:
        file = plan["calibrate"][1]
        result["calibrate"]["equals_dvc_lock"] = hashlib.md5(
            file.read_bytes()
        ).hexdigest() == locked_md5(f"models/thresholds/s{args.sparsity}/all.safetensors")
    shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    bad = [s for s in args.stages.split(",") if result[s]["distinct_outputs"] != 1]
    print(json.dumps({s: result[s]["distinct_outputs"] for s in args.stages.split(",")}))
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
