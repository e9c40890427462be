"""notebooks/quickstart.ipynb runs top to bottom on the default model (its code cells, in order,
in one namespace, from the repository root), so it cannot silently rot."""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks/quickstart.ipynb"


def code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), "commit the notebook without outputs"
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__main__"}
    for index, source in enumerate(code_cells(NOTEBOOK)):
        exec(compile(source, f"{NOTEBOOK.name}[{index}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "damage recovered" in out and "above dense" in out
    assert namespace["teal"] > namespace["dense"]  # TEAL at 50% hurts the real model
    assert (
        namespace["result"].epochs[namespace["result"].best_epoch]["val_kl"]
        <= (namespace["result"].epochs[0]["val_kl"])
    )


def test_notebook_is_committed_without_outputs():
    assert code_cells(NOTEBOOK)
    assert os.path.getsize(NOTEBOOK) < 20_000
