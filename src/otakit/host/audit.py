"""``otakit audit ...``: The audit log of operator actions."""

from __future__ import annotations

import typer

app = typer.Typer(help="The audit log of operator actions.", no_args_is_help=True)
