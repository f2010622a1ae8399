"""``otakit serve`` and ``otakit token ...``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from otakit.errors import UsageError
from otakit.server.tokens import Role

if TYPE_CHECKING:
    from otakit.server.models import Token

# The server stack (FastAPI, SQLAlchemy, Alembic, uvicorn) is imported inside the commands, so
# that every other `otakit` command starts fast.

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_DATA = Path("otakit-data")
DataOption = Annotated[
    Path, typer.Option("--data", help="Data folder (SQLite database and blobs by default).")
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="postgresql://user@host/db (default: SQLite in --data)."),
]


def serve(
    data: DataOption = DEFAULT_DATA,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes.")] = 1,
    database: DatabaseOption = None,
    blob_url: Annotated[
        str | None,
        typer.Option("--blob-url", help="s3://bucket?endpoint=URL (default: files in --data)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="TLS certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="TLS private key (PEM).")
    ] = None,
    url_days: Annotated[
        float, typer.Option("--url-days", help="Lifetime of signed download URLs, in days.")
    ] = 1.0,
    direct_downloads: Annotated[
        bool,
        typer.Option(
            "--direct-downloads", help="With S3 blobs, devices download straight from the bucket."
        ),
    ] = False,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log every request (URLs carry signatures).")
    ] = False,
) -> None:
    """Run the update server (device API, management API)."""
    import uvicorn

    from otakit.server.app import initialise
    from otakit.server.context import SETTINGS_ENV, ServerSettings
    from otakit.server.database import database_url, redacted

    if workers < 1:
        raise UsageError("--workers must be at least 1", value=workers)
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if direct_downloads and not (blob_url or "").startswith("s3://"):
        raise UsageError("--direct-downloads needs an S3 blob store (--blob-url s3://...)")
    if url_days <= 0:
        raise UsageError("--url-days must be positive", value=url_days)
    data = data.resolve()
    settings = ServerSettings(
        data_dir=data,
        database_url=database_url(database, data),
        blob_url=blob_url,
        url_days=url_days,
        direct_downloads=direct_downloads,
    )
    first = initialise(settings)
    if first.admin_token:
        out.print("First start: this admin token is shown once; keep it safe:", style="bold")
        out.print(first.admin_token, markup=False)
    err.print(
        f"otakit server on {'https' if tls_cert else 'http'}://{host}:{port}, "
        f"database {redacted(settings.database_url)}, blobs {blob_url or data / 'blobs'}"
    )
    os.environ[SETTINGS_ENV] = settings.to_env()
    uvicorn.run(
        "otakit.server.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        access_log=access_log,
        log_level="info",
        server_header=False,
    )


token_app = typer.Typer(help="API tokens: admin, enrollment (product/group) and device tokens.")


def _url(data: Path, database: str | None) -> str:
    from otakit.server.database import database_url, migrate

    url = database_url(database, data.resolve())
    if not database and not (data / "otakit.db").exists():
        raise UsageError(
            f"no server data in {data}; start `otakit serve --data {data}` first or give --database-url",
            value=str(data),
        )
    migrate(url)
    return url


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="admin, enroll or device.")],
    data: DataOption = DEFAULT_DATA,
    database: DatabaseOption = None,
    product: Annotated[str | None, typer.Option("--product", help="For enroll tokens.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="For enroll tokens.")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Serial, for device tokens.")
    ] = None,
    label: Annotated[str | None, typer.Option("--label", help="A note to recognise it.")] = None,
) -> None:
    """Create a token and print it (it is shown only this once)."""
    try:
        kind = Role(role)
    except ValueError:
        raise UsageError(
            f"unknown role {role!r}; choose admin, enroll or device", value=role
        ) from None
    if kind is Role.ENROLL and not product:
        raise UsageError("an enrollment token needs --product (and usually --group)")
    if kind is Role.DEVICE and not device:
        raise UsageError("a device token needs --device SERIAL")
    url = _url(data, database)
    from otakit.server.database import create_engine, sessionmaker
    from otakit.server.tokens import add_token

    async def _create() -> str:
        engine = create_engine(url)
        try:
            async with sessionmaker(engine)() as db:
                token = add_token(
                    db, kind, product=product, group=group, device_serial=device, label=label
                )
                await db.commit()
                return token
        finally:
            await engine.dispose()

    out.print(asyncio.run(_create()), markup=False)


@token_app.command("list")
def token_list(data: DataOption = DEFAULT_DATA, database: DatabaseOption = None) -> None:
    """List tokens (never their secrets)."""
    url = _url(data, database)
    from sqlalchemy import select

    from otakit.server.database import create_engine, sessionmaker
    from otakit.server.models import Token

    async def _list() -> list[Token]:
        engine = create_engine(url)
        try:
            async with sessionmaker(engine)() as db:
                return list(await db.scalars(select(Token).order_by(Token.created_at)))
        finally:
            await engine.dispose()

    table = Table("role", "product", "group", "device", "label", "created", "revoked")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=16))
    for t in asyncio.run(_list()):
        table.add_row(
            t.id, t.role, t.product or "", t.group or "", t.device_serial or "", t.label or "",
            f"{t.created_at:%Y-%m-%d %H:%M}", f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
        )  # fmt: skip
    out.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (the part after otk_).")],
    data: DataOption = DEFAULT_DATA,
    database: DatabaseOption = None,
) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    url = _url(data, database)
    wanted = token_id.split("_")[1] if token_id.startswith("otk_") else token_id
    from otakit.server.database import create_engine, sessionmaker
    from otakit.server.models import Token, utcnow

    async def _revoke() -> bool:
        engine = create_engine(url)
        try:
            async with sessionmaker(engine)() as db:
                token = await db.get(Token, wanted)
                if token is None:
                    return False
                token.revoked_at = token.revoked_at or utcnow()
                await db.commit()
                return True
        finally:
            await engine.dispose()

    if not asyncio.run(_revoke()):
        raise UsageError(f"no token {wanted!r}", value=wanted)
    err.print(f"revoked {wanted}")
