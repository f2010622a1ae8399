"""API tokens: ``otk_<id>_<secret>``; the server stores the id and a SHA-256 of the secret.

Roles: ``admin`` (management API), ``viewer`` (reads what an admin reads, changes nothing),
``enroll`` (bound to a product and group: lets a new device
register on its first check-in and receive its own token) and ``device`` (bound to one serial:
reads only its own jobs, reports only for itself). A token is shown once, when created; no
secret is ever logged or stored in clear.

A token may expire (``expires_at``); a device token can be rotated by its device
(``POST /api/v1/device/token``): the new token is returned once and the old one stays valid
for :data:`ROTATION_GRACE` more, so a device that loses the answer can try again. Deleting a
device revokes its tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from otakit.server.models import Token

PREFIX = "otk"
ROTATION_GRACE = timedelta(hours=1)
MAX_LIVE_DEVICE_TOKENS = 4  # rotation is refused beyond this (old ones expire within the grace)


class Role(StrEnum):
    ADMIN = "admin"
    VIEWER = "viewer"  # reads the management API, the dashboard and /metrics; changes nothing
    ENROLL = "enroll"
    DEVICE = "device"


@dataclass(frozen=True)
class NewToken:
    id: str
    secret_hash: str
    token: str  # the only place the secret exists


def new_token() -> NewToken:
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewToken(token_id, hash_secret(secret), f"{PREFIX}_{token_id}_{secret}")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    parts = token.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)


def add_token(
    db: AsyncSession,
    role: Role,
    *,
    product: str | None = None,
    group: str | None = None,
    device_serial: str | None = None,
    label: str | None = None,
    expires_at: datetime | None = None,
) -> str:
    """Add a new token to the session (the caller commits) and return it, shown this once."""
    from otakit.server.models import Token

    minted = new_token()
    db.add(
        Token(
            id=minted.id,
            secret_hash=minted.secret_hash,
            role=role,
            product=product,
            group=group,
            device_serial=device_serial,
            label=label,
            expires_at=expires_at,
        )
    )
    return minted.token


def usable(token: Token, now: datetime) -> bool:
    """Neither revoked nor expired."""
    return live(token.revoked_at, token.expires_at, now)


def live(revoked_at: datetime | None, expires_at: datetime | None, now: datetime) -> bool:
    """A token with these dates is neither revoked nor expired at ``now``."""
    return revoked_at is None and (expires_at is None or expires_at > now)


def rotate(db: AsyncSession, old: Token, now: datetime) -> tuple[str, datetime | None]:
    """A new token for the same device, with the same lifetime if the old one had one, and its
    expiry; the old one expires :data:`ROTATION_GRACE` from ``now``. The caller commits."""
    lifetime = old.expires_at - old.created_at if old.expires_at is not None else None
    expires_at = now + lifetime if lifetime is not None else None
    token = add_token(
        db,
        Role(old.role),
        product=old.product,
        group=old.group,
        device_serial=old.device_serial,
        label="rotated",
        expires_at=expires_at,
    )
    grace = now + ROTATION_GRACE
    if old.expires_at is None or old.expires_at > grace:
        old.expires_at = grace
    return token, expires_at


async def live_device_tokens(db: AsyncSession, serial: str, now: datetime) -> int:
    """How many tokens of device ``serial`` are neither revoked nor expired."""
    from sqlalchemy import func, or_, select

    from otakit.server.models import Token

    count = await db.scalar(
        select(func.count())
        .select_from(Token)
        .where(
            Token.device_serial == serial,
            Token.revoked_at.is_(None),
            or_(Token.expires_at.is_(None), Token.expires_at > now),
        )
    )
    return int(count or 0)


async def revoke_device_tokens(db: AsyncSession, serial: str, now: datetime) -> int:
    """Revoke every token bound to device ``serial``; return how many were live."""
    from sqlalchemy import update

    from otakit.server.models import Token

    result = await db.execute(
        update(Token)
        .where(Token.device_serial == serial, Token.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)
