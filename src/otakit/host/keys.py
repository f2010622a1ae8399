"""``otakit key ...``: the signing keys the server trusts: trust, list, remove.

``key trust`` reads the key file here and sends only its public part: given a private key (an
encrypted one takes its password from ``$OTAKIT_KEY_PASSWORD``) it derives the public key
locally, so the private key never leaves the machine (the server refuses one anyway).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from otakit.errors import UsageError
from otakit.host.client import (
    Column,
    JsonOption,
    ServerOption,
    TokenOption,
    connect,
    out,
    print_json,
    show_table,
)
from otakit.image.keys import PublicKey

app = typer.Typer(
    help="Trusted signing keys: trust (public part only), list, remove.", no_args_is_help=True
)

COLUMNS = (
    Column("fingerprint", "fingerprint"),
    Column("type", "key_type"),
)


@app.command("trust")
def trust(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE.pem",
            help="Public key, or private key (only its public part is sent).",
            show_default=False,
        ),
    ],
    json_: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Trust the key images are signed with; prints its fingerprint."""
    public = PublicKey.load(file)  # a private key is reduced to its public part here
    with connect(server, token) as client:
        key = client.json(
            "POST",
            "/api/v1/keys",
            content=public.pem(),
            headers={"content-type": "application/x-pem-file"},
        )
    if json_:
        print_json(key)
        return
    out.print(f"trusted {key['key_type']} key {key['fingerprint']}", markup=False)


@app.command("list")
def list_keys(
    json_: JsonOption = False, server: ServerOption = None, token: TokenOption = None
) -> None:
    """The keys the server trusts."""
    with connect(server, token) as client:
        keys = client.json("GET", "/api/v1/keys")
    if json_:
        print_json(keys)
        return
    show_table(keys, COLUMNS, empty="no trusted keys")


@app.command("remove")
def remove(
    fingerprint: Annotated[
        str,
        typer.Argument(metavar="FINGERPRINT", help="As `key list` shows it.", show_default=False),
    ],
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Stop trusting a key (images it signed can no longer be uploaded)."""
    fingerprint = fingerprint.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,64}", fingerprint):
        raise UsageError(
            f"{fingerprint!r} is not a key fingerprint (hex digits)", value=fingerprint
        )
    with connect(server, token) as client:
        client.request("DELETE", f"/api/v1/keys/{fingerprint}")
    out.print(f"removed key {fingerprint}", markup=False)
