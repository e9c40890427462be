"""The ``sponlab`` command line: one command per pipeline stage, exactly as DVC runs them.

Every command reads ``--params`` (default ``params.yaml``), validates it before any heavy work and
takes explicit input/output paths whose defaults match ``dvc.yaml``.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import typer

from sponlab.io.layout import BASE, DENSE_METRICS, SPON, THRESHOLDS

app = typer.Typer(
    help="sponlab: TEAL activation sparsification and SPON bias compensation, stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Stage modules under stages/ (installed as sponlab.stages); each exposes ``main`` and a docstring.
STAGES: list[str] = [
    "base",
    "prepare",
    "calibrate",
    "dense",
    "baseline",
    "teacher",
    "train",
    "evaluate",
    "summarize",
    "findings",
    "plots",
    "spectrum",
    "sae",
    "importance",
    "interpret",
    "layer_importance",
    "transfer",
    "transfer_training",
    "learning_curve",
    "report",
]


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _register() -> None:
    for name in STAGES:
        module = importlib.import_module(f"sponlab.stages.{name}")
        doc = (module.__doc__ or "").strip().splitlines()
        app.command(name.replace("_", "-"), help=doc[0] if doc else None)(module.main)


_register()


@app.command("results")
def results(
    root: Path = typer.Option(Path("."), "--root", help="Pipeline workspace (the git clone)."),
) -> None:
    """Where a finished run's results are, and its summary table (printed by `make repro`)."""
    from sponlab.sweep.summary import results_overview

    typer.echo(results_overview(root))


@app.command("readme")
def readme(
    path: Path = typer.Option(Path("README.md"), "--path", help="The README to refresh."),
    check: bool = typer.Option(False, "--check", help="Only report stale blocks (exit 1)."),
) -> None:
    """Refresh the README's include blocks from the files the run wrote (after `make repro`)."""
    from sponlab.sweep.readme import refreshed, stale_includes

    text = path.read_text()
    stale = stale_includes(text, path.parent)
    if check:
        typer.echo("\n".join(f"stale: {p}" for p in stale) or "README includes are current")
        raise typer.Exit(1 if stale else 0)
    path.write_text(refreshed(text, path.parent))
    typer.echo(f"refreshed {len(stale)} include block(s) in {path}")


@app.command("findings-by-model")
def findings_by_model(
    model: list[str] = typer.Option(
        ...,
        "--model",
        help="LABEL=REV, repeated: a model's run at a git revision or DVC experiment name "
        "(REV 'workspace': this checkout's file).",
    ),
    path: str = typer.Option("metrics/findings.json", "--path", help="The findings file."),
    out: Path = typer.Option(None, "--out", help="Write the Markdown here (default: print)."),
) -> None:
    """Each claim's verdict per model side by side, and whether the models agree."""
    import json

    from sponlab.sweep.by_model import findings_by_model_markdown

    findings = {}
    for spec in model:
        label, sep, rev = spec.partition("=")
        if not sep or not label or not rev:
            typer.secho(f"error: --model {spec!r}: expected LABEL=REV", fg="red", err=True)
            raise typer.Exit(2)
        findings[label] = json.loads(_read_at(path, rev))
    text = findings_by_model_markdown(findings) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        from sponlab.io.tensorio import write_text

        write_text(out, text)
        typer.echo(f"wrote {out}")


def _read_at(path: str, rev: str) -> str:
    """``path`` at a git revision or DVC experiment name, or in the workspace."""
    if rev == "workspace":
        return Path(path).read_text()
    import dvc.api

    try:
        return dvc.api.read(path, rev=rev)
    except Exception as err:  # dvc raises several kinds for a missing rev or path
        typer.secho(f"error: no {path} at {rev!r}: {err}", fg="red", err=True)
        raise typer.Exit(2) from err


