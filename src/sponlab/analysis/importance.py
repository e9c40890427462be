"""Per-layer importance of MLP activations (down_proj inputs) or of SAE features on them.

For every selected decoder layer the input of ``down_proj`` (``act(gate) * up``, shape
``[B, T, D]``) is captured with a forward *pre*-hook on the discovered site (:mod:`sponlab.sites`),
inside a context manager that always removes its hooks. Two quantities can be aggregated over all
non-pad tokens of all samples, giving one vector of length ``D`` (or the SAE dictionary size) per
layer:

- ``values``: the activations themselves (forward pass only, no logits needed);
- ``gradients``: ``d loss / d activation`` with the model frozen. The loss is the next-token
  cross-entropy *summed* over the non-pad target tokens of a batch, so the gradient at a token does
  not depend on which other samples share its batch (it equals the gradient of the dataset-mean loss
  times the number of target tokens; normalisation removes that scale). The last token of a
  sequence predicts nothing, so its gradient is exactly zero; it still counts as a token.

SAE features (see :mod:`sponlab.analysis.sae`) are ``f = ReLU((x - b_dec) @ W_enc + b_enc)``. Their
gradient is ``d loss / d f`` when the site's activation is replaced by the reconstruction plus the
detached reconstruction error, ``x' = decode(f) + (x - decode(f)).detach()``: the model output is
unchanged and, ``decode`` being affine, ``d loss / d f = (d loss / d x) @ W_dec^T``, computed from the
captured activation gradient (so analysing several layers at once never changes the gradients of
the others).

Each aggregate ``g`` (``mean`` or ``mean_abs`` over tokens) may be raised to a ``power`` (sign
preserving: ``sign(g) * |g|**p``) and is then normalised: ``none``; ``sum_abs`` scales so that
``sum |g| = D``; ``sum`` scales so that ``sum g = D`` and is refused when ``|sum g|`` is ~0 relative to
``sum |g|`` (the scale would be meaningless); the per-layer statistics keep
``pre_norm_sum_ratio = sum g / sum |g|`` and a warning names the layers where it is below 0.01
(signed gradient means often are: ``sum`` then mostly amplifies cancellation noise). A list given
as ``power`` is accepted for compatibility with sweep-style configs, but one run has one power:
its first value is used and a warning says so. Results are written per layer (``.npy``) and as one
consolidated ``<stem>.npz`` per variant, read back with :func:`load_importance`; the stem encodes the
variant, e.g. ``gradients_mean_abs_norm-sum_abs`` (``_pow-2`` appended when a power is set).

Text: the first ``samples`` documents of a split with at least ``min_tokens`` tokens, each cut to
``max_length`` tokens, batched longest-first and padded on the right (with EOS when the tokenizer
has no pad token); pad positions never enter an aggregate. Raw and SAE features share the passes:
one forward pass for ``values`` (decoder stack only) and one forward + backward for ``gradients``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sponlab.config import Section
from sponlab.data import SPLITS
from sponlab.hooks import installed
from sponlab.sites import Site, SiteError, SiteMap, parse_layer_spec
from sponlab.tensorio import atomic_path

log = logging.getLogger(__name__)

FEATURES: tuple[str, ...] = ("mlp", "sae")
AGGREGATE_BY: tuple[str, ...] = ("values", "gradients")
AGGREGATIONS: tuple[str, ...] = ("mean", "mean_abs")
NORMALIZATIONS: tuple[str, ...] = ("none", "sum_abs", "sum")
BOTH_NORMALIZATIONS: tuple[str, ...] = ("sum_abs", "sum")

# A per-layer map from captured site tensors [B, T, D] to the analysed features [B, T, F].
Transform = Callable[[torch.Tensor], torch.Tensor]


class ImportanceError(ValueError):
    """An importance computation that cannot give a meaningful answer (e.g. sum ~0)."""


@dataclass(frozen=True)
class ImportanceParams:
    """The ``importance`` section of params.yaml (lists are the expanded ``both`` choices)."""

    features: tuple[str, ...] = FEATURES
    aggregate_by: tuple[str, ...] = AGGREGATE_BY
    aggregation: tuple[str, ...] = AGGREGATIONS
    power: float | None = None
    normalize: tuple[str, ...] = BOTH_NORMALIZATIONS
    sum_tolerance: float = 1e-6
    layers: str = "all"
    split: str = "val"
    samples: int = 32
    min_tokens: int = 32
    max_length: int = 128
    batch_size: int = 8
    layer_figures: bool = True


def _one_or_many(sec: Section, name: str, allowed: Sequence[str], both: Sequence[str]) -> tuple:
    """A single choice, ``both`` (= ``both``), or a non-empty list of distinct choices."""
    value = sec.get(name, "both")
    if value == "both":
        return tuple(both)
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if v not in allowed]
    if not values or bad or len(set(values)) != len(values):
        raise sec.fail(
            name,
            f"must be one of {[*allowed, 'both']} or a list of distinct {list(allowed)}, "
            f"got {value!r}",
        )
    return tuple(values)


def _power(sec: Section) -> float | None:
    """``null`` (no power), a positive number, or a list whose first value is used (warned)."""
    value = sec.get("power", None)
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise sec.fail("power", "must be null, a number > 0 or a non-empty list, got []")
        if len(value) > 1:
            warnings.warn(
                f"{sec.key('power')} is a list {value!r}: only its first value {value[0]!r} is used "
                "(one power per run; run the stage again for other powers)",
                UserWarning,
                stacklevel=2,
            )
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise sec.fail("power", f"must be null or a number > 0, got {value!r}")
    return float(value)


def _layers(sec: Section) -> str:
    value = sec.get("layers", "all")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value == "all":
        return value
    if not isinstance(value, str):
        raise sec.fail("layers", f"must be 'all', a range '0-23' or a list '0,5,10', got {value!r}")
    try:
        parse_layer_spec(value)
    except SiteError as err:
        raise sec.fail("layers", f"is invalid: {err}") from err
    return value


def parse_params(sec: Section) -> ImportanceParams:
    """Validate the ``importance`` section; every bad value names its key."""
    params = ImportanceParams(
        features=_one_or_many(sec, "features", FEATURES, FEATURES),
        aggregate_by=_one_or_many(sec, "aggregate_by", AGGREGATE_BY, AGGREGATE_BY),
        aggregation=_expand(
            sec.choice("aggregation", (*AGGREGATIONS, "both"), "both"), AGGREGATIONS
        ),
        power=_power(sec),
        normalize=_expand(
            sec.choice("normalize", (*NORMALIZATIONS, "both"), "both"), BOTH_NORMALIZATIONS
        ),
        sum_tolerance=sec.number("sum_tolerance", 1e-6, lo=0, hi=1),
        layers=_layers(sec),
        split=sec.choice("split", SPLITS, "val"),
        samples=sec.number("samples", 32, lo=1, integer=True),
        min_tokens=sec.number("min_tokens", 32, lo=2, integer=True),
        max_length=sec.number("max_length", 128, lo=2, integer=True),
        batch_size=sec.number("batch_size", 8, lo=1, integer=True),
        layer_figures=sec.boolean("layer_figures", True),
    )
    sec.finish()
    sec.require_le("min_tokens", params.min_tokens, "max_length", params.max_length)
    return params


def _expand(choice: str, both: tuple[str, ...]) -> tuple[str, ...]:
    return both if choice == "both" else (choice,)


# --- text -> padded token batches -------------------------------------------------------------


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids and their mask (1 = real token, 0 = pad)."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Pad on the right with the tokenizer's pad token, or EOS when it has none; return its id."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ImportanceError("tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return int(tokenizer.pad_token_id)


def tokenize_documents(
    docs: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    samples: int,
    max_length: int,
    min_tokens: int = 2,
    bos: bool = False,
) -> list[list[int]]:
    """Token ids of the first ``samples`` documents with >= ``min_tokens`` tokens (<= max_length).

    With ``bos`` each sample starts with the BOS token (counted in ``max_length``).
    """
    out: list[list[int]] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        if bos:
            ids = [tokenizer.bos_token_id, *ids]
        ids = ids[:max_length]
        if len(ids) >= min_tokens:
            out.append(ids)
        if len(out) == samples:
            return out
    raise ImportanceError(
        f"only {len(out)} of {len(docs)} documents have >= {min_tokens} tokens; "
        f"{samples} samples requested (lower samples or min_tokens)"
    )


def pad_batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> list[TokenBatch]:
    """Consecutive right-padded batches of at most ``batch_size`` sequences."""
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append(TokenBatch(ids, mask))
    return batches


def build_batches(
    docs: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    samples: int,
    max_length: int,
    batch_size: int,
    min_tokens: int = 2,
    bos: bool = False,
) -> list[TokenBatch]:
    """Tokenise the first documents and batch them, longest first (less padding to compute)."""
    pad_id = ensure_pad_token(tokenizer)
    seqs = tokenize_documents(docs, tokenizer, samples, max_length, min_tokens, bos)
    seqs = sorted(seqs, key=len, reverse=True)  # aggregates are sums: order does not matter
    return pad_batches(seqs, batch_size, pad_id)


# --- capturing down_proj inputs and their gradients -------------------------------------------


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """``all`` or a ``parse_layer_spec`` string, validated against the model."""
    return list(range(num_layers)) if spec == "all" else parse_layer_spec(spec, num_layers)


def mlp_input_module(model: nn.Module, sitemap: SiteMap, layer: int) -> nn.Linear:
    """The ``down_proj`` of ``layer``: its input is the MLP activation ``act(gate) * up``."""
    return sitemap.linear(model, sitemap.require([Site(layer, "down_proj")])[0])


@contextmanager
def mlp_input_hooks(
    model: nn.Module,
    sitemap: SiteMap,
    layers: Sequence[int],
    on_value: Callable[[int, torch.Tensor], None] | None = None,
    on_grad: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Call ``on_value(layer, x)`` on each down_proj input and ``on_grad(layer, dL/dx)`` in backward.

    For gradients the activation is made to require grad (it is a leaf when nothing upstream does,
    the model being frozen) and a tensor hook reports its gradient; the forward values are untouched.
    Hooks are removed on exit, also on error.
    """
    with installed(
        mlp_input_module(model, sitemap, layer).register_forward_pre_hook(
            _pre_hook(layer, on_value, on_grad)
        )
        for layer in layers
    ):
        yield


