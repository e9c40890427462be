"""Peak memory (max RSS) and wall time of the ``train`` and ``evaluate`` stages of one cell.

Runs ``sponlab train`` and then ``sponlab evaluate`` (on the biases just trained) for one config
and sparsity in ``--workdir`` (default: this repository), reading the pipeline's inputs at their
dvc.yaml paths (``models/base``, ``data/blocks``, ``models/thresholds``, ``data/dense``,
``metrics/dense.json``; run ``dvc repro`` first) and writing outputs to a temporary folder, so DVC's
outputs are never touched. Max RSS comes from ``/usr/bin/time -v`` (the kernel's exact peak of
the process) or, where that tool is missing, from psutil polling of the process tree every 20 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import ROOT, print_table, save_result

TIME_BIN = Path("/usr/bin/time")


def stage_env() -> dict[str, str]:
    """Environment whose PATH finds this venv's ``sponlab`` and ``dvc`` first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _poll_peak(process: subprocess.Popen, peak: list[int]) -> None:
    import psutil

    try:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            peak[0] = max(peak[0], total)
            time.sleep(0.02)
    except psutil.Error:
        return


def peak_rss(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd`` and return its wall time, exit code and peak RSS in MiB."""
    start = time.perf_counter()
    if TIME_BIN.is_file():
        done = subprocess.run(
            [str(TIME_BIN), "-v", *cmd], cwd=cwd, env=stage_env(), capture_output=True, text=True
        )
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        rss_mib = int(match.group(1)) / 1024 if match else None
        rc, tail, how = done.returncode, done.stderr[-2000:], "/usr/bin/time -v"
    else:
        process = subprocess.Popen(
            cmd, cwd=cwd, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        peak = [0]
        poller = threading.Thread(target=_poll_peak, args=(process, peak), daemon=True)
        poller.start()
        output = process.communicate()[0].decode(errors="replace")
        poller.join()
        rss_mib = peak[0] / 2**20
        rc, tail, how = process.returncode, output[-2000:], "psutil polling (20 ms)"
    seconds = time.perf_counter() - start
    if rc != 0:
        print(f"command failed ({rc}): {' '.join(cmd)}\n{tail}", file=sys.stderr)
    return {"seconds": round(seconds, 2), "rc": rc, "max_rss_mib": rss_mib, "how": how}


def stage_commands(params: str, config: str, sparsity: float, out: Path) -> dict[str, list[str]]:
    """The train and evaluate commands of one cell, inputs at their dvc.yaml paths."""
    common = ["--params", params, "--config", config, "--sparsity", f"{sparsity:g}"]
    common += ["--model", "models/base", "--thresholds", "models/thresholds"]
    trained = out / "t"  # the cell folder train writes (one seedK/ per seed), evaluate reads
    evaluate = ["--blocks", "data/blocks/test.safetensors", "--dense", "data/dense"]
    evaluate += ["--dense-metrics", "metrics/dense.json", "--trained", str(trained)]
    return {
        "train": ["sponlab", "train", *common, "--data", "data/blocks", "--out", str(trained)],
        "evaluate": ["sponlab", "evaluate", *common, *evaluate, "--out", str(out / "e")],
    }


def default_cell(workdir: Path, params: str) -> tuple[str, float]:
    """The sweep config with the most bias sites (UNIF-ALL if swept) at the first sparsity."""
    raw = yaml.safe_load((workdir / params).read_text())
    configs = raw["sweep"]["configs"]
    config = "UNIF-ALL" if "UNIF-ALL" in configs else configs[-1]
    return config, float(raw["sweep"]["sparsities"][0])


def measure(
    workdir: Path, params: str = "params.yaml", config: str | None = None, sparsity=None
) -> list[dict[str, Any]]:
    """Peak RSS rows for the train and evaluate stage of one cell in ``workdir``."""
    default_config, default_sparsity = default_cell(workdir, params)
    config = config or default_config
    sparsity = default_sparsity if sparsity is None else sparsity
    out = Path(tempfile.mkdtemp(prefix="sponlab-mem-"))
    try:
        rows = []
        for stage, cmd in stage_commands(params, config, sparsity, out).items():
            print(f"[memory] {stage} {config} s={sparsity:g} ...", flush=True)
            row = {"stage": stage, "config": config, "sparsity": sparsity}
            rows.append({**row, **peak_rss(cmd, workdir)})
        return rows
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT)
    parser.add_argument("--params", default="params.yaml", help="Relative to --workdir.")
    parser.add_argument("--config", default=None, help="Default: UNIF-ALL (most bias sites).")
    parser.add_argument("--sparsity", type=float, default=None, help="Default: first swept.")
    parser.add_argument("--name", default="memory", help="Result: bench/results/<name>.json")
    args = parser.parse_args()
    rows = measure(args.workdir.resolve(), args.params, args.config, args.sparsity)
    print_table(rows, ["stage", "config", "sparsity", "seconds", "max_rss_mib", "rc"])
    save_result(
        args.name,
        {
            "what": "peak RSS and wall time of sponlab train / evaluate for one cell",
            "settings": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
        },
    )
    if any(row["rc"] != 0 for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
