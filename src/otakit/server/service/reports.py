"""Reports: what a device's status report or check-in means, and the counts and history that
follow from them.

States are the one vocabulary of protocol/states.py. Every report is kept as history, capped per
device; a device's standing in each deployment it was offered is one ``deployment_devices`` row.
Every change of a standing goes through :func:`set_standing`, which also moves the device in its
rollout's per-phase counts (phases.py) in the same transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import UsageError
from otakit.protocol.states import REPORTED, UNDECIDED, DeviceState
from otakit.server.models import (
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
    Rollout,
    StatusReport,
    utcnow,
)
from otakit.server.service import phases
from otakit.server.targeting import device_tags, version_of

DEFAULT_CONFIRM_TIMEOUT = 3600  # seconds; also the window in which boots are counted


def normalise_state(status: str) -> str:
    state = status.strip().lower()
    if state not in REPORTED and state != DeviceState.UNKNOWN:
        raise UsageError(
            f"unknown status {status!r}; expected one of {', '.join(REPORTED)}", value=status
        )
    return state


def is_revert(status: str, error: str | None) -> bool:
    """A report that the device went back to its old image (the agent reports
    ``{"status": "error", "error": "reverted: ..."}``)."""
    return status in ("error", "invalid") and (error or "").strip().lower().startswith("revert")


def boot_loop(
    row: DeploymentDevice, rollout: Rollout | None, boots: int | None, now: datetime
) -> str | None:
    """The failure to record when ``boots`` shows the device booting too often since it
    applied, else None. Keeps the boot counter on ``row``."""
    if boots is None or row.status != "applied":
        return None
    row.boots = boots
    if row.boots_at_apply is None or boots < row.boots_at_apply:
        row.boots_at_apply = boots  # first count after applying (or the counter was reset)
        return None
    if rollout is None or rollout.max_boots is None:
        return None
    window = timedelta(seconds=rollout.confirm_timeout or DEFAULT_CONFIRM_TIMEOUT)
    if row.applied_at is not None and now - row.applied_at > window:
        return None
    extra = boots - row.boots_at_apply
    return f"boot loop: {extra} boots" if extra > rollout.max_boots else None


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
    delta_error: str | None = None,
) -> int | None:
    """Keep a report (and only the newest ``keep`` of the device) and update the device and its
    standing in the deployment. A report of a revert makes the standing ``reverted``; a boot
    counter climbing too fast after applying makes it ``error`` (rollout.boot_loop);
    ``delta_error`` (the device's delta of this deployment failed: a DeltaError reason) is kept
    on the standing, and the device is offered the full image only from then on. Return the
    deployment whose standing changed, if any."""
    state = normalise_state(status)
    if error is not None and error.strip() in ("", "None"):
        error = None  # extFwInfo's "Error": "None" (protocol/fwinfo.py) says there is none
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
            if state == "applied" or is_revert(state, error):
                device.version = version
    if deployment_id is None:
        return None
    standing = "reverted" if is_revert(state, error) else state
    rollout = await session.scalar(select(Rollout).where(Rollout.deployment_id == deployment_id))
    row = await session.get(DeploymentDevice, (deployment_id, serial))
    if row is None:
        row = DeploymentDevice(deployment_id=deployment_id, device_serial=serial)
        session.add(row)
    if delta_error is not None:
        row.delta_error = delta_error
    tags = device_tags(device) if device is not None else None
    await set_standing(session, row, standing, error, now, boots, rollout=rollout, tags=tags)
    if boots is not None:
        failure = boot_loop(row, rollout, boots, now)
        if failure is not None:
            await set_standing(session, row, "error", failure, now, boots, rollout=rollout)
    return deployment_id


async def set_standing(
    session: AsyncSession,
    row: DeploymentDevice,
    state: str,
    error: str | None,
    now: datetime,
    boots: int | None,
    *,
    rollout: Rollout | None,
    tags: dict[str, str] | None = None,
) -> None:
    """THE place where a device's standing in a deployment changes: the row, and the device's
    place in the counts of the deployment's ``rollout`` (if any; ``tags``: the device's, so
    that a device without a rollout row gets one)."""
    if state == "applied" and row.status != "applied":
        row.applied_at, row.boots_at_apply = now, boots
    row.status, row.error, row.updated_at = state, error, now
    if boots is not None:
        row.boots = boots
    if rollout is not None:
        await phases.note(session, rollout, row.device_serial, tags, state, row.applied_at, now)


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
    tags = device_tags(device)
    # in deployment order: concurrent check-ins lock the rollouts' counts in the same order
    for row, artifact, deployment, rollout in sorted(rows, key=lambda r: r[0].deployment_id):
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
            await set_standing(session, row, state, error, now, boots, rollout=rollout, tags=tags)
        failure = boot_loop(row, rollout, boots, now)
        if failure is not None:
            state, error = "error", failure
            await set_standing(session, row, state, error, now, boots, rollout=rollout, tags=tags)
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
