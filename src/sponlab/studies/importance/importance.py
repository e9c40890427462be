"""Per-layer importance of MLP activations (down_proj inputs) or of SAE features on them.

For every selected decoder layer the input of ``down_proj`` (``act(gate) * up``, shape
``[B, T, D]``) is captured with a forward *pre*-hook on the discovered site (:mod:`sponlab.model.sites`),
inside a context manager that always removes its hooks. Two quantities can be aggregated over all
non-pad tokens of all samples, giving one vector of length ``D`` (or the SAE dictionary size) per
layer:

- ``values``: the activations themselves (forward pass only, no logits needed);
- ``gradients``: ``d loss / d activation`` with the model frozen. The loss is the next-token
  cross-entropy *summed* over the non-pad target tokens of a batch, so the gradient at a token does
  not depend on which other samples share its batch (it equals the gradient of the dataset-mean loss
  times the number of target tokens; normalisation removes that scale). The last token of a
  sequence predicts nothing, so its gradient is exactly zero; it still counts as a token.

SAE features (see :mod:`sponlab.studies.importance.sae`) are ``f = ReLU((x - b_dec) @ W_enc + b_enc)``. Their
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

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sponlab.config import Params, Section, section_params
from sponlab.io.data import SPLITS
from sponlab.model.capture import (
    ACTIVATIONS,
    AGGREGATE_BY,
    AGGREGATIONS,
    ImportanceError,
    PassResult,
    parse_layers,
)
from sponlab.paramcheck import choice, flag, integer, number, read_keys

log = logging.getLogger(__name__)
FEATURES: tuple[str, ...] = ("mlp", "sae")
NORMALIZATIONS: tuple[str, ...] = ("none", "sum_abs", "sum")
BOTH_NORMALIZATIONS: tuple[str, ...] = ("sum_abs", "sum")


@dataclass(frozen=True)
class ImportanceParams:
    """The ``importance`` section of params.yaml (lists are the expanded ``both`` choices)."""

    features: tuple[str, ...] = FEATURES
    aggregate_by: tuple[str, ...] = AGGREGATE_BY
    aggregation: tuple[str, ...] = AGGREGATIONS
    power: float | None = None
    normalize: tuple[str, ...] = BOTH_NORMALIZATIONS
    sum_tolerance: float = number(1e-6, "normalised layers must sum to 1 within this", lo=0, hi=1)
    layers: str = "all"  # parse_layers
    activation: str = choice("mlp_out", ACTIVATIONS, "the activations whose importance is measured")
    split: str = choice("val", SPLITS, "the text they are measured on")
    samples: int = integer(32, "documents", lo=1)
    min_tokens: int = integer(32, "shortest document kept (tokens)", lo=2)
    max_length: int = integer(128, "tokens per document", lo=2)
    batch_size: int = integer(8, "documents per forward", lo=1)
    layer_figures: bool = flag(True, "one figure per layer besides the summaries")


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
    """``null`` (no power), a positive number, or a list (also the gradient tools' comma-separated
    string ``"0.5,1.0,2.0"``) whose first value is used (warned)."""
    value = sec.get("power", None)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError as err:
            raise sec.fail("power", f"must be null, a number > 0 or a list, got {value!r}") from err
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


def parse_params(sec: Section) -> ImportanceParams:
    """Validate the ``importance`` section; every bad value names its key."""
    by_hand = {
        "features": _one_or_many(sec, "features", FEATURES, FEATURES),
        "aggregate_by": _one_or_many(sec, "aggregate_by", AGGREGATE_BY, AGGREGATE_BY),
        "aggregation": _expand(
            sec.choice("aggregation", (*AGGREGATIONS, "both"), "both"), AGGREGATIONS
        ),
        "power": _power(sec),
        "normalize": _expand(
            sec.choice("normalize", (*NORMALIZATIONS, "both"), "both"), BOTH_NORMALIZATIONS
        ),
        "layers": parse_layers(sec, ImportanceParams.layers),
    }
    params = ImportanceParams(**read_keys(ImportanceParams, sec, **by_hand))
    sec.finish()
    sec.require_le("min_tokens", params.min_tokens, "max_length", params.max_length)
    return params


def importance_params(params: Params) -> ImportanceParams:
    """The ``importance`` section of loaded params (its defaults when absent)."""
    return section_params(params, "importance", parse_params)


def _expand(choice: str, both: tuple[str, ...]) -> tuple[str, ...]:
    return both if choice == "both" else (choice,)


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


def score_stats(g: np.ndarray) -> dict[str, float]:
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
class ImportanceScores:
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


def finalize(result: PassResult, features: str, params: ImportanceParams) -> list[ImportanceScores]:
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
                layer: {**score_stats(v), "pre_norm_sum_ratio": sum_ratio(powered[layer])}
                for layer, v in vectors.items()
            }
            if norm == "sum":
                _warn_ill_conditioned(stats, f"{features} {result.aggregate_by} {aggregation}")
            variants.append(
                ImportanceScores(
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
