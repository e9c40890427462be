"""``params.yaml``: typed dataclasses, validated once at the edge with messages naming the key.

:func:`load_params` reads and validates the whole file before any heavy work starts, so a bad value
fails in milliseconds with e.g. ``params.yaml: sparsify.method must be one of ['teal', 'topk'],
got 'tael'`` instead of half-way through a stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sponlab.allocations import (
    INITS,
    LOSSES,
    PARAMETRIZATIONS,
    AllocationConfig,
    SparsifyParams,
    parse_config,
    parse_sparsify,
)
from sponlab.model.base import BaseModelParams, parse_base
from sponlab.paramcheck import ConfigError, Section  # re-exported: analysis parsers use them

DATA_SOURCES = ("builtin", "wikitext")
SCHEDULES = ("constant", "cosine", "linear")
AUTOCASTS = ("auto", "bfloat16", "off")


@dataclass(frozen=True)
class DataParams:
    source: str = "builtin"
    block_len: int = 128
    bos: bool | str = "auto"
    seed: int = 0
    calib_blocks: int = 16
    train_blocks: int = 64
    val_blocks: int = 16
    test_blocks: int = 32


@dataclass(frozen=True)
class TrainParams:
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    teacher_cache: bool = True
    # the kept training targets never exceed this (GiB of host memory); a larger set is
    # recomputed each epoch instead (the same values, one dense forward per batch more)
    teacher_cache_gib: float = 8.0
    teacher_topk: int = 0  # 0: full teacher distribution | k: top-k log-probs + the rest's mass
    kl_chunk: int = 0  # 0: KL on the whole batch at once | n: n tokens at a time (checkpointed)
    init: str = "zeros"
    loss: str = "kl"  # kl (distillation) | ce (next-token cross-entropy) | kl+logit_l2
    logit_l2: float = 0.01  # kl+logit_l2: weight of the mean squared centred logit difference
    blocks: int = 0  # blocks each seed draws from the training pool (0: the whole pool)
    # the frozen model's matmuls in the training step: auto (bfloat16 on a CPU with AMX or
    # AVX512-BF16 and a float32 model, else off) | bfloat16 | off. Biases, optimizer, KL,
    # teacher and validation stay float32.
    autocast: str = "off"


@dataclass(frozen=True)
class SummaryParams:
    """How the sweep is compared: the reference config for relative parameters, the noise rules."""

    # rel. params = bias parameters / this config's (as the study); default UNIF-ALL when swept
    reference: str | None = None
    min_damage: float = 0.02  # TEAL damage below this fraction of dense ppl: ratio not reported
    noise_sigmas: float = 2.0  # differences within this many standard errors count as noise


PROTOCOLS = ("auto", "block", "gptq", "sliding")


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 8
    detail_blocks: int = 16
    # block (C): data.test_blocks blocks of data.block_len from shuffled documents, each scored
    # alone | gptq (A): the test text joined with "\n\n", non-overlapping `context` windows |
    # sliding (B): `context` windows every `stride` tokens, the last `stride` scored | auto: gptq
    # with data.source wikitext, block otherwise
    protocol: str = "auto"
    context: int = 2048
    stride: int = 512
    max_windows: int = 0  # gptq / sliding: first N windows (0: the whole test text)

    def resolved_protocol(self, data_source: str) -> str:
        if self.protocol == "auto":
            return "gptq" if data_source == "wikitext" else "block"
        return self.protocol


@dataclass(frozen=True)
class Params:
    base: BaseModelParams
    data: DataParams
    sparsify: SparsifyParams
    sparsities: tuple[float, ...]
    sweep_configs: tuple[str, ...]
    sweep_sets: tuple[str, ...]
    configs: dict[str, AllocationConfig]
    train: TrainParams
    eval: EvalParams
    summary: SummaryParams = field(default_factory=SummaryParams)
    analyses: dict[str, Any] = field(default_factory=dict)
    sweep_ranked: tuple[str, ...] = ()  # configs whose layers come from a measured ranking

    @property
    def swept(self) -> tuple[str, ...]:
        """Every config of the sweep: ``sweep.configs`` then ``sweep.ranked``."""
        return self.sweep_configs + self.sweep_ranked

    def config(self, name: str) -> AllocationConfig:
        if name not in self.configs:
            raise ConfigError(
                f"unknown config {name!r}; defined in configs: {sorted(self.configs)}"
            )
        return self.configs[name]

    def sparsified_set(self, name: str) -> tuple[str, ...]:
        """The projections of sparsified set ``name`` (``sparsify.sets``)."""
        if name not in self.sparsify.sets:
            raise ConfigError(
                f"unknown sparsified set {name!r}; defined in sparsify.sets: "
                f"{sorted(self.sparsify.sets)}"
            )
        return self.sparsify.sets[name]

    def set_allocation(self, name: str) -> str:
        """How sparsified set ``name`` spreads its sparsity: ``uniform`` or ``greedy``."""
        self.sparsified_set(name)  # a clear error for an unknown set
        return self.sparsify.allocations[name]

    def check_sparsity(self, sparsity: float) -> float:
        if not any(abs(sparsity - s) < 1e-9 for s in self.sparsities):
            raise ConfigError(
                f"sparsity {sparsity} is not in sweep.sparsities {list(self.sparsities)}"
            )
        return sparsity


def _sparsity(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"params.yaml: {key} must be a number in [0, 1), got {value!r}")
    return float(value)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate the whole params mapping; raise :class:`ConfigError` on the first bad value."""
    top = Section(raw, "", source)

    base = parse_base(top.section("base"))
    data = _parse_data(top.section("data"))
    sparsify = parse_sparsify(top.section("sparsify"))

    sec = top.section("spon")
    parametrization = sec.choice("parametrization", PARAMETRIZATIONS, "output")
    sec.finish()

    train = _parse_train(top.section("train"))
    if train.blocks > data.train_blocks:
        raise ConfigError(
            f"{source}: train.blocks ({train.blocks}) must be <= data.train_blocks "
            f"({data.train_blocks}, the training pool each seed draws from), or 0 (the whole pool)"
        )
    sec = top.section("configs")
    if not sec.data:
        raise ConfigError(f"{source}: configs must define at least one allocation config")
    defaults = (parametrization, train.seed, train.init, train.loss)
    configs = {
        name: parse_config(name, sec.get(name), sparsify.sets, defaults, source)
        for name in list(sec.data)
    }

    sparsities, sweep_configs, sweep_ranked, sweep_sets = _parse_sweep(
        top.section("sweep"), configs, sparsify.sets
    )

    evaluation = _parse_eval(top.section("eval"), data)
    summary = _parse_summary(top.section("summary"), sweep_configs)

    # Sections owned by the analysis stages are validated by their own modules, here, up front.
    analyses = {
        name: _import(target)(top.section(name))
        for name, target in ANALYSIS_PARSERS.items()
        if name in top.data
    }
    top.finish()
    for name, target in CROSS_CHECKS.items():
        if name in analyses:
            _import(target)(analyses[name], configs, source)
    params = Params(
        base=base,
        data=data,
        sparsify=sparsify,
        sparsities=sparsities,
        sweep_configs=sweep_configs,
        sweep_sets=sweep_sets,
        configs=configs,
        train=train,
        eval=evaluation,
        summary=summary,
        analyses=analyses,
        sweep_ranked=sweep_ranked,
    )
    if sweep_ranked:
        _check_ranked(params, source)
    return params


