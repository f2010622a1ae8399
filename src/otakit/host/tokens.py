"""``otakit token create|list|revoke``: API tokens, on a running server (the management API's
``/api/v1/tokens``) or, with ``--data``/``--database-url``, on the server's own data on this
machine (how the first admin token is made)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from otakit.errors import UsageError
from otakit.extras import require
from otakit.host.client import (
    TOKEN_ENV,
    Column,
    JsonOption,
    ManagementClient,
    ServerOption,
    TokenOption,
    connect,
    print_json,
    show_table,
    timestamp,
)
from otakit.server.cli import local_session, local_url
from otakit.server.tokens import Role

if TYPE_CHECKING:
    from otakit.server.models import Token

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    help="API tokens: admin, viewer (read-only), enrollment (product/group) and device tokens. "
    "On a running server (--server/--token or $OTAKIT_SERVER/$OTAKIT_TOKEN) by default; with "
    "--data DIR or --database-url URL on the server's own data instead (the first admin token).",
    short_help="API tokens (admin, viewer, enroll, device): create, list, revoke.",
    no_args_is_help=True,
)
ROLES = tuple(r.value for r in Role)

LocalDataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        metavar="DIR",
        help="Work on the server data folder DIR on this machine, not a running server.",
        show_default=False,
    ),
]
LocalDatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        help="Work on the server's database directly (postgresql://...), not a running server.",
        show_default=False,
    ),
]


def _local(data: Path | None, database: str | None, server: str | None, token: str | None) -> bool:
    """Whether a token command works on the server's own data (``--data``/``--database-url``
    given) rather than calling a running server (the default: ``--server``/``--token``, else
    ``$OTAKIT_SERVER``/``$OTAKIT_TOKEN``). An explicit ``--data`` wins over the environment;
    both kinds of options at once are refused."""
    if data is None and database is None:
        return False
    if server is not None or token is not None:
        raise UsageError(
            "--data/--database-url work on the server's data on this machine, --server/--token "
            "on a running server: give one or the other"
        )
    require("server", "otakit token --data")
    return True


def _remote(server: str | None, token: str | None) -> ManagementClient:
    if not (token or os.environ.get(TOKEN_ENV)):
        raise UsageError(
            f"give an admin token with --token or ${TOKEN_ENV} to manage a running server's "
            "tokens, or --data DIR (--database-url URL) to work on the server's own data on "
            "this machine (how the first admin token is made)"
        )
    return connect(server, token)


def _token_id(text: str) -> str:
    """A token's id: given as the id, or as the whole token (``otk_ID_SECRET``)."""
    return text.split("_")[1] if text.startswith("otk_") and text.count("_") >= 2 else text


@app.command("create")
def token_create(
    role: Annotated[
        str, typer.Option("--role", metavar="ROLE", help="admin, viewer, enroll or device.")
    ],
    product: Annotated[
        str | None, typer.Option("--product", metavar="PRODUCT", help="For enroll tokens.")
    ] = None,
    group: Annotated[
        str | None, typer.Option("--group", metavar="GROUP", help="For enroll tokens.")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", metavar="SERIAL", help="For device tokens.")
    ] = None,
    label: Annotated[
        str | None,
        typer.Option(
            "--label", metavar="TEXT", help="A note to recognise it (the audit log's who)."
        ),
    ] = None,
    expires_days: Annotated[
        float | None,
        typer.Option("--expires-days", metavar="DAYS", help="Expire after DAYS (default: never)."),
    ] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    data: LocalDataOption = None,
    database: LocalDatabaseOption = None,
) -> None:
    """Create a token and print it (it is shown only this once)."""
    try:
        kind = Role(role)
    except ValueError:
        raise UsageError(f"unknown role {role!r}; choose {', '.join(ROLES)}", value=role) from None
    if kind is Role.ENROLL and not product:
        raise UsageError("an enrollment token needs --product (and usually --group)")
    if kind is Role.DEVICE and not device:
        raise UsageError("a device token needs --device SERIAL")
    # what the devices of these tokens get in their job documents must fit the device's buffers
    for option, key, value in (
        ("--product", "Product", product),
        ("--device", "SerialNumber", device),
    ):
        if value is not None:
            _check_job_field(option, key, value)
    if expires_days is not None and not 0 < expires_days <= 36500:
        raise UsageError("--expires-days must be more than 0 (and at most 36500)")
    if not _local(data, database, server, token):
        body = {
            "role": kind.value,
            "label": label,
            "product": product,
            "group": group,
            "device": device,
            "expires_days": expires_days,
        }
        with _remote(server, token) as client:
            created = client.request(
                "POST", "/api/v1/tokens", json={k: v for k, v in body.items() if v is not None}
            ).json()
        out.print(created["token"], markup=False)
        return
    from otakit.server.service import tokens as token_service
    from otakit.server.service.audit import LOCAL

    spec = token_service.TokenSpec(kind, label, product, group, device, expires_days)
    token_service.check(spec)
    url = local_url(data, database)

    async def _create() -> str:
        async with local_session(url) as db:
            return (await token_service.create(db, spec, actor=LOCAL)).token

    out.print(asyncio.run(_create()), markup=False)


