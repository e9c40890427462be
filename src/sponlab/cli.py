"""The ``sponlab`` command line: one command per pipeline stage, exactly as DVC runs them.

Every command reads ``--params`` (default ``params.yaml``), validates it before any heavy work and
takes explicit input/output paths whose defaults match ``dvc.yaml``.
"""

from __future__ import annotations

import importlib
import logging

import typer

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
    "train",
    "evaluate",
    "summarize",
    "plots",
    "spectrum",
    "sae",
    "importance",
    "interpret",
    "layer_importance",
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


def main() -> None:
    """Console entry point: parameter and site errors end with a one-line message, exit code 2."""
    from sponlab.config import ConfigError
    from sponlab.sites import SiteError

    try:
        app()
    except (ConfigError, SiteError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
