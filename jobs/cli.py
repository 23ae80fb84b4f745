"""The `facelake` command: a thin typer layer over the job modules' library functions.

Each job module exposes ``register(app)`` adding its command(s); the list below wires them.
User errors (facelake.errors.FacelakeError) print one clear line and exit with code 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from facelake.errors import FacelakeError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="facelake: distributed batch face search over image archives.")

# Modules under facelake.jobs that add commands. Keep alphabetical.
COMMAND_MODULES = (
    "audit_cmd",
    "calibrate",
    "demo",
    "embed",
    "erase",
    "evaluate",
    "index_cmd",
    "rebuild",
    "search",
    "status",
    "submit_cmd",
    "weights_cmd",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"facelake.jobs.{name}")
        module.register(app)


@app.callback()
def _root() -> None:
    """facelake: distributed batch face search over image archives."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `facelake` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register_all()
    try:
        app(args=argv, prog_name="facelake")
    except FacelakeError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
