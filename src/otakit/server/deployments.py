"""Deployments: which artifact a device gets, and where each device stands.

A device gets the highest-priority active deployment (not cancelled, not expired) whose target
matches its tags, whose artifact is for its board (when the artifact names one) and whose
version is strictly newer than the device's; a deployment marked ``downgrade`` may offer any
other version. Ties go to the newest deployment.

Device states are those of the cloud reference design (protocols.md §7): downloading,
interrupted, applying, applied, error, invalid; deployments count devices per state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import OtakitError, UsageError
from otakit.protocol.fwinfo import STATES
from otakit.protocol.version import FirmwareVersion
from otakit.server.models import (
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
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
}


@dataclass(frozen=True)
class Offer:
    deployment: Deployment
    artifact: Artifact


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


async def active(session: AsyncSession, now: datetime | None = None) -> list[Offer]:
    """Active deployments with their artifacts, best first."""
    now = now or utcnow()
    rows = await session.execute(
        select(Deployment, Artifact)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .where(Deployment.cancelled_at.is_(None), Deployment.expires_at > now)
        .order_by(Deployment.priority.desc(), Deployment.id.desc())
    )
    return [Offer(d, a) for d, a in rows]


def wanted(offer: Offer, version: str | None) -> bool:
    """Whether a device at ``version`` should get ``offer`` (never older unless downgrade)."""
    new, current = version_of(offer.artifact.version), version_of(version)
    if new is None:
        return False
    if current is None:
        return True
    return new != current if offer.deployment.downgrade else new > current


def select_offer(device: Device, offers: Sequence[Offer]) -> Offer | None:
    tags = device_tags(device)
    for offer in offers:
        if not matches(parse_condition(offer.deployment.condition), tags):
            continue
        board = offer.artifact.board
        if board and device.board and board != device.board:
            continue
        if wanted(offer, device.version):
            return offer
    return None


def select_for_products(products: set[str], offers: Sequence[Offer]) -> Offer | None:
    """For devices that do not identify themselves: the best offer aimed at one of ``products``."""
    for offer in offers:
        required = parse_condition(offer.deployment.condition)
        if required.get(PRODUCT_TAG) in products and set(required) <= {PRODUCT_TAG, GROUP_TAG}:
            return offer
    return None


def normalise_state(status: str) -> str:
    state = status.strip().lower()
    if state not in STATES:
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
) -> None:
    """Keep a report and update the device and its standing in the deployment."""
    state = normalise_state(status)
    now = utcnow()
    session.add(
        StatusReport(
            device_serial=serial,
            deployment_id=deployment_id,
            status=state,
            error=error,
            version=version,
            created_at=now,
        )
    )
    if serial is None:
        return
    device = await session.get(Device, serial)
    if device is not None:
        device.status, device.error, device.last_seen = state, error, now
        if version:
            device.status_version = version
            if state == "applied":
                device.version = version
    if deployment_id is None:
        return
    row = await session.get(DeploymentDevice, (deployment_id, serial))
    if row is None:
        session.add(
            DeploymentDevice(
                deployment_id=deployment_id,
                device_serial=serial,
                status=state,
                error=error,
                updated_at=now,
            )
        )
    else:
        row.status, row.error, row.updated_at = state, error, now


async def mark_applied_if_running(session: AsyncSession, device: Device) -> None:
    """A device that checks in running a deployment's version has applied it."""
    if not device.version:
        return
    rows = await session.execute(
        select(DeploymentDevice, Artifact)
        .join(Deployment, Deployment.id == DeploymentDevice.deployment_id)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .where(
            DeploymentDevice.device_serial == device.serial,
            DeploymentDevice.status.in_(("downloading", "interrupted", "applying")),
        )
    )
    running = version_of(device.version)
    for row, artifact in rows:
        if running is not None and version_of(artifact.version) == running:
            row.status, row.error, row.updated_at = "applied", None, utcnow()
            device.status, device.error = "applied", None


async def counts(session: AsyncSession, deployment_id: int) -> dict[str, int]:
    result = {label: 0 for label in dict.fromkeys(COUNTED.values())}
    rows = await session.execute(
        select(DeploymentDevice.status, func.count())
        .where(DeploymentDevice.deployment_id == deployment_id)
        .group_by(DeploymentDevice.status)
    )
    for state, count in rows:
        result[COUNTED.get(state, "Error")] += count
    return result
