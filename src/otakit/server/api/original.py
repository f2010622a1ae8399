"""What devices running the original middleware use, unchanged (protocols.md §1-2), and the
signed download URLs of the JSON API.

- ``GET /devices/{serial}/ota_update.json``: one device's job document (its token, or its
  product allows anonymous access: the middleware cannot send a token).
- ``GET /products/{product}/ota_update.json``: the job for a product's anonymous devices;
  ``GET /ota_update.json``: a device token's own job, else the same for the one product that
  allows anonymous access (with several: 409 ``AMBIGUOUS``, never another product's image).
  Job documents are answered like files: ``Range: bytes=0-`` (which the middleware sends)
  gets 206 and ``Content-Range``; ``Connection`` is the scheme the request came in with.
- ``GET|HEAD /devices/{serial}/files/{id}/{name}``, ``/products/{product}/files/{id}/{name}``
  (and ``/files/{id}/{name}`` of earlier jobs): image bytes, with
  ``Range``/``206``/``Content-Range``/``416``, ``ETag`` (the SHA-256) and ``If-Range``.
- ``GET|HEAD /products/{product}/ota-update.bin``, ``/ota-update.bin``: the direct flow's file.
- ``POST`` to any file path: the result, ``{"Message": "Success"|"Failure", "File": ...}``, or
  no body, as the original sends: ``unknown`` (it finished; the outcome is not said). Results
  from devices that do not identify themselves count for no rollout: they are kept as history
  (the newest ``ServerSettings.anonymous_history``) and in the device's trace
  (server/anonymous.py: one row per address and User-Agent).
- ``GET|HEAD /dl/{id}/{name}?expires=..&sig=..``: expiring signed URLs (403 when expired or
  forged); anyone holding a valid URL may download. Served by ``downloads.SignedDownloads``
  in front of the web framework.

A device with nothing newer gets a "No Update Available" document of the same shape; so does a
device whose rollout phase is not open yet, outside the rollout's maintenance window, or after
the rollout was paused or aborted (service/rollouts.py). A file is served only to a device its
deployment is offered to (or that is in the middle of downloading it); an aborted rollout's
files to nobody. Devices that do not identify themselves get a phased deployment only once its
rollout has completed. The rules are the service layer's (service/checkin.py, offers.py), the
same as for the JSON device API and the MQTT publisher; these routes parse, call and format.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response

from otakit.errors import (
    ConflictError,
    ForbiddenError,
    NoBoardError,
    NotFoundError,
    OtakitError,
    UnauthorizedError,
    UsageError,
)
from otakit.protocol import states
from otakit.protocol.jobdoc import (
    NO_UPDATE_AVAILABLE,
    RESULT_RECEIVED,
    UPDATE_AVAILABLE,
    JobDocument,
)
from otakit.server import downloads, identity, targeting
from otakit.server.context import Caller, Db, Rollouts, State, error_responses
from otakit.server.models import Artifact, Device, Token
from otakit.server.service import checkin, offers
from otakit.server.tokens import Role

router = APIRouter(
    tags=["original devices"], responses=error_responses(400, 401, 403, 404, 409, 422)
)

JSON_DOC = {
    "application/json": {"schema": {"type": "object", "additionalProperties": {"type": "string"}}}
}
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The whole file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {
        "description": "A range of the file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    416: {"description": "Range not satisfiable"},
}
RESULT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["Message"],
                    "properties": {
                        "Message": {"type": "string", "enum": ["Success", "Failure"]},
                        "File": {"type": "string"},
                        "Reason": {"type": "string"},
                    },
                }
            }
        },
    }
}


def _connection(request: Request) -> str:
    """The job's Connection: the scheme the device used. The original device stays on its
    server only when Connection is the one it used and Server and Port are empty (or its own
    host and port); otherwise it reconnects, with TLS only for "HTTPS" and to Port read with
    ``atoi`` (so a job that says "HTTP" to a device on HTTPS sends it to port 0). Server and
    Port stay empty: the port the device dialled is not known here (its Host header names no
    port, and a proxy may stand between). Behind a TLS proxy the scheme is the forwarded one
    (``X-Forwarded-Proto``, trusted from 127.0.0.1 or ``FORWARDED_ALLOW_IPS``)."""
    return "HTTPS" if request.url.scheme == "https" else "HTTP"


def _job(
    request: Request,
    offer: offers.Offer | None,
    device: Device | None,
    file: str,
    board: str | None,
) -> JobDocument:
    product = (device.product if device else None) or (offer.artifact.product if offer else None)
    identity = JobDocument(
        message=NO_UPDATE_AVAILABLE,
        manufacturer=(device.manufacturer if device else None) or "",
        manufacturer_id=(device.manufacturer_id if device else None) or "",
        product=product or "",
        serial_number=device.serial if device else "",
    )
    if offer is None:
        return identity
    version = targeting.version_of(offer.artifact.version)
    assert version is not None
    return replace(
        identity,
        message=UPDATE_AVAILABLE,
        version=version.short,
        board=offer.artifact.board or (device.board if device else None) or board or "",
        connection=_connection(request),
        server="",
        port="",
        file=file,
    )


def _job_response(request: Request, doc: JobDocument) -> Response:
    if doc.message == UPDATE_AVAILABLE and not doc.board:
        raise NoBoardError(
            "the deployed artifact names no board: set it on upload (?board=) or on the product",
        )
    try:
        body = doc.to_json()
    except OtakitError as exc:
        raise ConflictError(f"cannot build the job document: {exc.message}") from None
    return downloads.send_document(request, body, "application/json")


async def _device_for(db: Db, token: Token | None, serial: str) -> tuple[Device, int]:
    """A device whose jobs the caller may read (its own token, or an anonymous product), and
    the offers revision read with it."""
    device, at = await checkin.load(db, serial)
    if token is not None:
        if token.role == Role.ADMIN:
            pass
        elif token.role != Role.DEVICE or token.device_serial != serial:
            raise ForbiddenError("a device can only read its own jobs")
    else:
        products = (await offers.catalogue(db, at=at)).anonymous_products
        if device is None or device.product not in products:
            raise UnauthorizedError("this device needs its token")
    if device is None:
        raise NotFoundError(f"device {serial!r} is not registered")
    return device, at


def _visitor(request: Request, product: str) -> checkin.Visitor:
    return checkin.Visitor(
        product=product,
        address=request.client.host if request.client else "",
        user_agent=request.headers.get("user-agent", ""),
    )


async def _anonymous_job(
    request: Request, db: Db, st: State, engine: Rollouts, name: str | None
) -> Response:
    now = engine.now()
    product = await checkin.anonymous_product(db, name, now)
    offer, board = await checkin.anonymous_check_in(
        db, _visitor(request, product), now, keep=st.settings.anonymous_history
    )
    await db.commit()
    file = identity.product_file(product, offer.artifact.id, offer.artifact.name) if offer else ""
    return _job_response(request, _job(request, offer, None, file, board))


@router.get("/ota_update.json", responses={200: {"content": JSON_DOC}}, response_class=Response)
async def plain_job(
    request: Request, db: Db, st: State, token: Caller, engine: Rollouts
) -> Response:
    """The job document at the original device's default path: with a device token, that
    device's job; without one, the job of the one product that allows anonymous devices."""
    if token is not None and token.role == Role.DEVICE and token.device_serial:
        return await device_job(token.device_serial, request, db, token, engine)
    return await _anonymous_job(request, db, st, engine, None)