def _parse_data(sec: Section) -> DataParams:
    D = DataParams
    data = DataParams(
        source=sec.choice("source", DATA_SOURCES, D.source),
        block_len=sec.number("block_len", D.block_len, lo=8, integer=True),
        bos=_bos(sec),
        seed=sec.number("seed", D.seed, lo=0, integer=True),
        calib_blocks=sec.number("calib_blocks", D.calib_blocks, lo=1, integer=True),
        train_blocks=sec.number("train_blocks", D.train_blocks, lo=1, integer=True),
        val_blocks=sec.number("val_blocks", D.val_blocks, lo=1, integer=True),
        test_blocks=sec.number("test_blocks", D.test_blocks, lo=1, integer=True),
    )
    sec.finish()
    return data


def _parse_eval(sec: Section, data: DataParams) -> EvalParams:
    evaluation = EvalParams(
        batch_size=sec.number("batch_size", EvalParams.batch_size, lo=1, integer=True),
        detail_blocks=sec.number("detail_blocks", EvalParams.detail_blocks, lo=1, integer=True),
        protocol=sec.choice("protocol", PROTOCOLS, EvalParams.protocol),
        context=sec.number("context", EvalParams.context, lo=8, integer=True),
        stride=sec.number("stride", EvalParams.stride, lo=1, integer=True),
        max_windows=sec.number("max_windows", EvalParams.max_windows, lo=0, integer=True),
    )
    sec.finish()
    sec.require_le("stride", evaluation.stride, "context", evaluation.context)
    if evaluation.resolved_protocol(data.source) != "block":
        return evaluation  # windows: their count is known once the text is tokenised
    if evaluation.detail_blocks > data.test_blocks:
        raise ConfigError(
            f"{sec.source}: eval.detail_blocks ({evaluation.detail_blocks}) must be <= "
            f"data.test_blocks ({data.test_blocks})"
        )
    return evaluation


