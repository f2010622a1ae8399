"""Management API (``/api/v1``): products, trusted keys, artifacts, devices and their status
history, deployments, rollouts, tokens. Every GET takes an admin or a viewer token (Reader);
everything that changes something takes an admin token (Admin). The routes are adapters: the
rules live in the service layer (server/service/), which also records each operator action in
the audit log (service/audit.py).

The router also brings the rollout engine's lifespan (context.rollout_engine; the engine is
service/rollouts.py): one engine per server process, evaluating rollouts in the background.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from otakit.errors import (
    ConflictError,
    NotFoundError,
    TooLargeError,
)
from otakit.server import anonymous, downloads, identity, targeting
from otakit.server.context import (
    Admin,
    Db,
    Reader,
    Rollouts,
    State,
    error_responses,
    rollout_engine,
)
from otakit.server.models import (
    Artifact,
    ArtifactDelta,
    Deployment,
    Device,
    Product,
    Rollout,
    RolloutEvent,
    Token,
    TrustedKey,
    utcnow,
)
from otakit.server.service import artifacts as artifact_service
from otakit.server.service import audit, listings, reports, revision, rollouts
from otakit.server.service import deltas as delta_service
from otakit.server.service import deployments as deployment_service
from otakit.server.service import keys as key_service
from otakit.server.service import products as product_service
from otakit.server.service import tokens as token_service
from otakit.server.targeting import (
    GROUP_TAG,
    PRODUCT_TAG,
)
from otakit.server.tokens import Role, revoke_device_tokens
from otakit.server.twin import Twin, twin_of

router = APIRouter(
    prefix="/api/v1",
    tags=["management"],
    responses=error_responses(400, 401, 403, 404, 409, 413, 422, 507),
    lifespan=rollout_engine,
)

BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
PEM_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
    }
}


ARTIFACT_ID = r"^[0-9a-fA-F]+$"  # a SHA-256 in hex, or a prefix of it (artifacts.resolve)


def not_found(what: str) -> NotFoundError:
    return NotFoundError(f"{what} not found")


# --- products ----------------------------------------------------------------------------------


class ProductSettings(BaseModel):
    board: identity.Board | None = None
    allow_raw: bool = False
    anonymous: bool = False
    self_register: bool = False


class ProductOut(ProductSettings):
    name: str


class ProductChanges(BaseModel):
    """The settings to change; absent ones (and null booleans) are left as they are."""

    model_config = ConfigDict(extra="forbid")

    board: identity.Board | None = Field(default=None, description="null: no board.")
    allow_raw: bool | None = None
    anonymous: bool | None = None
    self_register: bool | None = None


def _product(p: Product) -> ProductOut:
    return ProductOut(
        name=p.name,
        board=p.board,
        allow_raw=p.allow_raw,
        anonymous=p.anonymous,
        self_register=p.self_register,
    )


@router.put("/products/{name}", response_model=ProductOut)
async def put_product(
    name: identity.ProductName, settings: ProductSettings, db: Db, admin: Admin
) -> ProductOut:
    """Create a product or replace its whole policy (settings not given get their defaults)."""
    product = await product_service.set_policy(
        db, name, settings.model_dump(), replace=True, actor=audit.actor_of(admin)
    )
    return _product(product)


@router.patch("/products/{name}", response_model=ProductOut)
async def patch_product(
    name: identity.ProductName, changes: ProductChanges, db: Db, admin: Admin
) -> ProductOut:
    """Change only the settings given; creates the product (defaults for the rest) if missing."""
    given = changes.model_dump(exclude_unset=True)
    wanted = {k: v for k, v in given.items() if v is not None or k == "board"}
    product = await product_service.set_policy(db, name, wanted, actor=audit.actor_of(admin))
    return _product(product)


@router.get("/products", response_model=list[ProductOut])
async def list_products(db: Db, _reader: Reader) -> list[ProductOut]:
    return [_product(p) for p in await product_service.listing(db)]


@router.get("/products/{name}", response_model=ProductOut)
async def get_product(name: str, db: Db, _reader: Reader) -> ProductOut:
    return _product(await product_service.get(db, name))


# --- trusted keys ------------------------------------------------------------------------------


class KeyOut(BaseModel):
    fingerprint: str
    key_type: str
    pem: str


def _key(k: TrustedKey) -> KeyOut:
    return KeyOut(fingerprint=k.fingerprint, key_type=k.key_type, pem=k.pem)


@router.post("/keys", response_model=KeyOut, status_code=201, openapi_extra=PEM_BODY)
async def add_key(request: Request, db: Db, admin: Admin) -> KeyOut:
    """Trust a public key (PEM). A private key is refused (422 ``PRIVATE_KEY``) and nothing
    is stored: send only its public part (``otakit key trust KEY.pem`` does)."""
    body = await request.body()
    if len(body) > key_service.MAX_PEM:
        raise TooLargeError("a PEM key is at most 64 KiB")
    return _key(await key_service.trust(db, body, actor=audit.actor_of(admin)))


@router.get("/keys", response_model=list[KeyOut])
async def list_keys(db: Db, _reader: Reader) -> list[KeyOut]:
    return [_key(k) for k in await key_service.listing(db)]


@router.delete("/keys/{fingerprint}", status_code=204)
async def delete_key(fingerprint: str, db: Db, admin: Admin) -> Response:
    await key_service.remove(db, fingerprint, actor=audit.actor_of(admin))
    return Response(status_code=204)


# --- artifacts ---------------------------------------------------------------------------------


class ArtifactOut(BaseModel):
    id: str
    sha256: str
    sha1: str | None = Field(
        description="Null for an artifact uploaded before SHA-1 and MD5 were kept, until it is "
        "deployed (or uploaded again)."
    )
    md5: str | None
    name: str
    container: str
    kind: str
    version: str
    size: int
    board: str | None
    product: str | None
    signature: str
    signed_by: str | None
    details: dict[str, Any]
    created_at: datetime
    image_sha256: str | None = Field(
        default=None,
        description="An image's identity as a delta's base or result: SHA-256 of the image "
        "proper (header to the end of its TLVs); null for other kinds, and for an image "
        "uploaded before it was kept, until it is deployed.",
    )
    image_size: int | None = None
    deltas: list[DeltaOut] | None = Field(
        default=None,
        description="Binary deltas to this image from earlier ones (GET /artifacts/{id} only; "
        "null in lists and upload answers).",
    )


class DeltaOut(BaseModel):
    base_sha256: str = Field(description="image_sha256 of the image the delta starts from")
    base_artifact_id: str | None
    compression: str
    state: str = Field(description="queued, making, ready, not-smaller or failed")
    progress: int = Field(description="0 to 100")
    size: int | None = Field(description="Bytes of the patch (ready, not-smaller)")
    ratio: float | None = Field(description="Image size / patch size")
    error: str | None = Field(default=None, description="Why it failed (one line)")


ArtifactOut.model_rebuild()


def _artifact(a: Artifact, deltas: Sequence[ArtifactDelta] | None = None) -> ArtifactOut:
    return ArtifactOut(
        id=a.id,
        sha256=a.id,
        sha1=a.sha1,
        md5=a.md5,
        name=a.name,
        container=a.container,
        kind=a.kind,
        version=a.version,
        size=a.size,
        board=a.board,
        product=a.product,
        signature=a.signature,
        signed_by=a.signed_by,
        details=a.details,
        created_at=a.created_at,
        image_sha256=a.image_sha256,
        image_size=a.image_size,
        deltas=None
        if deltas is None
        else [DeltaOut(**delta_service.record(d, a.image_size).as_dict()) for d in deltas],
    )


@router.post(
    "/artifacts",
    response_model=ArtifactOut,
    status_code=201,
    openapi_extra=BINARY_BODY,
    responses={200: {"model": ArtifactOut, "description": "Already uploaded (same SHA-256)"}},
)
async def upload_artifact(
    request: Request,
    response: Response,
    db: Db,
    st: State,
    admin: Admin,
    name: str = Query(
        min_length=1, max_length=identity.MAX_ARTIFACT_NAME, pattern=r"^[A-Za-z0-9._+-]+$"
    ),
    version: str | None = Query(default=None, max_length=32),
    board: Annotated[identity.Board | None, Query()] = None,
    product: str | None = Query(default=None, max_length=64),
    container: str = Query(
        default="ota", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$"
    ),
    expect_version: str | None = Query(
        default=None,
        max_length=32,
        description="Refuse the upload (422 VERSION_MISMATCH, nothing stored) unless its "
        "version is this (a raw file without ?version= takes this one).",
    ),
) -> ArtifactOut:
    """Upload a signed MCUboot image, a TAR package or (if the product allows) a raw file.

    The body is streamed to disk; the artifact is identified by its SHA-256, so uploading the
    same bytes again returns the existing record (200). A different binary with a version its
    product already has is refused (409 ``VERSION_TAKEN``); a full disk is 507
    ``STORAGE_FULL``. A refused upload leaves nothing behind.
    """
    # before receiving the body
    await artifact_service.product_of(db, product)
    artifact_service.expected_version(expect_version)
    tmp_dir = st.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    tmp = Path(tmp_name)
    try:
        digests, size = await _receive(request, fd, st.settings.max_upload)
        upload = artifact_service.Upload(name, version, board, product, container, expect_version)
        artifact, created = await artifact_service.add(
            db, st.blobs, tmp, digests, size, upload, actor=audit.actor_of(admin)
        )
        if not created:
            response.status_code = 200
        return _artifact(artifact)
    finally:
        tmp.unlink(missing_ok=True)


async def _receive(request: Request, fd: int, limit: int) -> tuple[artifact_service.Digests, int]:
    """Stream the body into ``fd``, hashing it on the way (SHA-256, SHA-1, MD5): each chunk is
    hashed and written in one worker-thread call, so the event loop only passes chunks on."""
    hasher = artifact_service.Hasher()
    async with await anyio.open_file(fd, "wb", closefd=True) as out:
        sink = out.wrapped

        def take(chunk: bytes) -> None:
            hasher.update(chunk)
            sink.write(chunk)

        async for chunk in request.stream():
            if not chunk:
                continue
            if hasher.size + len(chunk) > limit:
                raise TooLargeError(f"uploads are limited to {limit} bytes")
            await anyio.to_thread.run_sync(take, chunk)
    return hasher.digests(), hasher.size


# --- paging: a list answers one page; the next page's cursor is in the headers ------------------

Limit = Annotated[int, Query(ge=1, le=listings.MAX_LIMIT, description="Items per page.")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="The X-Next-Cursor of the page before (opaque)."),
]
PAGED: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "X-Next-Cursor": {
                "description": "The cursor of the next page; absent on the last page.",
                "schema": {"type": "string"},
            },
            "Link": {
                "description": 'The next page, rel="next"; absent on the last page.',
                "schema": {"type": "string"},
            },
        }
    }
}


def paged(request: Request, response: Response, next_cursor: str | None) -> None:
    """Name the next page in the answer's headers (the body stays a plain JSON list)."""
    if next_cursor is None:
        return
    url = request.url.include_query_params(cursor=next_cursor)
    response.headers["X-Next-Cursor"] = next_cursor
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'


