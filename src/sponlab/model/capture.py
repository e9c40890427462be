"""Capturing down_proj inputs and their gradients, aggregated over tokens as they stream past.

One forward pass (``values``, decoder stack only) or forward + backward (``gradients``, model
frozen, next-token loss summed over real target tokens) per batch; a pre-hook on each selected
layer's down_proj reports the input (and a tensor hook its gradient), removed on exit. See
:mod:`sponlab.studies.importance.importance` for what is computed from the aggregates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sponlab.io.batches import TokenBatch
from sponlab.model.hooks import installed
from sponlab.model.sites import Site, SiteError, SiteMap, parse_layer_spec
from sponlab.paramcheck import Section

log = logging.getLogger(__name__)

AGGREGATE_BY: tuple[str, ...] = ("values", "gradients")
AGGREGATIONS: tuple[str, ...] = ("mean", "mean_abs")


class ImportanceError(ValueError):
    """An importance computation that cannot give a meaningful answer (e.g. sum ~0)."""


# A per-layer map from captured activation tensors [B, T, D] to the analysed features [B, T, F].
Transform = Callable[[torch.Tensor], torch.Tensor]


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """``all``, ``auto`` (first, middle and last layer: any depth) or a ``parse_layer_spec``
    string, validated against the model."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "auto":
        return sorted({0, num_layers // 2, num_layers - 1})
    return parse_layer_spec(spec, num_layers)


ACTIVATIONS: tuple[str, ...] = ("mlp_out", "mlp_act", "resid_post")


def parse_layers(sec: Section, default: str) -> str:
    """``all``, ``auto`` (first / middle / last), a range ``"0-23"`` or a list ``"0,5,10"``."""
    value = sec.get("layers", default)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value in ("all", "auto"):
        return value
    if not isinstance(value, str):
        raise sec.fail(
            "layers", f"must be 'all', 'auto', a range '0-23' or a list '0,5,10', got {value!r}"
        )
    try:
        parse_layer_spec(value)
    except SiteError as err:
        raise sec.fail("layers", f"is invalid: {err}") from err
    return value


def mlp_input_module(model: nn.Module, site_map: SiteMap, layer: int) -> nn.Linear:
    """The ``down_proj`` of ``layer``: its input is the MLP activation ``act(gate) * up``."""
    return site_map.linear(model, site_map.require([Site(layer, "down_proj")])[0])


def post_norm(block: nn.Module, module: str) -> nn.Module | None:
    """The norm applied to ``module``'s (``o_proj`` / ``down_proj``) output before the residual
    add, in a sandwich-norm block (Gemma-2/3: ``post_attention_layernorm`` after attention,
    ``post_feedforward_layernorm`` after the MLP); None in pre-norm blocks (Llama, Qwen, Mistral,
    whose ``post_attention_layernorm`` is the MLP's *input* norm)."""
    if not hasattr(block, "pre_feedforward_layernorm"):
        return None
    name = {"o_proj": "post_attention_layernorm", "down_proj": "post_feedforward_layernorm"}
    return getattr(block, name[module], None) if module in name else None


def activation_module(
    model: nn.Module, site_map: SiteMap, layer: int, activation: str
) -> nn.Module:
    """The module whose input (``mlp_act``: down_proj) or output (``mlp_out``, ``resid_post``) is
    the activation named ``activation``.

    ``mlp_out`` is what the MLP adds to the residual stream, as TransformerLens' ``hook_mlp_out``
    (the hook SAELens SAEs name): the MLP block's output in pre-norm models, the output of
    ``post_feedforward_layernorm`` in sandwich-norm ones (Gemma-2/3). ``resid_post``: the decoder
    layer's output."""
    if activation == "mlp_act":
        return mlp_input_module(model, site_map, layer)
    if activation == "mlp_out":
        normed = post_norm(model.get_submodule(f"{site_map.layers_path}.{layer}"), "down_proj")
        if normed is not None:
            return normed
        path = site_map.paths[site_map.require([Site(layer, "down_proj")])[0]]
        return model.get_submodule(path.rsplit(".", 1)[0])
    if activation == "resid_post":
        return model.get_submodule(f"{site_map.layers_path}.{layer}")
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def activation_dim(model: nn.Module, site_map: SiteMap, layer: int, activation: str) -> int:
    """Width of the activation ``activation``: intermediate size for ``mlp_act``, hidden otherwise."""
    down = mlp_input_module(model, site_map, layer)
    return down.in_features if activation == "mlp_act" else down.out_features


@contextmanager
def activation_hooks(
    model: nn.Module,
    site_map: SiteMap,
    layers: Sequence[int],
    activation: str = "mlp_act",
    on_value: Callable[[int, torch.Tensor], None] | None = None,
    on_grad: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Call ``on_value(layer, x)`` with each layer's activation ``activation`` and
    ``on_grad(layer, dL/dx)`` in backward.

    For gradients the activation is made to require grad (it is a leaf when nothing upstream does,
    the model being frozen) and a tensor hook reports its gradient; the forward values are untouched.
    Hooks are removed on exit, also on error.
    """
    report = _report(on_value, on_grad)

    def register(layer: int):
        module = activation_module(model, site_map, layer, activation)
        if activation == "mlp_act":
            return module.register_forward_pre_hook(lambda _m, args: report(layer, args[0]))
        return module.register_forward_hook(lambda _m, _a, out: report(layer, _first(out)))

    with installed(register(layer) for layer in layers):
        yield


def _first(output: Any) -> torch.Tensor:
    """A module's output tensor (decoder layers may return a tuple led by the hidden states)."""
    return output[0] if isinstance(output, tuple) else output


def _report(
    on_value: Callable[[int, torch.Tensor], None] | None,
    on_grad: Callable[[int, torch.Tensor], None] | None,
) -> Callable[[int, torch.Tensor], None]:
    def report(layer: int, x: torch.Tensor) -> None:  # x [B, T, D]
        if on_value is not None:
            on_value(layer, x.detach())
        if on_grad is not None and torch.is_grad_enabled():
            if not x.requires_grad:
                x.requires_grad_(True)  # a leaf: no parameter or earlier activation needs grad
            x.register_hook(lambda grad: on_grad(layer, grad))

    return report


def next_token_loss_sum(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy summed over target tokens whose input and target are not pad."""
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()  # [B, T-1]
    pred = logits[:, :-1][valid]  # [N, V]
    target = input_ids[:, 1:][valid]  # [N]
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    return F.cross_entropy(pred, target, reduction="sum")


def _forward_body(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head when the model exposes it (values need no logits)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) else model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(
    model: nn.Module,
    site_map: SiteMap,
    layers: Sequence[int],
    batch: TokenBatch,
    aggregate_by: str,
    sink: Callable[[int, torch.Tensor], None],
    activation: str = "mlp_act",
) -> None:
    """One forward (``values``) or forward + backward (``gradients``) pass feeding ``sink``."""
    device = _device(model)
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    if aggregate_by == "values":
        with torch.no_grad(), activation_hooks(model, site_map, layers, activation, on_value=sink):
            _forward_body(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        return
    if aggregate_by != "gradients":
        raise ValueError(f"aggregate_by must be one of {AGGREGATE_BY}, got {aggregate_by!r}")
    with torch.enable_grad(), activation_hooks(model, site_map, layers, activation, on_grad=sink):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
        next_token_loss_sum(logits, ids, mask).backward()


# --- streaming aggregation over tokens --------------------------------------------------------


@dataclass
class LayerAggregate:
    """Running sums over non-pad tokens of one (features, layer): float64, shape [F]."""

    total: torch.Tensor | None = None
    total_abs: torch.Tensor | None = None
    tokens: int = 0

    def add(self, feats: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the rows of ``feats`` [B, T, F] where ``mask`` [B, T] is true."""
        rows = feats[mask.to(feats.device)].double()  # [N, F]; mask to the layer's device
        if self.total is None:
            self.total = torch.zeros(rows.shape[-1], dtype=torch.float64, device=rows.device)
            self.total_abs = torch.zeros_like(self.total)
        self.total += rows.sum(0)
        self.total_abs += rows.abs().sum(0)
        self.tokens += rows.shape[0]

    def result(self, aggregation: str) -> np.ndarray:
        """``mean`` or ``mean_abs`` over all tokens seen."""
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if self.total is None or self.total_abs is None or self.tokens == 0:
            raise ImportanceError("no tokens were aggregated")
        total = self.total if aggregation == "mean" else self.total_abs
        return (total / self.tokens).cpu().numpy()


@dataclass
class PassResult:
    """Aggregates of one pass: ``aggregates[features][layer]`` plus timing."""

    aggregate_by: str
    aggregates: dict[str, dict[int, LayerAggregate]]
    seconds: float
    tokens: int
    batches: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def timing(self) -> dict[str, float]:
        """Seconds, tokens, tokens/s and batches of the pass (for metadata and metrics)."""
        return {
            "seconds": self.seconds,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "batches": self.batches,
        }


def run_importance(
    model: nn.Module,
    site_map: SiteMap,
    batches: Sequence[TokenBatch],
    aggregate_by: str,
    targets: Mapping[str, Mapping[int, Transform]],
    progress: bool = True,
    activation: str = "mlp_act",
) -> PassResult:
    """Aggregate every target over all non-pad tokens in one pass over ``batches``.

    ``targets[features][layer]`` maps the captured activation tensor (values or gradients) of that layer
    to the analysed features (identity for raw activations, the SAE encoder or the SAE gradient
    projection), so raw and SAE features share the forward/backward passes.
    """
    layers = sorted({layer for per_layer in targets.values() for layer in per_layer})
    aggregates = {name: {layer: LayerAggregate() for layer in per} for name, per in targets.items()}
    state: dict[str, torch.Tensor] = {}

    def sink(layer: int, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            for name, per_layer in targets.items():
                if layer in per_layer:
                    aggregates[name][layer].add(per_layer[layer](tensor), state["mask"])

    start = time.perf_counter()
    device = _device(model)
    for batch in tqdm(batches, desc=f"importance {aggregate_by}", disable=not progress):
        state["mask"] = batch.attention_mask.to(device).bool()  # [B, T]
        _forward(model, site_map, layers, batch, aggregate_by, sink, activation)
    seconds = time.perf_counter() - start
    tokens = sum(b.tokens for b in batches)
    log.info(
        "%s pass: %d tokens, %d layers in %.1fs (%.0f tokens/s)",
        aggregate_by,
        tokens,
        len(layers),
        seconds,
        tokens / max(seconds, 1e-9),
    )
    return PassResult(aggregate_by, aggregates, seconds, tokens, len(batches))


def identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def collect_activations(
    model: nn.Module,
    site_map: SiteMap,
    layers: Sequence[int],
    batches: Sequence[TokenBatch],
    activation: str = "mlp_act",
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """The activation ``activation`` of every non-pad token, per layer ``[N, D]`` float32 on CPU (the
    SAE stage's training data, kept in host memory; ``train_sae`` moves it to the layer's device)."""
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    state: dict[str, torch.Tensor] = {}

    def keep(layer: int, x: torch.Tensor) -> None:
        rows[layer].append(x[state["mask"].to(x.device)].float().cpu())  # [n, D] to the host

    device = _device(model)
    for batch in tqdm(batches, desc="collect activations", disable=not progress):
        state["mask"] = batch.attention_mask.to(device).bool()
        _forward(model, site_map, layers, batch, "values", keep, activation)
    return {layer: torch.cat(parts) for layer, parts in rows.items()}


def feature_targets(
    mlp_layers: Sequence[int], saes: Mapping[int, Any], aggregate_by: str
) -> dict[str, dict[int, Transform]]:
    """What one pass aggregates: raw down_proj inputs of ``mlp_layers`` and the SAE features of
    ``saes`` (empty kinds left out)."""
    targets = {
        "mlp": {layer: identity for layer in mlp_layers},
        "sae": sae_targets(saes, aggregate_by),
    }
    return {name: t for name, t in targets.items() if t}


def sae_targets(saes: Mapping[int, Any], aggregate_by: str) -> dict[int, Transform]:
    """Per-layer SAE transforms: the encoder for ``values``, ``dL/dx @ W_dec^T`` for gradients.

    Each SAE moves (once) to the device of its layer's activations: SAEs load on the host, and
    with ``device_map: auto`` the layers sit on different GPUs."""
    method = "encode" if aggregate_by == "values" else "feature_grad"
    return {layer: _on_input_device(sae, method) for layer, sae in saes.items()}


def _on_input_device(sae: Any, method: str) -> Transform:
    def transform(x: torch.Tensor) -> torch.Tensor:
        if next(sae.parameters()).device != x.device:
            sae.to(x.device)
        return getattr(sae, method)(x)

    return transform
