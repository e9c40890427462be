"""The README's results are copies of what the run wrote, never typed by hand."""

from __future__ import annotations

from pathlib import Path

from sponlab.sweep.readme import included_paths, refreshed, stale_includes

ROOT = Path(__file__).resolve().parents[1]


def test_readme_includes_are_the_committed_outputs():
    text = (ROOT / "README.md").read_text()
    assert {"metrics/tables/summary.md", "metrics/findings.md"} <= set(included_paths(text))
    assert stale_includes(text, ROOT) == [], "run `sponlab readme` after `make repro`"


def test_refresh_replaces_only_the_blocks(tmp_path):
    (tmp_path / "out.md").write_text("# Title\n\n| a |\n|---|\n| 2 |\n")
    text = "intro\n<!-- include: out.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nafter\n"
    assert stale_includes(text, tmp_path) == ["out.md"]
    new = refreshed(text, tmp_path)
    assert (
        new == "intro\n<!-- include: out.md -->\n| a |\n|---|\n| 2 |\n<!-- end include -->\nafter\n"
    )
    assert stale_includes(new, tmp_path) == []
