"""Artifacts as the server keeps them: adding an upload, deleting one, asking whether one exists.

An artifact is named by the SHA-256 of its bytes, so adding the same bytes twice is one artifact:
the second upload, through this server or another sharing the database, gets the first one's
record (``created`` False), also when both arrive at once (the loser of the insert reads the
winner's row). Deleting removes the record first, then the blob: from that commit on, every
server refuses to serve the bytes (:func:`exists` is what signed downloads ask), and a server
that still holds a cached copy drops it when it next looks (blobs.BlobStore.evict).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import DeployedError, NotFoundError, UploadRefusedError, UsageError
from otakit.image.keys import PublicKey
from otakit.protocol.version import FirmwareVersion
from otakit.server import identity
from otakit.server.blobs import BlobStore
from otakit.server.database import RawReader
from otakit.server.models import Artifact, Deployment, DeploymentDevice, Product, TrustedKey
from otakit.server.service import offers, revision
from otakit.server.service.uploads import inspect_upload


@dataclass(frozen=True)
class Upload:
    """What the uploader says about the bytes (checked by the HTTP adapter's parameters)."""

    name: str
    version: str | None = None
    board: str | None = None
    product: str | None = None
    container: str = "ota"


async def product_of(db: AsyncSession, name: str | None) -> Product | None:
    """The product an upload names; NotFoundError when it names one that does not exist."""
    if not name:
        return None
    product = await db.get(Product, name)
    if product is None:
        raise NotFoundError(f"product {name!r} not found", value=name)
    return product


async def add(
    db: AsyncSession, blobs: BlobStore, path: Path, sha256: str, size: int, upload: Upload
) -> tuple[Artifact, bool]:
    """Record the received file ``path`` (whose SHA-256 and size the caller computed while
    receiving it) as an artifact, storing its bytes in ``blobs``; commits.

    Returns the artifact and whether it is new (False: the same bytes were already there).
    Raises NotFoundError (unknown product), UsageError (empty upload), UploadRefusedError (not
    an acceptable image, package or raw file), UnprocessableError (a name or version that does
    not fit a job document) and BlobStoreError (the store cannot be written).
    """
    product = await product_of(db, upload.product)
    existing = await db.get(Artifact, sha256)
    if existing is not None:
        return existing, False
    if size == 0:
        raise UsageError("the upload is empty")
    keys = [PublicKey.from_pem(k.pem.encode()) for k in await db.scalars(select(TrustedKey))]
    raw_allowed = bool(product and product.allow_raw)
    try:
        inspected = await anyio.to_thread.run_sync(
            lambda: inspect_upload(path, keys, raw_allowed=raw_allowed, version=upload.version)
        )
    except UsageError as exc:  # well-formed, not acceptable: refused like an image that fails
        raise UploadRefusedError(exc.message, value=exc.value) from None
    # a job names the version as major.minor.build, in the device's Version buffer
    identity.check("version", "Version", FirmwareVersion.parse(inspected.version).short)
    identity.check_job_files(sha256, upload.name, upload.product)
    await blobs.put_file(path, sha256)  # idempotent: a concurrent upload stores the same bytes
    artifact = Artifact(
        id=sha256,
        name=upload.name,
        container=upload.container,
        kind=inspected.kind,
        version=inspected.version,
        size=size,
        board=upload.board or (product.board if product else None),
        product=upload.product,
        signature=inspected.signature,
        signed_by=inspected.signed_by,
        details=inspected.details,
    )
    db.add(artifact)
    try:
        await db.commit()
    except IntegrityError:  # the same bytes, uploaded at the same time through another server
        await db.rollback()
        winner = await db.get(Artifact, sha256, populate_existing=True)
        if winner is None:  # not the artifact's key that clashed
            raise
        return winner, False
    return artifact, True


async def remove(db: AsyncSession, blobs: BlobStore, artifact_id: str) -> None:
    """Delete an artifact, its finished deployments and its blob; commits.

    Raises NotFoundError (no such artifact), DeployedError (an active deployment uses it) and
    BlobStoreError (the record is gone but the blob could not be removed).
    """
    artifact = await db.get(Artifact, artifact_id)
    if artifact is None:
        raise NotFoundError(f"artifact {artifact_id!r} not found", value=artifact_id)
    if any(o.artifact.id == artifact_id for o in await offers.active(db)):
        raise DeployedError("the artifact is deployed; cancel its deployments first")
    old = select(Deployment.id).where(Deployment.artifact_id == artifact_id)
    await db.execute(delete(DeploymentDevice).where(DeploymentDevice.deployment_id.in_(old)))
    await db.execute(delete(Deployment).where(Deployment.artifact_id == artifact_id))
    await db.delete(artifact)
    await revision.bump(db)
    await db.commit()
    await blobs.delete(artifact_id)


async def exists(db: AsyncSession, artifact_id: str) -> bool:
    """Whether the artifact is recorded (one primary-key lookup, no row loaded)."""
    found = await db.scalar(select(Artifact.id).where(Artifact.id == artifact_id))
    return found is not None


class Presence:
    """Whether an artifact is recorded, asked once per signed download range, so as cheaply as
    the database allows (a session from the pool costs several times the range itself): a
    primary-key read through database.RawReader (SQLite: a read-only connection of its own;
    PostgreSQL: one asyncpg connection of its own, a prepared statement, one round trip).

    Raises what the database driver raises when the database cannot be reached
    (database.unavailable tells those apart)."""

    _QUERY = "SELECT 1 FROM artifacts WHERE id = ?"

    def __init__(self, url: str) -> None:
        self._reader = RawReader(url)

    async def exists(self, artifact_id: str) -> bool:
        return await self._reader.fetchone(self._QUERY, artifact_id) is not None

    async def close(self) -> None:
        await self._reader.close()


async def stale_copies(db: AsyncSession, keys: list[str]) -> list[str]:
    """Those of ``keys`` (blobs a server holds a local copy of) that are no artifact any more."""
    if not keys:
        return []
    kept = set(await db.scalars(select(Artifact.id).where(Artifact.id.in_(keys))))
    return [key for key in keys if key not in kept]
