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
from typing import Any, TypeVar

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
from sponlab.paramcheck import (  # ConfigError, Section re-exported: analysis parsers use them
    ConfigError,
    Section,
    choice,
    flag,
    integer,
    number,
    read_keys,
)

T = TypeVar("T")

DATA_SOURCES = ("builtin", "wikitext")
SCHEDULES = ("constant", "cosine", "linear")
AUTOCASTS = ("auto", "bfloat16", "off")


# Each key is declared once: its field holds the default, the help and the check
# (sponlab.paramcheck), and read_keys reads the section from these declarations.


@dataclass(frozen=True)
class DataParams:
    source: str = choice("builtin", DATA_SOURCES, "builtin: the embedded text | wikitext (hub)")
    block_len: int = integer(128, "tokens per block", lo=8)
    bos: bool | str = "auto"  # true | false | auto (the tokenizer's habit): parsed by _bos
    seed: int = integer(0, "seed of the document shuffle and block draws", lo=0)
    calib_blocks: int = integer(16, "TEAL threshold calibration blocks", lo=1)
    train_blocks: int = integer(64, "the SPON training pool each seed draws from", lo=1)
    val_blocks: int = integer(16, "validation blocks (epoch selection, per block)", lo=1)
    test_blocks: int = integer(32, "perplexity blocks", lo=1)


@dataclass(frozen=True)
class TrainParams:
    lr: float = number(1e-3, "AdamW learning rate", lo=0, lo_open=True)
    epochs: int = integer(2, "passes over each seed's training blocks", lo=1)
    batch_size: int = integer(8, "blocks per step", lo=1)
    schedule: str = choice("cosine", SCHEDULES, "learning rate after warm-up")
    warmup_steps: int = integer(0, "steps of linear warm-up", lo=0)
    weight_decay: float = number(0.0, "AdamW weight decay", lo=0)
    grad_clip: float = number(1.0, "gradient-norm clip (0: none)", lo=0)
    seed: int = integer(0, "default seed of a config's training", lo=0)
    teacher_cache: bool = flag(True, "keep the dense targets after epoch 1, not recompute them")
    teacher_cache_gib: float = number(
        8.0, "the most host memory kept targets take (validation first); the rest is recomputed "
        "each epoch, the same values", lo=0,
    )  # fmt: skip
    teacher_topk: int = integer(
        0, "0: the full teacher distribution | k: its top-k log-probs and the rest's mass", lo=0
    )
    kl_chunk: int = integer(0, "0: KL on the whole batch | n: n tokens at a time", lo=0)
    init: str = choice("zeros", INITS, "zeros | closed_form: start from b = W E[x - S(x)]")
    loss: str = choice("kl", LOSSES, "kl (distillation) | ce (next token) | kl+logit_l2")
    logit_l2: float = number(0.01, "kl+logit_l2: weight of the centred logit difference", lo=0)
    blocks: int = integer(0, "blocks each seed draws from the training pool (0: all)", lo=0)
    autocast: str = choice(
        "off", AUTOCASTS, "the student's matmuls: auto (bfloat16 on a float32 model on a CPU "
        "with AMX / AVX512-BF16) | bfloat16 | off; biases, optimizer, KL, teacher stay float32",
    )  # fmt: skip


@dataclass(frozen=True)
class SummaryParams:
    """How the sweep is compared: the reference config for relative parameters, the noise rules."""

    # rel. params = bias parameters / this config's (as the study); default UNIF-ALL when swept
    reference: str | None = None  # checked against the sweep: parsed by _parse_summary
    min_damage: float = number(0.02, "TEAL damage below this fraction of dense ppl: no ratio", lo=0)
    noise_sigmas: float = number(2.0, "differences within this many SEs are noise", lo=0)


PROTOCOLS = ("auto", "block", "gptq", "sliding")


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = integer(8, "blocks per forward", lo=1)
    detail_blocks: int = integer(16, "first test blocks: KL to dense and hidden shift", lo=1)
    protocol: str = choice(
        "auto", PROTOCOLS, "block (C): test blocks scored alone | gptq (A): the test text in "
        "non-overlapping windows | sliding (B): windows every stride | auto: gptq on wikitext",
    )  # fmt: skip
    context: int = integer(2048, "gptq / sliding: window length", lo=8)
    stride: int = integer(512, "sliding: tokens between windows (the last stride scored)", lo=1)
    max_windows: int = integer(0, "gptq / sliding: first N windows (0: all)", lo=0)

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
    data = DataParams(**read_keys(DataParams, sec, bos=_bos(sec)))
    sec.finish()
    return data


def _parse_eval(sec: Section, data: DataParams) -> EvalParams:
    evaluation = EvalParams(**read_keys(EvalParams, sec))
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
    if reference is not None:
        reference = _config_ref(reference, sec.key("reference"), sweep_configs, sec.source)
    summary = SummaryParams(**read_keys(SummaryParams, sec, reference=reference))
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
    interpret = section_params(params, "interpret", _import(ANALYSIS_PARSERS["interpret"]), source)
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
    train = TrainParams(**read_keys(TrainParams, sec))
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
# that analysis' typed params (calling Section.finish()), so load_params validates every section
# up front. Named here, not imported: the studies sit above config (they read its Params); each
# stage imports its own study's parser through that study's ``*_params`` wrapper.
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


def section_params(
    params: Params, name: str, parser: Callable[[Section], T], source: str = "params.yaml"
) -> T:
    """Typed params of analysis section ``name``: parsed by its study's ``parser`` when
    params.yaml was loaded (if present), else that parser's defaults. Stages call their study's
    wrapper (e.g. ``sponlab.studies.importance.importance.importance_params``), so the parser a
    stage depends on is a real import that dvc.yaml's deps test sees."""
    if name in params.analyses:
        return params.analyses[name]
    return parser(Section({}, name, source))


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
