"""Offers: which artifact a device gets now.

A device gets the best active deployment (not cancelled, not expired) that targets it
(targeting.targets: its tags match the condition, the artifact is for its board when it names
one, and its version is strictly newer than the device's; a deployment marked ``downgrade`` may
offer any other version). Best is :func:`rank`: the highest priority (0 unless the operator set
one, an override), then the highest artifact version (protocols.md version order), then the
newest deployment.

A deployment with a rollout (rollouts.py) is offered only to the devices its rollout admits at
the time: its phase is open, the rollout runs, the clock is inside its maintenance window.
:func:`offer_for` is the one call for "what does this device get now"; it loads what the rollout
needs to know about the device (:class:`rollouts.Standing`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.protocol.states import UNDECIDED
from otakit.server.models import (
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
    Rollout,
    RolloutTarget,
    utcnow,
)
from otakit.server.service import rollouts
from otakit.server.targeting import (
    GROUP_TAG,
    PRODUCT_TAG,
    board_fits,
    device_tags,
    matches,
    parse_condition,
    version_of,
    wanted,
)


@dataclass(frozen=True)
class Offer:
    deployment: Deployment
    artifact: Artifact
    rollout: Rollout | None = None  # when the deployment is phased


def rank(offer: Offer) -> tuple[int, tuple[int, ...], int]:
    """Sort key, highest best: the operator's priority, then the artifact's version (one that
    does not parse ranks below every version), then the newest deployment."""
    version = version_of(offer.artifact.version)
    return (
        offer.deployment.priority or 0,
        version.parts if version is not None else (-1,),
        offer.deployment.id or 0,  # None: not stored yet
    )


def best_first(offers: Iterable[Offer]) -> list[Offer]:
    """``offers`` in the order a device is offered them (:func:`rank`)."""
    return sorted(offers, key=rank, reverse=True)


async def active(session: AsyncSession, now: datetime | None = None) -> list[Offer]:
    """Active deployments with their artifacts and rollouts, best first (:func:`rank`; there
    are few active deployments, so they are ordered here rather than by the database)."""
    now = now or utcnow()
    rows = await session.execute(
        select(Deployment, Artifact, Rollout)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
        .where(Deployment.cancelled_at.is_(None), Deployment.expires_at > now)
    )
    return best_first(Offer(d, a, r) for d, a, r in rows)


def select_offer(
    device: Device,
    offers: Sequence[Offer],
    *,
    standing: rollouts.Standing | None = None,
    now: datetime | None = None,
) -> Offer | None:
    """The best offer (:func:`rank`) for ``device``: its target matches, its board fits, its
    version is wanted, the device did not revert it already, and its rollout (if any) admits
    the device at ``now``. Pass the device's ``standing`` (or use :func:`offer_for`): without it
    frozen rollouts admit nobody and a revert is not known."""
    tags = device_tags(device)
    now = now or utcnow()
    for offer in best_first(offers):
        if not matches(parse_condition(offer.deployment.condition), tags):
            continue
        if standing is not None and _reverted(standing, offer.deployment.id):
            continue
        if not board_fits(offer.artifact, device):
            continue
        if not wanted(offer.deployment, offer.artifact, device.version):
            continue
        if offer.rollout is not None and not rollouts.admits(offer.rollout, device, standing, now):
            continue
        return offer
    return None


def _reverted(standing: rollouts.Standing, deployment_id: int) -> bool:
    return standing.statuses.get(deployment_id, (None, None))[0] == "reverted"


async def standing_of(session: AsyncSession, serial: str) -> rollouts.Standing:
    """The device's status in each deployment, and the frozen rollouts that hold it."""
    rows = await session.execute(
        select(
            DeploymentDevice.deployment_id, DeploymentDevice.status, DeploymentDevice.error
        ).where(DeploymentDevice.device_serial == serial)
    )
    members = await session.scalars(
        select(RolloutTarget.rollout_id).where(RolloutTarget.device_serial == serial)
    )
    return rollouts.Standing({d: (s, e) for d, s, e in rows}, frozenset(members))


async def offer_for(
    session: AsyncSession, device: Device, now: datetime | None = None
) -> Offer | None:
    """What ``device`` is offered now."""
    now = now or utcnow()
    offers = await active(session, now)
    standing = await standing_of(session, device.serial) if offers else None
    return select_offer(device, offers, standing=standing, now=now)


async def reportable(session: AsyncSession, device: Device, deployment_id: int) -> bool | None:
    """Whether ``device`` may report about deployment ``deployment_id`` (None: no such
    deployment). It may when it already stands in it, or when the deployment targets it (its
    condition matches the device's tags, its board fits) and, if phased, the rollout has opened
    the device's phase (or the device is downloading it): a report counts only for what was
    offered to the device, so no device can steer another product's or phase's rollout."""
    found = (
        await session.execute(
            select(Deployment, Artifact, Rollout)
            .join(Artifact, Artifact.id == Deployment.artifact_id)
            .outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
            .where(Deployment.id == deployment_id)
        )
    ).one_or_none()
    if found is None:
        return None
    deployment, artifact, rollout = found
    if await session.get(DeploymentDevice, (deployment_id, device.serial)) is not None:
        return True
    if not matches(parse_condition(deployment.condition), device_tags(device)):
        return False
    if artifact.board and device.board and artifact.board != device.board:
        return False
    if rollout is None:
        return True
    return rollouts.may_download(rollout, device, await standing_of(session, device.serial))


async def attribute(
    session: AsyncSession,
    device: Device,
    now: datetime | None = None,
    *,
    artifact_id: str | None = None,
) -> int | None:
    """The deployment a report without a deployment id is about: the update on offer (worked
    out before an applied version is kept), else the device's latest one still under way (a
    rollout may have paused its offer, or the device may already run the new version)."""
    offer = await offer_for(session, device, now)
    if offer is not None and artifact_id in (None, offer.artifact.id):
        return offer.deployment.id
    query = (
        select(DeploymentDevice.deployment_id)
        .join(Deployment, Deployment.id == DeploymentDevice.deployment_id)
        .where(
            DeploymentDevice.device_serial == device.serial,
            DeploymentDevice.status.in_((*UNDECIDED, "applied")),
        )
        .order_by(DeploymentDevice.updated_at.desc())
        .limit(1)
    )
    if artifact_id is not None:
        query = query.where(Deployment.artifact_id == artifact_id)
    return await session.scalar(query)


def select_for_products(
    products: set[str], offers: Sequence[Offer], now: datetime | None = None
) -> Offer | None:
    """For devices that do not identify themselves: the best offer (:func:`rank`) aimed at one
    of ``products`` (a phased deployment only once its rollout completed)."""
    now = now or utcnow()
    for offer in best_first(offers):
        required = parse_condition(offer.deployment.condition)
        if required.get(PRODUCT_TAG) in products and set(required) <= {PRODUCT_TAG, GROUP_TAG}:
            if offer.rollout is not None and not rollouts.admits_anonymous(offer.rollout, now):
                continue
            return offer
    return None
