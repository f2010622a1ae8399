"""Device JSON API, for the otakit agent and for gateways (``/api/v1/device``).

A device authenticates with its own token. On its first check-in a new device may use an
enrollment token (bound to a product and group) or, if its product allows self-registration,
no token at all; the response then carries its device token, which it keeps from then on.

Offers go through the rollout engine (server/rollout.py): a phased deployment is offered only
when the device's phase is open and the clock is inside the window. When the rollout of a
download the device has under way is aborted, the check-in answers ``{"job": null, "abort":
{...}}`` once: stop and discard that download. Check-ins and reports may carry ``boots`` (the
device's boot counter) for the health gate.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import (
    ForbiddenError,
    NotFoundError,
    NotOfferedError,
    RegisteredError,
    TooManyTokensError,
    UnauthorizedError,
)
from otakit.protocol import states
from otakit.protocol.fwinfo import FwStatus
from otakit.server import identity
from otakit.server.context import Caller, Db, Rollouts, State, error_responses
from otakit.server.models import DeploymentDevice, Device, Product, Rollout, Token, utcnow
from otakit.server.service import offers, reports, rollouts
from otakit.server.targeting import GROUP_TAG, PRODUCT_TAG
from otakit.server.tokens import (
    MAX_LIVE_DEVICE_TOKENS,
    Role,
    add_token,
    live_device_tokens,
    rotate,
)
from otakit.server.twin import SECONDS_PER_DAY, Twin, download_url, twin_of

LAST_SEEN_RESOLUTION = timedelta(seconds=60)

log = logging.getLogger("otakit.server")

router = APIRouter(
    prefix="/api/v1/device",
    tags=["device"],
    responses=error_responses(400, 401, 403, 404, 409, 422),
)


# Check-in fields kept for the device's job documents, and their keys there. They are checked
# (identity.check) once the caller is known, so a device without a token learns it needs one.
JOB_FIELDS = {"board": "Board", "manufacturer": "Manufacturer", "manufacturer_id": "ManufacturerId"}


class CheckIn(BaseModel):
    serial: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    board: str | None = Field(default=None, max_length=48)
    product: str | None = Field(default=None, max_length=64)
    manufacturer: str | None = Field(default=None, max_length=64)
    manufacturer_id: str | None = Field(default=None, max_length=16)
    version: str | None = Field(default=None, max_length=32)
    boots: int | None = Field(
        default=None, ge=0, le=2**53, description="The device's boot counter (health gate)."
    )


class Job(BaseModel):
    deployment_id: int
    artifact_id: str
    kind: str
    name: str
    version: str
    size: int
    sha256: str
    board: str | None
    url: str  # absolute, signed, expiring
    url_expires: datetime


class Abort(BaseModel):
    """Stop the download of this deployment and discard it: its rollout was aborted."""

    deployment_id: int
    reason: str


class CheckInResult(BaseModel):
    job: Job | None
    device_token: str | None = None  # only on the check-in that registered the device
    abort: Abort | None = None  # once, when a download under way was called off


class StatusReport(BaseModel):
    """A status report with flat fields."""

    status: FwStatus
    error: str | None = Field(default=None, max_length=64)
    version: str | None = Field(default=None, max_length=32)
    deployment_id: int | None = Field(default=None, ge=1, le=2**31 - 1)
    boots: int | None = Field(
        default=None, ge=0, le=2**53, description="The device's boot counter (health gate)."
    )


class ExtFwInfo(BaseModel):
    Status: FwStatus  # the reference design's names
    Error: str | None = Field(default=None, max_length=64)
    Version: int | str | None = None


class GatewayReport(BaseModel):
    """A status report in the reported-state shape of the reference design (protocols.md §7)."""

    extFwInfo: ExtFwInfo


def _str(value: Any) -> str | None:
    return None if value is None else str(value)[:64]


def _device_of(token: Token | None) -> str:
    if token is None:
        raise UnauthorizedError("this call needs a device token")
    if token.role != Role.DEVICE or not token.device_serial:
        raise ForbiddenError("this call needs a device token")
    return token.device_serial


async def _enroll(db: Db, body: CheckIn, token: Token | None) -> tuple[Device, str | None]:
    """The calling device, registering it (and minting its token) when allowed."""
    if token is not None and token.role == Role.DEVICE:
        if token.device_serial != body.serial:
            raise ForbiddenError("a device token can only check in for its device")
        device = await db.get(Device, body.serial)
        if device is None:
            raise NotFoundError(f"device {body.serial!r} is not registered")
        return device, None
    if token is not None and token.role == Role.ENROLL:
        product, group = token.product, token.group
    elif token is None:
        product_row = await db.get(Product, body.product) if body.product else None
        if product_row is None or not product_row.self_register:
            raise UnauthorizedError("this call needs a device or enrollment token")
        product, group = product_row.name, None
    else:
        raise ForbiddenError("admin tokens cannot check in as a device")
    existing = await db.get(Device, body.serial)
    if existing is not None:
        # serials are one namespace across products: another product's token (or a leaked
        # one) never takes over a registered device
        log.warning(
            "refused to enroll serial %r for product %r: already registered (product %r)",
            body.serial,
            product,
            existing.product,
        )
        raise RegisteredError(f"device {body.serial!r} is already registered; use its token")
    identity.check("serial", "SerialNumber", body.serial)  # the job documents carry it
    tags = {PRODUCT_TAG: product} if product else {}
    if group:
        tags[GROUP_TAG] = group
    device = Device(serial=body.serial, product=product, tags=tags)
    db.add(device)
    token_text = add_token(
        db, Role.DEVICE, product=product, group=group, device_serial=body.serial, label="enrolled"
    )
    return device, token_text


async def _abort_notice(db: AsyncSession, device: Device) -> Abort | None:
    """The download under way whose rollout was aborted, if any; told once."""
    if device.status not in rollouts.DOWNLOADING_STATES:
        return None
    found = (
        await db.execute(
            select(DeploymentDevice, Rollout)
            .join(Rollout, Rollout.deployment_id == DeploymentDevice.deployment_id)
            .where(
                DeploymentDevice.device_serial == device.serial,
                DeploymentDevice.status.in_(rollouts.DOWNLOADING_STATES),
                or_(
                    DeploymentDevice.error.is_(None),
                    DeploymentDevice.error != rollouts.ABORTED_ERROR,
                ),
                Rollout.state == rollouts.ABORTED,
            )
        )
    ).first()
    if found is None:
        return None
    row, rollout = found
    row.status, row.error = "interrupted", rollouts.ABORTED_ERROR
    device.status, device.error = "interrupted", rollouts.ABORTED_ERROR
    return Abort(deployment_id=row.deployment_id, reason=rollout.reason or "rollout aborted")


@router.post(
    "/checkin",
    response_model=CheckInResult,
    responses={204: {"description": "Nothing to do"}},
)
async def checkin(
    body: CheckIn,
    request: Request,
    db: Db,
    st: State,
    token: Caller,
    engine: Rollouts,
) -> CheckInResult | Response:
    """Report identity and version; get the job to do, or 204 when there is none."""
    device, device_token = await _enroll(db, body, token)
    for field, key in JOB_FIELDS.items():
        value = getattr(body, field)
        if value is not None:
            identity.check(field, key, value)
    version_changed = body.version is not None and body.version != device.version
    for field in ("board", "manufacturer", "manufacturer_id", "version"):
        value = getattr(body, field)
        if value is not None and getattr(device, field) != value:
            setattr(device, field, value)
    now = engine.now()
    if device.last_seen is None or now - device.last_seen > LAST_SEEN_RESOLUTION:
        device.last_seen = now  # at most one write a minute for a device that only polls
    changed: set[int] = set()
    if version_changed or device.status in states.UNDECIDED or body.boots is not None:
        changed = await reports.note_checkin(db, device, boots=body.boots, now=now)
    offer = await offers.offer_for(db, device, now)
    job = None
    abort = None
    if offer is not None:
        lifetime = timedelta(seconds=int(st.settings.url_days * SECONDS_PER_DAY))
        job = Job(
            deployment_id=offer.deployment.id,
            artifact_id=offer.artifact.id,
            kind=offer.artifact.kind,
            name=offer.artifact.name,
            version=offer.artifact.version,
            size=offer.artifact.size,
            sha256=offer.artifact.id,
            board=offer.artifact.board,
            url=download_url(st, offer.artifact, str(request.base_url)),
            url_expires=now + lifetime,
        )
    else:
        abort = await _abort_notice(db, device)
    await db.commit()
    await engine.changed(changed)
    if job is None and device_token is None and abort is None:
        return Response(status_code=204)
    return CheckInResult(job=job, device_token=device_token, abort=abort)


@router.post("/status", status_code=204)
async def report_status(
    body: StatusReport | GatewayReport,
    db: Db,
    st: State,
    token: Caller,
    engine: Rollouts,
) -> Response:
    """Report progress with the states and error strings of the reference design (§7).

    Without ``deployment_id`` the report is about the update on offer, or else the device's
    latest update under way. ``{"status": "error", "error": "reverted: ..."}`` reports a revert.
    """
    serial = _device_of(token)
    boots = None
    if isinstance(body, GatewayReport):
        info = body.extFwInfo
        status, error = info.Status, info.Error
        version = None if info.Version is None else str(info.Version)[:32]
        deployment_id = None
    else:
        status, error = body.status, body.error
        version, deployment_id, boots = body.version, body.deployment_id, body.boots
    now = engine.now()
    device = await db.get(Device, serial)
    if device is None:
        raise NotFoundError(f"device {serial!r} is not registered")
    if deployment_id is None:
        deployment_id = await offers.attribute(db, device, now)
    else:
        allowed = await offers.reportable(db, device, deployment_id)
        if allowed is None:
            raise NotFoundError(f"deployment {deployment_id} not found")
        if not allowed:
            log.warning(
                "refused a report from device %r about deployment %d, which was not offered to it",
                serial,
                deployment_id,
            )
            raise NotOfferedError(f"deployment {deployment_id} was not offered to this device")
    changed = await reports.record_status(
        db,
        serial=serial,
        deployment_id=deployment_id,
        status=status,
        error=error,
        version=version,
        boots=boots,
        now=now,
        keep=st.settings.history_per_device,
    )
    await db.commit()
    await engine.changed([changed])
    return Response(status_code=204)


@router.get("/twin", response_model=Twin)
async def own_twin(request: Request, db: Db, st: State, token: Caller) -> Twin:
    """This device's desired and reported state."""
    device = await db.get(Device, _device_of(token))
    if device is None:
        raise NotFoundError("device not registered")
    return await twin_of(db, st, device, str(request.base_url))


class NewToken(BaseModel):
    device_token: str
    expires_at: datetime | None  # of the new token (None: does not expire)
    previous_expires_at: datetime  # the token used for this call stops working then


@router.post("/token", response_model=NewToken)
async def rotate_token(db: Db, token: Caller) -> NewToken:
    """Rotate this device's token: the answer holds a new one (shown once); the token that made
    the call keeps working for an hour, so a lost answer can be asked for again. 409 while the
    device holds MAX_LIVE_DEVICE_TOKENS live tokens."""
    serial = _device_of(token)
    assert token is not None
    now = utcnow()
    if await live_device_tokens(db, serial, now) >= MAX_LIVE_DEVICE_TOKENS:
        raise TooManyTokensError(
            f"this device already has {MAX_LIVE_DEVICE_TOKENS} live tokens; "
            "rotate again when the old ones have expired",
        )
    minted, expires_at = rotate(db, token, now)
    previous = token.expires_at
    assert previous is not None
    await db.commit()
    return NewToken(device_token=minted, expires_at=expires_at, previous_expires_at=previous)
