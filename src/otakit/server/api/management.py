"""Management API (``/api/v1``, admin token): products, trusted keys, artifacts, devices,
deployments."""

from __future__ import annotations

import hashlib
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from sqlalchemy import delete, select

from otakit.errors import OtakitError
from otakit.image.keys import PublicKey
from otakit.server import deployments, downloads
from otakit.server.artifacts import inspect_upload
from otakit.server.context import Admin, Db, HttpError, State, error_responses
from otakit.server.models import (
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
    Product,
    TrustedKey,
    utcnow,
)
from otakit.server.targeting import (
    GROUP_TAG,
    PRODUCT_TAG,
    parse_condition,
    product_group_condition,
)
from otakit.server.twin import Twin, twin_of

router = APIRouter(
    prefix="/api/v1",
    tags=["management"],
    responses=error_responses(400, 401, 403, 404, 409, 413, 422),
)

NAME_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
Name = Annotated[str, PathParam(pattern=NAME_PATTERN)]
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


def not_found(what: str) -> HttpError:
    return HttpError(404, "NOT_FOUND", f"{what} not found")


# --- products ----------------------------------------------------------------------------------


class ProductSettings(BaseModel):
    board: str | None = Field(default=None, max_length=48)
    allow_raw: bool = False
    anonymous: bool = False
    self_register: bool = False


class ProductOut(ProductSettings):
    name: str


def _product(p: Product) -> ProductOut:
    return ProductOut(
        name=p.name,
        board=p.board,
        allow_raw=p.allow_raw,
        anonymous=p.anonymous,
        self_register=p.self_register,
    )


@router.put("/products/{name}", response_model=ProductOut)
async def put_product(name: Name, settings: ProductSettings, db: Db, _admin: Admin) -> ProductOut:
    """Create or update a product's policy."""
    product = await db.get(Product, name) or Product(name=name)
    for key, value in settings.model_dump().items():
        setattr(product, key, value)
    db.add(product)
    await db.commit()
    return _product(product)


@router.get("/products", response_model=list[ProductOut])
async def list_products(db: Db, _admin: Admin) -> list[ProductOut]:
    rows = await db.scalars(select(Product).order_by(Product.name))
    return [_product(p) for p in rows]


@router.get("/products/{name}", response_model=ProductOut)
async def get_product(name: str, db: Db, _admin: Admin) -> ProductOut:
    product = await db.get(Product, name)
    if product is None:
        raise not_found(f"product {name!r}")
    return _product(product)


# --- trusted keys ------------------------------------------------------------------------------


class KeyOut(BaseModel):
    fingerprint: str
    key_type: str
    pem: str


@router.post("/keys", response_model=KeyOut, status_code=201, openapi_extra=PEM_BODY)
async def add_key(request: Request, db: Db, _admin: Admin) -> KeyOut:
    """Trust a public key (PEM; a private key is reduced to its public part)."""
    body = await request.body()
    if len(body) > 64 * 1024:
        raise HttpError(413, "TOO_LARGE", "a PEM key is at most 64 KiB")
    key = PublicKey.from_pem(body)
    row = await db.get(TrustedKey, key.fingerprint)
    if row is None:
        row = TrustedKey(
            fingerprint=key.fingerprint, key_type=key.type.value, pem=key.pem().decode()
        )
        db.add(row)
        await db.commit()
    return KeyOut(fingerprint=row.fingerprint, key_type=row.key_type, pem=row.pem)


@router.get("/keys", response_model=list[KeyOut])
async def list_keys(db: Db, _admin: Admin) -> list[KeyOut]:
    rows = await db.scalars(select(TrustedKey).order_by(TrustedKey.created_at))
    return [KeyOut(fingerprint=k.fingerprint, key_type=k.key_type, pem=k.pem) for k in rows]


@router.delete("/keys/{fingerprint}", status_code=204)
async def delete_key(fingerprint: str, db: Db, _admin: Admin) -> Response:
    row = await db.get(TrustedKey, fingerprint)
    if row is None:
        raise not_found(f"key {fingerprint!r}")
    await db.delete(row)
    await db.commit()
    return Response(status_code=204)


async def trusted_keys(db: Db) -> list[PublicKey]:
    rows = await db.scalars(select(TrustedKey))
    return [PublicKey.from_pem(k.pem.encode()) for k in rows]


# --- artifacts ---------------------------------------------------------------------------------


class ArtifactOut(BaseModel):
    id: str
    sha256: str
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


