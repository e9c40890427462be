"""Allocation configs (``configs:`` of params.yaml): where SPON biases go and what TEAL sparsifies.

An :class:`AllocationConfig` names SPON bias sites (layers x modules), the sparsified set its
TEAL baseline and TEAL+SPON share, its seeds and how its biases are obtained (trained or closed
form). Parsed once at the edge by :mod:`sponlab.config` with messages naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sponlab.model.sites import PROJECTIONS, LayerSelection, parse_modules
from sponlab.paramcheck import ConfigError, Section, choice, integer, number, read_keys

PARAMETRIZATIONS = ("output", "input")
BIAS_KINDS = ("trained", "closed_form")
INITS = ("zeros", "closed_form")
LOSSES = ("kl", "ce", "kl+logit_l2")
RANK_RULES = ("coverage", "top", "above")
CONFIG_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class AllocationConfig:
    """One named allocation: SPON biases on ``layers`` x ``modules`` (empty: TEAL-only).

    ``sparsify`` names the sparsified set (``sparsify.sets``; its modules in ``sparsify_modules``)
    that both the TEAL-only baseline and TEAL+SPON of this config use. ``bias`` is ``trained``
    (KL distillation, from ``init``) or ``closed_form`` (b = W E[x - S(x)] on calibration text,
    no training). ``seeds`` are independent trainings of the same cell (replicates). ``loss``
    is the training objective (``train.loss`` unless the config sets its own).
    """

    name: str
    layers: LayerSelection
    modules: tuple[str, ...]
    sparsify: str = "all"
    sparsify_modules: tuple[str, ...] = PROJECTIONS
    parametrization: str = "output"
    seeds: tuple[int, ...] = (0,)
    bias: str = "trained"
    init: str = "zeros"
    loss: str = "kl"

    @property
    def has_biases(self) -> bool:
        return bool(self.modules) and self.layers.kind != "none"

    @property
    def ranked(self) -> bool:
        """Its layers come from a measured layer ranking (trained after the layer-importance
        stage: listed in ``sweep.ranked``)."""
        return self.layers.kind == "ranked"


def parse_layers(value: Any, key: str, source: str = "params.yaml") -> LayerSelection:
    """``all`` | ``none`` | ``{first: f}`` | ``{last: f}`` | ``[i, j, ...]`` | ``{ranked: CONFIG,
    coverage: f}`` | ``{ranked: CONFIG, top: k}`` | ``{ranked: CONFIG, above: median}``."""
    if value in ("all", "none"):
        return LayerSelection(kind=value)
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if any(v < 0 for v in value) or not value:
            raise ConfigError(f"{source}: {key} must list layer indices >= 0, got {value!r}")
        return LayerSelection(kind="list", layers=tuple(value))
    if isinstance(value, Mapping) and "ranked" in value:
        return _parse_ranked(value, key, source)
    if isinstance(value, Mapping) and len(value) == 1:
        ((kind, fraction),) = value.items()
        ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
        if kind in ("first", "last") and ok and 0 < fraction <= 1:
            return LayerSelection(kind=kind, fraction=float(fraction))
    raise ConfigError(
        f"{source}: {key} must be 'all', 'none', {{first: f}} or {{last: f}} with 0 < f <= 1, "
        f"a list of layer indices, or {{ranked: CONFIG, coverage: f | top: k | above: median}}; "
        f"got {value!r}"
    )


def _parse_ranked(value: Mapping, key: str, source: str) -> LayerSelection:
    """``{ranked: CONFIG, <rule>: <value>}``: the layers of CONFIG's measured ranking that give a
    ``coverage`` fraction of its benefit, the ``top`` k, or those ``above`` the median."""
    rules = [r for r in value if r != "ranked"]
    if len(rules) != 1 or rules[0] not in RANK_RULES:
        raise ConfigError(
            f"{source}: {key} takes 'ranked' and exactly one of {list(RANK_RULES)}, got {value!r}"
        )
    rule, number = rules[0], value[rules[0]]
    numeric = isinstance(number, (int, float)) and not isinstance(number, bool)
    valid = {
        "coverage": numeric and 0 < number <= 1,
        "top": numeric and isinstance(number, int) and number >= 1,
        "above": number == "median",
    }[rule]
    if not valid:
        allowed = {"coverage": "a fraction in (0, 1]", "top": "an integer >= 1",
                   "above": "'median'"}[rule]  # fmt: skip
        raise ConfigError(f"{source}: {key}.{rule} must be {allowed}, got {number!r}")
    if not isinstance(value["ranked"], str):
        raise ConfigError(f"{source}: {key}.ranked must name a config, got {value['ranked']!r}")
    fraction = 0.5 if rule == "above" else float(number)
    return LayerSelection(kind="ranked", fraction=fraction, source=value["ranked"], rule=rule)


def parse_config(
    name: str,
    value: Any,
    sets: Mapping[str, tuple[str, ...]],
    defaults: tuple[str, int, str, str],
    source: str,
) -> AllocationConfig:
    if not CONFIG_NAME_RE.match(name):
        raise ConfigError(f"{source}: config name {name!r} must match {CONFIG_NAME_RE.pattern}")
    parametrization, seed, init, loss = defaults
    sec = Section(value, f"configs.{name}", source)
    set_name = sec.choice("sparsify", list(sets), "all" if "all" in sets else next(iter(sets)))
    seeds = tuple(sec.items("seeds", _seed, [seed]))
    if len(set(seeds)) != len(seeds):
        raise sec.fail("seeds", f"has duplicates: {list(seeds)}")
    cfg = AllocationConfig(
        name=name,
        layers=parse_layers(sec.get("layers"), sec.key("layers"), source),
        modules=parse_modules(sec, "modules", allow_empty=True),
        sparsify=set_name,
        sparsify_modules=sets[set_name],
        parametrization=sec.choice("parametrization", PARAMETRIZATIONS, parametrization),
        seeds=seeds,
        bias=sec.choice("bias", BIAS_KINDS, "trained"),
        init=sec.choice("init", INITS, init),
        loss=sec.choice("loss", LOSSES, loss),
    )
    if cfg.bias == "closed_form" and any(k in sec.data for k in ("init", "loss")):
        raise sec.fail("bias", "closed_form is computed, not trained: it takes no init or loss")
    if cfg.bias == "closed_form" and len(cfg.seeds) > 1:
        raise sec.fail("bias", "closed_form is computed, not trained: it takes no seeds")
    sec.finish()
    return cfg


def _seed(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"params.yaml: {key} must be an integer >= 0, got {value!r}")
    return value


SPARSIFY_METHODS = ("teal", "topk")
THRESHOLD_METHODS = ("quantile", "histogram")
CALIBRATION_MODES = ("sequential", "dense")
PREFILL_POLICIES = ("all", "dense_prefix")
ALLOCATION_KINDS = ("uniform", "greedy")


@dataclass(frozen=True)
class GreedyParams:
    """``sparsify.greedy``: TEAL's block-wise greedy search (:mod:`sponlab.method.greedy`)."""

    step: float = number(
        0.05, "weighted sparsity added per step, per q_proj-sized matrix (TEAL: 0.05)", 1e-3, 0.5
    )
    blocks: int = integer(
        4, "first calibration blocks whose layer inputs and outputs drive the search", lo=1
    )
    last_fraction: float = number(
        0.25, "positions scored: the last fraction of each block (TEAL)", 0.01, 1.0
    )


