"""``otakit product ...``: Products and their policy: set, list, show."""

from __future__ import annotations

import typer

app = typer.Typer(help="Products and their policy: set, list, show.", no_args_is_help=True)