def _artifact(a: Artifact) -> ArtifactOut:
    return ArtifactOut(
        id=a.id,
        sha256=a.id,
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
    _admin: Admin,
    name: str = Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._+-]+$"),
    version: str | None = Query(default=None, max_length=32),
    board: str | None = Query(default=None, max_length=48),
    product: str | None = Query(default=None, max_length=64),
    container: str = Query(
        default="ota", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$"
    ),
) -> ArtifactOut:
    """Upload a signed MCUboot image, a TAR package or (if the product allows) a raw file.

    The body is streamed to disk; the artifact is identified by its SHA-256, so uploading the
    same bytes again returns the existing record (200).
    """
    product_row = await db.get(Product, product) if product else None
    if product and product_row is None:
        raise not_found(f"product {product!r}")
    tmp_dir = st.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    tmp = Path(tmp_name)
    try:
        digest, size = await _receive(request, fd, st.settings.max_upload)
        existing = await db.get(Artifact, digest)
        if existing is not None:
            response.status_code = 200
            return _artifact(existing)
        if size == 0:
            raise HttpError(400, "BADARG", "the upload is empty")
        keys = await trusted_keys(db)
        try:
            inspected = await anyio.to_thread.run_sync(
                lambda: inspect_upload(
                    tmp,
                    keys,
                    raw_allowed=bool(product_row and product_row.allow_raw),
                    version=version,
                )
            )
        except OtakitError as exc:
            raise HttpError(422, exc.code, exc.message) from None
        await st.blobs.put_file(tmp, digest)
        artifact = Artifact(
            id=digest,
            name=name,
            container=container,
            kind=inspected.kind,
            version=inspected.version,
            size=size,
            board=board or (product_row.board if product_row else None),
            product=product,
            signature=inspected.signature,
            signed_by=inspected.signed_by,
            details=inspected.details,
        )
        db.add(artifact)
        await db.commit()
        return _artifact(artifact)
    finally:
        tmp.unlink(missing_ok=True)


async def _receive(request: Request, fd: int, limit: int) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    async with await anyio.open_file(fd, "wb", closefd=True) as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, "TOO_LARGE", f"uploads are limited to {limit} bytes")
            hasher.update(chunk)
            await out.write(chunk)
    return hasher.hexdigest(), size


@router.get("/artifacts", response_model=list[ArtifactOut])
async def list_artifacts(db: Db, _admin: Admin) -> list[ArtifactOut]:
    rows = await db.scalars(select(Artifact).order_by(Artifact.created_at.desc()))
    return [_artifact(a) for a in rows]


@router.get("/artifacts/{artifact_id}", response_model=ArtifactOut)
async def get_artifact(artifact_id: str, db: Db, _admin: Admin) -> ArtifactOut:
    artifact = await db.get(Artifact, artifact_id)
    if artifact is None:
        raise not_found(f"artifact {artifact_id!r}")
    return _artifact(artifact)


@router.delete("/artifacts/{artifact_id}", status_code=204)
async def delete_artifact(artifact_id: str, db: Db, st: State, _admin: Admin) -> Response:
    """Delete an artifact; refused (409) while an active deployment uses it."""
    artifact = await db.get(Artifact, artifact_id)
    if artifact is None:
        raise not_found(f"artifact {artifact_id!r}")
    if any(o.artifact.id == artifact_id for o in await deployments.active(db)):
        raise HttpError(409, "DEPLOYED", "the artifact is deployed; cancel its deployments first")
    old = select(Deployment.id).where(Deployment.artifact_id == artifact_id)
    await db.execute(delete(DeploymentDevice).where(DeploymentDevice.deployment_id.in_(old)))
    await db.execute(delete(Deployment).where(Deployment.artifact_id == artifact_id))
    await db.delete(artifact)
    await db.commit()
    await st.blobs.delete(artifact_id)
    downloads.forget(artifact_id)
    return Response(status_code=204)


# --- devices -----------------------------------------------------------------------------------


class DeviceIn(BaseModel):
    product: str | None = Field(default=None, max_length=64)
    group: str | None = Field(default=None, max_length=64)
    board: str | None = Field(default=None, max_length=48)
    manufacturer: str | None = Field(default=None, max_length=64)
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
        tags=deployments.device_tags(d),
        version=d.version,
        last_seen=d.last_seen,
        status=d.status,
        error=d.error,
    )


@router.get("/devices", response_model=list[DeviceOut])
async def list_devices(
    db: Db,
    _admin: Admin,
    product: str | None = None,
    group: str | None = None,
) -> list[DeviceOut]:
    query = select(Device).order_by(Device.serial)
    if product:
        query = query.where(Device.product == product)
    rows = [d for d in await db.scalars(query)]
    if group:
        rows = [d for d in rows if (d.tags or {}).get(GROUP_TAG) == group]
    return [device_out(d) for d in rows]


