"""The audit log: every operator action, with who made it, when, and on what.

Actions are named ``<thing>.<verb>``: ``deployment.create``, ``deployment.cancel``,
``rollout.create``, ``rollout.pause``, ``rollout.resume``, ``rollout.abort``, ``rollout.approve``,
``token.create``, ``token.revoke``, ``key.trust``, ``key.delete``, ``artifact.upload``,
``artifact.delete``, ``product.set``, ``device.set``, ``device.delete``. The service function
that performs an action records it in the same transaction, so an action and its record are
committed together or not at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

from sqlalchemy import and_, or_, select

from otakit.errors import UsageError
from otakit.server.models import AuditEvent
from otakit.server.service import listings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from otakit.server.models import Token

AuditAction = Literal[
    "deployment.create",
    "deployment.cancel",
    "rollout.create",
    "rollout.pause",
    "rollout.resume",
    "rollout.abort",
    "rollout.approve",
    "token.create",
    "token.revoke",
    "key.trust",
    "key.delete",
    "artifact.upload",
    "artifact.delete",
    "product.set",
    "device.set",
    "device.delete",
]
ACTIONS: tuple[str, ...] = get_args(AuditAction)
ENGINE = "engine"  # a rollout paused or aborted by its error threshold, not by an operator
LOCAL = "local"  # an action taken on the server's own data folder (otakit token create --data)


def actor_of(token: Token | None) -> str:
    """Who acted: ``label (token id)`` for a labelled token, else ``token <id>``."""
    if token is None:
        return LOCAL
    if token.label:
        return f"{token.label[:120]} ({token.id})"
    return f"token {token.id}"


def record(
    db: AsyncSession | Session,
    *,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Add the record of one action to the session (the caller commits it with the action)."""
    db.add(AuditEvent(actor=actor[:160], action=action, target=target[:160], details=details or {}))


async def listing(
    db: AsyncSession,
    *,
    action: str | None = None,
    actor: str | None = None,
    limit: int = listings.DEFAULT_LIMIT,
    cursor: str | None = None,
) -> listings.Page[AuditEvent]:
    """A page of the log, newest first: only ``action`` (one of :data:`ACTIONS`) and only
    ``actor`` if given: exactly as recorded (``ops-alice (3f9c01d2a4b5e6f7)``, ``engine``) or a
    token label (``ops-alice``: every token of that label). Each filter is an index range on
    (column, id)."""
    query = select(AuditEvent)
    if action:
        if action not in ACTIONS:
            raise UsageError(
                f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}", value=action
            )
        query = query.where(AuditEvent.action == action)
    if actor:
        # "label (id)" sorts between "label (" and "label )": one range of the actor index
        labelled = and_(AuditEvent.actor >= f"{actor} (", AuditEvent.actor < f"{actor} )")
        query = query.where(or_(AuditEvent.actor == actor, labelled))
    return await listings.page(
        db,
        query,
        kind="audit",
        keys=[listings.Key(AuditEvent.id)],
        descending=True,
        limit=limit,
        cursor=cursor,
    )
