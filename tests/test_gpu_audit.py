"""bench/gpu_audit.py runs as pasted on CPU (small shapes): every stage's library function, the
analysis stages with SAE features, and a ``device_map: auto`` load, each checked; the memory
model's estimate sits beside the stages it sizes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python bench/gpu_audit.py --device cpu --dtype float32 --blocks 4 --length 32"


def test_gpu_audit_runs_every_stage_on_cpu(tmp_path: Path):
    subprocess.run(f"{COMMAND} --out {tmp_path}", shell=True, cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    result = json.loads((tmp_path / "gpu_audit.json").read_text())
    by_model: dict[str, dict[str, dict]] = {}
    for row in result["rows"]:
        by_model.setdefault(row["model"], {})[row["stage"]] = row
    tiny, mapped = by_model["tiny Llama"], by_model["tiny, device_map auto on ['cpu']"]
    analyses = {"calibrate (histogram)", "sae (capture + train)", "importance (values, SAE)",
                "importance (gradients, SAE)", "interpret captures"}  # fmt: skip
    assert analyses <= set(tiny) and {"calibrate", "train", "evaluate"} <= set(mapped)
    assert set(tiny) - analyses == set(mapped)  # the device_map model runs every smoke stage
    assert all(r["seconds"] > 0 and r["checked"] for r in result["rows"])
    sized = {s for s, r in tiny.items() if r["estimate_mib"] is not None}
    assert sized == {"calibrate", "dense", "train", "evaluate"}
    assert "2 aggregates on cpu" in tiny["importance (gradients, SAE)"]["checked"]
