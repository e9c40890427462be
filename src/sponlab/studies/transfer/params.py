"""``interpret.transfer``: which configs the transfer stage evaluates on which text domains, and
which training sets the transfer-training stage compares (size and domain mix), and the
learning curve's training sizes (stage learning-curve)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sponlab.paramcheck import Section, choice, integer, number, read_keys

DOMAINS: tuple[str, ...] = ("code", "technical", "multilingual", "stories")
MIX_SOURCES: tuple[str, ...] = ("train", *DOMAINS)  # train: the pipeline's own training text


def _default_mixes() -> dict[str, dict[str, float]]:
    share = {d: 0.125 for d in DOMAINS}
    return {"train": {"train": 1.0}, "mixed": {"train": 0.5, **share}}


@dataclass(frozen=True)
class TransferTrainingParams:
    """One config retrained at ``interpret.sparsity`` on each training set: ``sizes`` blocks
    drawn from each mix (source -> weight), once per seed; evaluated on the transfer domains."""

    config: str = "UNIF-ALL"
    sizes: tuple[int, ...] = (32,)
    mixes: Mapping[str, Mapping[str, float]] = field(default_factory=_default_mixes)
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class TransferParams:
    """Domains (offline corpora no stage trains, calibrates or tests on), blocks per domain,
    the configs evaluated at every sweep sparsity, and the evaluation batch size."""

    domains: tuple[str, ...] = DOMAINS
    blocks: int = integer(16, "128-token blocks scored per domain", lo=2)
    configs: tuple[str, ...] = ("UNIF-ALL", "ATTN-ONLY", "TOP-50")
    batch_size: int = integer(8, "blocks per evaluation forward", lo=1)
    training: TransferTrainingParams = field(default_factory=TransferTrainingParams)


def parse_transfer(sec: Section) -> TransferParams:
    """Validate the section (config names are checked against ``configs`` with the others)."""
    domains = sec.get("domains", list(TransferParams.domains))
    if not isinstance(domains, list) or not domains or any(d not in DOMAINS for d in domains):
        raise sec.fail("domains", f"must be a non-empty list of {list(DOMAINS)}, got {domains!r}")
    configs = sec.get("configs", list(TransferParams.configs))
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise sec.fail("configs", f"must be a non-empty list of config names, got {configs!r}")
    keys = read_keys(
        TransferParams,
        sec,
        domains=tuple(dict.fromkeys(domains)),
        configs=tuple(dict.fromkeys(configs)),
        training=parse_training(sec.section("training")),
    )
    params = TransferParams(**keys)
    sec.finish()
    return params


def _positive_ints(sec: Section, name: str, default: tuple[int, ...], lo: int) -> tuple[int, ...]:
    value = sec.get(name, list(default))
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in value)
    )
    if not ok or len(set(value)) != len(value):
        raise sec.fail(
            name, f"must be a non-empty list of distinct integers >= {lo}, got {value!r}"
        )
    return tuple(value)


def _mix(value: Any, key: str, sec: Section) -> dict[str, float]:
    ok = (
        isinstance(value, Mapping)
        and value
        and all(
            k in MIX_SOURCES and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in value.items()
        )
    )
    if not ok or sum(value.values()) <= 0:
        raise sec.fail(
            key, f"must map sources {list(MIX_SOURCES)} to weights >= 0 (sum > 0), got {value!r}"
        )
    return {k: float(v) for k, v in value.items()}


def parse_training(sec: Section) -> TransferTrainingParams:
    """``interpret.transfer.training``: config, sizes, mixes (name -> {source: weight}), seeds."""
    T = TransferTrainingParams
    config = sec.get("config", T.config)
    if not isinstance(config, str):
        raise sec.fail("config", f"must name a config, got {config!r}")
    mixes = sec.get("mixes", _default_mixes())
    if not isinstance(mixes, Mapping) or not mixes:
        raise sec.fail("mixes", f"must map mix names to {{source: weight}}, got {mixes!r}")
    params = TransferTrainingParams(
        config=config,
        sizes=_positive_ints(sec, "sizes", T.sizes, 1),
        mixes={str(name): _mix(mix, f"mixes.{name}", sec) for name, mix in mixes.items()},
        seeds=_positive_ints(sec, "seeds", T.seeds, 0),
    )
    sec.finish()
    return params


@dataclass(frozen=True)
class LearningCurveParams:
    configs: tuple[str, ...] = ("UNIF-ALL", "ATTN-ONLY")
    sparsity: float = number(0.5, "the sparsity every curve point trains at", lo=0, hi=1)
    sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)  # training blocks per seed
    seeds: tuple[int, ...] = (0, 1, 2)
    domain: str = choice("stories", DOMAINS, "the transfer domain scored beside the test blocks")
    domain_blocks: int = integer(16, "blocks of that domain scored", lo=2)


def parse_learning_curve(sec: Section) -> LearningCurveParams:
    """Validate ``interpret.learning_curve`` (config names are checked with the others)."""
    D = LearningCurveParams
    sizes = sec.get("sizes", list(D.sizes))
    seeds = sec.get("seeds", list(D.seeds))
    configs = sec.get("configs", list(D.configs))
    for key, values in (("sizes", sizes), ("seeds", seeds)):
        if (
            not isinstance(values, list)
            or not values
            or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= (1 if key == "sizes" else 0)
                for v in values
            )
        ):
            raise sec.fail(key, f"must be a non-empty list of integers, got {values!r}")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise sec.fail("configs", f"must be a non-empty list of config names, got {configs!r}")
    keys = read_keys(
        D,
        sec,
        configs=tuple(dict.fromkeys(configs)),
        sizes=tuple(sorted(set(sizes))),
        seeds=tuple(dict.fromkeys(seeds)),
    )
    params = LearningCurveParams(**keys)
    sec.finish()
    return params
