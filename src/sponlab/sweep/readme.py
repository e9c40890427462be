"""The README shows what the run wrote: blocks between include markers are copies of generated
files, refreshed by ``sponlab readme`` and checked by the test suite, so no result, verdict or
rule in it is typed by hand.

A block looks like::

    <!-- include: metrics/findings.md -->
    ...the file's text, verbatim...
    <!-- end include -->
"""

from __future__ import annotations

import re
from pathlib import Path

INCLUDE = re.compile(
    r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S
)


def included_paths(text: str) -> list[str]:
    """The files the README includes, in order."""
    return [m.group("path") for m in INCLUDE.finditer(text)]


def _body(root: Path, path: str) -> str:
    content = (root / path).read_text()
    if content.startswith("# "):  # the file's own title: the README section has one
        content = content.split("\n", 1)[1].lstrip("\n")
    return content if content.endswith("\n") else content + "\n"


def refreshed(text: str, root: Path) -> str:
    """``text`` with every include block replaced by its file's current content."""
    return INCLUDE.sub(lambda m: m.group(1) + _body(root, m.group("path")) + m.group(4), text)


def stale_includes(text: str, root: Path) -> list[str]:
    """Included files whose README copy differs from the file."""
    return [m.group("path") for m in INCLUDE.finditer(text)
            if m.group("body") != _body(root, m.group("path"))]  # fmt: skip
