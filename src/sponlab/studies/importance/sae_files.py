"""SAEs on disk in the SAELens format, and where in the model an SAE reads its activations.

One SAE is a directory with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` ``[d_in, d_sae]``,
``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec`` ``[d_in]``, plus ``threshold``
``[d_sae]`` for JumpReLU), as SAELens saves and loads them. ``cfg.json`` is read in both the v5
layout (``hook_name``, ``architecture``, ``activation_fn_kwargs.k`` at the top) and the v6 one
(``metadata.hook_name``, ``k``). A folder of SAEs holds one such directory per layer
(``layer_<i>/``, as the ``sae`` stage writes them), or is itself one SAE.

Activations are named as the TransformerLens hook points, which public SAE releases are keyed by:
``mlp_out`` = ``blocks.L.hook_mlp_out`` (the MLP block's output, hidden size; the default, as the
gradient tools), ``mlp_act`` = ``blocks.L.mlp.hook_post`` (the down_proj input, intermediate
size), ``resid_post`` = ``blocks.L.hook_resid_post`` (the decoder layer's output).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sponlab.io.tensorio import atomic_path, load_tensors, save_tensors, write_json
from sponlab.studies.importance.sae import SparseAutoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
HOOK_NAMES: dict[str, str] = {
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_act": "blocks.{layer}.mlp.hook_post",
    "resid_post": "blocks.{layer}.hook_resid_post",
}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_mlp_out|mlp\.hook_post|hook_resid_post)$")


class SAEFileError(ValueError):
    """An SAE directory that cannot be used for the chosen activation, layer or model."""


def hook_name(activation: str, layer: int) -> str:
    """TransformerLens hook name of ``activation`` at ``layer``."""
    if activation not in HOOK_NAMES:
        raise SAEFileError(f"activation must be one of {list(HOOK_NAMES)}, got {activation!r}")
    return HOOK_NAMES[activation].format(layer=layer)


def parse_hook(name: str) -> tuple[str, int]:
    """``(activation, layer)`` of a hook name; other hook points are an :class:`SAEFileError`."""
    match = _HOOK_RE.match(name)
    if match is None:
        known = ", ".join(p.format(layer="L") for p in HOOK_NAMES.values())
        raise SAEFileError(f"SAE hook point {name!r} is not one sponlab reads ({known})")
    activation = next(s for s, p in HOOK_NAMES.items() if p.format(layer=match.group(1)) == name)
    return activation, int(match.group(1))


def save_sae(
    directory: Path, sae: SparseAutoencoder, activation: str, layer: int, extra: dict[str, Any]
) -> Path:
    """Write one SAE as ``directory/{cfg.json, sae_weights.safetensors}`` (SAELens v6 layout)."""
    cfg = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({"k": sae.k} if sae.architecture == "topk" else {}),
        "metadata": {"hook_name": hook_name(activation, layer), **extra},
    }
    tensors = {name: getattr(sae, name).detach().float() for name in sae.tensor_names()}
    save_tensors(Path(directory) / WEIGHTS_FILE, tensors, {"format": "pt"})
    write_json(Path(directory) / CFG_FILE, cfg)
    return Path(directory)


def read_cfg(directory: Path) -> dict[str, Any]:
    """``cfg.json`` with the fields sponlab uses normalised across SAELens versions."""
    path = Path(directory) / CFG_FILE
    if not path.is_file():
        raise SAEFileError(f"{directory}: no {CFG_FILE} (not an SAE directory in SAELens format)")
    raw = json.loads(path.read_text())
    meta = raw.get("metadata") or {}
    hook = raw.get("hook_name") or meta.get("hook_name") or raw.get("hook_point")
    if not hook:
        raise SAEFileError(f"{path}: no hook_name (neither at the top nor in metadata)")
    parse_hook(hook)  # a hook point sponlab cannot place is an error before any weight is read
    architecture = raw.get("architecture", "standard")
    if raw.get("activation_fn_str") == "topk" or raw.get("activation_fn") == "topk":
        architecture = "topk"
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise SAEFileError(
            f"{path}: normalize_activations={norm!r} is not supported (only 'none'): the SAE "
            "expects rescaled inputs"
        )
    return {
        "hook_name": hook,
        "architecture": architecture,
        "k": None if k is None else int(k),
        "d_in": int(raw["d_in"]),
        "d_sae": int(raw["d_sae"]),
        "apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", True)),
        "raw": raw,
    }


def load_sae(directory: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """One SAE directory -> the SAE (float32, frozen) and its normalised cfg."""
    cfg = read_cfg(directory)
    tensors, _ = load_tensors(Path(directory) / WEIGHTS_FILE, producer="sae")
    try:
        sae = SparseAutoencoder.from_tensors(
            tensors,
            architecture=cfg["architecture"],
            k=cfg["k"],
            apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
        )
    except ValueError as err:
        raise SAEFileError(f"{directory}: {err}") from err
    if (sae.d_in, sae.d_sae) != (cfg["d_in"], cfg["d_sae"]):
        raise SAEFileError(
            f"{directory}: cfg.json says d_in={cfg['d_in']}, d_sae={cfg['d_sae']} but the weights "
            f"are {sae.d_in} x {sae.d_sae}"
        )
    return sae, cfg


def find_saes(directory: Path) -> dict[int, Path]:
    """Layer -> SAE directory: ``directory`` itself when it holds ``cfg.json``, otherwise each
    sub-directory that does (the layer comes from the SAE's hook name, not the folder name)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"SAE directory not found: {directory} (run the sae stage)")
    candidates = [directory] if (directory / CFG_FILE).is_file() else sorted(directory.iterdir())
    found: dict[int, Path] = {}
    for path in candidates:
        if not (path / CFG_FILE).is_file():
            continue
        _, layer = parse_hook(read_cfg(path)["hook_name"])
        if layer in found:
            raise SAEFileError(f"two SAEs for layer {layer}: {found[layer]} and {path}")
        found[layer] = path
    return dict(sorted(found.items()))


def load_saes(
    directory: Path, activation: str, d_in: int, layers: Iterable[int] | None = None
) -> dict[int, SparseAutoencoder]:
    """The SAEs of ``directory`` for ``layers`` (default: all found), each checked to read
    ``activation`` and to take ``d_in``-dimensional inputs."""
    found = find_saes(directory)
    wanted = sorted(found) if layers is None else sorted(set(layers))
    missing = [i for i in wanted if i not in found]
    if missing:
        raise FileNotFoundError(f"no SAE for layer(s) {missing} in {directory}; has {list(found)}")
    out = {}
    for layer in wanted:
        sae, cfg = load_sae(found[layer])
        got_activation, _ = parse_hook(cfg["hook_name"])
        if got_activation != activation:
            raise SAEFileError(
                f"{found[layer]}: the SAE reads {cfg['hook_name']} ({got_activation}) but the analysis "
                f"activation is {activation} ({hook_name(activation, layer)}); set importance.activation: {got_activation}"
            )
        if sae.d_in != d_in:
            raise SAEFileError(
                f"{found[layer]}: the SAE takes d_in={sae.d_in}, the model's {activation} at layer "
                f"{layer} has {d_in} dimensions (an SAE for another model?)"
            )
        out[layer] = sae
    return out


def from_sae_lens(release: str, sae_id: str, out: Path) -> Path:
    """Download ``release`` / ``sae_id`` with the optional ``sae-lens`` package (online) and save
    it as an SAE directory at ``out``, so the importance stage reads it like any other."""
    try:
        from sae_lens import SAE
    except ImportError as err:
        raise ImportError(
            "loading by release needs the optional package: pip install sae-lens"
        ) from err
    loaded = SAE.from_pretrained(release, sae_id)
    sae = loaded[0] if isinstance(loaded, tuple) else loaded
    cfg = sae.cfg.to_dict() if hasattr(sae.cfg, "to_dict") else dict(vars(sae.cfg))
    state = {k: v.detach().float().cpu() for k, v in sae.state_dict().items()}
    if "log_threshold" in state:
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    out = Path(out)
    save_tensors(out / WEIGHTS_FILE, state, {"format": "pt"})
    with atomic_path(out / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, default=str, indent=2))
    read_cfg(out)  # fail now if the release uses something sponlab cannot read
    return out
