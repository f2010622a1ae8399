"""Device JSON API, for the otakit agent and for gateways (``/api/v1/device``).

A device authenticates with its own token. On its first check-in a new device may use an
enrollment token (bound to a product and group) or, if its product allows self-registration,
no token at all; the response then carries its device token, which it keeps from then on. A
device whose answer was lost checks in again with the same enrollment token and gets a fresh
device token (earlier ones stop working).

The rules live in the service layer (service/enrollment.py, service/checkin.py); these routes
parse, call and format. Offers go through the rollout engine (service/rollouts.py): a phased
deployment is offered only when the device's phase is open and the clock is inside the window. When the rollout of a
download the device has under way is aborted, the check-in answers ``{"job": null, "abort":
{...}}`` once: stop and discard that download. Check-ins and reports may carry ``boots`` (the
device's boot counter) for the health gate.

Deltas (docs/delta.md): an otakit agent that sends ``image_sha256`` (the image_digest of the image
it runs) and ``delta`` (the compressions it applies) may get, with its job, a ``delta`` object:
a patch from that image to the offered one, behind a signed URL bound to the device
(``/api/v1/device/deltas/{id}/{serial}/{name}``, served like an artifact: Range, If-Range on the
patch's SHA-256, HEAD; refused unless the patch's image is one the device may fetch). A device
whose delta failed reports ``delta_error`` and gets the full image only for that deployment. A
check-in without those keys is answered exactly as before.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, Field

from otakit.errors import (
    ForbiddenError,
    NotFoundError,
    NotOfferedError,
    TooManyTokensError,
    UnauthorizedError,
)
from otakit.protocol.fwinfo import FwStatus
from otakit.server import downloads
from otakit.server.context import Caller, Db, Rollouts, State, error_responses
from otakit.server.models import ArtifactDelta, Device, Token, utcnow
from otakit.server.service import checkin as checkin_service
from otakit.server.service import enrollment, offers
from otakit.server.tokens import MAX_LIVE_DEVICE_TOKENS, Role, live_device_tokens, rotate
from otakit.server.twin import SECONDS_PER_DAY, Twin, delta_url, download_url, twin_of
from otakit.server.urls import check_signature

log = logging.getLogger("otakit.server")

router = APIRouter(
    prefix="/api/v1/device",
    tags=["device"],
    responses=error_responses(400, 401, 403, 404, 409, 422),
)


Compression = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[a-z0-9_-]+$")]
DeltaReason = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]


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
    image_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="image_digest (SHA-256 of header to end of TLVs) of the image it runs.",
    )
    delta: list[Compression] | None = Field(
        default=None,
        max_length=4,
        description="The delta compressions it applies, preferred first (otakit agents).",
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


class Delta(BaseModel):
    """A patch (otakit.image.delta) that turns the image the device runs into the job's."""

    url: str  # absolute, signed, expiring like the job's url; bound to this device
    size: int
    sha256: str  # of the patch file
    base_sha256: str  # image_digest of the image it applies to
    new_sha256: str  # image_digest of the image it makes
    compression: str


class JobWithDelta(Job):
    """A job that may also be done with a delta (only for a device that asked)."""

    delta: Delta


class Abort(BaseModel):
    """Stop the download of this deployment and discard it: its rollout was aborted."""

    deployment_id: int
    reason: str


class CheckInResult(BaseModel):
    job: JobWithDelta | Job | None  # with ``delta`` only for a device that sent its image
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
    delta_error: DeltaReason | None = Field(
        default=None,
        description="Why the delta failed (a DeltaError reason): full image only from then on.",
    )


class ExtFwInfo(BaseModel):
    Status: FwStatus  # the reference design's names
    Error: str | None = Field(default=None, max_length=64)
    Version: int | str | None = None


class GatewayReport(BaseModel):
    """A status report in the reported-state shape of the reference design (protocols.md §7)."""

    extFwInfo: ExtFwInfo


