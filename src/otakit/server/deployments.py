"""Deployments: which artifact a device gets, and where each device stands.

A device gets the best active deployment (not cancelled, not expired) whose target matches its
tags, whose artifact is for its board (when the artifact names one) and whose version is
strictly newer than the device's; a deployment marked ``downgrade`` may offer any other version.
Best is :func:`rank`: the highest priority (0 unless the operator set one, an override), then
the highest artifact version (protocols.md version order), then the newest deployment.

A deployment with a rollout (rollout.py) is offered only to the devices its rollout admits at
the time: its phase is open, the rollout runs, the clock is inside its maintenance window.
:func:`offer_for` is the one call for "what does this device get now"; it loads what the rollout
needs to know about the device (:class:`rollout.Standing`).

Device states are those of the cloud reference design (protocols.md §7): downloading,
interrupted, applying, applied, error, invalid, plus ``reverted`` (the health gate) and
``unknown`` (a result without a body, as the original device sends: it finished, but whether it
succeeded is not said); deployments count devices per state. Every report is kept as history,
capped per device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import OtakitError, UsageError
from otakit.protocol.fwinfo import STATES
from otakit.protocol.version import FirmwareVersion
from otakit.server import rollout as rollouts
from otakit.server.models import (
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
    Rollout,
    RolloutTarget,
    StatusReport,
    utcnow,
)
from otakit.server.targeting import GROUP_TAG, PRODUCT_TAG, matches, parse_condition

COUNTED = {
    "downloading": "Downloading",
    "interrupted": "Interrupted",
    "applying": "Applying",
    "applied": "Applied",
    "error": "Error",
    "invalid": "Error",
    "reverted": "Reverted",
    "unknown": "Unknown",
}
LABELS = tuple(dict.fromkeys(COUNTED.values()))
IN_FLIGHT = ("downloading", "interrupted", "applying")
UNKNOWN = "unknown"  # a result without a body (the original device): finished, outcome unknown
UNDECIDED = (*IN_FLIGHT, UNKNOWN)  # a check-in may still show how these end


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(LABELS, 0)


def label_of(state: str) -> str:
    return COUNTED.get(state, "Error")


@dataclass(frozen=True)
class Offer:
    deployment: Deployment
    artifact: Artifact
    rollout: Rollout | None = None  # when the deployment is phased


def version_of(text: str | None) -> FirmwareVersion | None:
    if not text:
        return None
    try:
        return FirmwareVersion.parse(text)
    except OtakitError:
        return None


def device_tags(device: Device) -> dict[str, str]:
    tags = dict(device.tags or {})
    if device.product and PRODUCT_TAG not in tags:
        tags[PRODUCT_TAG] = device.product
    return tags


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


def wanted(offer: Offer, version: str | None) -> bool:
    """Whether a device at ``version`` should get ``offer`` (never older unless downgrade)."""
    new, current = version_of(offer.artifact.version), version_of(version)
    if new is None:
        return False
    if current is None:
        return True
    return new != current if offer.deployment.downgrade else new > current


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
        board = offer.artifact.board
        if board and device.board and board != device.board:
            continue
        if not wanted(offer, device.version):
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


def normalise_state(status: str) -> str:
    state = status.strip().lower()
    if state not in STATES and state != UNKNOWN:
        raise UsageError(
            f"unknown status {status!r}; expected one of {', '.join(STATES)}", value=status
        )
    return state


async def record_status(
    session: AsyncSession,
    *,
    serial: str | None,
    deployment_id: int | None,
    status: str,
    error: str | None = None,
    version: str | None = None,
    boots: int | None = None,
    now: datetime | None = None,
    keep: int | None = None,
) -> int | None:
    """Keep a report (and only the newest ``keep`` of the device) and update the device and its
    standing in the deployment. A report of a revert makes the standing ``reverted``; a boot
    counter climbing too fast after applying makes it ``error`` (rollout.boot_loop). Return the
    deployment whose standing changed, if any."""
    state = normalise_state(status)
    now = now or utcnow()
    session.add(
        StatusReport(
            device_serial=serial,
            deployment_id=deployment_id,
            status=state,
            error=error,
            version=version,
            boots=boots,
            created_at=now,
            source="device",
        )
    )
    if keep is not None:
        await _cap_history(session, serial, keep)
    if serial is None:
        return None
    device = await session.get(Device, serial)
    if device is not None:
        device.status, device.error, device.last_seen = state, error, now
        if version:
            device.status_version = version
            if state == "applied" or rollouts.is_revert(state, error):
                device.version = version
    if deployment_id is None:
        return None
    standing = "reverted" if rollouts.is_revert(state, error) else state
    row = await session.get(DeploymentDevice, (deployment_id, serial))
    if row is None:
        row = DeploymentDevice(deployment_id=deployment_id, device_serial=serial)
        session.add(row)
    _set(row, standing, error, now, boots)
    if boots is not None:
        rollout = await session.scalar(
            select(Rollout).where(Rollout.deployment_id == deployment_id)
        )
        failure = rollouts.boot_loop(row, rollout, boots, now)
        if failure is not None:
            _set(row, "error", failure, now, boots)
    return deployment_id


def _set(
    row: DeploymentDevice, state: str, error: str | None, now: datetime, boots: int | None
) -> None:
    if state == "applied" and row.status != "applied":
        row.applied_at, row.boots_at_apply = now, boots
    row.status, row.error, row.updated_at = state, error, now
    if boots is not None:
        row.boots = boots


async def _cap_history(session: AsyncSession, serial: str | None, keep: int) -> None:
    """Delete the device's reports beyond the newest ``keep`` (``serial`` None: the reports of
    devices that do not identify themselves, kept as one source)."""
    source = (
        StatusReport.device_serial == serial
        if serial is not None
        else StatusReport.device_serial.is_(None)
    )
    oldest_kept = await session.scalar(
        select(StatusReport.id)
        .where(source)
        .order_by(StatusReport.id.desc())
        .offset(max(keep, 1) - 1)
        .limit(1)
    )
    if oldest_kept is not None:
        await session.execute(delete(StatusReport).where(source, StatusReport.id < oldest_kept))


async def note_checkin(
    session: AsyncSession,
    device: Device,
    *,
    boots: int | None = None,
    now: datetime | None = None,
    source: str = "checkin",
) -> set[int]:
    """What a check-in shows about the updates the device was given: running a deployment's
    version means applied; running an older one after that means reverted; the boot counter
    may show a boot loop. Keeps a history entry (from ``source``) for each change; returns the
    deployments whose standing changed."""
    now = now or utcnow()
    rows = await session.execute(
        select(DeploymentDevice, Artifact, Deployment, Rollout)
        .join(Deployment, Deployment.id == DeploymentDevice.deployment_id)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
        .where(
            DeploymentDevice.device_serial == device.serial,
            DeploymentDevice.status.in_((*UNDECIDED, "applied")),
        )
    )
    running = version_of(device.version)
    changed: set[int] = set()
    for row, artifact, deployment, rollout in rows:
        target = version_of(artifact.version)
        state, error = None, None
        if row.status in UNDECIDED and running is not None and running == target:
            state = "applied"
        elif (
            row.status == "applied"
            and not deployment.downgrade
            and running is not None
            and target is not None
            and running < target
        ):
            state, error = "reverted", f"reverted to {device.version}"[:64]
        if state is not None:
            _set(row, state, error, now, boots)
        failure = rollouts.boot_loop(row, rollout, boots, now)
        if failure is not None:
            state, error = "error", failure
            _set(row, state, error, now, boots)
        if state is None:
            continue
        changed.add(row.deployment_id)
        device.status, device.error = state if state != "reverted" else "error", error
        session.add(
            StatusReport(
                device_serial=device.serial,
                deployment_id=row.deployment_id,
                status=state,
                error=error,
                version=device.version,
                boots=boots,
                created_at=now,
                source=source,
            )
        )
    return changed


async def mark_applied_if_running(session: AsyncSession, device: Device) -> None:
    """A device that checks in running a deployment's version has applied it."""
    await note_checkin(session, device)


async def counts(session: AsyncSession, deployment_id: int) -> dict[str, int]:
    result = empty_counts()
    rows = await session.execute(
        select(DeploymentDevice.status, func.count())
        .where(DeploymentDevice.deployment_id == deployment_id)
        .group_by(DeploymentDevice.status)
    )
    for state, count in rows:
        result[label_of(state)] += count
    return result


async def history(
    session: AsyncSession, serial: str, *, limit: int = 100, before: int | None = None
) -> list[StatusReport]:
    """The device's reports, newest first (``before``: only those with a smaller id)."""
    query = select(StatusReport).where(StatusReport.device_serial == serial)
    if before is not None:
        query = query.where(StatusReport.id < before)
    return list(await session.scalars(query.order_by(StatusReport.id.desc()).limit(limit)))
