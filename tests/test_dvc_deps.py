"""dvc.yaml's hand-written ``deps`` cover every source file a stage's code imports.

A stage whose deps miss a module it imports is called up to date by ``dvc repro`` after that
module changed: stale results. The import graph is read from the source (every ``import`` and
``from ... import``, including ones inside functions), starting at the stage's entry module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """Source file of a ``sponlab`` module (stage entries live in the top-level stages/)."""
    parts = name.split(".")
    if parts[0] != "sponlab":
        return None
    base = ROOT / "stages" if parts[1:2] == ["stages"] else ROOT / "src" / "sponlab"
    rest = parts[2:] if parts[1:2] == ["stages"] else parts[1:]
    for candidate in (base.joinpath(*rest).with_suffix(".py"), base.joinpath(*rest, "__init__.py")):
        if rest and candidate.is_file():
            return candidate
    return base / "__init__.py" if not rest else None


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports there never run."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _is_type_checking(node):
            todo.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path) -> set[str]:
    """Every ``sponlab`` module named by an import in ``path`` that runs (``from a import b``: a and
    a.b); imports under ``if TYPE_CHECKING:`` are for type checkers only and do not count."""
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "sponlab"}


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' __init__."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def source_closure(entry: str) -> set[Path]:
    """Files of ``entry`` and every ``sponlab`` module it imports, transitively."""
    seen: set[Path] = set()
    todo = with_parents(entry)
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            todo.extend(with_parents(name))
    return seen


def stage_entry(cmd: str) -> str:
    """``sponlab layer-importance --params ...`` -> ``sponlab.stages.layer_importance``."""
    words = cmd.split()
    return "sponlab.stages." + words[words.index("sponlab") + 1].replace("-", "_")


# Package __init__ files with no code of their own; listing them would add noise to every stage.
EMPTY_INITS = {
    p.relative_to(ROOT).as_posix()
    for p in [*ROOT.glob("src/sponlab/**/__init__.py"), ROOT / "stages/__init__.py"]
    if all(isinstance(node, ast.Expr) for node in ast.parse(p.read_text()).body)
}


def needed_files(stage: str) -> set[str]:
    """Source files (repository-relative) that ``stage``'s entry module imports, transitively."""
    closure = source_closure(stage_entry(DVC[stage]["cmd"]))
    return {p.relative_to(ROOT).as_posix() for p in closure}


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_deps_cover_its_imports(stage: str):
    declared = {d for d in DVC[stage]["deps"] if isinstance(d, str)}
    missing = sorted(needed_files(stage) - declared - EMPTY_INITS)
    assert not missing, (
        f"dvc.yaml stage {stage!r} imports these files but does not list them in deps: {missing}"
    )


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_source_deps_exist_and_are_imported(stage: str):
    declared = {d for d in DVC[stage]["deps"] if isinstance(d, str) and d.endswith(".py")}
    assert all((ROOT / d).is_file() for d in declared), f"{stage}: a listed dep does not exist"
    unused = sorted(declared - needed_files(stage))
    assert not unused, f"{stage}: lists source files it never imports: {unused}"


def test_the_closure_finds_lazy_and_transitive_imports():
    # evaluate imports sponlab.method.evaluate, which imports sponlab.method.spon (transitive); the stage
    # helpers import sponlab.model.loading inside a function (lazy): both must be found.
    closure = {p.relative_to(ROOT).as_posix() for p in source_closure("sponlab.stages.evaluate")}
    assert {
        "src/sponlab/method/spon.py",
        "src/sponlab/model/loading.py",
        "stages/common.py",
    } <= closure
    assert "stages/train.py" not in closure  # a stage entry never imports another
