"""``otakit device ...``: Registered devices: list, show, set, history."""

from __future__ import annotations

import typer

app = typer.Typer(help="Registered devices: list, show, set, history.", no_args_is_help=True)