def parse_greedy(sec: Section) -> GreedyParams:
    """The greedy search settings among a set's keys (``step``, ``blocks``, ``last_fraction``)."""
    return GreedyParams(**read_keys(GreedyParams, sec))


def parse_sets(sec: Section, default_allocation: str) -> tuple[dict, dict, dict]:
    """``sparsify.sets``: name -> projections (``all`` or a list), or a mapping ``{modules,
    allocation, step, blocks, last_fraction}`` giving one set its own allocation (``uniform`` |
    ``greedy``; default ``sparsify.allocation``) and greedy settings. Returns name -> modules,
    name -> allocation and name -> :class:`GreedyParams`; names as config names."""
    raw = sec.get("sets", {"all": "all"})
    if not isinstance(raw, Mapping) or not raw:
        raise sec.fail("sets", f"must map set names to 'all' or projection lists, got {raw!r}")
    sets_sec = Section(raw, sec.key("sets"), sec.source)
    modules, allocation, greedy = {}, {}, {}
    for name in list(raw):
        if not isinstance(name, str) or not CONFIG_NAME_RE.match(name):
            raise sets_sec.fail(str(name), f"is not a valid set name ({CONFIG_NAME_RE.pattern})")
        allocation[name], greedy[name] = default_allocation, GreedyParams()
        if not isinstance(raw[name], Mapping):
            modules[name] = parse_modules(sets_sec, name)
            continue
        one = sets_sec.section(name)
        modules[name] = parse_modules(one, "modules")
        allocation[name] = one.choice("allocation", ALLOCATION_KINDS, default_allocation)
        if allocation[name] == "greedy":
            greedy[name] = parse_greedy(one)
        one.finish()
    sets_sec.finish()
    return modules, allocation, greedy


@dataclass(frozen=True)
class SparsifyParams:
    """``sparsify``: how TEAL zeroes inputs, which sets it calibrates and how they spread it."""

    method: str = choice(
        "teal", SPARSIFY_METHODS, "teal (calibrated thresholds) | topk (per-token magnitude top-k)"
    )
    threshold: str = choice(
        "quantile",
        THRESHOLD_METHODS,
        "quantile (exact empirical quantile of |x|) | histogram (streaming)",
    )
    calibration: str = choice(
        "sequential",
        CALIBRATION_MODES,
        "sequential (each site sees its inputs with upstream sites sparsified) | dense",
    )
    sets: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"all": PROJECTIONS})
    prefill: str = choice(
        "all",
        PREFILL_POLICIES,
        "all: every token sparsified | dense_prefix: the first tokens kept dense",
    )
    dense_prefix: int = integer(0, "tokens kept dense under prefill: dense_prefix", lo=0)
    allocation: str = "uniform"  # default of the sets: uniform | greedy (TEAL's per-layer search)
    allocations: Mapping[str, str] = field(default_factory=lambda: {"all": "uniform"})  # per set
    greedy: Mapping[str, GreedyParams] = field(default_factory=lambda: {"all": GreedyParams()})


def parse_sparsify(sec: Section) -> SparsifyParams:
    """``sparsify``: method, thresholds, calibration, sets and their allocation, prefill."""
    S = SparsifyParams
    allocation = sec.choice("allocation", ALLOCATION_KINDS, S.allocation)
    sets, allocations, greedy_params = parse_sets(sec, allocation)
    sparsify = SparsifyParams(
        **read_keys(
            SparsifyParams,
            sec,
            sets=sets,
            allocation=allocation,
            allocations=allocations,
            greedy=greedy_params,
        )
    )
    sec.finish()
    greedy = sorted(name for name, kind in allocations.items() if kind == "greedy")
    needs = {"calibration": "sequential", "method": "teal"}  # per-site thresholds, layer by layer
    for key, value in needs.items():
        if greedy and getattr(sparsify, key) != value:
            raise sec.fail(
                key,
                f"must be {value!r} for the greedy allocation of set(s) {greedy}, "
                f"got {getattr(sparsify, key)!r}",
            )
    return sparsify
