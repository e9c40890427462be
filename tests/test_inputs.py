"""Files between stages: deterministic bytes, provenance, and clear errors for bad inputs.

A truncated, corrupt, missing or foreign input (thresholds or biases made for another model,
sparsity or site set) is refused with a message naming the file, what is wrong and the stage that
writes it, and the CLI turns it into one line and exit code 2, not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_PARAMS
from typer.testing import CliRunner

from sponlab.io.provenance import cpu_identity, environment, write_metrics
from sponlab.io.tensorio import InputFileError, load_tensors, save_tensors
from sponlab.method.sparsify import load_thresholds, thresholds_to_tensors
from sponlab.method.spon import SponBiases, load_biases, save_biases
from sponlab.model.loading import model_fingerprint
from sponlab.model.sites import discover_sites
from sponlab.model.tiny import tiny_model
from sponlab.tools.reproduce import (
    compare_metrics,
    compare_outputs,
    compare_run,
    cpu_of,
    failures,
    lock_outputs,
    machine_line,
    report,
)

META = {"split": "test", "source": "builtin", "block_len": 16, "bos": False, "seed": 3, "n": 7}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_equal_tensors_and_metadata_give_identical_bytes_across_processes(tmp_path):
    # safetensors orders __metadata__ by a per-process hash map; each process writes its own file
    script = (
        "import sys, torch; from sponlab.io.tensorio import save_tensors; "
        "save_tensors(sys.argv[1], {'b': torch.arange(6.0), 'a': torch.ones(2, 3)}, "
        f"{META!r})"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({md5(p) for p in paths}) == 1
    tensors, meta = load_tensors(paths[0])
    assert meta == META and torch.equal(tensors["b"], torch.arange(6.0))


def thresholds_file(tmp_path: Path, model, site_map, sparsity=0.5, **extra) -> Path:
    thresholds = {site: 0.1 for site in site_map.sites}
    meta = {"sparsity": sparsity, "model_fingerprint": model_fingerprint(model), **extra}
    return save_tensors(tmp_path / "s0.5.safetensors", thresholds_to_tensors(thresholds), meta)


def test_thresholds_round_trip_when_made_for_this_run(tmp_path, llama):
    model, site_map = llama
    path = thresholds_file(tmp_path, model, site_map)
    loaded = load_thresholds(path, site_map, 0.5, model_fingerprint(model))
    assert set(loaded) == set(site_map.sites)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:40]), "truncated or corrupt"),
        (lambda p: p.write_bytes(b"\x00" * 5), "truncated or corrupt"),
        (lambda p: p.unlink(), "file not found"),
    ],
)
def test_unreadable_thresholds_name_the_file_and_the_stage(tmp_path, llama, damage, message):
    model, site_map = llama
    path = thresholds_file(tmp_path, model, site_map)
    damage(path)
    with pytest.raises(InputFileError, match=message) as err:
        load_thresholds(path, site_map, 0.5)
    assert str(path) in str(err.value) and "dvc repro calibrate" in str(err.value)


def test_thresholds_for_another_sparsity_model_or_site_set_are_refused(tmp_path, llama):
    model, site_map = llama
    path = thresholds_file(tmp_path, model, site_map, sparsity=0.6)
    with pytest.raises(InputFileError, match=r"made for sparsity=0.6, but this run needs"):
        load_thresholds(path, site_map, 0.5)
    other = tiny_model("llama", seed=1)
    with pytest.raises(InputFileError, match="made for model_fingerprint="):
        load_thresholds(path, site_map, fingerprint=model_fingerprint(other))
    bigger = discover_sites(tiny_model("llama", layers=6))
    with pytest.raises(InputFileError, match=r"no entry: \['layers.4.q_proj'"):
        load_thresholds(path, bigger)
    smaller = discover_sites(tiny_model("llama", layers=2))
    with pytest.raises(InputFileError, match="sites this model does not have"):
        load_thresholds(path, smaller)


def test_biases_for_another_model_or_sparsity_are_refused(tmp_path, llama):
    model, site_map = llama
    biases = SponBiases.for_model(model, site_map, site_map.select([0, 3], ["down_proj"]))
    meta = {"sparsity": 0.5, "model_fingerprint": model_fingerprint(model)}
    path = save_biases(tmp_path / "b.safetensors", biases, meta)
    assert load_biases(path, site_map, 0.5, model_fingerprint(model))[0].sites == biases.sites
    with pytest.raises(InputFileError, match="dvc repro train"):
        load_biases(path, site_map, 0.6)
    with pytest.raises(InputFileError, match="sites this model does not have"):
        load_biases(path, discover_sites(tiny_model("llama", layers=2)))


def test_fingerprint_ignores_dtype_but_not_weights():
    model = tiny_model("llama")
    same = model_fingerprint(model)
    assert model_fingerprint(tiny_model("llama").to(torch.bfloat16)) == same
    assert model_fingerprint(tiny_model("llama", seed=1)) != same


def test_cli_reports_a_truncated_input_in_one_line(tmp_path):
    from sponlab.cli import app, main
    from sponlab.model.tiny import save_tiny

    model_dir = tmp_path / "model"
    save_tiny(model_dir, "llama", layers=2, hidden=32)
    blocks = tmp_path / "calib.safetensors"
    save_tensors(blocks, {"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    blocks.write_bytes(blocks.read_bytes()[:20])
    args = [
        "calibrate",
        "--sparsity",
        "0.5",
        "--params",
        str(REPO_PARAMS),
        "--model",
        str(model_dir),
    ]
    args += ["--blocks", str(blocks), "--out", str(tmp_path / "t.safetensors")]
    sys_argv, sys.argv = sys.argv, ["sponlab", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = sys_argv
    assert exit_info.value.code == 2
    assert not (tmp_path / "t.safetensors").exists()
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InputFileError)
    assert "calib.safetensors: not a readable safetensors file" in str(result.exception)
    assert "stage 'prepare'" in str(result.exception)


def test_metrics_record_versions_device_dtype_and_threads(tmp_path):
    path = write_metrics(tmp_path / "m.json", {"ppl": 3.0}, torch.device("cpu"), torch.bfloat16)
    env = json.loads(path.read_text())["env"]
    assert env["device"] == "cpu" and env["dtype"] == "bfloat16"
    assert env["threads"] == torch.get_num_threads()
    for package in ("python", "torch", "transformers", "tokenizers", "gguf", "dvc"):
        assert env[package], package
    assert environment() == {k: v for k, v in env.items() if k not in ("device", "dtype")}


def test_reproduction_check_compares_hashes_and_numbers_but_not_timings():
    ref = "stages:\n  a:\n    outs:\n    - path: x\n      md5: 1\n    - path: y\n      md5: 2\n"
    cur = ref.replace("md5: 2", "md5: 3")
    outputs = compare_outputs(lock_outputs(ref), lock_outputs(cur))
    assert [(o.path, o.identical) for o in outputs] == [("x", True), ("y", False)]
    a = json.dumps({"ppl": 10.0, "seconds": 1.0, "env": {"threads": 2}, "l": [1, 2]})
    b = json.dumps({"ppl": 10.5, "seconds": 9.0, "env": {"threads": 4}, "l": [1, 2]})
    rows = {m.key: m.relative for m in compare_metrics("m.json", a, b)}
    assert rows == {"ppl": pytest.approx(0.05), "l[0]": 0.0, "l[1]": 0.0}


INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile avx512_fp16

processor\t: 1
vendor_id\t: SomethingElse
"""