def _parse_summary(sec: Section, sweep_configs: Sequence[str]) -> SummaryParams:
    reference = sec.get("reference", "UNIF-ALL" if "UNIF-ALL" in sweep_configs else None)
    summary = SummaryParams(
        reference=None
        if reference is None
        else _config_ref(reference, sec.key("reference"), sweep_configs, sec.source),
        min_damage=sec.number("min_damage", SummaryParams.min_damage, lo=0),
        noise_sigmas=sec.number("noise_sigmas", SummaryParams.noise_sigmas, lo=0),
    )
    sec.finish()
    return summary


def _parse_sweep(sec: Section, configs: Mapping[str, AllocationConfig], sets: Mapping[str, Any]):
    """``sweep``: sparsities, configs, ranked configs (trained after the ranking), sets."""
    source = sec.source
    sparsities = tuple(sec.items("sparsities", _sparsity))
    if len(set(sparsities)) != len(sparsities):
        raise ConfigError(f"{source}: sweep.sparsities has duplicates: {list(sparsities)}")
    sweep_configs = tuple(sec.items("configs", lambda v, k: _config_ref(v, k, configs, source)))
    ranked: tuple[str, ...] = ()
    if sec.get("ranked", []) != []:  # may be empty: no ranked configs
        ranked = tuple(sec.items("ranked", lambda v, k: _config_ref(v, k, configs, source)))
    sweep_sets = tuple(
        sec.items("sets", lambda v, k: _config_ref(v, k, sets, source, "set"), ["all"])
    )
    sec.finish()
    for name in sweep_configs + ranked:
        if configs[name].sparsify not in sweep_sets:
            raise ConfigError(
                f"{source}: sweep has {name!r}, which sparsifies set "
                f"{configs[name].sparsify!r}; add it to sweep.sets {list(sweep_sets)} so it is "
                "calibrated"
            )
    for name in sweep_configs:
        if configs[name].ranked:
            raise ConfigError(
                f"{source}: sweep.configs has {name!r}, whose layers come from a ranking "
                f"(configs.{name}.layers.ranked): list it in sweep.ranked instead, so it is "
                "trained after the layer-importance stage"
            )
    for name in ranked:
        if not configs[name].ranked:
            raise ConfigError(
                f"{source}: sweep.ranked has {name!r}, whose layers are not "
                "{ranked: CONFIG, ...}: list it in sweep.configs instead"
            )
    return sparsities, sweep_configs, ranked, sweep_sets


