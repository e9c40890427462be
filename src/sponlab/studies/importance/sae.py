"""Sparse autoencoders (SAEs) on a layer's activations: the model and its training.

:class:`SparseAutoencoder` computes features as SAELens does for its ``standard`` (ReLU),
``jumprelu`` and ``topk`` architectures, so a public SAE (SAELens on-disk format, read by
:mod:`sponlab.studies.importance.sae_files`) and one trained here are interchangeable. The ``sae`` stage
trains small standard SAEs offline (none can be downloaded here) on the activation ``sae.activation`` of each
chosen layer and saves them in that same format.

Training (:func:`train_sae`): activations are scaled by one constant so that ``E ||x||^2 = d_in``
(the L1 coefficient then means the same at every layer), decoder rows are kept at unit norm, the
loss is ``||x - x_hat||^2 + l1 * sum(f)`` averaged over tokens, optimised with Adam on random token
mini-batches; the scale is folded back into the weights before saving, so the file works on raw
activations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sponlab.config import Params, Section, section_params
from sponlab.io.data import SPLITS
from sponlab.model.capture import ACTIVATIONS, parse_layers
from sponlab.paramcheck import choice, integer, number, read_keys

log = logging.getLogger(__name__)

TENSOR_NAMES: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True)
class SAEParams:
    """The ``sae`` section of params.yaml (SAE training for the importance analysis)."""

    layers: str = "auto"  # first, middle and last layer (parse_layers)
    activation: str = choice("mlp_out", ACTIVATIONS, "the activations the SAE encodes")
    split: str = choice("train", SPLITS, "the text it trains on")
    samples: int = integer(48, "documents", lo=1)
    min_tokens: int = integer(32, "shortest document kept (tokens)", lo=2)
    max_length: int = integer(128, "tokens per document", lo=2)
    batch_size: int = integer(8, "documents per forward", lo=1)
    expansion: int = integer(2, "features per activation dimension", lo=1)
    l1: float = number(2.0, "L1 weight of the feature activations", lo=0)
    lr: float = number(2e-3, "Adam learning rate", lo=0, lo_open=True)
    steps: int = integer(250, "optimizer steps", lo=1)
    token_batch: int = integer(256, "tokens per step", lo=1)
    holdout: float = number(
        0.1, "fraction of tokens held out for the FVE", lo=0, hi=0.5, lo_open=True
    )
    seed: int = integer(0, "seed of the initialisation and token order", lo=0)


def parse_params(sec: Section) -> SAEParams:
    """Validate the ``sae`` section; every bad value names its key."""
    params = SAEParams(**read_keys(SAEParams, sec, layers=parse_layers(sec, SAEParams.layers)))
    sec.finish()
    sec.require_le("min_tokens", params.min_tokens, "max_length", params.max_length)
    return params


def sae_params(params: Params) -> SAEParams:
    """The ``sae`` section of loaded params (its defaults when absent)."""
    return section_params(params, "sae", parse_params)


ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu", "topk")


class SparseAutoencoder(nn.Module):
    """An SAE as SAELens defines its inference forward pass.

    ``pre = (x - b_dec) @ W_enc + b_enc`` (``x @ W_enc + b_enc`` when ``apply_b_dec_to_input`` is
    false); features ``f`` are ``ReLU(pre)`` (``standard``), ``ReLU(pre) * (pre > threshold)``
    (``jumprelu``) or ReLU of the ``k`` largest ``pre`` per token, zero elsewhere (``topk``); the
    reconstruction is ``x_hat = f @ W_dec + b_dec``.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        architecture: str = "standard",
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"SAE architecture must be one of {ARCHITECTURES}, got {architecture!r}"
            )
        if architecture == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
            raise ValueError(f"a topk SAE needs 0 < k <= d_sae={d_sae}, got k={k!r}")
        self.architecture = architecture
        self.k = k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(d_sae))  # jumprelu only

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def tensor_names(self) -> tuple[str, ...]:
        """The tensors an SAELens weights file of this architecture holds."""
        extra = ("threshold",) if self.architecture == "jumprelu" else ()
        return (*TENSOR_NAMES, *extra)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., d_sae]`` of activations ``x`` ``[..., d_in]``."""
        x = x.to(self.W_enc.dtype)
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = sae_in @ self.W_enc + self.b_enc  # [..., d_sae]
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` of features ``f`` ``[..., d_sae]``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def feature_grad(self, grad_x: torch.Tensor) -> torch.Tensor:
        """``d loss / d f`` ``[..., d_sae]`` from ``d loss / d x`` ``[..., d_in]``.

        With ``x' = decode(f) + (x - decode(f)).detach()`` the forward pass is unchanged and, decode
        being affine whatever the encoder, the chain rule gives ``grad_x @ W_dec^T``.
        """
        return grad_x.to(self.W_dec.dtype) @ self.W_dec.T

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **kwargs: Any) -> SparseAutoencoder:
        """Build from ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (+ ``threshold`` for jumprelu),
        checking every shape against ``W_enc`` ``[d_in, d_sae]``."""
        missing = [k for k in TENSOR_NAMES if k not in tensors]
        if missing:
            raise ValueError(f"SAE weights lack tensor(s) {missing}; expected {list(TENSOR_NAMES)}")
        d_in, d_sae = tensors["W_enc"].shape
        sae = cls(d_in, d_sae, **kwargs)
        shapes = {
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
            "threshold": (d_sae,),
        }
        for name in sae.tensor_names():
            if name not in tensors:
                raise ValueError(f"a {sae.architecture} SAE needs tensor {name!r}")
            if name != "W_enc" and tuple(tensors[name].shape) != shapes[name]:
                raise ValueError(
                    f"SAE tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"expected {shapes[name]} for W_enc {(d_in, d_sae)}"
                )
        with torch.no_grad():
            for name in sae.tensor_names():
                getattr(sae, name).copy_(tensors[name].float())
        return sae.requires_grad_(False).eval()


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
    device: torch.device | str = "cpu",
) -> SaeTrainResult:
    """Train an SAE on ``acts`` ``[N, d_in]`` on ``device`` (the model's: the activations are
    collected to host memory, the training runs where the matmuls are fast); quality is measured
    on a held-out token fraction. The split, the initialisation and the token draws come from a
    CPU generator, so a seed draws the same tokens on every device."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    acts = acts.float()
    order = torch.randperm(acts.shape[0], generator=generator)
    n_val = max(1, round(holdout * acts.shape[0]))
    train, val = acts[order[n_val:]], acts[order[:n_val]]  # [N_train, d_in], [N_val, d_in]
    scale = float((train.shape[1] / train.pow(2).sum(-1).mean()).sqrt())
    sae = init_sae(train * scale, expansion * train.shape[1], generator).to(device)
    train, val = train.to(device), val.to(device)
    before = reconstruction_metrics(_unscaled(sae, scale), val)
    sae.requires_grad_(True).train()
    opt = torch.optim.Adam(sae.parameters(), lr=lr, **_fast_adam(device))
    history: dict[str, list[float]] = {"loss": [], "mse": [], "l0": []}
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="sae", disable=not progress):
        idx = torch.randint(0, train.shape[0], (token_batch,), generator=generator)
        x = train[idx.to(device)] * scale  # [b, d_in]
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
    raw = SparseAutoencoder(sae.d_in, sae.d_sae).to(sae.W_enc.device)
    with torch.no_grad():
        raw.W_enc.copy_(sae.W_enc * scale)
        raw.b_enc.copy_(sae.b_enc)
        raw.W_dec.copy_(sae.W_dec / scale)
        raw.b_dec.copy_(sae.b_dec / scale)
    return raw.requires_grad_(False).eval()


def _fast_adam(device: torch.device = torch.device("cpu")) -> dict[str, bool]:
    """Fused Adam where this torch build supports it on ``device`` (several times faster)."""
    try:
        torch.optim.Adam([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, TypeError):
        return {}
    return {"fused": True}
