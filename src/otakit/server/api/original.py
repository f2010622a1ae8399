"""What devices running the original middleware use, unchanged (protocols.md §1-2), and the
signed download URLs of the JSON API.

- ``GET /ota_update.json``: the job document. With a device token it is that device's job;
  without one it is the best deployment of the products that allow anonymous access
  (off by default), for devices that do not identify themselves.
- ``GET /devices/{serial}/ota_update.json``: one device's job document.
- ``GET|HEAD /files/{id}/{name}``, ``/devices/{serial}/files/{id}/{name}``: image bytes, with
  ``Range``/``206``/``Content-Range``/``416``, ``ETag`` (the SHA-256) and ``If-Range``.
- ``GET|HEAD /ota-update.bin``: the direct flow's file (anonymous products).
- ``POST`` to any file path: the result, ``{"Message": "Success"|"Failure", "File": ...}``, with
  or without a body (the original sends none). Results from devices that do not identify
  themselves are kept as history only (they count for no rollout), the newest
  ``ServerSettings.anonymous_history`` of them.
- ``GET|HEAD /dl/{id}/{name}?expires=..&sig=..``: expiring signed URLs (403 when expired or
  forged); anyone holding a valid URL may download. Served by ``downloads.SignedDownloads``
  in front of the web framework.

A device with nothing newer gets a "No Update Available" document of the same shape; so does a
device whose rollout phase is not open yet, outside the rollout's maintenance window, or after
the rollout was paused or aborted (server/rollout.py). A file is served only to a device its
deployment is offered to (or that is in the middle of downloading it); an aborted rollout's
files to nobody. Devices that do not identify themselves get a phased deployment only once its
rollout has completed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from otakit.errors import OtakitError
from otakit.protocol.jobdoc import (
    NO_UPDATE_AVAILABLE,
    RESULT_RECEIVED,
    UPDATE_AVAILABLE,
    JobDocument,
)
from otakit.server import deployments, downloads
from otakit.server import rollout as rollouts
from otakit.server.context import Caller, Db, HttpError, State, error_responses
from otakit.server.models import Artifact, Device, Product, Token
from otakit.server.targeting import PRODUCT_TAG, matches, parse_condition
from otakit.server.tokens import Role
from otakit.server.twin import download_path

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


async def _anonymous_products(db: Db) -> set[str]:
    return set(await db.scalars(select(Product.name).where(Product.anonymous.is_(True))))


def _job(
    offer: deployments.Offer | None, device: Device | None, file: str, board: str | None
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
    version = deployments.version_of(offer.artifact.version)
    assert version is not None
    return replace(
        identity,
        message=UPDATE_AVAILABLE,
        version=version.short,
        board=offer.artifact.board or (device.board if device else None) or board or "",
        connection="HTTP",
        server="",
        port="",
        file=file,
    )


async def _product_board(db: Db, offer: deployments.Offer | None) -> str | None:
    if offer is None:
        return None
    name = parse_condition(offer.deployment.condition).get(PRODUCT_TAG) or offer.artifact.product
    product = await db.get(Product, name) if name else None
    return product.board if product else None


def _job_response(doc: JobDocument) -> Response:
    if doc.message == UPDATE_AVAILABLE and not doc.board:
        raise HttpError(
            409,
            "NO_BOARD",
            "the deployed artifact names no board: set it on upload (?board=) or on the product",
        )
    try:
        body = doc.to_json()
    except OtakitError as exc:
        raise HttpError(409, exc.code, f"cannot build the job document: {exc.message}") from None
    return Response(body, media_type="application/json")


async def _device_for(db: Db, token: Token | None, serial: str) -> Device:
    """A device whose jobs the caller may read: its own token, or an anonymous product."""
    device = await db.get(Device, serial)
    if token is not None:
        if token.role == Role.ADMIN:
            pass
        elif token.role != Role.DEVICE or token.device_serial != serial:
            raise HttpError(403, "FORBIDDEN", "a device can only read its own jobs")
    else:
        product = await db.get(Product, device.product) if device and device.product else None
        if product is None or not product.anonymous:
            raise HttpError(401, "UNAUTHORIZED", "this device needs its token")
    if device is None:
        raise HttpError(404, "NOT_FOUND", f"device {serial!r} is not registered")
    return device


@router.get("/ota_update.json", responses={200: {"content": JSON_DOC}}, response_class=Response)
async def plain_job(db: Db, token: Caller, engine: rollouts.Rollouts) -> Response:
    """The job document at the original device's default path."""
    if token is not None and token.role == Role.DEVICE and token.device_serial:
        return await device_job(token.device_serial, db, token, engine)
    products = await _anonymous_products(db)
    if not products:
        raise HttpError(401, "UNAUTHORIZED", "no product allows anonymous devices; send a token")
    now = engine.now()
    offer = deployments.select_for_products(products, await deployments.active(db, now), now)
    file = download_path(offer.artifact).replace("/dl/", "/files/", 1) if offer else ""
    return _job_response(_job(offer, None, file, await _product_board(db, offer)))


