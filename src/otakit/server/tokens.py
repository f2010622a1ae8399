"""API tokens: ``otk_<id>_<secret>``; the server stores the id and a SHA-256 of the secret.

Roles: ``admin`` (management API), ``enroll`` (bound to a product and group: lets a new device
register on its first check-in and receive its own token) and ``device`` (bound to one serial:
reads only its own jobs, reports only for itself). A token is shown once, when created; no
secret is ever logged or stored in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

PREFIX = "otk"


class Role(StrEnum):
    ADMIN = "admin"
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
        )
    )
    return minted.token
