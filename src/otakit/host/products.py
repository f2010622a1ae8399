"""``otakit product ...``: products and their policy: set, list, show.

``product set`` changes only the settings given (``PATCH /api/v1/products/{name}``) and creates
the product if it does not exist yet, so setting the board never turns anonymous access off.
"""

from __future__ import annotations

from typing import Annotated, Any

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

app = typer.Typer(help="Products and their policy: set, list, show.", no_args_is_help=True)

NameArgument = Annotated[
    str, typer.Argument(metavar="NAME", help="Product name.", show_default=False)
]

COLUMNS = (
    Column("product", "name"),
    Column("board", "board"),
    Column("anonymous", "anonymous"),
    Column("self-register", "self_register"),
    Column("raw files", "allow_raw"),
)


def _path(name: str) -> str:
    if not name or "/" in name:
        raise UsageError(f"{name!r} is not a product name", value=name)
    return f"/api/v1/products/{name}"


@app.command("set")
def set_product(
    name: NameArgument,
    board: Annotated[
        str | None,
        typer.Option("--board", metavar="BOARD", help="Board its devices are.", show_default=False),
    ] = None,
    anonymous: Annotated[
        bool | None,
        typer.Option(
            "--anonymous/--no-anonymous",
            help="Serve devices that send no token (original middleware).",
            show_default=False,
        ),
    ] = None,
    self_register: Annotated[
        bool | None,
        typer.Option(
            "--self-register/--no-self-register",
            help="Register unknown serials at their first check-in.",
            show_default=False,
        ),
    ] = None,
    allow_raw: Annotated[
        bool | None,
        typer.Option(
            "--allow-raw/--no-allow-raw",
            help="Accept unsigned raw files (gateway payloads).",
            show_default=False,
        ),
    ] = None,
    json_: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Create a product or change only the given settings of its policy."""
    changes: dict[str, Any] = {
        key: value
        for key, value in {
            "board": board,
            "anonymous": anonymous,
            "self_register": self_register,
            "allow_raw": allow_raw,
        }.items()
        if value is not None
    }
    with connect(server, token) as client:
        product = client.json("PATCH", _path(name), json=changes)
    if json_:
        print_json(product)
        return
    out.print(f"product {product['name']}: " + _summary(product), markup=False)


def _summary(product: dict[str, Any]) -> str:
    flags = [
        f"board {product.get('board') or '-'}",
        "anonymous" if product.get("anonymous") else "no anonymous",
        "self-register" if product.get("self_register") else "no self-register",
        "raw files" if product.get("allow_raw") else "no raw files",
    ]
    return ", ".join(flags)


@app.command("list")
def list_products(
    json_: JsonOption = False, server: ServerOption = None, token: TokenOption = None
) -> None:
    """The products and their policies."""
    with connect(server, token) as client:
        products = client.json("GET", "/api/v1/products")
    if json_:
        print_json(products)
        return
    show_table(products, COLUMNS, empty="no products")


@app.command("show")
def show_product(
    name: NameArgument,
    json_: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """One product's policy."""
    with connect(server, token) as client:
        product = client.json("GET", _path(name))
    if json_:
        print_json(product)
        return
    show_table([product], COLUMNS)
