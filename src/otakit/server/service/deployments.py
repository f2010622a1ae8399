"""Deployments: deploy an artifact, cancel a deployment, list them with their counts.

A deployment offers an artifact to the devices its condition targets (targeting.py) until it is
cancelled or expires; offers.py decides who gets which. Making or cancelling one changes what
devices may be offered, so both bump the offers revision (revision.py) in their transaction.

Counts are the devices per state label (protocol/states.py) in a deployment: one grouped count
over that deployment's ``deployment_devices`` rows (indexed by deployment and status), read for
a whole page of deployments at once, never a row per device in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import NotFoundError, UsageError
from otakit.protocol import states
from otakit.server import identity
from otakit.server.models import (
    AnonymousDevice,
    Artifact,
    Deployment,
    DeploymentDevice,
    Rollout,
    utcnow,
)
from otakit.server.service import revision
from otakit.server.service.listings import DEFAULT_LIMIT, Key, Page, page
from otakit.server.targeting import PRODUCT_TAG, parse_condition, product_group_condition


@dataclass(frozen=True)
class DeploymentSpec:
    """What to deploy to whom: a product (and group) or a tag condition, not both."""

    artifact_id: str
    product: str | None = None
    group: str | None = None
    condition: str | None = None
    priority: int = 0
    expiry_days: float = 365
    downgrade: bool = False


@dataclass
class DeploymentView:
    """A deployment as the management API shows it. ``counts`` are the devices per state
    label (protocol/states.py LABELS: disjoint, as in /metrics and the dashboard)."""

    id: int
    artifact_id: str
    version: str
    condition: str
    priority: int
    downgrade: bool
    created_at: datetime
    expires_at: datetime
    cancelled_at: datetime | None
    active: bool
    counts: dict[str, int]
    anonymous: dict[str, int] = field(default_factory=dict)
    rollout_id: int | None = None


def is_active(deployment: Deployment, now: datetime) -> bool:
    return deployment.cancelled_at is None and deployment.expires_at > now


async def new_deployment(
    db: AsyncSession, spec: DeploymentSpec, now: datetime | None = None
) -> Deployment:
    """Add a deployment (flushed, not committed: a rollout may be created with it)."""
    artifact = await db.get(Artifact, spec.artifact_id)
    if artifact is None:
        raise NotFoundError(f"artifact {spec.artifact_id!r} not found")
    if (spec.condition is None) == (spec.product is None):
        raise UsageError("give either product (and group) or condition")
    condition = spec.condition or product_group_condition(spec.product or "", spec.group)
    required = parse_condition(condition)
    identity.check_job_files(artifact.id, artifact.name, required.get(PRODUCT_TAG))
    now = now or utcnow()
    deployment = Deployment(
        artifact_id=artifact.id,
        condition=condition,
        priority=spec.priority,
        downgrade=spec.downgrade,
        created_at=now,
        expires_at=now + timedelta(days=spec.expiry_days),
    )
    db.add(deployment)
    await db.flush()
    await revision.bump(db)
    return deployment


async def deploy(db: AsyncSession, spec: DeploymentSpec) -> DeploymentView:
    """Deploy an artifact: offered at once to every targeted device."""
    deployment = await new_deployment(db, spec)
    await db.commit()
    return await get(db, deployment.id)


async def cancel(db: AsyncSession, deployment_id: int) -> DeploymentView:
    """Stop offering a deployment (devices that got it keep it); cancelling again is a no-op."""
    deployment = await _found(db, deployment_id)
    if deployment.cancelled_at is None:
        deployment.cancelled_at = utcnow()
        await revision.bump(db)
        await db.commit()
    return await get(db, deployment_id)


async def _found(db: AsyncSession, deployment_id: int) -> Deployment:
    deployment = await db.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFoundError(f"deployment {deployment_id} not found")
    return deployment


async def get(db: AsyncSession, deployment_id: int) -> DeploymentView:
    deployment = await _found(db, deployment_id)
    return (await views(db, [deployment]))[0]


async def listing(
    db: AsyncSession,
    *,
    active: bool | None = None,
    artifact_id: str | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    now: datetime | None = None,
) -> Page[DeploymentView]:
    """A page of deployments, newest first, with their counts (a few queries a page)."""
    now = now or utcnow()
    query = select(Deployment)
    live = Deployment.cancelled_at.is_(None) & (Deployment.expires_at > now)
    if active is True:
        query = query.where(live)
    elif active is False:
        query = query.where(~live)
    if artifact_id:
        query = query.where(Deployment.artifact_id == artifact_id)
    found: Page[Deployment] = await page(
        db,
        query,
        kind="deployments",
        keys=[Key(Deployment.id)],
        descending=True,
        limit=limit,
        cursor=cursor,
    )
    return Page(await views(db, found.items, now), found.next)


async def counts(db: AsyncSession, deployment_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Devices per state label in each deployment: one grouped count over their rows."""
    result = {i: states.empty_counts() for i in deployment_ids}
    if not result:
        return result
    rows = await db.execute(
        select(DeploymentDevice.deployment_id, DeploymentDevice.status, func.count())
        .where(DeploymentDevice.deployment_id.in_(list(result)))
        .group_by(DeploymentDevice.deployment_id, DeploymentDevice.status)
    )
    for deployment_id, status, count in rows:
        result[deployment_id][states.label_of(status)] += int(count)
    return result


async def anonymous_counts(
    db: AsyncSession, deployment_ids: Sequence[int]
) -> dict[int, dict[str, int]]:
    """Anonymous devices per state label (``Offered``: fetched the job only) in each."""
    result: dict[int, dict[str, int]] = {}
    if not deployment_ids:
        return result
    rows = await db.execute(
        select(AnonymousDevice.deployment_id, AnonymousDevice.status, func.count())
        .where(AnonymousDevice.deployment_id.in_(list(deployment_ids)))
        .group_by(AnonymousDevice.deployment_id, AnonymousDevice.status)
    )
    for deployment_id, status, count in rows:
        if deployment_id is None:
            continue
        shown = result.setdefault(deployment_id, {})
        label = "Offered" if status is None else states.label_of(status)
        shown[label] = shown.get(label, 0) + int(count)
    return result


async def views(
    db: AsyncSession, deployments: Sequence[Deployment], now: datetime | None = None
) -> list[DeploymentView]:
    """The views of ``deployments``: their versions, rollouts and counts in three queries."""
    now = now or utcnow()
    ids = [d.id for d in deployments]
    if not ids:
        return []
    versions: dict[int, str] = {
        i: v
        for i, v in await db.execute(
            select(Deployment.id, Artifact.version)
            .join(Artifact, Artifact.id == Deployment.artifact_id)
            .where(Deployment.id.in_(ids))
        )
    }
    rollout_ids: dict[int, int] = {
        d: r
        for d, r in await db.execute(
            select(Rollout.deployment_id, Rollout.id).where(Rollout.deployment_id.in_(ids))
        )
    }
    by_state = await counts(db, ids)
    anonymous = await anonymous_counts(db, ids)
    result = []
    for d in deployments:
        shown = by_state[d.id]
        result.append(
            DeploymentView(
                id=d.id,
                artifact_id=d.artifact_id,
                version=versions.get(d.id, ""),
                condition=d.condition,
                priority=d.priority,
                downgrade=d.downgrade,
                created_at=d.created_at,
                expires_at=d.expires_at,
                cancelled_at=d.cancelled_at,
                active=is_active(d, now),
                counts=shown,
                anonymous={k: v for k, v in anonymous.get(d.id, {}).items() if v},
                rollout_id=rollout_ids.get(d.id),
            )
        )
    return result