@router.get("/artifacts", response_model=list[ArtifactOut], responses=PAGED)
async def list_artifacts(
    request: Request,
    response: Response,
    db: Db,
    _reader: Reader,
    product: str | None = Query(default=None, max_length=64),
    board: str | None = Query(default=None, max_length=48),
    name: str | None = Query(default=None, max_length=identity.MAX_ARTIFACT_NAME),
    version: str | None = Query(default=None, max_length=32, description="Starts with."),
    limit: Limit = listings.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> list[ArtifactOut]:
    """Artifacts, newest first, one page at a time."""
    where = listings.ArtifactFilter(product=product, board=board, name=name, version=version)
    found = await listings.artifacts(db, where, limit=limit, cursor=cursor)
    paged(request, response, found.next)
    return [_artifact(a) for a in found.items]


ArtifactId = Annotated[
    str,
    PathParam(
        min_length=artifact_service.MIN_PREFIX,
        max_length=64,
        pattern=ARTIFACT_ID,
        description="The SHA-256, or a prefix of at least 12 hex digits "
        "(409 AMBIGUOUS if several artifacts start with it).",
    ),
]


@router.get("/artifacts/{artifact_id}", response_model=ArtifactOut)
async def get_artifact(artifact_id: ArtifactId, db: Db, _reader: Reader) -> ArtifactOut:
    """An artifact, with its deltas (``deltas``)."""
    artifact = await artifact_service.find(db, artifact_id)
    return _artifact(artifact, await delta_service.listing(db, artifact.id))


@router.delete("/artifacts/{artifact_id}", status_code=204)
async def delete_artifact(artifact_id: ArtifactId, db: Db, st: State, admin: Admin) -> Response:
    """Delete an artifact; refused (409) while an active deployment uses it."""
    removed = await artifact_service.remove(db, st.blobs, artifact_id, actor=audit.actor_of(admin))
    downloads.forget(removed)
    return Response(status_code=204)


# --- devices -----------------------------------------------------------------------------------


class DeviceIn(BaseModel):
    product: identity.ProductName | None = None
    group: str | None = Field(default=None, max_length=64)
    board: identity.Board | None = None
    manufacturer: identity.Manufacturer | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    version: str | None = Field(default=None, max_length=32)


class DeviceOut(BaseModel):
    serial: str
    product: str | None
    board: str | None
    manufacturer: str | None
    manufacturer_id: str | None
    tags: dict[str, str]
    version: str | None
    last_seen: datetime | None
    status: str | None
    error: str | None


def device_out(d: Device) -> DeviceOut:
    return DeviceOut(
        serial=d.serial,
        product=d.product,
        board=d.board,
        manufacturer=d.manufacturer,
        manufacturer_id=d.manufacturer_id,
        tags=targeting.shown_tags(d),
        version=d.version,
        last_seen=d.last_seen,
        status=d.status,
        error=d.error,
    )


def _device_filter(
    product: str | None = Query(default=None, max_length=64),
    group: str | None = Query(default=None, max_length=64),
    status: Annotated[
        listings.DeviceStatus | None,
        Query(description="A device state (protocol/states.py) or none (never reported)."),
    ] = None,
    version: str | None = Query(default=None, max_length=32, description="Starts with."),
    q: str | None = Query(default=None, max_length=64, description="The serial starts with."),
) -> listings.DeviceFilter:
    return listings.DeviceFilter(product, group, status, version, q)


DeviceFilter = Annotated[listings.DeviceFilter, Depends(_device_filter)]


@router.get("/devices", response_model=list[DeviceOut], responses=PAGED)
async def list_devices(
    request: Request,
    response: Response,
    db: Db,
    _reader: Reader,
    where: DeviceFilter,
    sort: listings.DeviceSort = "serial",
    limit: Limit = listings.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> list[DeviceOut]:
    """Registered devices matching every filter given, one page at a time (``sort``: a leading
    ``-`` sorts descending; devices never seen sort as the oldest)."""
    found = await listings.devices(db, where, sort=sort, limit=limit, cursor=cursor)
    paged(request, response, found.next)
    return [device_out(d) for d in found.items]


class DeviceCountsOut(BaseModel):
    total: int = Field(description="Devices matching the filters other than status.")
    statuses: dict[str, int] = Field(
        description="Of those, per status (a device state, or none: never reported)."
    )


@router.get("/device-counts", response_model=DeviceCountsOut)
async def device_counts(db: Db, _reader: Reader, where: DeviceFilter) -> DeviceCountsOut:
    """How many devices match the filters (``status`` aside), and how many per status: one
    grouped count, for the dashboard's summary next to a page."""
    found = await listings.device_counts(db, where)
    return DeviceCountsOut(total=found.total, statuses=found.statuses)


@router.get("/devices/{serial}", response_model=DeviceOut)
async def get_device(serial: str, db: Db, _reader: Reader) -> DeviceOut:
    device = await db.get(Device, serial)
    if device is None:
        raise not_found(f"device {serial!r}")
    return device_out(device)


@router.put("/devices/{serial}", response_model=DeviceOut)
async def put_device(
    serial: identity.Serial, body: DeviceIn, db: Db, admin: Admin, engine: Rollouts
) -> DeviceOut:
    """Register a device or update its identity and tags. A new version counts as a check-in
    with it: a device given a deployment's version has applied it."""
    device = await db.get(Device, serial) or Device(serial=serial, tags={})
    version_changed = body.version is not None and body.version != device.version
    tags = dict(body.tags)
    if body.product:
        device.product = body.product
        tags[PRODUCT_TAG] = body.product
    if body.group:
        tags[GROUP_TAG] = body.group
    device.tags = {**(device.tags or {}), **tags}
    for field in ("board", "manufacturer", "version"):
        value = getattr(body, field)
        if value is not None:
            setattr(device, field, value)
    db.add(device)
    audit.record(
        db,
        actor=audit.actor_of(admin),
        action="device.set",
        target=f"device {serial}",
        details=body.model_dump(exclude_defaults=True),
    )
    changed: set[int] = set()
    if version_changed:
        await db.flush()
        changed = await reports.note_checkin(db, device, now=engine.now(), source="admin")
    await db.commit()
    await engine.changed(changed)
    return device_out(device)


@router.delete("/devices/{serial}", status_code=204)
async def delete_device(serial: str, db: Db, admin: Admin) -> Response:
    """Delete a device and revoke its tokens: a device later registered with the same serial
    is another device and gets a token of its own."""
    device = await db.get(Device, serial)
    if device is None:
        raise not_found(f"device {serial!r}")
    await revoke_device_tokens(db, serial, utcnow())
    await rollouts.forget_device(db, serial)  # it leaves the rollouts' counts
    await db.delete(device)
    audit.record(db, actor=audit.actor_of(admin), action="device.delete", target=f"device {serial}")
    await db.commit()
    return Response(status_code=204)


class HistoryEntry(BaseModel):
    """One report: as the device sent it (``device``), what a check-in showed (``checkin``),
    what an operator set (``admin``: the version it runs) or what the server concluded
    (``server``: not confirmed in time)."""

    id: int
    at: datetime
    status: str
    error: str | None
    version: str | None
    deployment_id: int | None
    boots: int | None
    source: str


@router.get("/devices/{serial}/history", response_model=list[HistoryEntry], responses=PAGED)
async def device_history(
    serial: str,
    request: Request,
    response: Response,
    db: Db,
    _reader: Reader,
    limit: Limit = listings.DEFAULT_LIMIT,
    cursor: Cursor = None,
    before: int | None = Query(default=None, ge=1, le=2**63 - 1, description="Older than this id."),
) -> list[HistoryEntry]:
    """The device's status reports, newest first, one page at a time (``cursor``, or
    ``before``: older than that entry)."""
    if await db.get(Device, serial) is None:
        raise not_found(f"device {serial!r}")
    found = await listings.history(db, serial, limit=limit, cursor=cursor, before=before)
    paged(request, response, found.next)
    rows = found.items
    return [
        HistoryEntry(
            id=r.id,
            at=r.created_at,
            status=r.status,
            error=r.error,
            version=r.version,
            deployment_id=r.deployment_id,
            boots=r.boots,
            source=r.source,
        )
        for r in rows
    ]


@router.get("/devices/{serial}/twin", response_model=Twin)
async def device_twin(serial: str, request: Request, db: Db, st: State, _reader: Reader) -> Twin:
    """Desired and reported state (``extFwInfo``) of one device."""
    device = await db.get(Device, serial)
    if device is None:
        raise not_found(f"device {serial!r}")
    return await twin_of(db, st, device, str(request.base_url))


# --- deployments -------------------------------------------------------------------------------


class DeploymentIn(BaseModel):
    artifact_id: str = Field(
        min_length=artifact_service.MIN_PREFIX,
        max_length=64,
        pattern=ARTIFACT_ID,
        description="The artifact's SHA-256, or a prefix of at least 12 hex digits.",
    )
    product: str | None = Field(default=None, max_length=64)
    group: str | None = Field(default=None, max_length=64)
    board: identity.Board | None = Field(
        default=None, description="Only devices of this board (with product or condition)."
    )
    condition: str | None = Field(default=None, max_length=1024)
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    expiry_days: float = Field(default=365, gt=0, le=3650)
    downgrade: bool = False


class DeploymentOut(BaseModel):
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
    counts: dict[str, int] = Field(
        description="Devices per state: Downloading, Interrupted, Applying, Applied, Error "
        "(error or invalid), Reverted (ran the version and went back) and Unknown (the device "
        "posted an empty result, as the original middleware does); each device counts once."
    )
    anonymous: dict[str, int] = Field(
        default_factory=dict,
        description="Devices that send no token (told apart by address and User-Agent), per "
        "state: Offered (fetched the job only), Downloading, ..., Unknown (an empty result).",
    )
    rollout_id: int | None = None
    targeted: int | None = Field(
        default=None,
        description="Registered devices its target matches now (product, group, board); "
        "null for a condition on other tags (not counted).",
    )
    existing: bool = Field(
        default=False,
        description="POST: an identical active deployment (same artifact and target) was "
        "given back (200) instead of making a second one (201).",
    )


def _deployment(view: deployment_service.DeploymentView) -> DeploymentOut:
    return DeploymentOut.model_validate(view, from_attributes=True)


def _spec(body: DeploymentIn) -> deployment_service.DeploymentSpec:
    return deployment_service.DeploymentSpec(**body.model_dump())


@router.post(
    "/deployments",
    response_model=DeploymentOut,
    status_code=201,
    responses={200: {"model": DeploymentOut, "description": "Already deployed (existing)"}},
)
async def create_deployment(
    body: DeploymentIn, response: Response, db: Db, st: State, admin: Admin
) -> DeploymentOut:
    """Deploy an artifact to a product and group (and board), or to devices matching a tag
    condition.

    It is offered at once to every targeted device; to phase it, create it with its rollout
    (``POST /rollouts`` with ``deployment``). The same artifact to the same target while such a
    deployment is active gives that one back (200, ``existing`` true)."""
    view = await deployment_service.deploy(
        db,
        _spec(body),
        blobs=st.blobs,
        actor=audit.actor_of(admin),
        delta_compression=st.settings.delta_compression,
    )
    if view.existing:
        response.status_code = 200
    return _deployment(view)


@router.get("/deployments", response_model=list[DeploymentOut], responses=PAGED)
async def list_deployments(
    request: Request,
    response: Response,
    db: Db,
    _reader: Reader,
    active: bool | None = Query(default=None, description="Only active (or only finished)."),
    artifact: str | None = Query(
        default=None,
        min_length=artifact_service.MIN_PREFIX,
        max_length=64,
        pattern=ARTIFACT_ID,
        description="Of this artifact (its SHA-256 or a prefix of at least 12 hex digits).",
    ),
    limit: Limit = listings.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> list[DeploymentOut]:
    """Deployments, newest first, with their counts, one page at a time."""
    found = await deployment_service.listing(
        db, active=active, artifact_id=artifact, limit=limit, cursor=cursor
    )
    paged(request, response, found.next)
    return [_deployment(v) for v in found.items]


# a row id: a value past the database's integer is not a row (and never reaches the database)
DeploymentId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


@router.get("/deployments/{deployment_id}", response_model=DeploymentOut)
async def get_deployment(deployment_id: DeploymentId, db: Db, _reader: Reader) -> DeploymentOut:
    return _deployment(await deployment_service.get(db, deployment_id))


@router.post("/deployments/{deployment_id}/cancel", response_model=DeploymentOut)
async def cancel_deployment(deployment_id: DeploymentId, db: Db, admin: Admin) -> DeploymentOut:
    """Stop offering the deployment (devices that got it keep it)."""
    view = await deployment_service.cancel(db, deployment_id, actor=audit.actor_of(admin))
    return _deployment(view)


# --- rollouts ----------------------------------------------------------------------------------

RolloutId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
Seconds = Annotated[int, Field(ge=0, le=365 * 86400)]


class AnonymousDeviceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    product: str
    address: str
    user_agent: str
    deployment_id: int | None
    status: str | None = Field(description="None: it fetched its job only (Offered).")
    error: str | None
    first_seen: datetime
    last_seen: datetime


@router.get("/anonymous-devices", response_model=list[AnonymousDeviceOut])
async def list_anonymous_devices(
    db: Db,
    _reader: Reader,
    product: str | None = None,
    deployment: int | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AnonymousDeviceOut]:
    """Devices that send no token, most recently seen first (server/anonymous.py)."""
    rows = await anonymous.listing(db, product=product, deployment_id=deployment, limit=limit)
    return [AnonymousDeviceOut.model_validate(r) for r in rows]


class _PhaseRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    success: float = Field(
        default=rollouts.DEFAULT_SUCCESS,
        ge=0,
        le=100,
        description="Percent of the phase's devices applied and healthy to advance.",
    )
    manual: bool = Field(default=False, description="Advance only on approval.")
    max_errors: int | None = Field(
        default=None, ge=0, le=10**9, description="Failed devices allowed; one more trips."
    )
    max_errors_percent: float | None = Field(
        default=None, ge=0, le=100, description="Failed devices allowed, percent of the phase."
    )
    on_error: Literal["pause", "abort"] = "pause"


class PercentPhase(_PhaseRules):
    """Admits devices up to a cumulative share of the targeted ones (by a stable hash)."""

    percent: float = Field(gt=0, le=100)


class GroupPhase(_PhaseRules):
    """Admits the devices of one group (``deviceGroup`` tag)."""

    group: str = Field(min_length=1, max_length=64)


class _RolloutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phases: list[PercentPhase | GroupPhase] = Field(min_length=1, max_length=rollouts.MAX_PHASES)
    start_at: datetime | None = Field(default=None, description="No offers before (UTC if naive).")
    window: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Maintenance window, e.g. 'mon-fri 02:00-05:00 Europe/Berlin'.",
    )
    frozen: bool = Field(default=False, description="Only the devices targeted at the start.")
    confirm_timeout: Seconds | None = Field(
        default=reports.DEFAULT_CONFIRM_TIMEOUT,
        description="Seconds from 'applying' to running the new version; 0 or null: no limit.",
    )
    max_boots: int | None = Field(
        default=None, ge=0, le=10**6, description="Boots allowed within confirm_timeout."
    )
    soak: Seconds = Field(default=0, description="Seconds applied before a device counts.")

    @field_validator("start_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:  # beyond the calendar's ends once in UTC
            edge = datetime.min if value.year < 2 else datetime.max
            return edge.replace(tzinfo=UTC)


class RolloutOfDeployment(_RolloutSpec):
    """Phase an existing deployment (devices that already got it keep it)."""

    deployment_id: int = Field(ge=1, le=2**31 - 1)


class RolloutWithDeployment(_RolloutSpec):
    """Create a deployment phased from its first second."""

    deployment: DeploymentIn


class PhaseOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    percent: float | None
    group: str | None
    success: float
    manual: bool
    max_errors: int | None
    max_errors_percent: float | None
    on_error: str
    status: str = Field(description="done, current or waiting.")
    targeted: int = Field(description="Devices of this phase (targeted now or reported).")
    succeeded: int = Field(description="Applied and healthy (past the soak time).")
    failed: int = Field(description="Error, invalid or reverted.")
    acknowledged: int = Field(description="Failures accepted by resuming.")
    counts: dict[str, int]
    started_at: datetime | None
    completed_at: datetime | None


class RolloutOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    deployment_id: int
    artifact_id: str
    version: str
    condition: str
    state: str = Field(description="scheduled, running, paused, aborted or completed.")
    phase: int = Field(description="The current phase, from 1.")
    reason: str | None
    start_at: datetime | None
    window: str | None
    window_open: bool
    next_window: datetime | None
    frozen: bool
    confirm_timeout: int | None
    max_boots: int | None
    soak: int
    awaiting_approval: bool
    created_at: datetime
    updated_at: datetime
    phase_started_at: datetime | None
    targeted: int
    counts: dict[str, int]
    phases: list[PhaseOut]


class RolloutEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    kind: str
    phase: int
    actor: str
    detail: str | None


class ActionIn(BaseModel):
    reason: str | None = Field(default=None, max_length=200)


class ApproveIn(BaseModel):
    phase: int | None = Field(
        default=None,
        ge=1,
        le=rollouts.MAX_PHASES,
        description="The phase being approved; 409 if the rollout is no longer in it.",
    )
    reason: str | None = Field(default=None, max_length=200)


async def _rollout_out(db: Db, engine: rollouts.RolloutEngine, rollout_id: int) -> RolloutOut:
    found = await rollouts.view(db, rollout_id, engine.now())
    if found is None:
        raise not_found(f"rollout {rollout_id}")
    return RolloutOut.model_validate(found)


def _actor(admin: Any) -> str:
    from otakit.server.service.audit import actor_of  # the audit log's name for the token

    return actor_of(admin)


@router.post("/rollouts", response_model=RolloutOut, status_code=201)
async def create_rollout(
    body: RolloutOfDeployment | RolloutWithDeployment,
    db: Db,
    st: State,
    admin: Admin,
    engine: Rollouts,
) -> RolloutOut:
    """Phase a deployment (``deployment_id``), or create a deployment phased from the start
    (``deployment``). It starts at ``start_at`` (or now)."""
    now = engine.now()
    if isinstance(body, RolloutWithDeployment):
        deployment = await deployment_service.new_deployment(
            db,
            _spec(body.deployment),
            blobs=st.blobs,
            actor=audit.actor_of(admin),
            delta_compression=st.settings.delta_compression,
        )
    else:
        found = await db.get(Deployment, body.deployment_id)
        if found is None:
            raise not_found(f"deployment {body.deployment_id}")
        deployment = found
        if deployment.cancelled_at is not None or deployment.expires_at <= now:
            raise ConflictError(f"deployment {deployment.id} is not active")
        existing = await db.scalar(select(Rollout.id).where(Rollout.deployment_id == deployment.id))
        if existing is not None:
            raise ConflictError(f"deployment {deployment.id} already has rollout {existing}")
    phases = [rollouts.Phase(**p.model_dump()) for p in body.phases]
    rollout = rollouts.new_rollout(
        db,
        deployment,
        phases,
        actor=_actor(admin),
        now=now,
        start_at=body.start_at,
        window=body.window,
        frozen=body.frozen,
        confirm_timeout=body.confirm_timeout,
        max_boots=body.max_boots,
        soak=body.soak,
    )
    try:
        await db.flush()
        db.add(rollouts.created_event(rollout, _actor(admin), now))
        await revision.bump(db)
        await db.commit()
    except IntegrityError:
        await db.rollback()
        raise ConflictError(f"deployment {deployment.id} already has a rollout") from None
    await engine.evaluate(rollout.id)
    return await _rollout_out(db, engine, rollout.id)


@router.get("/rollouts", response_model=list[RolloutOut], responses=PAGED)
async def list_rollouts(
    request: Request,
    response: Response,
    db: Db,
    _reader: Reader,
    engine: Rollouts,
    state: Literal["scheduled", "running", "paused", "aborted", "completed"] | None = None,
    limit: Limit = listings.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> list[RolloutOut]:
    """Rollouts, newest first, with their per-phase counts, one page at a time."""
    query = select(Rollout)
    if state is not None:
        query = query.where(Rollout.state == state)
    found = await listings.page(
        db,
        query,
        kind="rollouts",
        keys=[listings.Key(Rollout.id)],
        descending=True,
        limit=limit,
        cursor=cursor,
    )
    paged(request, response, found.next)
    return [await _rollout_out(db, engine, r.id) for r in found.items]


@router.get("/rollouts/{rollout_id}", response_model=RolloutOut)
async def get_rollout(
    rollout_id: RolloutId, db: Db, _reader: Reader, engine: Rollouts
) -> RolloutOut:
    """State, current phase and per-phase counts."""
    return await _rollout_out(db, engine, rollout_id)


@router.get("/rollouts/{rollout_id}/events", response_model=list[RolloutEventOut])
async def rollout_events(rollout_id: RolloutId, db: Db, _reader: Reader) -> list[RolloutEventOut]:
    """What happened, oldest first: created, started, advanced, paused, resumed, ..."""
    if await db.get(Rollout, rollout_id) is None:
        raise not_found(f"rollout {rollout_id}")
    rows = await db.scalars(
        select(RolloutEvent).where(RolloutEvent.rollout_id == rollout_id).order_by(RolloutEvent.id)
    )
    return [RolloutEventOut.model_validate(e) for e in rows]


async def _act(
    db: Db,
    engine: rollouts.RolloutEngine,
    admin: Any,
    rollout_id: int,
    action: str,
    *,
    phase: int | None = None,
    reason: str | None = None,
) -> RolloutOut:
    await engine.act(rollout_id, action, _actor(admin), phase=phase, reason=reason)
    return await _rollout_out(db, engine, rollout_id)


@router.post("/rollouts/{rollout_id}/pause", response_model=RolloutOut)
async def pause_rollout(
    rollout_id: RolloutId,
    db: Db,
    admin: Admin,
    engine: Rollouts,
    body: ActionIn | None = None,
) -> RolloutOut:
    """Stop new offers (downloads under way may finish); 409 once aborted or completed."""
    reason = body.reason if body else None
    return await _act(db, engine, admin, rollout_id, "pause", reason=reason)


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutOut)
async def resume_rollout(
    rollout_id: RolloutId,
    db: Db,
    admin: Admin,
    engine: Rollouts,
    body: ActionIn | None = None,
) -> RolloutOut:
    """Offer again; the failures seen so far are acknowledged (the error thresholds count
    from here)."""
    reason = body.reason if body else None
    return await _act(db, engine, admin, rollout_id, "resume", reason=reason)


@router.post("/rollouts/{rollout_id}/abort", response_model=RolloutOut)
async def abort_rollout(
    rollout_id: RolloutId,
    db: Db,
    admin: Admin,
    engine: Rollouts,
    body: ActionIn | None = None,
) -> RolloutOut:
    """Stop for good: the deployment is cancelled, downloads under way are told to stop."""
    reason = body.reason if body else None
    return await _act(db, engine, admin, rollout_id, "abort", reason=reason)


@router.post("/rollouts/{rollout_id}/approve", response_model=RolloutOut)
async def approve_rollout(
    rollout_id: RolloutId,
    db: Db,
    admin: Admin,
    engine: Rollouts,
    body: ApproveIn | None = None,
) -> RolloutOut:
    """Advance the current phase now (the only way past a manual phase)."""
    phase, reason = (body.phase, body.reason) if body else (None, None)
    return await _act(db, engine, admin, rollout_id, "approve", phase=phase, reason=reason)


# --- tokens ------------------------------------------------------------------------------------


class _TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(default=None, max_length=128, description="A note to recognise it.")
    expires_days: float | None = Field(
        default=None, gt=0, le=token_service.MAX_EXPIRES_DAYS, description="null: never."
    )


class OperatorTokenIn(_TokenIn):
    """A token for people and scripts: admin (everything) or viewer (reads only)."""

    role: Literal["admin", "viewer"]


class EnrollTokenIn(_TokenIn):
    """Lets new devices of a product (and group) register on their first check-in."""

    role: Literal["enroll"]
    product: identity.ProductName
    group: str | None = Field(default=None, min_length=1, max_length=64)


class DeviceTokenIn(_TokenIn):
    """One device's own token."""

    role: Literal["device"]
    device: identity.Serial = Field(description="The device's serial.")


TokenIn = Annotated[OperatorTokenIn | EnrollTokenIn | DeviceTokenIn, Field(discriminator="role")]


class TokenOut(BaseModel):
    id: str
    role: str
    label: str | None
    product: str | None
    group: str | None
    device: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class CreatedTokenOut(TokenOut):
    token: str = Field(description="The token itself (otk_...): shown only this once.")


def _token(t: Token) -> TokenOut:
    return TokenOut(
        id=t.id,
        role=t.role,
        label=t.label,
        product=t.product,
        group=t.group,
        device=t.device_serial,
        created_at=t.created_at,
        expires_at=t.expires_at,
        revoked_at=t.revoked_at,
    )


@router.post("/tokens", response_model=CreatedTokenOut, status_code=201)
async def create_token(body: TokenIn, db: Db, admin: Admin) -> CreatedTokenOut:
    """Create a token; the answer holds the token itself, shown only this once."""
    spec = token_service.TokenSpec(**body.model_dump())  # the service checks it again
    created = await token_service.create(db, spec, actor=audit.actor_of(admin))
    return CreatedTokenOut(**_token(created.row).model_dump(), token=created.token)


@router.get("/tokens", response_model=list[TokenOut], responses=PAGED)
async def list_tokens(
    request: Request,
    response: Response,
    db: Db,
    _reader: Reader,
    role: Role | None = None,
    limit: Limit = listings.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> list[TokenOut]:
    """Tokens (never their secrets), newest first, one page at a time."""
    found = await token_service.listing(db, role=role, limit=limit, cursor=cursor)
    paged(request, response, found.next)
    return [_token(t) for t in found.items]


@router.delete("/tokens/{token_id}", status_code=204)
async def revoke_token(
    token_id: Annotated[str, PathParam(max_length=256)], db: Db, admin: Admin
) -> Response:
    """Revoke a token: requests with it are refused (401) from then on. Revoking the token
    that makes the request is allowed."""
    await token_service.revoke(db, token_id, actor=audit.actor_of(admin))
    return Response(status_code=204)