@router.get("/devices/{serial}", response_model=DeviceOut)
async def get_device(serial: str, db: Db, _admin: Admin) -> DeviceOut:
    device = await db.get(Device, serial)
    if device is None:
        raise not_found(f"device {serial!r}")
    return device_out(device)


@router.put("/devices/{serial}", response_model=DeviceOut)
async def put_device(serial: Name, body: DeviceIn, db: Db, _admin: Admin) -> DeviceOut:
    """Register a device or update its identity and tags."""
    device = await db.get(Device, serial) or Device(serial=serial, tags={})
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
    await db.commit()
    return device_out(device)


@router.delete("/devices/{serial}", status_code=204)
async def delete_device(serial: str, db: Db, _admin: Admin) -> Response:
    device = await db.get(Device, serial)
    if device is None:
        raise not_found(f"device {serial!r}")
    await db.delete(device)
    await db.commit()
    return Response(status_code=204)


@router.get("/devices/{serial}/twin", response_model=Twin)
async def device_twin(serial: str, request: Request, db: Db, st: State, _admin: Admin) -> Twin:
    """Desired and reported state (``extFwInfo``) of one device."""
    device = await db.get(Device, serial)
    if device is None:
        raise not_found(f"device {serial!r}")
    return await twin_of(db, st, device, str(request.base_url))


# --- deployments -------------------------------------------------------------------------------


class DeploymentIn(BaseModel):
    artifact_id: str = Field(min_length=64, max_length=64)
    product: str | None = Field(default=None, max_length=64)
    group: str | None = Field(default=None, max_length=64)
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
    counts: dict[str, int]


async def _deployment(db: Db, d: Deployment) -> DeploymentOut:
    artifact = await db.get(Artifact, d.artifact_id)
    return DeploymentOut(
        id=d.id,
        artifact_id=d.artifact_id,
        version=artifact.version if artifact else "",
        condition=d.condition,
        priority=d.priority,
        downgrade=d.downgrade,
        created_at=d.created_at,
        expires_at=d.expires_at,
        cancelled_at=d.cancelled_at,
        active=d.cancelled_at is None and d.expires_at > utcnow(),
        counts=await deployments.counts(db, d.id),
    )


@router.post("/deployments", response_model=DeploymentOut, status_code=201)
async def create_deployment(body: DeploymentIn, db: Db, _admin: Admin) -> DeploymentOut:
    """Deploy an artifact to a product and group, or to devices matching a tag condition."""
    artifact = await db.get(Artifact, body.artifact_id)
    if artifact is None:
        raise not_found(f"artifact {body.artifact_id!r}")
    if (body.condition is None) == (body.product is None):
        raise HttpError(400, "BADARG", "give either product (and group) or condition")
    condition = body.condition or product_group_condition(body.product or "", body.group)
    try:
        parse_condition(condition)
    except OtakitError as exc:
        raise HttpError(400, exc.code, exc.message) from None
    now = utcnow()
    deployment = Deployment(
        artifact_id=artifact.id,
        condition=condition,
        priority=body.priority,
        downgrade=body.downgrade,
        created_at=now,
        expires_at=now + timedelta(days=body.expiry_days),
    )
    db.add(deployment)
    await db.commit()
    return await _deployment(db, deployment)


@router.get("/deployments", response_model=list[DeploymentOut])
async def list_deployments(db: Db, _admin: Admin) -> list[DeploymentOut]:
    rows = await db.scalars(select(Deployment).order_by(Deployment.id.desc()))
    return [await _deployment(db, d) for d in rows]


@router.get("/deployments/{deployment_id}", response_model=DeploymentOut)
async def get_deployment(deployment_id: int, db: Db, _admin: Admin) -> DeploymentOut:
    deployment = await db.get(Deployment, deployment_id)
    if deployment is None:
        raise not_found(f"deployment {deployment_id}")
    return await _deployment(db, deployment)


@router.post("/deployments/{deployment_id}/cancel", response_model=DeploymentOut)
async def cancel_deployment(deployment_id: int, db: Db, _admin: Admin) -> DeploymentOut:
    deployment = await db.get(Deployment, deployment_id)
    if deployment is None:
        raise not_found(f"deployment {deployment_id}")
    if deployment.cancelled_at is None:
        deployment.cancelled_at = utcnow()
        await db.commit()
    return await _deployment(db, deployment)
