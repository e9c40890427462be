"""The base model's manifest: hub weights pinned by commit (no copy), cache keys without the GPU
index, and bad models refused before any weights are read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from sponlab.config import BaseModelParams, ConfigError
from sponlab.model.base import MANIFEST, check_dtype_runs, inspect_architecture, read_manifest
from sponlab.model.loading import load_model, plan_base, resolve_device
from sponlab.model.tiny import save_tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, repo: str, dtype: torch.dtype) -> Path:
    """A hub cache holding ``repo`` at COMMIT with ``main`` pointing to it (the cache layout)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = save_tiny(entry / "snapshots" / COMMIT)
    if dtype != torch.float32:  # re-save in the checkpoint dtype a hub repo would hold
        model = load_model(snapshot, "cpu", "float32").model.to(dtype)
        model.save_pretrained(snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    return root


def run_offline(script: str, cache: Path, cwd: Path) -> str:
    """Run ``script`` with the fake cache as the hub cache and the hub unreachable."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_hub_model_is_pinned_to_a_commit_not_copied(tmp_path):
    cache = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", torch.bfloat16)
    out = run_offline(
        "from pathlib import Path\n"
        "import torch\n"
        "from sponlab.config import BaseModelParams\n"
        "from sponlab.model.loading import build_base, load_model\n"
        "cfg = BaseModelParams(source='hub', name='acme/tiny-llama', device='cpu', dtype='auto')\n"
        "build_base(cfg, Path('base'))\n"
        "ref = load_model('acme/tiny-llama', 'cpu', 'float32').model\n"
        "got = load_model('base', 'cpu', 'float32').model\n"
        "ids = torch.arange(12).view(1, 12)\n"
        "print(bool(torch.equal(ref(ids).logits, got(ids).logits)))\n",
        cache,
        tmp_path,
    )
    assert out.strip().endswith("True")  # the stages load exactly the pinned weights
    manifest = read_manifest(tmp_path / "base")
    assert manifest.revision == COMMIT and manifest.weights == "hub"
    assert manifest.dtype == "float32" and manifest.device_type == "cpu"
    assert [p.name for p in (tmp_path / "base").iterdir()] == [MANIFEST]  # nothing multi-GB


def test_copy_weights_keeps_the_checkpoint_dtype(tmp_path):
    cache = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", torch.bfloat16)
    run_offline(
        "from pathlib import Path\n"
        "from sponlab.config import BaseModelParams\n"
        "from sponlab.model.loading import build_base\n"
        "cfg = BaseModelParams(source='hub', name='acme/tiny-llama', device='cpu',\n"
        "                      copy_weights=True, revision='main')\n"
        "build_base(cfg, Path('base'))\n",
        cache,
        tmp_path,
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in list(handle.keys())}
    assert dtypes == {"BF16"}  # no fp32 upcast: half the bytes of the old export
    assert read_manifest(tmp_path / "base").weights == "here"


def test_manifest_depends_on_device_type_and_dtype_not_gpu_index(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny")
    cfg = BaseModelParams(source="hub", name=str(model_dir), device="cuda:0")
    on = {d: plan_base(cfg, torch.device(d)) for d in ("cuda:0", "cuda:1", "cpu")}
    assert on["cuda:0"] == on["cuda:1"]  # same cached results on another GPU of the machine
    assert on["cuda:0"].dtype == "bfloat16" and on["cpu"].dtype == "float32"
    fp32 = plan_base(BaseModelParams(source="hub", name=str(model_dir), dtype="float32"), torch.device("cuda:1"))  # fmt: skip
    assert fp32 != on["cuda:0"]  # a dtype change re-runs the pipeline
    assert on["cpu"].local_digest is not None and on["cpu"].revision is None


def test_stages_depend_on_the_manifest_not_on_the_device_key():
    import yaml

    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        keys = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}
        if name != "base":
            assert not keys & {"base", "base.device", "base.dtype"}, name


def test_remote_code_and_non_standard_projections_are_refused(tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    auto_map = {"AutoConfig": "conf.AcmeConfig", "AutoModelForCausalLM": "model.AcmeForCausalLM"}
    (custom / "config.json").write_text(json.dumps({"model_type": "acme", "auto_map": auto_map}))
    with pytest.raises(ConfigError, match=r"base\.trust_remote_code: true"):
        inspect_architecture(str(custom), None, False)
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0).save_pretrained(gpt2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"\(gpt2\) cannot be sparsified.*q_proj"):
        inspect_architecture(str(gpt2), None, False)


def test_bad_device_and_dtype_fail_with_the_key_named():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"base\.device.*CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"base\.dtype"):
        check_dtype_runs(torch.device("meta"), torch.float32)  # a device that cannot compute
    check_dtype_runs(torch.device("cpu"), torch.bfloat16)  # runs


def test_device_map_auto_loads_the_same_model(tmp_path):
    pytest.importorskip("accelerate")
    model_dir = save_tiny(tmp_path / "tiny")
    plain = load_model(model_dir, "cpu", "float32").model
    mapped = load_model(model_dir, "cpu", "float32", device_map="auto")
    ids = torch.arange(10).view(1, 10)
    assert mapped.device.type == "cpu"
    assert torch.equal(plain(ids).logits, mapped.model(ids).logits)
