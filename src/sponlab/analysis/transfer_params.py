"""``interpret.transfer``: which configs the transfer stage evaluates on which text domains."""

from __future__ import annotations

from dataclasses import dataclass

from sponlab.paramcheck import Section

DOMAINS: tuple[str, ...] = ("code", "technical", "multilingual", "stories")


@dataclass(frozen=True)
class TransferParams:
    """Domains (offline corpora no stage trains, calibrates or tests on), blocks per domain,
    the configs evaluated at every sweep sparsity, and the evaluation batch size."""

    domains: tuple[str, ...] = DOMAINS
    blocks: int = 16
    configs: tuple[str, ...] = ("UNIF-ALL", "ATTN-ONLY", "TOP-50")
    batch_size: int = 8


def parse_transfer(sec: Section) -> TransferParams:
    """Validate the section (config names are checked against ``configs`` with the others)."""
    domains = sec.get("domains", list(TransferParams.domains))
    if not isinstance(domains, list) or not domains or any(d not in DOMAINS for d in domains):
        raise sec.fail("domains", f"must be a non-empty list of {list(DOMAINS)}, got {domains!r}")
    configs = sec.get("configs", list(TransferParams.configs))
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise sec.fail("configs", f"must be a non-empty list of config names, got {configs!r}")
    params = TransferParams(
        domains=tuple(dict.fromkeys(domains)),
        blocks=sec.number("blocks", TransferParams.blocks, lo=2, integer=True),
        configs=tuple(dict.fromkeys(configs)),
        batch_size=sec.number("batch_size", TransferParams.batch_size, lo=1, integer=True),
    )
    sec.finish()
    return params
