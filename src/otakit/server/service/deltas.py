"""Binary deltas between image artifacts (issue 20): which are wanted, which are ready, and the
background worker that makes them.

A delta (otakit.image.delta) turns one MCUboot image, its *base*, into an image artifact. The
server names a base by its image identity (``Artifact.image_sha256``: the SHA-256 of the image
proper, what a device reports it runs), so one row of ``artifact_deltas`` is (artifact, base
SHA-256, compression), unique. A row moves through these states:

- ``queued``: wanted. :func:`plan` queues the product's most recent earlier images of the same
  board as bases when a deployment is created; :func:`queue` one base when a device on a known
  image asks (the check-in that asked gets the full image). Queueing is an insert-or-nothing:
  asking again, from any server process, changes nothing.
- ``making``: a :class:`DeltaWorker` claimed it (``claimed_at``) with an UPDATE that only
  matches a ``queued`` row, so of several server processes exactly one makes it; a claim older
  than :data:`CLAIM_TIMEOUT` (its process died or stopped) is queued again. ``progress`` goes
  from 0 to 100 as it goes.
- ``ready``: the patch is the blob ``blob_key`` (its SHA-256) of ``size`` bytes; offered by
  :func:`usable` to a device on that base that applies that compression.
- ``not-smaller``: the patch is not worth sending: ``size`` times ``delta_min_ratio`` is more
  than the new image (not stored).
- ``failed``: it could not be made; ``error`` says why in one line (an image larger than
  ``delta_max_image``, the base artifact or a blob gone, not an image). A blob store that
  cannot be used now (S3 unreachable, a full disk) is no reason: the row is queued again and
  the worker waits a poll.

Nothing here reads the device table: a delta is per (artifact, base), whatever the number of
devices on that base. Removing an artifact removes its rows (ON DELETE CASCADE) and their blobs
(:func:`delete_blob`, from service/artifacts.remove).

The patch is made in a thread (the event loop never waits on detools; a daemon thread, so a
stopping server never waits for it) from local copies of both blobs (BlobStore.local_path),
both held in memory while it runs: ``delta_max_image`` bounds that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import event, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from otakit.errors import BlobNotFoundError, BlobStoreError, OtakitError, StorageFullError
from otakit.image.delta import COMPRESSIONS, create_delta
from otakit.server.blobs import BlobStore
from otakit.server.database import insert
from otakit.server.models import Artifact, ArtifactDelta, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

QUEUED = "queued"
MAKING = "making"
READY = "ready"
NOT_SMALLER = "not-smaller"
FAILED = "failed"
STATES = (QUEUED, MAKING, READY, NOT_SMALLER, FAILED)

CLAIM_TIMEOUT = timedelta(minutes=10)  # a "making" row older than this is queued again
# seconds a worker waits for queued rows when it found none: a row queued by this process wakes
# it at once (after the commit), one queued by another process or host is found by this poll
POLL = 10.0
STALE_CHECK = 60.0  # seconds between a worker's looks for stale claims
MAX_ERROR = 200  # characters of ArtifactDelta.error
STOP_TIMEOUT = 5.0  # seconds stop() waits for a worker to hand back its claim
DEFAULT_MAX_IMAGE = 16 * 1024 * 1024

_HEX = frozenset("0123456789abcdef")


def is_digest(text: str) -> bool:
    """Whether ``text`` is a SHA-256 in lowercase hex (an image identity)."""
    return len(text) == 64 and set(text) <= _HEX


def one_line(text: str, limit: int = MAX_ERROR) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def worth_it(size: int, image_size: int, min_ratio: float) -> bool:
    """Whether a patch of ``size`` bytes is worth offering for an image of ``image_size``:
    not when ``size * min_ratio > image_size``."""
    return size * min_ratio <= image_size


def ratio(size: int | None, image_size: int | None) -> float | None:
    """How many times smaller than the image the patch is (image size / patch size, two
    decimals); None while either is unknown."""
    if not size or not image_size:
        return None
    return round(image_size / size, 2)


@dataclass(frozen=True)
class DeltaRecord:
    """One delta as listings show it (management API, ``otakit artifact show``, dashboard)."""

    base_sha256: str
    base_artifact_id: str | None
    compression: str
    state: str
    progress: int
    size: int | None
    ratio: float | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "base_sha256": self.base_sha256,
            "base_artifact_id": self.base_artifact_id,
            "compression": self.compression,
            "state": self.state,
            "progress": self.progress,
            "size": self.size,
            "ratio": self.ratio,
            "error": self.error,
        }


def record(delta: ArtifactDelta, image_size: int | None) -> DeltaRecord:
    """The listing record of ``delta`` (``image_size``: its artifact's, for the ratio)."""
    return DeltaRecord(
        base_sha256=delta.base_sha256,
        base_artifact_id=delta.base_artifact_id,
        compression=delta.compression,
        state=delta.state,
        progress=delta.progress,
        size=delta.size,
        ratio=ratio(delta.size, image_size) if delta.state in (READY, NOT_SMALLER) else None,
        error=delta.error,
    )


# --- wanting ---------------------------------------------------------------------------------

_workers: weakref.WeakSet[DeltaWorker] = weakref.WeakSet()


_WAKE = "otakit_delta_wake"


def _wake() -> None:
    """Tell this process's workers there may be queued rows (others find them by polling)."""
    for worker in list(_workers):
        worker.wake()


def _wake_after_commit(db: AsyncSession) -> None:
    """Wake this process's workers once ``db`` commits (before, they would not see the row)."""
    session = db.sync_session
    session.info[_WAKE] = True
    if not event.contains(session, "after_commit", _after_commit):
        event.listen(session, "after_commit", _after_commit)


def _after_commit(session: Any) -> None:
    if session.info.pop(_WAKE, False):
        _wake()


async def queue(
    db: AsyncSession, artifact: Artifact, base_sha256: str, now: datetime, *, compression: str
) -> ArtifactDelta | None:
    """Want the delta from the image ``base_sha256`` to the image artifact ``artifact`` in
    ``compression``: returns its row (a new ``queued`` one, or the one there already, in any
    state), or None when there is nothing to make (``artifact`` is not an image with a known
    identity, the base is that same image, or no image artifact has that identity).

    Insert-or-nothing (ON CONFLICT DO NOTHING on (artifact, base, compression)), so concurrent
    callers in any server process get the one row. Commits nothing: the caller's commit makes
    it visible to the workers. Two indexed reads and at most one insert."""
    base_sha256 = base_sha256.lower()
    if (
        artifact.kind != "image"
        or artifact.image_sha256 is None
        or not is_digest(base_sha256)
        or base_sha256 == artifact.image_sha256
        or compression not in COMPRESSIONS
    ):
        return None
    existing = await _row(db, artifact.id, base_sha256, compression)
    if existing is not None:
        return existing
    base_id = await db.scalar(
        select(Artifact.id)
        .where(Artifact.image_sha256 == base_sha256, Artifact.kind == "image")
        .order_by(Artifact.created_at.desc())
        .limit(1)
    )
    if base_id is None:
        return None
    await db.execute(
        insert(db, ArtifactDelta)
        .values(
            artifact_id=artifact.id,
            base_sha256=base_sha256,
            base_artifact_id=base_id,
            compression=compression,
            state=QUEUED,
            progress=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["artifact_id", "base_sha256", "compression"])
    )
    _wake_after_commit(db)
    return await _row(db, artifact.id, base_sha256, compression)


async def _row(
    db: AsyncSession, artifact_id: str, base_sha256: str, compression: str
) -> ArtifactDelta | None:
    found: ArtifactDelta | None = await db.scalar(
        select(ArtifactDelta).where(
            ArtifactDelta.artifact_id == artifact_id,
            ArtifactDelta.base_sha256 == base_sha256,
            ArtifactDelta.compression == compression,
        )
    )
    return found


async def plan(
    db: AsyncSession,
    artifact: Artifact,
    now: datetime,
    *,
    compression: str,
    bases: int = 5,
    blobs: BlobStore | None = None,
) -> list[ArtifactDelta]:
    """Queue deltas to ``artifact`` (being deployed) from the ``bases`` most recent image
    artifacts of its product, container and board uploaded before it: the images its devices
    most likely run. Returns their rows (new or already there). Nothing for an artifact that is
    not an image or has no product. With ``blobs``, a base uploaded before image identities
    were kept gets its own first (artifacts.ensure_image_digest; one unreadable is skipped).
    Only queues: the patches are made in the background. Commits nothing. One indexed read
    of the product's artifacts (at most ``bases`` rows), then :func:`queue` per base."""
    if artifact.kind != "image" or artifact.image_sha256 is None or not artifact.product:
        return []
    query = (
        select(Artifact)
        .where(
            Artifact.product == artifact.product,
            Artifact.container == artifact.container,
            Artifact.kind == "image",
            Artifact.id != artifact.id,
            Artifact.created_at < artifact.created_at,
        )
        .order_by(Artifact.created_at.desc())
        .limit(bases)
    )
    query = query.where(
        Artifact.board.is_(None) if artifact.board is None else Artifact.board == artifact.board
    )
    rows: list[ArtifactDelta] = []
    for base in list(await db.scalars(query)):
        if base.image_sha256 is None and blobs is not None:
            from otakit.server.service.artifacts import ensure_image_digest

            try:
                await ensure_image_digest(db, blobs, base)
            except OtakitError as exc:
                log.warning("no delta from artifact %s: %s", base.id[:12], exc.message)
                continue
        if base.image_sha256 is None:
            continue
        row = await queue(db, artifact, base.image_sha256, now, compression=compression)
        if row is not None:
            rows.append(row)
    return rows


# --- offering and listing --------------------------------------------------------------------


async def usable(
    db: AsyncSession, artifact_id: str, base_sha256: str, accepts: Sequence[str]
) -> ArtifactDelta | None:
    """The ready delta from the image ``base_sha256`` to ``artifact_id`` in one of the
    compressions a device ``accepts`` (its first choice first), or None. One indexed read."""
    wanted = [c for c in accepts if c in COMPRESSIONS]
    if not wanted or not is_digest(base_sha256.lower()):
        return None
    found = {
        row.compression: row
        for row in await db.scalars(
            select(ArtifactDelta).where(
                ArtifactDelta.artifact_id == artifact_id,
                ArtifactDelta.base_sha256 == base_sha256.lower(),
                ArtifactDelta.compression.in_(wanted),
                ArtifactDelta.state == READY,
                ArtifactDelta.blob_key.is_not(None),
            )
        )
    }
    for compression in wanted:
        if compression in found:
            return found[compression]
    return None


async def listing(db: AsyncSession, artifact_id: str) -> list[ArtifactDelta]:
    """The deltas to ``artifact_id``, oldest first (one indexed read)."""
    return list(
        await db.scalars(
            select(ArtifactDelta)
            .where(ArtifactDelta.artifact_id == artifact_id)
            .order_by(ArtifactDelta.id)
        )
    )


async def listings(db: AsyncSession, artifact_ids: Sequence[str]) -> dict[str, list[ArtifactDelta]]:
    """The deltas of several artifacts (a page of a list) in one query, by artifact id."""
    out: dict[str, list[ArtifactDelta]] = {key: [] for key in artifact_ids}
    if not artifact_ids:
        return out
    for row in await db.scalars(
        select(ArtifactDelta)
        .where(ArtifactDelta.artifact_id.in_(list(artifact_ids)))
        .order_by(ArtifactDelta.id)
    ):
        out.setdefault(row.artifact_id, []).append(row)
    return out


async def delete_blob(db: AsyncSession, blobs: BlobStore, key: str) -> bool:
    """Remove the patch blob ``key`` unless a delta row or an artifact still uses it; returns
    whether it was removed. Raises BlobStoreError when the store refuses."""
    used = await db.scalar(select(ArtifactDelta.id).where(ArtifactDelta.blob_key == key).limit(1))
    if used is not None or await db.get(Artifact, key) is not None:
        return False
    await blobs.delete(key)
    return True


# --- making ----------------------------------------------------------------------------------


class _Failed(Exception):
    """The delta cannot be made: the row becomes ``failed`` with this one-line message."""


class DeltaWorker:
    """Makes queued deltas, one at a time, in the background of one server process.

    :meth:`start` runs it as a task on the running event loop; :meth:`stop` cancels it and
    waits at most :data:`STOP_TIMEOUT` seconds (a patch being made in a thread is abandoned
    and its row handed back to the queue). Each round: claim the oldest queued row (an UPDATE
    that matches only while it is still queued: one process wins), make the patch from local
    copies of both blobs in a thread of its own, store it as a blob named by its SHA-256, then set
    the row ready, not-smaller or failed; a result whose row was meanwhile deleted or claimed
    again is dropped (and its blob removed if nothing uses it). Waits :data:`POLL` seconds
    when nothing is queued (sooner when this process queues something)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        *,
        tmp_dir: Path,
        min_ratio: float = 2.0,
        max_image: int = DEFAULT_MAX_IMAGE,
        poll: float = POLL,
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.tmp_dir = tmp_dir
        self.min_ratio = min_ratio
        self.max_image = max_image
        self.poll = poll
        self._task: asyncio.Task[None] | None = None
        self._event = asyncio.Event()
        self._stale_checked = 0.0

    def start(self) -> None:
        if self._task is None:
            _workers.add(self)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="delta-worker")

    async def stop(self) -> None:
        task, self._task = self._task, None
        _workers.discard(self)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, STOP_TIMEOUT)

    def wake(self) -> None:
        self._event.set()

    async def _run(self) -> None:
        while True:
            self._event.clear()  # before looking: a wake while it looks is not lost
            try:
                worked = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("delta worker: %s", one_line(f"{type(exc).__name__}: {exc}", 300))
                worked = False
            if not worked:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), self.poll)

    async def step(self) -> bool:
        """Claim and make one queued delta; False when none was queued."""
        loop_now = asyncio.get_running_loop().time()
        if loop_now - self._stale_checked >= STALE_CHECK or not self._stale_checked:
            self._stale_checked = loop_now
            await self.requeue_stale()
        claimed = await self.claim()
        if claimed is None:
            return False
        try:
            await self.make(*claimed)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._hand_back(*claimed))
            raise
        except (BlobStoreError, StorageFullError) as exc:  # the store, not the delta: later
            log.warning("delta %d queued again: %s", claimed[0], one_line(exc.message))
            await self._hand_back(*claimed)
            return False
        return True

    async def requeue_stale(self, now: datetime | None = None) -> int:
        """Queue again the claims older than CLAIM_TIMEOUT; returns how many."""
        now = now or utcnow()
        async with self.sessions() as db:
            stale = list(
                await db.scalars(
                    select(ArtifactDelta.id).where(
                        ArtifactDelta.state == MAKING,
                        ArtifactDelta.claimed_at < now - CLAIM_TIMEOUT,
                    )
                )
            )
            if not stale:
                return 0
            result = await db.execute(
                update(ArtifactDelta)
                .where(
                    ArtifactDelta.id.in_(stale),
                    ArtifactDelta.state == MAKING,
                    ArtifactDelta.claimed_at < now - CLAIM_TIMEOUT,
                )
                .values(state=QUEUED, progress=0, claimed_at=None, updated_at=now)
            )
            await db.commit()
        count = _rowcount(result)
        if count:
            log.info("queued %d stale delta claim(s) again", count)
        return count

    async def claim(self, now: datetime | None = None) -> tuple[int, datetime] | None:
        """Claim the oldest queued row: (its id, the claim's time), or None when nothing is
        queued. Tries the next one when another process claimed it first."""
        now = now or utcnow()
        for _ in range(5):
            async with self.sessions() as db:
                found = await db.scalar(
                    select(ArtifactDelta.id)
                    .where(ArtifactDelta.state == QUEUED)
                    .order_by(ArtifactDelta.id)
                    .limit(1)
                )
                if found is None:
                    return None
                result = await db.execute(
                    update(ArtifactDelta)
                    .where(ArtifactDelta.id == found, ArtifactDelta.state == QUEUED)
                    .values(state=MAKING, progress=0, claimed_at=now, updated_at=now)
                )
                await db.commit()
            if _rowcount(result) == 1:
                return found, now
        return None

    async def make(self, delta_id: int, claimed_at: datetime) -> str | None:
        """Make the claimed delta ``delta_id``; returns the state it was left in (None: the
        row was gone or claimed again meanwhile)."""
        try:
            base_path, new_path, compression, image_size = await self._inputs(delta_id)
            await self._update(delta_id, claimed_at, progress=10)
            data = await in_daemon_thread(
                partial(create_delta, base_path, new_path, compression=compression)
            )
        except _Failed as exc:
            return await self._finish(delta_id, claimed_at, FAILED, error=str(exc))
        except (BlobStoreError, StorageFullError):  # the store cannot be used now: queued again
            raise
        except OtakitError as exc:
            return await self._finish(delta_id, claimed_at, FAILED, error=exc.message)
        except MemoryError:
            return await self._finish(delta_id, claimed_at, FAILED, error="out of memory")
        except (ValueError, TypeError, IndexError, OSError) as exc:  # detools on odd input
            error = f"cannot make it: {type(exc).__name__}: {exc}"
            return await self._finish(delta_id, claimed_at, FAILED, error=error)
        size = len(data)
        if not worth_it(size, image_size, self.min_ratio):
            return await self._finish(delta_id, claimed_at, NOT_SMALLER, size=size)
        await self._update(delta_id, claimed_at, progress=90)
        key = hashlib.sha256(data).hexdigest()
        await self._store(data, key)
        state = await self._finish(delta_id, claimed_at, READY, size=size, blob_key=key)
        if state is None:  # deleted or claimed again: keep no blob nothing uses
            async with self.sessions() as db:
                with contextlib.suppress(Exception):
                    await delete_blob(db, self.blobs, key)
        return state

    async def _inputs(self, delta_id: int) -> tuple[Path, Path, str, int]:
        async with self.sessions() as db:
            delta = await db.get(ArtifactDelta, delta_id)
            if delta is None:
                raise _Failed("the delta was removed")
            artifact = await db.get(Artifact, delta.artifact_id)
            if artifact is None or artifact.image_sha256 is None or artifact.image_size is None:
                raise _Failed("the artifact is not an image with a known identity")
            base = await _base(db, delta)
            if base is None:
                raise _Failed(f"no image artifact has the base SHA-256 {delta.base_sha256[:12]}")
            for what, image in (("image", artifact), ("base image", base)):
                size = image.image_size or image.size
                if size > self.max_image:
                    raise _Failed(
                        f"the {what} ({size} bytes) is larger than delta_max_image "
                        f"({self.max_image} bytes)"
                    )
            compression, image_size = delta.compression, artifact.image_size
            ids = base.id, artifact.id
        paths = []
        for what, key in zip(("base", "new"), ids, strict=True):
            try:
                paths.append(await self.blobs.local_path(key))
            except BlobNotFoundError:
                raise _Failed(f"the {what} image's blob {key[:12]} is missing") from None
        return paths[0], paths[1], compression, image_size

    async def _store(self, data: bytes, key: str) -> None:
        await anyio.to_thread.run_sync(partial(os.makedirs, self.tmp_dir, exist_ok=True))
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="delta-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                await anyio.to_thread.run_sync(f.write, data)
            await self.blobs.put_file(tmp, key)
        finally:
            tmp.unlink(missing_ok=True)

    async def _update(self, delta_id: int, claim: datetime, **values: Any) -> bool:
        """Set ``values`` on the row while it is still this claim; whether it was."""
        async with self.sessions() as db:
            result = await db.execute(
                update(ArtifactDelta)
                .where(
                    ArtifactDelta.id == delta_id,
                    ArtifactDelta.state == MAKING,
                    ArtifactDelta.claimed_at == claim,
                )
                .values(updated_at=utcnow(), **values)
            )
            await db.commit()
        return _rowcount(result) == 1

    async def _finish(
        self,
        delta_id: int,
        claimed_at: datetime,
        state: str,
        *,
        size: int | None = None,
        blob_key: str | None = None,
        error: str | None = None,
    ) -> str | None:
        done = await self._update(
            delta_id,
            claimed_at,
            state=state,
            progress=100,
            size=size,
            blob_key=blob_key,
            error=one_line(error) if error else None,
        )
        if done:
            log.info("delta %d: %s%s", delta_id, state, f" ({one_line(error)})" if error else "")
        return state if done else None

    async def _hand_back(self, delta_id: int, claimed_at: datetime) -> None:
        await self._update(delta_id, claimed_at, state=QUEUED, progress=0, claimed_at=None)


async def in_daemon_thread(work: Callable[[], T]) -> T:
    """``work()`` in a thread of its own, awaited. A daemon thread, unlike anyio's worker
    threads: cancelling the caller abandons it, and a server that stops does not wait at exit
    for a patch being made (its row is queued again)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, lambda: done.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: done.set_result(result))

    threading.Thread(target=run, name="otakit-delta", daemon=True).start()
    return await done


async def _base(db: AsyncSession, delta: ArtifactDelta) -> Artifact | None:
    if delta.base_artifact_id is not None:
        base = await db.get(Artifact, delta.base_artifact_id)
        if base is not None and base.image_sha256 == delta.base_sha256:
            return base
    found: Artifact | None = await db.scalar(
        select(Artifact)
        .where(Artifact.image_sha256 == delta.base_sha256, Artifact.kind == "image")
        .limit(1)
    )
    return found


def _rowcount(result: Any) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0
