"""API tokens as operators manage them: create, list, revoke (``POST/GET/DELETE /api/v1/tokens``
and ``otakit token create --data``, which share these functions).

A token's secret is returned once, by :func:`create`; the database keeps its hash
(server/tokens.py). Creating and revoking are recorded in the audit log in the same
transaction (service/audit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import MalformedJobDocError, NotFoundError, UsageError
from otakit.protocol.jobdoc import check_stored_value
from otakit.server.models import Token, utcnow
from otakit.server.service import audit
from otakit.server.service.listings import DEFAULT_LIMIT, Key, Page, page
from otakit.server.tokens import PREFIX, Role, add_token, split_token

MAX_EXPIRES_DAYS = 36500


@dataclass(frozen=True)
class TokenSpec:
    """What to create: the role, and for ``enroll`` its product (and group), for ``device`` its
    serial; ``expires_days`` None: never expires."""

    role: Role | str
    label: str | None = None
    product: str | None = None
    group: str | None = None
    device: str | None = None
    expires_days: float | None = None


@dataclass(frozen=True)
class CreatedToken:
    """A new token: ``token`` is the secret (``otk_<id>_<secret>``), shown this once; ``row`` is
    what is stored (id, role, bindings, dates)."""

    token: str
    row: Token


def role_of(value: Role | str) -> Role:
    """``value`` as a role; UsageError naming the choices for anything else."""
    try:
        return Role(value)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise UsageError(f"unknown role {value!r}; choose {choices}", value=value) from None


def check(spec: TokenSpec) -> Role:
    """The spec's role, once the spec is valid; raises UsageError (unknown role, an enroll token
    without product, a device token without serial, a product or serial that does not fit a job
    document, an expiry out of range). Touches no database: callers may check before opening
    one."""
    role = role_of(spec.role)
    if role is Role.ENROLL and not spec.product:
        raise UsageError("an enroll token needs a product (and usually a group)")
    if role is Role.DEVICE and not spec.device:
        raise UsageError("a device token needs the device's serial")
    # what the devices of these tokens get in their job documents must fit the device's buffers
    for field, key, value in (("product", "Product", spec.product), ("device", "SerialNumber", spec.device)):  # fmt: skip
        if value is not None:
            try:
                check_stored_value(key, value)
            except MalformedJobDocError as exc:
                raise UsageError(f"{field}: {exc.message}", value=value) from None
    if spec.group is not None and len(spec.group) > 64:
        raise UsageError("group: at most 64 characters", value=spec.group)
    if spec.label is not None and len(spec.label) > 128:
        raise UsageError("label: at most 128 characters", value=spec.label)
    days = spec.expires_days
    if days is not None and not 0 < days <= MAX_EXPIRES_DAYS:
        raise UsageError(
            f"expires_days must be more than 0 (and at most {MAX_EXPIRES_DAYS})", value=days
        )
    return role


async def create(db: AsyncSession, spec: TokenSpec, *, actor: str) -> CreatedToken:
    """Create a token and record ``token.create`` (by ``actor``: audit.actor_of(caller), or
    audit.LOCAL for the server's own data folder); commits. Raises UsageError (see
    :func:`check`)."""
    role = check(spec)
    now = utcnow()
    expires_at = now + timedelta(days=spec.expires_days) if spec.expires_days is not None else None
    secret = add_token(
        db,
        role,
        product=spec.product,
        group=spec.group,
        device_serial=spec.device,
        label=spec.label,
        expires_at=expires_at,
    )
    token_id = secret.split("_")[1]
    details: dict[str, object] = {"role": role.value}
    for name in ("label", "product", "group", "device"):
        value = getattr(spec, name)
        if value is not None:
            details[name] = value
    if expires_at is not None:
        details["expires_at"] = expires_at.isoformat()
    audit.record(
        db, actor=actor, action="token.create", target=f"token {token_id}", details=details
    )
    await db.commit()
    row = await db.get(Token, token_id)
    assert row is not None
    return CreatedToken(secret, row)


def id_of(token_or_id: str) -> str:
    """The id of a token given as its id or as the whole ``otk_<id>_<secret>``."""
    if token_or_id.startswith(f"{PREFIX}_"):
        parts = split_token(token_or_id)
        if parts is not None:
            return parts[0]
    return token_or_id.strip()


async def revoke(db: AsyncSession, token_id: str, *, actor: str) -> Token:
    """Revoke a token (its id, or the whole token): requests with it are refused from then on.
    Revoking a revoked token changes nothing and records nothing. Records ``token.revoke``;
    commits. Raises NotFoundError for an unknown token."""
    wanted = id_of(token_id)
    token = await db.get(Token, wanted) if wanted else None
    if token is None:
        raise NotFoundError(f"no token {wanted!r}", value=wanted)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(
            db,
            actor=actor,
            action="token.revoke",
            target=f"token {token.id}",
            details={"role": token.role, **({"label": token.label} if token.label else {})},
        )
        await db.commit()
    return token


async def listing(
    db: AsyncSession,
    *,
    role: Role | str | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page[Token]:
    """A page of tokens (never their secrets), newest first; ``role``: only those. Read in the
    order of an index (migration 0011: created_at, id; and role, created_at, id)."""
    query = select(Token)
    kind = "tokens"
    if role is not None:
        query = query.where(Token.role == role_of(role).value)
        kind = f"tokens:{role_of(role).value}"
    return await page(
        db,
        query,
        kind=kind,
        keys=[Key(Token.created_at), Key(Token.id)],
        descending=True,
        limit=limit,
        cursor=cursor,
    )
