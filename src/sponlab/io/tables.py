"""Markdown tables and ``mean ± spread`` numbers as every sponlab report writes them.

One owner, so the summary, findings, transfer, learning-curve, spectrum and reproducibility
tables agree on the rule line, on how a spread is printed and on the mark of a missing value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

MISSING = "n/a"


def is_missing(value: Any) -> bool:
    """None or a float NaN (pandas' missing values included)."""
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def pm(mean: Any, sd: Any = None, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """``scale * mean ± scale * sd`` with ``digits`` decimals and ``unit`` after both; the
    spread is left out when missing (a lone seed), the whole is ``n/a`` when the mean is."""
    if is_missing(mean):
        return MISSING
    text = f"{scale * float(mean):.{digits}f}"
    if not is_missing(sd):
        text += f" ± {scale * float(sd):.{digits}f}"
    return text + unit


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells as ``str``; no trailing newline)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