@router.get(
    "/devices/{serial}/ota_update.json",
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def device_job(serial: str, db: Db, token: Caller, engine: rollouts.Rollouts) -> Response:
    """One device's job document."""
    device = await _device_for(db, token, serial)
    now = engine.now()
    device.last_seen = now
    offer = await deployments.offer_for(db, device, now)
    file = f"/devices/{serial}/files/{offer.artifact.id}/{offer.artifact.name}" if offer else ""
    board = await _product_board(db, offer)
    await db.commit()
    return _job_response(_job(offer, device, file, board))


# --- files -------------------------------------------------------------------------------------


async def _serve(request: Request, st: State, artifact: Artifact) -> Response:
    return await downloads.send(request, await downloads.blob(st.blobs, artifact.id))


async def _artifact(db: Db, artifact_id: str, name: str) -> Artifact:
    artifact = await db.get(Artifact, artifact_id)
    if artifact is None or artifact.name != name:
        raise HttpError(404, "NOT_FOUND", "no such file")
    return artifact


async def _anonymous_offer(db: Db, now: datetime) -> deployments.Offer:
    products = await _anonymous_products(db)
    offer = (
        deployments.select_for_products(products, await deployments.active(db, now), now)
        if products
        else None
    )
    if offer is None:
        raise HttpError(404, "NOT_FOUND", "no file is deployed to anonymous devices")
    return offer


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
    engine: rollouts.Rollouts,
) -> Response:
    """A file deployed to anonymous devices (the plain job document points here)."""
    artifact = await _artifact(db, artifact_id, name)
    if token is None or token.role != Role.ADMIN:
        offer = await _anonymous_offer(db, engine.now())
        if offer.artifact.id != artifact.id:
            raise HttpError(403, "FORBIDDEN", "this file is not deployed to anonymous devices")
    return await _serve(request, st, artifact)


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
    engine: rollouts.Rollouts,
) -> Response:
    """A file deployed to this device (and, when phased, offered to it or being downloaded)."""
    device = await _device_for(db, token, serial)
    artifact = await _artifact(db, artifact_id, name)
    now = engine.now()
    offers = [o for o in await deployments.active(db, now) if o.artifact.id == artifact.id]
    tags = deployments.device_tags(device)
    offers = [o for o in offers if matches(parse_condition(o.deployment.condition), tags)]
    if not offers:
        raise HttpError(403, "FORBIDDEN", "this file is not deployed to this device")
    if all(o.rollout is not None for o in offers):
        standing = await deployments.standing_of(db, device.serial)
        if not any(rollouts.may_download(o.rollout, device, standing) for o in offers if o.rollout):
            raise HttpError(403, "FORBIDDEN", "this file is not offered to this device yet")
    return await _serve(request, st, artifact)


@router.api_route(
    "/ota-update.bin", methods=["GET", "HEAD"], responses=FILE_RESPONSES, response_class=Response
)
async def direct_file(request: Request, db: Db, st: State, engine: rollouts.Rollouts) -> Response:
    """The direct flow's file: what is deployed to anonymous devices."""
    return await _serve(request, st, (await _anonymous_offer(db, engine.now())).artifact)


# --- results -----------------------------------------------------------------------------------


async def _result(request: Request) -> tuple[str, str | None]:
    """(status, error) from a result body; an empty body means success, as the original sends."""
    raw = await request.body()
    if not raw.strip():
        return "applying", None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise HttpError(400, "BADARG", "the result body is not JSON") from None
    message = body.get("Message") if isinstance(body, dict) else None
    if message == "Success":
        return "applying", None
    if message == "Failure":
        reason = body.get("Reason") or body.get("Error")
        return "error", str(reason)[:64] if reason else "MCU Download fail"
    raise HttpError(400, "BADARG", "the result Message must be 'Success' or 'Failure'")


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
    engine: rollouts.Rollouts,
) -> Response:
    """The device's result for the file it downloaded."""
    device = await _device_for(db, token, serial)
    artifact = await _artifact(db, artifact_id, name)
    status, error = await _result(request)
    now = engine.now()
    deployment_id = await deployments.attribute(db, device, now, artifact_id=artifact.id)
    changed = await deployments.record_status(
        db,
        serial=device.serial,
        deployment_id=deployment_id,
        status=status,
        error=error,
        now=now,
        keep=st.settings.history_per_device,
    )
    await db.commit()
    await engine.changed([changed])
    return _received()


@router.post(
    "/files/{artifact_id}/{name}",
    openapi_extra=RESULT_BODY,
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def anonymous_result(
    artifact_id: str, name: str, request: Request, db: Db, st: State, engine: rollouts.Rollouts
) -> Response:
    """A result from a device that did not identify itself (kept as an anonymous report)."""
    artifact = await _artifact(db, artifact_id, name)
    status, error = await _result(request)
    now = engine.now()
    offer = await _anonymous_offer(db, now)
    deployment_id = offer.deployment.id if offer.artifact.id == artifact.id else None
    await deployments.record_status(
        db,
        serial=None,
        deployment_id=deployment_id,
        status=status,
        error=error,
        now=now,
        keep=st.settings.anonymous_history,
    )
    await db.commit()
    return _received()


@router.post(
    "/ota-update.bin",
    openapi_extra=RESULT_BODY,
    responses={200: {"content": JSON_DOC}},
    response_class=Response,
)
async def direct_result(request: Request, db: Db, st: State, engine: rollouts.Rollouts) -> Response:
    """The direct flow's result."""
    now = engine.now()
    offer = await _anonymous_offer(db, now)
    status, error = await _result(request)
    await deployments.record_status(
        db,
        serial=None,
        deployment_id=offer.deployment.id,
        status=status,
        error=error,
        now=now,
        keep=st.settings.anonymous_history,
    )
    await db.commit()
    return _received()
