"""Artifacts as the server keeps them: adding an upload, deleting one, asking whether one exists,
finding one by a short id.

An artifact is named by the SHA-256 of its bytes, so adding the same bytes twice is one artifact:
the second upload, through this server or another sharing the database, gets the first one's
record (``created`` False), also when both arrive at once (the loser of the insert reads the
winner's row). Deleting removes the record first, then the blob: from that commit on, every
server refuses to serve the bytes (:func:`exists` is what signed downloads ask), and a server
that still holds a cached copy drops it when it next looks (blobs.BlobStore.evict).

A version names one binary per product (and container): a different binary with a version the
product already has is refused (VersionTakenError), so "version X" always means the same bytes;
an uploader that says which version it expects (``expect_version``) gets VersionMismatchError
for anything else, and nothing is stored. An artifact may be named by a prefix of its SHA-256
of at least :data:`MIN_PREFIX` hex digits (:func:`resolve`: one range read of the primary key).

Besides the SHA-256 that names it, an artifact keeps its SHA-1 and MD5, which hawkBit DDI
clients check: an upload computes all three in one pass while its body streams (:class:`Hasher`);
an artifact uploaded before they were kept gets them from one read of its blob
(:func:`ensure_hashes`, when it is deployed or a DDI client asks), or from the next upload of
the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import (
    AmbiguousError,
    BlobStoreError,
    DeployedError,
    ImageFormatError,
    NotFoundError,
    OtakitError,
    UnprocessableError,
    UploadRefusedError,
    UsageError,
    VersionMismatchError,
    VersionTakenError,
)
from otakit.image.delta import image_digest
from otakit.image.keys import PublicKey
from otakit.protocol.version import FirmwareVersion
from otakit.server import identity
from otakit.server.blobs import CHUNK, BlobStore
from otakit.server.database import RawReader
from otakit.server.models import (
    Artifact,
    ArtifactDelta,
    Deployment,
    DeploymentDevice,
    Product,
    TrustedKey,
)
from otakit.server.service import audit, deltas, offers, revision
from otakit.server.service.uploads import inspect_upload
from otakit.server.storage import storage_full


@dataclass(frozen=True)
class Upload:
    """What the uploader says about the bytes (checked by the HTTP adapter's parameters)."""

    name: str
    version: str | None = None
    board: str | None = None
    product: str | None = None
    container: str = "ota"
    expect_version: str | None = None  # refuse (and store nothing) unless the version is this


@dataclass(frozen=True)
class Digests:
    """The hashes of an artifact's bytes, lowercase hex: SHA-256 names it; SHA-1 and MD5 are
    for the clients that check those (hawkBit DDI)."""

    sha256: str
    sha1: str
    md5: str


class Hasher:
    """SHA-256, SHA-1 and MD5 of a stream in one pass: every chunk goes to the three at once
    (hashlib releases the GIL for chunks over 2 KiB, so a worker thread can do this)."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._sha1 = hashlib.sha1(usedforsecurity=False)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        self._sha1.update(chunk)
        self._md5.update(chunk)
        self.size += len(chunk)

    def digests(self) -> Digests:
        return Digests(self._sha256.hexdigest(), self._sha1.hexdigest(), self._md5.hexdigest())


MIN_PREFIX = 12  # hex digits of a short artifact id (the dashboard shows 12)
_HEX = frozenset("0123456789abcdef")


async def resolve(db: AsyncSession, artifact_id: str) -> str:
    """The full SHA-256 of the artifact ``artifact_id`` names: the whole id, or a prefix of at
    least MIN_PREFIX hex digits (any case). One range read of the primary key index
    (``prefix <= id < prefix + 'g'``: every id starting with the prefix, as ids are lowercase
    hex), at most two rows.

    Raises UsageError (not hex, or shorter than MIN_PREFIX), AmbiguousError (several artifacts
    start with it) and NotFoundError (none does)."""
    wanted = artifact_id.strip().lower()
    if not wanted or not set(wanted) <= _HEX or len(wanted) > 64:
        raise UsageError(
            f"an artifact id is its SHA-256 in hex, or the first {MIN_PREFIX} or more hex digits "
            f"of it: not {artifact_id[:80]!r}",
            value=artifact_id[:80],
        )
    if len(wanted) == 64:
        if await exists(db, wanted):
            return wanted
        raise NotFoundError(f"artifact {wanted!r} not found", value=wanted)
    if len(wanted) < MIN_PREFIX:
        raise UsageError(
            f"artifact id {wanted!r} is too short: give at least {MIN_PREFIX} hex digits",
            value=wanted,
        )
    found = list(
        await db.scalars(
            select(Artifact.id)
            .where(Artifact.id >= wanted, Artifact.id < wanted + "g")
            .order_by(Artifact.id)
            .limit(2)
        )
    )
    if not found:
        raise NotFoundError(f"no artifact id starts with {wanted!r}", value=wanted)
    if len(found) > 1:
        raise AmbiguousError(
            f"more than one artifact id starts with {wanted!r}: give more digits", value=wanted
        )
    return str(found[0])


async def find(db: AsyncSession, artifact_id: str) -> Artifact:
    """The artifact a whole or short id names (see :func:`resolve`)."""
    artifact = await db.get(Artifact, await resolve(db, artifact_id))
    if artifact is None:  # deleted between the two reads
        raise NotFoundError(f"artifact {artifact_id!r} not found", value=artifact_id)
    return artifact


def expected_version(text: str | None) -> FirmwareVersion | None:
    """The ``expect_version`` of an upload, parsed; UnprocessableError if it is no version."""
    if text is None or not text.strip():
        return None
    try:
        return FirmwareVersion.parse(text.strip())
    except OtakitError as exc:
        raise UnprocessableError(f"expect_version: {exc.message}", value=text) from None


def _check_expected(upload: Upload, version: str) -> None:
    wanted = expected_version(upload.expect_version)
    if wanted is None:
        return
    try:
        got = FirmwareVersion.parse(version)
    except OtakitError:
        got = None
    if got != wanted:
        raise VersionMismatchError(
            f"the upload is version {version}, not {upload.expect_version} as expected; "
            "nothing was stored",
            value=version,
        )


async def _check_version_free(db: AsyncSession, sha256: str, upload: Upload, version: str) -> None:
    """VersionTakenError if another binary already has ``version`` for the upload's product and
    container (read by the index of migration 0011)."""
    if not upload.product:
        return
    forms = {version}
    with contextlib.suppress(OtakitError):
        forms.add(str(FirmwareVersion.parse(version)))
    taken = await db.scalar(
        select(Artifact.id)
        .where(
            Artifact.product == upload.product,
            Artifact.container == upload.container,
            Artifact.version.in_(sorted(forms)),
            Artifact.id != sha256,
        )
        .limit(1)
    )
    if taken is not None:
        raise VersionTakenError(
            f"product {upload.product} already has version {version} (artifact "
            f"{taken[:MIN_PREFIX]}): bump the version",
            value=version,
        )


async def product_of(db: AsyncSession, name: str | None) -> Product | None:
    """The product an upload names; NotFoundError when it names one that does not exist."""
    if not name:
        return None
    product = await db.get(Product, name)
    if product is None:
        raise NotFoundError(f"product {name!r} not found", value=name)
    return product


async def add(
    db: AsyncSession,
    blobs: BlobStore,
    path: Path,
    digests: Digests,
    size: int,
    upload: Upload,
    *,
    actor: str = audit.LOCAL,
) -> tuple[Artifact, bool]:
    """Record the received file ``path`` (whose hashes and size the caller computed while
    receiving it, :class:`Hasher`) as an artifact, storing its bytes in ``blobs``; commits.

    Returns the artifact and whether it is new (False: the same bytes were already there; if
    that artifact had no SHA-1 and MD5 yet, it gets these).
    A new one is recorded in the audit log (``artifact.upload`` by ``actor``). Raises
    NotFoundError (unknown product), UsageError (empty upload), UploadRefusedError (not an
    acceptable image, package or raw file), UnprocessableError (a name or version that does not
    fit a job document), VersionMismatchError (not the ``expect_version``), VersionTakenError
    (another binary has this version for the product), StorageFullError (a full disk) and
    BlobStoreError (the store cannot be written). Nothing is stored when it raises.
    """
    sha256 = digests.sha256
    product = await product_of(db, upload.product)
    existing = await db.get(Artifact, sha256)
    if existing is not None:
        _check_expected(upload, existing.version)
        if existing.sha1 is None or existing.md5 is None:  # uploaded before they were kept
            existing.sha1, existing.md5 = digests.sha1, digests.md5
            await db.commit()
        return existing, False
    if size == 0:
        raise UsageError("the upload is empty")
    keys = [PublicKey.from_pem(k.pem.encode()) for k in await db.scalars(select(TrustedKey))]
    raw_allowed = bool(product and product.allow_raw)
    # a raw file's version is the one given, or else the one expected
    given = upload.version or (upload.expect_version or "").strip() or None
    try:
        inspected = await anyio.to_thread.run_sync(
            lambda: inspect_upload(path, keys, raw_allowed=raw_allowed, version=given)
        )
    except UsageError as exc:  # well-formed, not acceptable: refused like an image that fails
        raise UploadRefusedError(exc.message, value=exc.value) from None
    # an image's identity as a delta's base or result (the upload is verified: it is an image)
    image = (
        await anyio.to_thread.run_sync(image_digest, path) if inspected.kind == "image" else None
    )
    _check_expected(upload, inspected.version)
    # a job names the version as major.minor.build, in the device's Version buffer
    identity.check("version", "Version", FirmwareVersion.parse(inspected.version).short)
    identity.check_job_files(sha256, upload.name, upload.product)
    await _check_version_free(db, sha256, upload, inspected.version)
    await blobs.put_file(path, sha256)  # idempotent: a concurrent upload stores the same bytes
    artifact = Artifact(
        id=sha256,
        sha1=digests.sha1,
        md5=digests.md5,
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
        image_sha256=image.sha256.hex() if image else None,
        image_size=image.size if image else None,
    )
    db.add(artifact)
    audit.record(
        db,
        actor=actor,
        action="artifact.upload",
        target=f"artifact {sha256[:MIN_PREFIX]}",
        details={
            "id": sha256,
            "name": upload.name,
            "version": inspected.version,
            "product": upload.product,
            "container": upload.container,
            "size": size,
        },
    )
    try:
        await db.commit()
    except IntegrityError:  # the same bytes, uploaded at the same time through another server
        await db.rollback()
        winner = await db.get(Artifact, sha256, populate_existing=True)
        if winner is None:  # not the artifact's key that clashed
            raise
        return winner, False
    except Exception as exc:
        if storage_full(exc) is not None:  # the database refused it: no blob without its row
            await db.rollback()
            with contextlib.suppress(Exception):
                if not await exists(db, sha256):
                    await blobs.delete(sha256)
        raise
    return artifact, True


async def ensure_hashes(db: AsyncSession, store: BlobStore, artifact: Artifact) -> None:
    """Give ``artifact`` its SHA-1 and MD5 if it has none (uploaded before they were kept):
    one streaming read of its blob (S3: of this server's verified local copy) in a worker
    thread, 1 MiB at a time, with the SHA-256 checked on the way. Nothing when it has them.
    Commits nothing: the caller's commit stores them.

    Raises BlobNotFoundError (the blob is gone) and BlobStoreError (it cannot be read, or its
    bytes are not the artifact's)."""
    if artifact.sha1 is not None and artifact.md5 is not None:
        return
    path = await store.local_path(artifact.id)
    digests = await anyio.to_thread.run_sync(_hash_blob, path)
    if digests.sha256 != artifact.id:
        raise BlobStoreError(
            f"the blob of artifact {artifact.id[:MIN_PREFIX]} has SHA-256 {digests.sha256}: "
            "it is not the artifact's bytes",
            value=artifact.id,
        )
    artifact.sha1, artifact.md5 = digests.sha1, digests.md5
    db.add(artifact)  # already there when the caller loaded it with ``db``


async def ensure_image_digest(db: AsyncSession, store: BlobStore, artifact: Artifact) -> None:
    """Give an image artifact (kind ``image``) its ``image_sha256`` and ``image_size`` if it has
    none (uploaded before they were kept): otakit.image.delta.image_digest of its blob (S3: of
    this server's local copy) in a worker thread. Nothing for other kinds or when it has them.
    Commits nothing: the caller's commit stores them.

    Raises BlobNotFoundError (the blob is gone) and BlobStoreError (it cannot be read, or it is
    not an image)."""
    if artifact.kind != "image" or (
        artifact.image_sha256 is not None and artifact.image_size is not None
    ):
        return
    path = await store.local_path(artifact.id)
    try:
        found = await anyio.to_thread.run_sync(image_digest, path)
    except (ImageFormatError, OSError) as exc:
        raise BlobStoreError(
            f"the blob of artifact {artifact.id[:MIN_PREFIX]} is not a readable image: "
            f"{getattr(exc, 'message', None) or exc}",
            value=artifact.id,
        ) from None
    artifact.image_sha256, artifact.image_size = found.sha256.hex(), found.size
    db.add(artifact)


def _hash_blob(path: Path) -> Digests:
    hasher = Hasher()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
    except OSError as exc:
        raise BlobStoreError(
            f"cannot read {path}: {exc.strerror or exc}", value=str(path)
        ) from None
    return hasher.digests()


async def remove(
    db: AsyncSession, blobs: BlobStore, artifact_id: str, *, actor: str = audit.LOCAL
) -> str:
    """Delete an artifact (a whole or short id), its finished deployments, its blob and its
    deltas (rows and patch blobs), and record ``artifact.delete``; commits. Returns the artifact's whole id.

    Raises NotFoundError (no such artifact), UsageError, AmbiguousError (see :func:`resolve`),
    DeployedError (an active deployment uses it) and BlobStoreError (the record is gone but the
    blob could not be removed).
    """
    artifact = await find(db, artifact_id)
    artifact_id = artifact.id
    if any(o.artifact.id == artifact_id for o in await offers.active(db)):
        raise DeployedError("the artifact is deployed; cancel its deployments first")
    old = select(Deployment.id).where(Deployment.artifact_id == artifact_id)
    await db.execute(delete(DeploymentDevice).where(DeploymentDevice.deployment_id.in_(old)))
    await db.execute(delete(Deployment).where(Deployment.artifact_id == artifact_id))
    # its deltas' rows go with it (ON DELETE CASCADE); their blobs after the commit
    patches = [
        str(key)
        for key in await db.scalars(
            select(ArtifactDelta.blob_key).where(
                ArtifactDelta.artifact_id == artifact_id, ArtifactDelta.blob_key.is_not(None)
            )
        )
    ]
    await db.execute(delete(ArtifactDelta).where(ArtifactDelta.artifact_id == artifact_id))
    await db.delete(artifact)
    audit.record(
        db,
        actor=actor,
        action="artifact.delete",
        target=f"artifact {artifact_id[:MIN_PREFIX]}",
        details={"id": artifact_id, "name": artifact.name, "version": artifact.version},
    )
    await revision.bump(db)
    await db.commit()
    await blobs.delete(artifact_id)
    for key in patches:
        await deltas.delete_blob(db, blobs, key)
    return artifact_id


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
    """Those of ``keys`` (blobs a server holds a local copy of) that are no artifact nor delta
    patch any more."""
    if not keys:
        return []
    kept = set(await db.scalars(select(Artifact.id).where(Artifact.id.in_(keys))))
    kept |= {
        str(key)
        for key in await db.scalars(
            select(ArtifactDelta.blob_key).where(ArtifactDelta.blob_key.in_(keys))
        )
    }
    return [key for key in keys if key not in kept]