@app.command("check-repro")
def check_repro(
    reference: str = typer.Option("HEAD", "--reference", help="Git revision of the reference run."),
    rtol: float = typer.Option(
        0.0,
        "--rtol",
        help="Relative tolerance for metrics; > 0 judges by the numbers only (another CPU). "
        "0: every output bit-identical (timings and env aside).",
    ),
) -> None:
    """Compare this workspace's dvc.lock and metrics with a committed run; exit 1 if they differ.

    Run it after `dvc repro` in a fresh clone (`make check-repro` does both).
    """
    import subprocess

    from sponlab.tools import reproduce

    def git_show(path: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "show", f"{reference}:{path}"], capture_output=True, text=True
        )

    def show(path: str) -> str:
        done = git_show(path)
        if done.returncode != 0:
            typer.secho(
                f"error: no {path} at git revision {reference!r}: run inside the clone "
                f"({done.stderr.strip()})",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(2)
        return done.stdout

    def read(path: str) -> str | None:
        return Path(path).read_text() if Path(path).is_file() else None

    outputs, metrics = reproduce.compare_run(show, Path("dvc.lock").read_text(), read)
    ref_dense = git_show(str(DENSE_METRICS))
    ref_cpu = reproduce.cpu_of(ref_dense.stdout if ref_dense.returncode == 0 else None)
    typer.echo(reproduce.machine_line(ref_cpu, reproduce.cpu_of(read(str(DENSE_METRICS)))))
    typer.echo(reproduce.report(outputs, metrics, rtol))
    raise typer.Exit(1 if reproduce.failures(outputs, metrics, rtol) else 0)


@app.command("lm-eval")
def lm_eval_cmd(
    config: str = typer.Option(None, "--config", help="Pipeline config (not for --variant dense)."),
    sparsity: float = typer.Option(None, "--sparsity"),
    variant: str = typer.Option("spon", "--variant", help="dense | teal | spon"),
    seed: int = typer.Option(None, "--seed", help="Training seed (default: the config's first)."),
    tasks: str = typer.Option("", "--tasks", help="lm-eval task names, comma-separated (hub)."),
    local: list[Path] = typer.Option([], "--local", help="JSONL multiple-choice file (offline)."),
    demo: bool = typer.Option(False, "--demo", help="Add the bundled offline demo task."),
    limit: int = typer.Option(None, "--limit", help="At most this many documents per task."),
    num_fewshot: int = typer.Option(None, "--num-fewshot"),
    batch_size: int = typer.Option(8, "--batch-size"),
    params: Path = typer.Option(Path("params.yaml"), "--params"),
    model: Path = typer.Option(BASE, "--model"),
    thresholds: Path = typer.Option(THRESHOLDS, "--thresholds"),
    spon: Path = typer.Option(SPON, "--spon", help="Root of the train cells."),
    out: Path = typer.Option(
        None, "--out", help="Default: metrics/lmeval/CONFIG/s<S>/VARIANT.json"
    ),
) -> None:
    """Zero-shot tasks (lm-evaluation-harness, extra `lmeval`) on a pipeline cell after `make repro`."""
    from sponlab.tools.lmeval import CellRef, TaskOptions, run_cell, task_list

    try:
        path = run_cell(
            params,
            CellRef(config, sparsity, variant, seed),
            task_list([t for t in tasks.split(",") if t], local, demo),
            TaskOptions(limit, num_fewshot, batch_size),
            model=model,
            thresholds=thresholds,
            spon=spon,
            out=out,
        )
    except (ValueError, ImportError) as err:  # a bad option or the extra not installed
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    typer.echo(path.read_text())


def main() -> None:
    """Console entry point: parameter, site and input-file errors end with a one-line message
    (exit code 2) instead of a traceback."""
    from sponlab.config import ConfigError
    from sponlab.io.tensorio import InputFileError
    from sponlab.model.sites import SiteError

    try:
        app()
    except (ConfigError, SiteError, InputFileError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