def _pre_hook(
    layer: int,
    on_value: Callable[[int, torch.Tensor], None] | None,
    on_grad: Callable[[int, torch.Tensor], None] | None,
) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]  # [B, T, D]
        if on_value is not None:
            on_value(layer, x.detach())
        if on_grad is not None and torch.is_grad_enabled():
            if not x.requires_grad:
                x.requires_grad_(True)  # a leaf: no parameter or earlier activation needs grad
            x.register_hook(lambda grad: on_grad(layer, grad))

    return hook


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


def site_tensors(
    model: nn.Module,
    sitemap: SiteMap,
    layers: Sequence[int],
    batch: TokenBatch,
    aggregate_by: str,
) -> dict[int, torch.Tensor]:
    """Per-token down_proj inputs (``values``) or ``d loss / d input`` (``gradients``), [B, T, D]."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, tensor: torch.Tensor) -> None:
        captured[layer] = tensor.detach().clone()

    _forward(model, sitemap, layers, batch, aggregate_by, keep)
    return captured


def _forward(
    model: nn.Module,
    sitemap: SiteMap,
    layers: Sequence[int],
    batch: TokenBatch,
    aggregate_by: str,
    sink: Callable[[int, torch.Tensor], None],
) -> None:
    """One forward (``values``) or forward + backward (``gradients``) pass feeding ``sink``."""
    device = _device(model)
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    if aggregate_by == "values":
        with torch.no_grad(), mlp_input_hooks(model, sitemap, layers, on_value=sink):
            _forward_body(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        return
    if aggregate_by != "gradients":
        raise ValueError(f"aggregate_by must be one of {AGGREGATE_BY}, got {aggregate_by!r}")
    with torch.enable_grad(), mlp_input_hooks(model, sitemap, layers, on_grad=sink):
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
        rows = feats[mask].double()  # [N, F]
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


def run_importance(
    model: nn.Module,
    sitemap: SiteMap,
    batches: Sequence[TokenBatch],
    aggregate_by: str,
    targets: Mapping[str, Mapping[int, Transform]],
    progress: bool = True,
) -> PassResult:
    """Aggregate every target over all non-pad tokens in one pass over ``batches``.

    ``targets[features][layer]`` maps the captured site tensor (values or gradients) of that layer
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
        _forward(model, sitemap, layers, batch, aggregate_by, sink)
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


