"""The audit log: every operator action, with who made it, when, and on what.

Actions are named ``<thing>.<verb>``: ``deployment.create``, ``deployment.cancel``,
``rollout.create``, ``rollout.pause``, ``rollout.resume``, ``rollout.abort``, ``rollout.approve``,
``token.create``, ``token.revoke``, ``key.trust``, ``key.delete``, ``artifact.upload``,
``artifact.delete``, ``product.set``, ``device.set``, ``device.delete``. The service function
that performs an action records it in the same transaction, so an action and its record are
committed together or not at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from otakit.server.models import AuditEvent

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from otakit.server.models import Token

LOCAL = "local"  # an action taken on the server's own data folder (otakit token create --data)


def actor_of(token: Token | None) -> str:
    """Who acted: ``label (token id)`` for a labelled token, else ``token <id>``."""
    if token is None:
        return LOCAL
    if token.label:
        return f"{token.label[:120]} ({token.id})"
    return f"token {token.id}"


def record(
    db: AsyncSession,
    *,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Add the record of one action to the session (the caller commits it with the action)."""
    db.add(AuditEvent(actor=actor[:160], action=action, target=target[:160], details=details or {}))
