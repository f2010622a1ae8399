"""``otakit key ...``: Trusted signing keys: trust (public part only), list, remove."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Trusted signing keys: trust (public part only), list, remove.", no_args_is_help=True
)
