"""``otakit deployment ...``: Deployments: list, show, cancel."""

from __future__ import annotations

import typer

app = typer.Typer(help="Deployments: list, show, cancel.", no_args_is_help=True)
