"""The package's import graph points one way: a module imports only from its own group or from
groups below it (README "Library layout"), so no group depends on one built on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "sponlab"
# bottom to top; a module's group is its first folder, or its own name at the top level
ORDER = ["paramcheck", "stats", "io", "model", "allocations", "config", "method", "sweep",
         "studies.transfer", "studies.interpret", "studies.layers", "studies.importance",
         "studies.spectrum", "tools", "cli", "__init__"]  # fmt: skip


def group(module: str) -> str:
    """``sponlab.method.train`` -> ``method``; ``sponlab.studies.x.y`` -> ``studies.x``."""
    parts = module.split(".")[1:] or ["__init__"]
    return ".".join(parts[:2]) if parts[0] == "studies" else parts[0]


def imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every ``from sponlab... import`` in the package."""
    pairs = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(("sponlab", *path.relative_to(ROOT).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sponlab."):
                pairs.append((module, node.module))
    return pairs


def test_every_module_belongs_to_a_known_group():
    unknown = {group(m) for pair in imports() for m in pair} - set(ORDER)
    assert not unknown, f"add these groups to ORDER (and the README's layout): {unknown}"


def test_imports_point_down():
    rank = {g: i for i, g in enumerate(ORDER)}
    upward = [
        f"{module} ({group(module)}) imports {target} ({group(target)})"
        for module, target in imports()
        if rank[group(target)] > rank[group(module)]
    ]
    assert not upward, "imports that point to a group above:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import():
    rank = {g: i for i, g in enumerate(ORDER)}
    assert rank[group("sponlab.sweep.summary")] > rank[group("sponlab.method.train")]
    assert group("sponlab.studies.interpret.params") == "studies.interpret"
    assert group("sponlab") == "__init__"