# --- power, normalisation, statistics ---------------------------------------------------------


def apply_power(g: np.ndarray, power: float | None) -> np.ndarray:
    """``sign(g) * |g|**power`` (sign preserving; ``None`` returns ``g`` unchanged)."""
    g = np.asarray(g, dtype=np.float64)
    if power is None:
        return g.copy()
    return np.sign(g) * np.abs(g) ** power


def normalize(g: np.ndarray, how: str, tolerance: float = 1e-6) -> np.ndarray:
    """Scale ``g`` so that ``sum |g|`` (``sum_abs``) or ``sum g`` (``sum``) equals its length.

    ``sum`` is refused when ``|sum g| <= tolerance * sum |g|``: positive and negative entries
    cancel and dividing by the near-zero sum would only amplify noise.
    """
    g = np.asarray(g, dtype=np.float64)
    dim = g.size
    if how == "none":
        return g.copy()
    sum_abs = float(np.abs(g).sum())
    if how == "sum_abs":
        if sum_abs == 0:
            raise ImportanceError(
                "cannot normalise by sum |g|: all entries are zero (e.g. SAE features that never fire)"
            )
        return g * (dim / sum_abs)
    if how == "sum":
        total = float(g.sum())
        if sum_abs == 0 or abs(total) <= tolerance * sum_abs:
            raise ImportanceError(
                f"cannot normalise by sum g: |sum g| = {abs(total):.3g} is ~0 relative to "
                f"sum |g| = {sum_abs:.3g} (tolerance {tolerance:g}); positive and negative "
                "entries cancel. Use normalize: sum_abs, or aggregation: mean_abs"
            )
        return g * (dim / total)
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")