def _check_ranked(params: Params, source: str) -> None:
    """A ranking comes from the layer-importance stage: of interpret.layers.config, swept, at
    interpret.sparsity, which must be swept too (its thresholds are calibrated)."""
    interpret = analysis_params(params, "interpret", source)
    layers_config = interpret.layers.config
    if not any(abs(interpret.sparsity - s) < 1e-9 for s in params.sparsities):
        raise ConfigError(
            f"{source}: sweep.ranked {list(params.sweep_ranked)} takes layers from the ranking "
            f"measured at interpret.sparsity ({interpret.sparsity}), which is not in "
            f"sweep.sparsities {list(params.sparsities)}: add it there, or set sweep.ranked: []"
        )
    for name in params.sweep_ranked:
        wanted = params.configs[name].layers.source
        if wanted != layers_config or wanted not in params.sweep_configs:
            raise ConfigError(
                f"{source}: configs.{name}.layers.ranked is {wanted!r}, but the layer ranking "
                f"is measured for interpret.layers.config ({layers_config!r}), which must be in "
                f"sweep.configs {list(params.sweep_configs)}"
            )


def _bos(sec: Section) -> bool | str:
    """``data.bos``: ``auto`` (the tokenizer's own convention) or a boolean."""
    value = sec.get("bos", DataParams.bos)
    return value if value == "auto" else sec.boolean("bos")


def _parse_train(sec: Section) -> TrainParams:
    T = TrainParams  # defaults live once, on the dataclass
    train = TrainParams(
        lr=sec.number("lr", T.lr, lo=0, lo_open=True),
        epochs=sec.number("epochs", T.epochs, lo=1, integer=True),
        batch_size=sec.number("batch_size", T.batch_size, lo=1, integer=True),
        schedule=sec.choice("schedule", SCHEDULES, T.schedule),
        warmup_steps=sec.number("warmup_steps", T.warmup_steps, lo=0, integer=True),
        weight_decay=sec.number("weight_decay", T.weight_decay, lo=0),
        grad_clip=sec.number("grad_clip", T.grad_clip, lo=0),
        seed=sec.number("seed", T.seed, lo=0, integer=True),
        teacher_cache=sec.boolean("teacher_cache", T.teacher_cache),
        teacher_cache_gib=sec.number("teacher_cache_gib", T.teacher_cache_gib, lo=0),
        teacher_topk=sec.number("teacher_topk", T.teacher_topk, lo=0, integer=True),
        kl_chunk=sec.number("kl_chunk", T.kl_chunk, lo=0, integer=True),
        init=sec.choice("init", INITS, T.init),
        loss=sec.choice("loss", LOSSES, T.loss),
        logit_l2=sec.number("logit_l2", T.logit_l2, lo=0),
        blocks=sec.number("blocks", T.blocks, lo=0, integer=True),
        autocast=sec.choice("autocast", AUTOCASTS, T.autocast),
    )
    sec.finish()
    if (train.teacher_topk or train.kl_chunk) and train.loss != "kl":
        raise sec.fail(
            "loss",
            f"must be kl with teacher_topk / kl_chunk (memory-bounded KL), got {train.loss!r}",
        )
    return train


def _config_ref(
    value: Any,
    key: str,
    configs: Sequence[str] | Mapping[str, Any],
    source: str,
    what: str = "config",
) -> str:
    if value not in configs:
        raise ConfigError(
            f"{source}: {key} names unknown {what} {value!r}; allowed: {sorted(configs)}"
        )
    return value


# Top-level sections owned by analysis modules: "module:function" taking a Section and returning
# that analysis' typed params (calling Section.finish()). Imported only when the section is present.
ANALYSIS_PARSERS: dict[str, str] = {
    "interpret": "sponlab.studies.interpret.params:parse_params",
    "importance": "sponlab.studies.importance.importance:parse_params",
    "sae": "sponlab.studies.importance.sae:parse_params",
    "spectrum": "sponlab.studies.spectrum.spectrum:parse_params",
}


# Checks of an analysis section against the rest of params.yaml (e.g. config names it refers to),
# "module:function" taking (that analysis' params, configs, source): run at the edge as well.
CROSS_CHECKS: dict[str, str] = {"interpret": "sponlab.studies.interpret.params:check_config_names"}


def _import(target: str) -> Callable[[Section], Any]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def analysis_params(params: Params, name: str, source: str = "params.yaml") -> Any:
    """Typed params of analysis section ``name`` (its defaults when the section is absent)."""
    if name in params.analyses:
        return params.analyses[name]
    return _import(ANALYSIS_PARSERS[name])(Section({}, name, source))


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return parse_params(raw, source=str(path))