def _device_of(token: Token | None) -> str:
    if token is None:
        raise UnauthorizedError("this call needs a device token")
    if token.role != Role.DEVICE or not token.device_serial:
        raise ForbiddenError("this call needs a device token")
    return token.device_serial


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
    now = engine.now()
    enrolled = await enrollment.enroll(db, body.serial, token, body.product, now)
    visit = await checkin_service.check_in(
        db,
        enrolled.device,
        now,
        at=enrolled.revision,
        version=body.version,
        board=body.board,
        manufacturer=body.manufacturer,
        manufacturer_id=body.manufacturer_id,
        boots=body.boots,
        image_sha256=body.image_sha256,
        delta=body.delta,
        compression=st.settings.delta_compression,
    )
    job: Job | None = None
    if visit.offer is not None:
        offer = visit.offer
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
        if visit.delta is not None:
            new_sha256 = offer.artifact.image_sha256
            assert new_sha256 is not None  # offers.delta_for offers none without it
            job = _with_delta(job, visit.delta, new_sha256, enrolled.device.serial, st, request)
    abort = None
    if visit.abort is not None:
        abort = Abort(deployment_id=visit.abort.deployment_id, reason=visit.abort.reason)
    await db.commit()
    await engine.changed(visit.changed)
    if job is None and enrolled.device_token is None and abort is None:
        return Response(status_code=204)
    return CheckInResult(job=job, device_token=enrolled.device_token, abort=abort)


def _with_delta(
    job: Job, delta: ArtifactDelta, new_sha256: str, serial: str, st: State, request: Request
) -> JobWithDelta:
    """``job`` with its delta (a ready one: blob_key and size are set)."""
    assert delta.blob_key is not None
    assert delta.size is not None
    return JobWithDelta(
        **job.model_dump(),
        delta=Delta(
            url=delta_url(st, delta, job.name, serial, str(request.base_url)),
            size=delta.size,
            sha256=delta.blob_key,
            base_sha256=delta.base_sha256,
            new_sha256=new_sha256,
            compression=delta.compression,
        ),
    )


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
    boots = delta_error = None
    if isinstance(body, GatewayReport):
        info = body.extFwInfo
        status, error = info.Status, info.Error
        version = None if info.Version is None else str(info.Version)[:32]
        deployment_id = None
    else:
        status, error = body.status, body.error
        version, deployment_id, boots = body.version, body.deployment_id, body.boots
        delta_error = body.delta_error
    try:
        changed = await checkin_service.report(
            db,
            serial,
            engine.now(),
            status=status,
            error=error,
            version=version,
            boots=boots,
            deployment_id=deployment_id,
            delta_error=delta_error,
            keep=st.settings.history_per_device,
        )
    except NotOfferedError:
        log.warning(
            "refused a report from device %r about deployment %d, which was not offered to it",
            serial,
            deployment_id,
        )
        raise
    await db.commit()
    await engine.changed([changed])
    return Response(status_code=204)


@router.api_route(
    "/deltas/{delta_id}/{serial}/{name}",
    methods=["GET", "HEAD"],
    response_class=Response,
    responses={
        200: {"description": "The whole patch"},
        206: {"description": "A range of the patch"},
        416: {"description": "Range not satisfiable"},
    },
)
async def delta_file(
    delta_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    serial: str,
    name: str,
    request: Request,
    db: Db,
    st: State,
    engine: Rollouts,
    expires: str | None = Query(default=None, max_length=12),
    sig: str | None = Query(default=None, max_length=43),
) -> Response:
    """A delta offered to device ``serial``, behind the signed URL its check-in answered
    (Range, If-Range on the patch's SHA-256, HEAD, as artifact downloads): 403 when the URL is
    not valid or the patch's image is not one the device may fetch (any more)."""
    problem = check_signature(st.signing_key, request.scope["path"], expires, sig)
    if problem is not None:
        raise ForbiddenError(problem)
    delta, refused = await offers.may_fetch_delta(db, serial, delta_id, engine.now())
    if delta is None or delta.blob_key is None:
        raise NotFoundError("no such file")
    if refused is not None:
        raise ForbiddenError(refused)
    key = delta.blob_key
    await db.rollback()  # nothing written; the connection goes back before the bytes are sent
    return await downloads.send(request, await downloads.blob(st.blobs, key))


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