def vector_stats(g: np.ndarray) -> dict[str, float]:
    """Summary of one importance vector: moments, sign balance and concentration."""
    g = np.asarray(g, dtype=np.float64)
    mass = np.abs(g)
    share = mass / mass.sum() if mass.sum() > 0 else np.full_like(mass, 1 / mass.size)
    nonzero = share[share > 0]
    top = max(1, int(np.ceil(0.01 * g.size)))
    return {
        "dim": int(g.size),
        "mean": float(g.mean()),
        "std": float(g.std()),
        "min": float(g.min()),
        "max": float(g.max()),
        "median": float(np.median(g)),
        "sum": float(g.sum()),
        "sum_abs": float(mass.sum()),
        "fraction_positive": float((g > 0).mean()),
        "top1pct_share": float(np.sort(share)[::-1][:top].sum()),
        # exp(entropy) of |g| / sum |g|: how many dimensions carry the mass (dim when uniform)
        "effective_dims": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
    }


def stem_name(aggregate_by: str, aggregation: str, norm: str, power: float | None = None) -> str:
    """File stem of one variant, e.g. ``values_mean_abs_norm-sum_abs`` (+ ``_pow-2``)."""
    stem = f"{aggregate_by}_{aggregation}_norm-{norm}"
    return stem if power is None else f"{stem}_pow-{power:g}"


@dataclass(frozen=True)
class Variant:
    """One written result: features x pass x aggregation x normalisation (x power)."""

    features: str
    aggregate_by: str
    aggregation: str
    normalize: str
    power: float | None
    vectors: dict[int, np.ndarray]
    stats: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return stem_name(self.aggregate_by, self.aggregation, self.normalize, self.power)


def finalize(result: PassResult, features: str, params: ImportanceParams) -> list[Variant]:
    """Every (aggregation, normalisation) variant of one features' aggregates of a pass."""
    variants = []
    per_layer = result.aggregates[features]
    for aggregation in params.aggregation:
        powered = {
            layer: apply_power(agg.result(aggregation), params.power)
            for layer, agg in per_layer.items()
        }
        for norm in params.normalize:
            vectors = {}
            for layer, g in powered.items():
                try:
                    vectors[layer] = normalize(g, norm, params.sum_tolerance)
                except ImportanceError as err:
                    raise ImportanceError(
                        f"{features} {result.aggregate_by} {aggregation}, layer {layer}: {err}"
                    ) from err
            stats = {
                layer: {**vector_stats(v), "pre_norm_sum_ratio": sum_ratio(powered[layer])}
                for layer, v in vectors.items()
            }
            if norm == "sum":
                _warn_ill_conditioned(stats, f"{features} {result.aggregate_by} {aggregation}")
            variants.append(
                Variant(
                    features, result.aggregate_by, aggregation, norm, params.power, vectors, stats
                )
            )
    return variants


def sum_ratio(g: np.ndarray) -> float:
    """``sum g / sum |g|`` in [-1, 1]: 1 for one-signed vectors, ~0 when entries cancel."""
    mass = float(np.abs(g).sum())
    return float(np.sum(g)) / mass if mass > 0 else float("nan")


ILL_CONDITIONED_RATIO = 0.01


def _warn_ill_conditioned(stats: Mapping[int, Mapping[str, float]], what: str) -> None:
    """Log the layers whose ``sum`` normalisation multiplies the vector by > 100x sum|g|/dim."""
    bad = {i: s["pre_norm_sum_ratio"] for i, s in stats.items()}
    bad = {i: r for i, r in bad.items() if abs(r) < ILL_CONDITIONED_RATIO}
    if bad:
        log.warning(
            "%s, normalize sum: |sum g| / sum |g| < %g at layer(s) %s (min %.2g): these vectors "
            "are dominated by cancellation; prefer sum_abs for them",
            what,
            ILL_CONDITIONED_RATIO,
            sorted(bad),
            min(abs(r) for r in bad.values()),
        )