def _check_job_field(option: str, key: str, value: str) -> None:
    from otakit.errors import MalformedJobDocError
    from otakit.protocol.jobdoc import check_stored_value

    try:
        check_stored_value(key, value)
    except MalformedJobDocError as exc:
        raise UsageError(f"{option}: {exc.message}", value=value) from None


@app.command("list")
def token_list(
    role: Annotated[
        str | None, typer.Option("--role", metavar="ROLE", help="Only tokens of this role.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, help="Show at most N tokens.")
    ] = 100,
    server: ServerOption = None,
    token: TokenOption = None,
    data: LocalDataOption = None,
    database: LocalDatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """List tokens, newest first (never their secrets)."""
    if role is not None and role not in ROLES:
        raise UsageError(f"unknown role {role!r}; choose {', '.join(ROLES)}", value=role)
    if _local(data, database, server, token):
        tokens = _local_tokens(local_url(data, database), role, limit + 1)
    else:
        with _remote(server, token) as client:
            tokens = client.items("/api/v1/tokens", {"role": role} if role else {}, limit=limit + 1)
    more = len(tokens) > limit
    tokens = tokens[:limit]
    if as_json:
        print_json(tokens)
        return
    # at 80 columns every cell's widest line fits, so that no token id is folded: the state's
    # date goes under it and the creation date is left out (--json has every field)
    wide = out.width >= 100
    columns = [
        Column("id", "id", min_width=16),
        Column("role", "role"),
        Column("label", "label"),
        Column("for", _token_scope),
        Column("state", lambda t: _token_state(t, "  " if wide else "\n")),
    ]
    if wide:
        columns.insert(4, Column("created", lambda t: timestamp(t.get("created_at"))[:10]))
    show_table(tokens, columns, empty="no tokens")
    if more:
        err.print(f"(the first {limit} tokens; --limit N shows more)")


def _token_scope(t: Mapping[str, Any]) -> str:
    """What a token is limited to: ``PRODUCT/GROUP``, or ``device SERIAL``; "-" for none."""
    if t.get("device"):
        return f"device {t['device']}"
    return "/".join(str(t[k]) for k in ("product", "group") if t.get(k)) or "-"


def _token_state(t: Mapping[str, Any], between: str) -> str:
    """active, or revoked / expired / expires with the date (``between`` them)."""
    if t.get("revoked_at"):
        return f"revoked{between}{timestamp(t['revoked_at'])[:10]}"
    if not t.get("expires_at"):
        return "active"
    expires = datetime.fromisoformat(str(t["expires_at"]).replace("Z", "+00:00"))
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    word = "expired" if expires <= datetime.now(UTC) else "expires"
    return f"{word}{between}{timestamp(t['expires_at'])[:10]}"


def _local_tokens(url: str, role: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest tokens of the database at ``url``, in the shape the API lists them."""
    from otakit.server.service import tokens as token_service

    async def _list() -> list[Token]:
        async with local_session(url) as db:
            return (await token_service.listing(db, role=role, limit=limit)).items

    def iso(at: datetime | None) -> str | None:
        return at.isoformat() if at is not None else None

    return [
        {
            "id": t.id,
            "role": t.role,
            "label": t.label,
            "product": t.product,
            "group": t.group,
            "device": t.device_serial,
            "created_at": iso(t.created_at),
            "expires_at": iso(t.expires_at),
            "revoked_at": iso(t.revoked_at),
        }
        for t in asyncio.run(_list())
    ]


@app.command("revoke")
def token_revoke(
    token_id: Annotated[
        str, typer.Argument(metavar="ID", help="Token id (the part after otk_), or the token.")
    ],
    server: ServerOption = None,
    token: TokenOption = None,
    data: LocalDataOption = None,
    database: LocalDatabaseOption = None,
) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    wanted = _token_id(token_id)
    if not wanted.isalnum() or not wanted.isascii():
        raise UsageError(f"{token_id!r} is not a token id", value=token_id)
    if not _local(data, database, server, token):
        with _remote(server, token) as client:
            client.request("DELETE", f"/api/v1/tokens/{wanted}")
        err.print(f"revoked {wanted}")
        return
    url = local_url(data, database)
    from otakit.server.service import tokens as token_service
    from otakit.server.service.audit import LOCAL

    async def _revoke() -> None:
        async with local_session(url) as db:
            await token_service.revoke(db, wanted, actor=LOCAL)

    asyncio.run(_revoke())
    err.print(f"revoked {wanted}")


# --- the MQTT publisher ------------------------------------------------------------------------
