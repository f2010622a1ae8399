"""Devices that do not identify themselves: the trace they leave.

Original devices on a product that allows anonymous access send no token and no serial number
(protocols.md §2). The server still keeps one row per (product, network address, User-Agent):
the deployment it was last offered and where it stands, from what the server saw: it fetched
the first range of the file (``downloading``), then its result (``applying`` for a result that
says Success, ``error`` for Failure, ``unknown`` for the original's empty result). Deployments
count them apart from identified devices. Devices behind one address count as one; rows are
capped (the least recently seen go first), so the table never grows with traffic.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.server.database import insert
from otakit.server.models import AnonymousDevice

MAX_USER_AGENT = 128


def key_of(product: str, address: str, user_agent: str) -> str:
    return hashlib.sha256(f"{product}\n{address}\n{user_agent}".encode()).hexdigest()


async def seen(
    session: AsyncSession,
    *,
    product: str,
    address: str,
    user_agent: str,
    deployment_id: int | None,
    now: datetime,
    keep: int,
    status: str | None = None,
    error: str | None = None,
) -> None:
    """Note that an anonymous device asked for something of ``product`` (its job, the first
    range of a file, its result). ``status`` None keeps the status it had, unless the device
    is now offered another deployment."""
    user_agent = user_agent[:MAX_USER_AGENT]
    key = key_of(product, address, user_agent)
    values = {
        "key": key,
        "product": product,
        "address": address[:64],
        "user_agent": user_agent,
        "deployment_id": deployment_id,
        "status": status,
        "error": error,
        "first_seen": now,
        "last_seen": now,
    }
    created = await session.execute(
        insert(session, AnonymousDevice)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["key"])
    )
    if getattr(created, "rowcount", 0) == 1:
        await _cap(session, keep)
        return
    row = await session.get(AnonymousDevice, key)
    if row is None:  # capped away in between
        return
    row.last_seen = now
    if status is not None or row.deployment_id != deployment_id:
        row.deployment_id, row.status, row.error = deployment_id, status, error


async def _cap(session: AsyncSession, keep: int) -> None:
    oldest_kept = await session.scalar(
        select(AnonymousDevice.last_seen)
        .order_by(AnonymousDevice.last_seen.desc())
        .offset(max(keep, 1) - 1)
        .limit(1)
    )
    if oldest_kept is not None:
        await session.execute(
            delete(AnonymousDevice).where(AnonymousDevice.last_seen < oldest_kept)
        )


async def listing(
    session: AsyncSession,
    *,
    product: str | None = None,
    deployment_id: int | None = None,
    limit: int = 100,
) -> list[AnonymousDevice]:
    """The most recently seen anonymous devices first."""
    query = select(AnonymousDevice)
    if product is not None:
        query = query.where(AnonymousDevice.product == product)
    if deployment_id is not None:
        query = query.where(AnonymousDevice.deployment_id == deployment_id)
    return list(
        await session.scalars(query.order_by(AnonymousDevice.last_seen.desc()).limit(limit))
    )