# --- files ------------------------------------------------------------------------------------

_LAYER_KEY_RE = re.compile(r"^layer_(\d+)$")


@dataclass(frozen=True)
class ImportanceResult:
    """A consolidated ``.npz`` read back: one vector per layer plus its metadata."""

    vectors: dict[int, np.ndarray]
    metadata: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)


def save_importance(out_dir: Path, variant: Variant, metadata: Mapping[str, Any]) -> Path:
    """Write ``<stem>.npz`` (keys ``layer_<i>``, ``layers``, ``metadata``) and per-layer ``.npy``.

    ``metadata`` is stored as a one-element JSON string array so ``allow_pickle=False`` loads it.
    Per-layer vectors go to ``layers/<stem>/layer_<i>.npy``.
    """
    out_dir = Path(out_dir)
    arrays: dict[str, np.ndarray] = {f"layer_{i}": v for i, v in sorted(variant.vectors.items())}
    arrays["layers"] = np.asarray(sorted(variant.vectors), dtype=np.int64)
    arrays["metadata"] = np.asarray([json.dumps(dict(metadata), sort_keys=True)])
    path = out_dir / f"{variant.stem}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    for layer, vector in variant.vectors.items():
        npy = out_dir / "layers" / variant.stem / f"layer_{layer}.npy"
        with atomic_path(npy) as tmp, open(tmp, "wb") as handle:
            np.save(handle, vector, allow_pickle=False)
    return path


def load_importance(path: Path) -> ImportanceResult:
    """Read a consolidated ``.npz`` written by :func:`save_importance` (no pickle)."""
    with np.load(Path(path), allow_pickle=False) as data:
        vectors = {
            int(m.group(1)): data[key]
            for key in data.files
            if (m := _LAYER_KEY_RE.match(key)) is not None
        }
        metadata = json.loads(str(data["metadata"][0])) if "metadata" in data.files else {}
    return ImportanceResult(vectors=vectors, metadata=metadata)


def variant_metadata(
    variant: Variant, result: PassResult, params: ImportanceParams, context: Mapping[str, Any]
) -> dict[str, Any]:
    """What a consolidated file says about itself: config, sizes, statistics, timing."""
    return {
        **dict(context),
        "features": variant.features,
        "aggregate_by": variant.aggregate_by,
        "aggregation": variant.aggregation,
        "normalize": variant.normalize,
        "power": variant.power,
        "layers": sorted(variant.vectors),
        "dims": {str(i): int(v.size) for i, v in sorted(variant.vectors.items())},
        "tokens": result.tokens,
        "seconds": result.seconds,
        "params": params_dict(params),
        "stats": {str(i): s for i, s in sorted(variant.stats.items())},
    }


def params_dict(params: ImportanceParams) -> dict[str, Any]:
    """JSON-ready params (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}


def collect_mlp_inputs(
    model: nn.Module,
    sitemap: SiteMap,
    layers: Sequence[int],
    batches: Sequence[TokenBatch],
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Down_proj inputs of every non-pad token, per layer ``[N, D]`` float32 on CPU (SAE data)."""
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    state: dict[str, torch.Tensor] = {}

    def keep(layer: int, x: torch.Tensor) -> None:
        rows[layer].append(x[state["mask"]].float().cpu())  # [n, D]

    device = _device(model)
    for batch in tqdm(batches, desc="collect activations", disable=not progress):
        state["mask"] = batch.attention_mask.to(device).bool()
        _forward(model, sitemap, layers, batch, "values", keep)
    return {layer: torch.cat(parts) for layer, parts in rows.items()}


def sae_targets(saes: Mapping[int, Any], aggregate_by: str) -> dict[int, Transform]:
    """Per-layer SAE transforms: the encoder for ``values``, ``dL/dx @ W_dec^T`` for gradients."""
    if aggregate_by == "values":
        return {layer: sae.encode for layer, sae in saes.items()}
    return {layer: sae.feature_grad for layer, sae in saes.items()}


def write_variants(
    out_dir: Path,
    variants: Sequence[Variant],
    result: PassResult,
    params: ImportanceParams,
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """Save every variant (``.npz`` + per-layer ``.npy``); return their metadata by stem."""
    written = {}
    for variant in variants:
        meta = variant_metadata(variant, result, params, context)
        save_importance(out_dir, variant, meta)
        written[variant.stem] = {k: v for k, v in meta.items() if k not in ("params", *context)}
    return written