def test_cpu_identity_names_vendor_model_and_the_flags_that_pick_kernels():
    assert cpu_identity(INTEL) == (
        "GenuineIntel Intel(R) Xeon(R) Platinum 8480+ "
        "(family 6, model 143; amx_tile amx_bf16 avx512_bf16 avx512_fp16)"
    )
    amd = INTEL.replace("GenuineIntel", "AuthenticAMD").replace(" amx_bf16 amx_tile", "")
    assert "amx" not in cpu_identity(amd) and cpu_identity(amd).startswith("AuthenticAMD")
    assert cpu_identity("") and environment()["cpu"] == cpu_identity()


def test_reproduction_check_passes_metrics_that_differ_only_in_env_and_fails_a_number():
    def env(cpu):
        return {"env": {"cpu": cpu}, "seconds": 1.0 if cpu == "A" else 2.0}

    ref_files = {
        "metrics/m.json": json.dumps({"ppl": 10.0, **env("A")}),
        "metrics/n.json": json.dumps({"ppl": 5.0, **env("A")}),
    }
    cur_files = {
        "metrics/m.json": json.dumps({"ppl": 10.0, **env("B")}),
        "metrics/n.json": json.dumps({"ppl": 5.5, **env("B")}),
    }
    lock = "stages:\n  a:\n    outs:\n    - path: metrics/m.json\n      md5: {m}\n"
    lock += "    - path: metrics/n.json\n      md5: {n}\n"
    files = {"dvc.lock": lock.format(m=1, n=2), **ref_files}
    outputs, metrics = compare_run(files.__getitem__, lock.format(m=3, n=4), cur_files.get)
    assert [(o.path, o.identical, o.passes) for o in outputs] == [
        ("metrics/m.json", False, True),
        ("metrics/n.json", False, False),
    ]
    assert [m.key for m in metrics if m.relative > 0] == ["ppl"]
    assert "differs only in env / timings" in report(outputs, metrics, 0.0)
    assert {f.path if hasattr(f, "path") else f.key for f in failures(outputs, metrics, 0.0)} == {
        "metrics/n.json",
        "ppl",
    }
    assert [f.key for f in failures(outputs, metrics, 0.2)] == []  # 5 -> 5.5 within 20%
    assert cpu_of(cur_files["metrics/m.json"]) == "B" and cpu_of("{}") == "not recorded"
    assert machine_line("A", "A") == "reference CPU: A; this run: A"
    assert "another or unrecorded CPU" in machine_line("A", "B")
