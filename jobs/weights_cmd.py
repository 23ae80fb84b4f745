"""`facelake weights`: provision and verify a model's weights offline."""

from __future__ import annotations

import typer

from facelake.faces.registry import MODELS, get_model
from facelake.faces.weights import provision
from facelake.jobs.options import WeightsFrom


def register(app: typer.Typer) -> None:
    @app.command("weights")
    def weights_command(
        model: str = typer.Option(None, help=f"registered model: {', '.join(MODELS)}"),
        weights_from: WeightsFrom = None,
    ) -> None:
        """Put the model's weight files in deepface's folder, checked by sha256; never downloads."""
        spec = get_model(model)
        for name, path in provision(spec, weights_from).items():
            typer.echo(f"ok  {name}  {path}")
