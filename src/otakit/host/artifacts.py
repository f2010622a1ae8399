"""``otakit artifact ...``: Artifacts on the server: upload, list, show, delete."""

from __future__ import annotations

import typer

app = typer.Typer(help="Artifacts on the server: upload, list, show, delete.", no_args_is_help=True)
