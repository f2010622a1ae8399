"""``otakit artifact ...``: the files on the server: upload, list, show, delete.

An artifact is named by its SHA-256; every command takes the full hash or a prefix of at least
12 hex digits (what tables and the dashboard show).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from otakit.errors import UsageError
from otakit.host.client import (
    SHORT_ID,
    Column,
    JsonOption,
    ServerOption,
    TokenOption,
    connect,
    out,
    print_json,
    short_id,
    show_record,
    show_table,
    timestamp,
)
from otakit.host.deploy import upload_file

app = typer.Typer(help="Artifacts on the server: upload, list, show, delete.", no_args_is_help=True)

IdArgument = Annotated[
    str,
    typer.Argument(
        metavar="ID",
        help=f"SHA-256, or its first {SHORT_ID} or more hex digits.",
        show_default=False,
    ),
]

COLUMNS = (
    Column("id", lambda a: short_id(a["id"])),
    Column("name", "name"),
    Column("version", "version"),
    Column("product", "product", drop=1),
    Column("board", "board", drop=3),
    Column("kind", "kind", drop=5),
    Column("signature", "signature", drop=4),
    Column("size", "size", justify="right", drop=6),
    Column("uploaded", lambda a: timestamp(a["created_at"]), drop=2),
)
DETAILS = (
    Column("sha256", "sha256"),
    Column("sha1", "sha1"),  # "-" until an artifact uploaded before they were kept is deployed
    Column("md5", "md5"),
    *COLUMNS[1:],
    Column("container", "container"),
    Column("signed by", "signed_by"),
    Column("details", "details"),
)
DELTA_COLUMNS = (
    Column("base", lambda d: short_id(d["base_artifact_id"] or d["base_sha256"])),
    Column("compression", "compression"),
    Column("state", lambda d: _delta_state(d)),
    Column("size", "size", justify="right", drop=2),
    Column("ratio", lambda d: f"{d['ratio']:g}x" if d.get("ratio") else None, drop=1),
)


def _delta_state(delta: Mapping[str, Any]) -> str:
    state = str(delta["state"])
    if state == "making":
        return f"making {delta.get('progress', 0)}%"
    if state == "failed" and delta.get("error"):
        return f"failed: {delta['error']}"
    return state


def _id(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(f"[0-9a-f]{{{SHORT_ID},64}}", value):
        raise UsageError(
            f"{value!r} is not an artifact id: give its SHA-256 or at least its first "
            f"{SHORT_ID} hex digits",
            value=value,
        )
    return value


@app.command("upload")
def upload(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="Signed image, package or raw file.", show_default=False
        ),
    ],
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            metavar="VERSION",
            help="The version FILE must be (refused, and nothing stored, if it is another); "
            "a raw file's version.",
            show_default=False,
        ),
    ] = None,
    product: Annotated[
        str | None,
        typer.Option("--product", metavar="PRODUCT", help="Its product.", show_default=False),
    ] = None,
    container: Annotated[
        str, typer.Option("--container", metavar="CONTAINER", help="Storage container.")
    ] = "ota",
    json_: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Upload FILE (with a progress bar); prints its id (SHA-256)."""
    with connect(server, token) as client:
        artifact, new = upload_file(
            client, file, version=version, product=product, container=container
        )
    if json_:
        print_json(artifact)
        return
    what = "uploaded" if new else "already on the server:"
    out.print(
        f"{what} {artifact['name']} {artifact['version']} ({artifact['kind']}, "
        f"signature {artifact['signature']}) {artifact['id']}",
        markup=False,
    )


@app.command("list")
def list_artifacts(
    product: Annotated[
        str | None,
        typer.Option(
            "--product", metavar="PRODUCT", help="Only this product's.", show_default=False
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, help="At most N, newest first.")
    ] = 50,
    json_: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """The artifacts, newest first."""
    params: dict[str, Any] = {"product": product} if product else {}
    with connect(server, token) as client:
        artifacts = client.items("/api/v1/artifacts", params, limit=limit)
    if json_:
        print_json(artifacts)
        return
    show_table(artifacts, COLUMNS, empty="no artifacts")


@app.command("show")
def show(
    artifact_id: IdArgument,
    json_: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """One artifact, with its full SHA-256, SHA-1 and MD5, and its deltas (from which base
    artifact, compression, state, size, how many times smaller than the image)."""
    with connect(server, token) as client:
        artifact = client.json("GET", f"/api/v1/artifacts/{_id(artifact_id)}")
    if json_:
        print_json(artifact)
        return
    show_record(artifact, DETAILS)
    deltas = artifact.get("deltas") or []
    if deltas:
        show_table(deltas, DELTA_COLUMNS, title="deltas (from base)")


@app.command("delete")
def delete(
    artifact_id: IdArgument,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Delete an artifact (refused while an active deployment uses it)."""
    with connect(server, token) as client:
        path = f"/api/v1/artifacts/{_id(artifact_id)}"
        artifact = client.json("GET", path)
        client.request("DELETE", f"/api/v1/artifacts/{artifact['id']}")
    out.print(
        f"deleted {artifact['name']} {artifact['version']} ({short_id(artifact['id'])})",
        markup=False,
    )
