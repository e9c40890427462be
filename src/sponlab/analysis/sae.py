"""Sparse autoencoders (SAEs) on MLP activations (down_proj inputs): model, file format, training.

File format (one directory, one file per layer): ``layer_<i>.safetensors`` holding

- ``W_enc`` ``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec`` ``[d_in]``
  (float32);
- safetensors metadata (JSON-encoded values): ``d_in``, ``d_sae``, ``layer`` (int), ``site`` (the
  site key, e.g. ``layers.3.down_proj``: the SAE reads that projection's *input*), ``model`` (the
  model it was trained on), plus optional training facts (``l1``, ``steps``, ``fve``, ``l0``, ...).

Features are ``f = ReLU((x - b_dec) @ W_enc + b_enc)`` and the reconstruction is
``x_hat = f @ W_dec + b_dec``. Any SAE stored this way (e.g. converted from a public release) can
be analysed; the ``sae`` stage trains small ones offline because none can be downloaded here.

Training (:func:`train_sae`): activations are scaled by one constant so that ``E ||x||^2 = d_in``
(the L1 coefficient then means the same at every layer), decoder rows are kept at unit norm, the
loss is ``||x - x_hat||^2 + l1 * sum(f)`` averaged over tokens, optimised with Adam on random token
mini-batches; the scale is folded back into the weights before saving, so the file works on raw
activations.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sponlab.config import Section
from sponlab.data import SPLITS
from sponlab.sites import Site, SiteError, parse_layer_spec
from sponlab.tensorio import load_tensors, save_tensors

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^layer_(\d+)\.safetensors$")
TENSOR_NAMES: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True)
class SAEParams:
    """The ``sae`` section of params.yaml (SAE training for the importance analysis)."""

    layers: str = "0,14,29"
    split: str = "train"
    samples: int = 48
    min_tokens: int = 32
    max_length: int = 128
    batch_size: int = 8
    expansion: int = 2
    l1: float = 2.0
    lr: float = 2e-3
    steps: int = 250
    token_batch: int = 256
    holdout: float = 0.1
    seed: int = 0


def parse_params(sec: Section) -> SAEParams:
    """Validate the ``sae`` section; every bad value names its key."""
    layers = sec.get("layers", SAEParams.layers)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = str(layers)
    if not isinstance(layers, str):
        raise sec.fail("layers", f"must be a range '0-23' or a list '0,5,10', got {layers!r}")
    if layers != "all":
        try:
            parse_layer_spec(layers)
        except SiteError as err:
            raise sec.fail("layers", f"is invalid: {err}") from err
    params = SAEParams(
        layers=layers,
        split=sec.choice("split", SPLITS, SAEParams.split),
        samples=sec.number("samples", SAEParams.samples, lo=1, integer=True),
        min_tokens=sec.number("min_tokens", SAEParams.min_tokens, lo=2, integer=True),
        max_length=sec.number("max_length", SAEParams.max_length, lo=2, integer=True),
        batch_size=sec.number("batch_size", SAEParams.batch_size, lo=1, integer=True),
        expansion=sec.number("expansion", SAEParams.expansion, lo=1, integer=True),
        l1=sec.number("l1", SAEParams.l1, lo=0),
        lr=sec.number("lr", SAEParams.lr, lo=0, lo_open=True),
        steps=sec.number("steps", SAEParams.steps, lo=1, integer=True),
        token_batch=sec.number("token_batch", SAEParams.token_batch, lo=1, integer=True),
        holdout=sec.number("holdout", SAEParams.holdout, lo=0, hi=0.5, lo_open=True),
        seed=sec.number("seed", SAEParams.seed, lo=0, integer=True),
    )
    sec.finish()
    sec.require_le("min_tokens", params.min_tokens, "max_length", params.max_length)
    return params


class SparseAutoencoder(nn.Module):
    """``f = ReLU((x - b_dec) @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec``."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., d_sae]`` of activations ``x`` ``[..., d_in]``."""
        x = x.to(self.W_enc.dtype)
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` of features ``f`` ``[..., d_sae]``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def feature_grad(self, grad_x: torch.Tensor) -> torch.Tensor:
        """``d loss / d f`` ``[..., d_sae]`` from ``d loss / d x`` ``[..., d_in]``.

        With ``x' = decode(f) + (x - decode(f)).detach()`` the forward pass is unchanged and, decode
        being affine, the chain rule gives ``grad_x @ W_dec^T``.
        """
        return grad_x.to(self.W_dec.dtype) @ self.W_dec.T

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
        missing = [k for k in TENSOR_NAMES if k not in tensors]
        if missing:
            raise ValueError(f"SAE file lacks tensor(s) {missing}; expected {list(TENSOR_NAMES)}")
        d_in, d_sae = tensors["W_enc"].shape
        shapes = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"SAE tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"expected {shape} for W_enc {(d_in, d_sae)}"
                )
        sae = cls(d_in, d_sae)
        with torch.no_grad():
            for name in TENSOR_NAMES:
                getattr(sae, name).copy_(tensors[name].float())
        return sae.requires_grad_(False).eval()


def sae_path(directory: Path, layer: int) -> Path:
    return Path(directory) / f"layer_{layer}.safetensors"


def save_sae(
    directory: Path,
    layer: int,
    sae: SparseAutoencoder,
    model: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``layer_<layer>.safetensors`` in the documented format."""
    meta = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "layer": layer,
        "site": Site(layer, "down_proj").key,
        "model": model,
        **(extra or {}),
    }
    tensors = {name: getattr(sae, name).detach().float() for name in TENSOR_NAMES}
    return save_tensors(sae_path(directory, layer), tensors, meta)


def load_sae(path: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read one SAE file; checks shapes against the metadata."""
    tensors, meta = load_tensors(Path(path))
    sae = SparseAutoencoder.from_tensors(tensors)
    for key, value in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if key in meta and int(meta[key]) != value:
            raise ValueError(f"{path}: metadata {key}={meta[key]} but tensors give {value}")
    return sae, meta


def sae_layers(directory: Path) -> list[int]:
    """Layers that have an SAE file in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"SAE directory not found: {directory} (run the sae stage)")
    found = (_FILE_RE.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m is not None)


def load_saes(
    directory: Path, layers: Iterable[int] | None = None, d_in: int | None = None
) -> dict[int, SparseAutoencoder]:
    """SAEs of ``layers`` (default: every file); checks ``d_in`` and the recorded layer."""
    available = sae_layers(directory)
    wanted = available if layers is None else sorted(set(layers))
    missing = [i for i in wanted if i not in available]
    if missing:
        raise FileNotFoundError(f"no SAE for layer(s) {missing} in {directory}; has {available}")
    out = {}
    for layer in wanted:
        sae, meta = load_sae(sae_path(directory, layer))
        if "layer" in meta and int(meta["layer"]) != layer:
            raise ValueError(f"{sae_path(directory, layer)} says layer {meta['layer']}")
        if d_in is not None and sae.d_in != d_in:
            raise ValueError(
                f"SAE for layer {layer} has d_in {sae.d_in}, the model's down_proj input is {d_in}"
            )
        out[layer] = sae
    return out


# --- training ---------------------------------------------------------------------------------


@dataclass
class SaeTrainResult:
    """A trained SAE (on raw activations) with its learning curve and held-out quality."""

    sae: SparseAutoencoder
    history: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def init_sae(acts: torch.Tensor, d_sae: int, generator: torch.Generator) -> SparseAutoencoder:
    """Unit-norm random decoder rows, tied encoder, ``b_dec`` = data mean."""
    d_in = acts.shape[1]
    sae = SparseAutoencoder(d_in, d_sae)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=generator)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts.mean(0))
    return sae


def reconstruction_metrics(sae: SparseAutoencoder, acts: torch.Tensor) -> dict[str, float]:
    """Fraction of variance explained, mean squared error per token, L0 and dead features."""
    with torch.no_grad():
        x_hat, f = sae(acts)  # [N, d_in], [N, d_sae]
        err = (acts - x_hat).pow(2).sum(-1)  # [N]
        var = (acts - acts.mean(0)).pow(2).sum(-1)  # [N]
        active = f > 0
        return {
            "fve": float(1 - err.sum() / var.sum()),
            "mse": float(err.mean()),
            "l0": float(active.sum(-1).float().mean()),
            "dead_fraction": float((~active.any(0)).float().mean()),
            "tokens": int(acts.shape[0]),
        }


def train_sae(
    acts: torch.Tensor,
    expansion: int = 2,
    l1: float = 2.0,
    lr: float = 2e-3,
    steps: int = 250,
    token_batch: int = 256,
    holdout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> SaeTrainResult:
    """Train an SAE on ``acts`` ``[N, d_in]``; quality is measured on a held-out token fraction."""
    generator = torch.Generator().manual_seed(seed)
    acts = acts.float()
    order = torch.randperm(acts.shape[0], generator=generator)
    n_val = max(1, round(holdout * acts.shape[0]))
    train, val = acts[order[n_val:]], acts[order[:n_val]]  # [N_train, d_in], [N_val, d_in]
    scale = float((train.shape[1] / train.pow(2).sum(-1).mean()).sqrt())
    sae = init_sae(train * scale, expansion * train.shape[1], generator)
    before = reconstruction_metrics(_unscaled(sae, scale), val)
    sae.requires_grad_(True).train()
    opt = torch.optim.Adam(sae.parameters(), lr=lr, **_fast_adam())
    history: dict[str, list[float]] = {"loss": [], "mse": [], "l0": []}
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="sae", disable=not progress):
        idx = torch.randint(0, train.shape[0], (token_batch,), generator=generator)
        x = train[idx] * scale  # [b, d_in]
        x_hat, f = sae(x)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        loss = mse + l1 * f.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        history["loss"].append(float(loss.detach()))
        history["mse"].append(float(mse.detach()) / scale**2)  # in raw activation units
        history["l0"].append(float((f > 0).sum(-1).float().mean()))
    trained = _unscaled(sae, scale)
    after = reconstruction_metrics(trained, val)
    metrics = {
        **after,
        "mse_before": before["mse"],
        "fve_before": before["fve"],
        "scale": scale,
        "train_tokens": int(train.shape[0]),
        "seconds": time.perf_counter() - start,
    }
    return SaeTrainResult(sae=trained, history=history, metrics=metrics)


def _unscaled(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """The same SAE acting on raw activations (training used ``x * scale``)."""
    raw = SparseAutoencoder(sae.d_in, sae.d_sae)
    with torch.no_grad():
        raw.W_enc.copy_(sae.W_enc * scale)
        raw.b_enc.copy_(sae.b_enc)
        raw.W_dec.copy_(sae.W_dec / scale)
        raw.b_dec.copy_(sae.b_dec / scale)
    return raw.requires_grad_(False).eval()


def _fast_adam() -> dict[str, bool]:
    """Fused Adam where this torch build supports it on CPU (several times faster)."""
    try:
        torch.optim.Adam([nn.Parameter(torch.zeros(1))], fused=True)
    except (RuntimeError, TypeError):
        return {}
    return {"fused": True}