@router.get(
    "/products/{product}/ota_update.json",
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def product_job(
    product: str, request: Request, db: Db, st: State, token: Caller, engine: Rollouts
) -> Response:
    """The job document for the anonymous devices of one product."""
    if token is not None and token.role == Role.DEVICE and token.device_serial:
        return await device_job(token.device_serial, request, db, token, engine)
    return await _anonymous_job(request, db, st, engine, product)


@router.get(
    "/devices/{serial}/ota_update.json",
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def device_job(
    serial: str, request: Request, db: Db, token: Caller, engine: Rollouts
) -> Response:
    """One device's job document."""
    device, at = await _device_for(db, token, serial)
    now = engine.now()
    visit = await checkin.check_in(db, device, now, at=at)
    offer = visit.offer
    file = identity.device_file(serial, offer.artifact.id, offer.artifact.name) if offer else ""
    board = (await offers.catalogue(db, now, at=at)).product_board(offer)
    await db.commit()
    await engine.changed(visit.changed)
    return _job_response(request, _job(request, offer, device, file, board))


# --- files -------------------------------------------------------------------------------------


async def _serve(request: Request, st: State, artifact: Artifact) -> Response:
    return await downloads.send(request, await downloads.blob(st.blobs, artifact.id))


async def _artifact(db: Db, artifact_id: str, name: str) -> Artifact:
    artifact = await db.get(Artifact, artifact_id)
    if artifact is None or artifact.name != name:
        raise NotFoundError("no such file")
    return artifact


def _starts_download(request: Request) -> bool:
    """A GET of the file's first byte: the moment an anonymous device counts as downloading."""
    if request.method != "GET":
        return False
    match = re.fullmatch(r"bytes=0*-[0-9]*", (request.headers.get("range") or "bytes=0-").strip())
    return match is not None


async def _anonymous_file(
    request: Request,
    db: Db,
    st: State,
    token: Caller,
    engine: Rollouts,
    product: str,
    artifact: Artifact | None,
) -> Response:
    """The file a product's anonymous devices are offered (``artifact`` None: whichever it is,
    the direct flow); an administrator may read any."""
    if artifact is not None and token is not None and token.role == Role.ADMIN:
        return await _serve(request, st, artifact)
    offer = await checkin.anonymous_fetch(
        db,
        _visitor(request, product),
        engine.now(),
        artifact_id=artifact.id if artifact is not None else None,
        starts=_starts_download(request),
        keep=st.settings.anonymous_history,
    )
    await db.commit()
    return await _serve(request, st, offer.artifact)


async def _product_of(db: Db, artifact: Artifact, now: datetime) -> str:
    """The anonymous product whose offer ``artifact`` is (the paths without a product)."""
    product = await offers.product_of(db, artifact.id, now)
    if product is None:
        raise ForbiddenError("this file is not deployed to anonymous devices")
    return product


@router.api_route(
    "/products/{product}/files/{artifact_id}/{name}",
    methods=["GET", "HEAD"],
    responses=FILE_RESPONSES,
    response_class=Response,
)
async def product_file(
    product: str,
    artifact_id: str,
    name: str,
    request: Request,
    db: Db,
    st: State,
    token: Caller,
    engine: Rollouts,
) -> Response:
    """A file offered to a product's anonymous devices (their job document points here)."""
    artifact = await _artifact(db, artifact_id, name)
    name = await checkin.anonymous_product(db, product, engine.now())
    return await _anonymous_file(request, db, st, token, engine, name, artifact)


@router.api_route(
    "/files/{artifact_id}/{name}",
    methods=["GET", "HEAD"],
    responses=FILE_RESPONSES,
    response_class=Response,
)
async def anonymous_file(
    artifact_id: str,
    name: str,
    request: Request,
    db: Db,
    st: State,
    token: Caller,
    engine: Rollouts,
) -> Response:
    """A file deployed to anonymous devices (the path of earlier job documents)."""
    artifact = await _artifact(db, artifact_id, name)
    if token is not None and token.role == Role.ADMIN:
        return await _serve(request, st, artifact)
    product = await _product_of(db, artifact, engine.now())
    return await _anonymous_file(request, db, st, token, engine, product, artifact)


@router.api_route(
    "/devices/{serial}/files/{artifact_id}/{name}",
    methods=["GET", "HEAD"],
    responses=FILE_RESPONSES,
    response_class=Response,
)
async def device_file(
    serial: str,
    artifact_id: str,
    name: str,
    request: Request,
    db: Db,
    st: State,
    token: Caller,
    engine: Rollouts,
) -> Response:
    """A file deployed to this device (and, when phased, offered to it or being downloaded)."""
    device, _at = await _device_for(db, token, serial)
    artifact = await _artifact(db, artifact_id, name)
    refused = await offers.may_fetch(db, device, artifact.id, engine.now())
    if refused is not None:
        raise ForbiddenError(refused)
    return await _serve(request, st, artifact)


@router.api_route(
    "/ota-update.bin", methods=["GET", "HEAD"], responses=FILE_RESPONSES, response_class=Response
)
async def direct_file(
    request: Request, db: Db, st: State, token: Caller, engine: Rollouts
) -> Response:
    """The direct flow's file: what the one anonymous product is offered."""
    product = await checkin.anonymous_product(db, None, engine.now())
    return await _anonymous_file(request, db, st, token, engine, product, None)


@router.api_route(
    "/products/{product}/ota-update.bin",
    methods=["GET", "HEAD"],
    responses=FILE_RESPONSES,
    response_class=Response,
)
async def product_direct_file(
    product: str, request: Request, db: Db, st: State, token: Caller, engine: Rollouts
) -> Response:
    """The direct flow's file for one product's anonymous devices."""
    name = await checkin.anonymous_product(db, product, engine.now())
    return await _anonymous_file(request, db, st, token, engine, name, None)


# --- results -----------------------------------------------------------------------------------


async def _result(request: Request) -> tuple[str, str | None]:
    """(status, error) from a result body. An empty body, as the original device sends whatever
    happened, is ``unknown``: the device finished, the outcome is not said."""
    raw = await request.body()
    if not raw.strip():
        return states.DeviceState.UNKNOWN, None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise UsageError("the result body is not JSON") from None
    message = body.get("Message") if isinstance(body, dict) else None
    result = None
    if isinstance(body, dict) and isinstance(message, str):
        result = states.of_result(message, body.get("Reason") or body.get("Error"))
    if result is None:
        raise UsageError("the result Message must be 'Success' or 'Failure'")
    return result


def _received() -> Response:
    return Response(JobDocument(message=RESULT_RECEIVED).to_json(), media_type="application/json")


@router.post(
    "/devices/{serial}/files/{artifact_id}/{name}",
    openapi_extra=RESULT_BODY,
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def device_result(
    serial: str,
    artifact_id: str,
    name: str,
    request: Request,
    db: Db,
    st: State,
    token: Caller,
    engine: Rollouts,
) -> Response:
    """The device's result for the file it downloaded."""
    device, _at = await _device_for(db, token, serial)
    artifact = await _artifact(db, artifact_id, name)
    status, error = await _result(request)
    changed = await checkin.report(
        db,
        device.serial,
        engine.now(),
        status=status,
        error=error,
        artifact_id=artifact.id,
        keep=st.settings.history_per_device,
    )
    await db.commit()
    await engine.changed([changed])
    return _received()


async def _anonymous_result(
    request: Request,
    db: Db,
    st: State,
    engine: Rollouts,
    product: str,
    artifact: Artifact | None,
) -> Response:
    """A result from a device that did not identify itself: kept as an anonymous report and in
    the device's trace; it counts for no rollout."""
    status, error = await _result(request)
    await checkin.anonymous_report(
        db,
        _visitor(request, product),
        engine.now(),
        status=status,
        error=error,
        artifact_id=artifact.id if artifact is not None else None,
        keep=st.settings.anonymous_history,
    )
    await db.commit()
    return _received()


@router.post(
    "/products/{product}/files/{artifact_id}/{name}",
    openapi_extra=RESULT_BODY,
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def product_result(
    product: str,
    artifact_id: str,
    name: str,
    request: Request,
    db: Db,
    st: State,
    engine: Rollouts,
) -> Response:
    """A result from one of a product's anonymous devices."""
    artifact = await _artifact(db, artifact_id, name)
    name = await checkin.anonymous_product(db, product, engine.now())
    return await _anonymous_result(request, db, st, engine, name, artifact)


@router.post(
    "/files/{artifact_id}/{name}",
    openapi_extra=RESULT_BODY,
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def anonymous_result(
    artifact_id: str, name: str, request: Request, db: Db, st: State, engine: Rollouts
) -> Response:
    """A result posted to the file path of earlier job documents."""
    artifact = await _artifact(db, artifact_id, name)
    product = await _product_of(db, artifact, engine.now())
    return await _anonymous_result(request, db, st, engine, product, artifact)


@router.post(
    "/ota-update.bin",
    openapi_extra=RESULT_BODY,
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def direct_result(request: Request, db: Db, st: State, engine: Rollouts) -> Response:
    """The direct flow's result."""
    product = await checkin.anonymous_product(db, None, engine.now())
    return await _anonymous_result(request, db, st, engine, product, None)


@router.post(
    "/products/{product}/ota-update.bin",
    openapi_extra=RESULT_BODY,
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def product_direct_result(
    product: str, request: Request, db: Db, st: State, engine: Rollouts
) -> Response:
    """The direct flow's result from one product's anonymous devices."""
    name = await checkin.anonymous_product(db, product, engine.now())
    return await _anonymous_result(request, db, st, engine, name, None)
