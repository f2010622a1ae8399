"""The MQTT publisher: serves devices that run the original middleware's MQTT flows (protocols.md §3).

A device talks to the publisher through the broker, never directly::

    device -> COMPANY/BOARD/publish_notify       every request below, JSON, all values strings
    publisher -> the request's UniqueTopicName   job document, image chunks, "Result Received"
    publisher -> COMPANY/BOARD/OTAImage          the image, for "Send Direct Update"

    request              answer
    Update Availability  "Update Available" job (Connection MQTT, Broker/Port "" = this broker,
                         File, Version a.b.c, Board, UniqueTopicName) or "No Update Available"
    Request Update       every chunk of the image, on the unique topic
    Send Direct Update   every chunk of the image, on the direct topic
    Request Data Chunk   the chunks covering Offset/Size (Size "-1": to the end of the file)
    Success / Failure    "Result Received"; with deployments, recorded for the device and
                         deployment answered on its UniqueTopicName (the only key it sends)

Delta updates, for otakit agents only (nothing changes for a request without the two keys): an
"Update Availability" with ``ImageSHA256`` (the image digest of what the device runs, 64
lowercase hex) and ``Delta`` (the compressions it applies, e.g. ``lzma,heatshrink``) is
answered, when the server has a ``ready`` delta of the offered artifact from exactly that base
in one of those compressions (and the device reported no delta failure in that deployment),
with the same job plus ``DeltaFile``, ``DeltaSize``, ``DeltaSHA256``, ``DeltaBase``,
``DeltaNew`` and ``DeltaCompression`` (protocol/jobdoc.py). ``DeltaFile`` is
``/deltas/<artifact sha256>/<patch sha256>``; "Request Data Chunk" with that ``Filename`` gets
the patch's chunks (same header, the new image's version, total size = the patch's size) while
the artifact is offered to the device. A device on a known base with no delta yet gets the full
image and the delta is queued (made in the background by ``otakit serve``). A result message
may carry ``DeltaError`` (a DeltaError reason): kept for the device in that deployment, which
then gets full images only.

BOARD is accepted with and without the ``APP_`` prefix the original tools use; answers go to
the topics the device named or uses. The topic's BOARD is the device's build target, which it
compares the job's ``Board`` with; ``BoardName`` is hard-coded in the original's request
templates and never decides. So images are chosen for the topic's board and ``Board`` is the
topic's level (``--app-prefix``/``--no-app-prefix`` pin one form). A message that is not a
valid JSON request is logged as one warning line and ignored.

Images come from an :class:`ImageSource`: :class:`FileSource` (one file, like the original
``publisher.py``) or :class:`DeploymentSource` (the update server's database and blob store,
with the same targeting as its HTTP device API). The publisher keeps no state a second
publisher would need: every request carries the device's identity and is decided afresh, and
what a registered device was answered on its unique topic is kept in the database
(``mqtt_sessions``, one row per device) for its result, which names only that topic. So
several publishers can share the fleet through an MQTT shared subscription
(``$share/GROUP/COMPANY/+/publish_notify``), each request reaching exactly one of them.

Sending: one asyncio task per request over one MQTT connection (QoS 1, retain false,
keepalive 60 s). A transfer keeps at most ``window`` chunks published but not yet
acknowledged (PUBACK) by the broker, in order; all transfers together keep at most
:data:`MAX_IN_FLIGHT`. A lost broker connection abandons the transfers in progress (devices
re-request what they miss) and the publisher reconnects with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import socket
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import aiomqtt

from otakit.errors import ChunkHeaderError, InputFileError, OtakitError, UsageError
from otakit.files import read_input
from otakit.image.header import HEADER_SIZE as IMAGE_HEADER_SIZE
from otakit.image.header import ImageHeader
from otakit.protocol import mqtt
from otakit.protocol.jobdoc import (
    JobDocument,
    no_update,
    parse_job_document,
    result_received,
    update_available,
    with_delta,
)
from otakit.protocol.states import of_result
from otakit.protocol.version import FirmwareVersion, job_version
from otakit.tls import client_context

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from otakit.server.blobs import BlobStore
    from otakit.server.models import ArtifactDelta, Device
    from otakit.server.service.checkin import MqttOffer
    from otakit.server.service.rollouts import RolloutEngine
    from otakit.server.settings import ServerSettings

log = logging.getLogger("otakit.publisher")
T = TypeVar("T")

WINDOW = 16  # chunks of one transfer published and not yet PUBACKed
MAX_IN_FLIGHT = 8192  # the same, all transfers together (MQTT packet ids are 16-bit)
REQUEST_TIMEOUT_S = 30.0  # longest wait for a PUBACK or SUBACK before a transfer is abandoned
CONNECT_TIMEOUT_S = 10.0  # longest wait for the broker's CONNACK
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
STOP_GRACE_S = 10.0  # on stop, how long transfers under way may take to finish
IMAGE_CACHE_BYTES = 256 * 1024 * 1024  # images kept in memory, by content hash
DEFAULT_KIT = "CY8CPROTO_062_4343W"  # the original publisher's default board
MAX_PAYLOADS = 0xFFFF  # the chunk header counts payloads in a u16

# A device's result names only its unique topic; what was answered there is kept this long
# (the original device's data timeout is 1200 s, protocols.md §8; verification and the
# result follow the download) and expired answers are deleted at most every SESSION_SWEEP_S.
SESSION_TTL = timedelta(hours=2)
SESSION_SWEEP_S = 60.0
SESSION_TOPIC_MAX = 256  # the column's size (the original device's topic buffer is 256 bytes)

# Delta requests (otakit agents): "Delta" names at most this many compressions of at most
# DELTA_NAME_MAX characters each; "DeltaError" (in a result) at most DELTA_ERROR_MAX characters.
DELTA_ACCEPTS_MAX = 4
DELTA_NAME_MAX = 16
DELTA_ERROR_MAX = 32  # DeploymentDevice.delta_error's size
DELTA_PREFIX = "/deltas/"
_HEX64 = frozenset("0123456789abcdef")
_DELTA_REASON = re.compile(rf"[A-Za-z0-9_.-]{{1,{DELTA_ERROR_MAX}}}")


# --- configuration -----------------------------------------------------------------------------


def _check_topic_level(what: str, value: str) -> str:
    """A topic level the publisher builds topics from: no separators, wildcards or NUL."""
    bad = next((c for c in ("/", "+", "#", "\x00") if c in value), None)
    if not value or bad is not None or value.startswith("$"):
        reason = f"contains {bad!r}" if bad else "is empty" if not value else "starts with '$'"
        raise UsageError(f"{what} {value!r} {reason}; it must be one MQTT topic level", value=value)
    return value


@dataclass(frozen=True)
class Broker:
    """Where the publisher connects. ``tls`` with no ``cafile`` trusts the system's CAs;
    ``certfile`` (and ``keyfile``, unless the key is in the same PEM) adds a client certificate."""

    host: str = "127.0.0.1"
    port: int = mqtt.PORT
    tls: bool = False
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    keepalive: int = mqtt.KEEPALIVE_S
    connect_timeout: float = CONNECT_TIMEOUT_S  # a broker that refuses TLS fails only by this

    def __post_init__(self) -> None:
        if not self.host:
            raise UsageError("the broker host is empty")
        if not 1 <= self.port <= 65535:
            raise UsageError(f"broker port {self.port} is not from 1 to 65535", value=self.port)
        if self.keyfile is not None and self.certfile is None:
            raise UsageError("a client key (--key) needs its certificate (--cert)")
        if not self.tls and (self.cafile or self.certfile):
            raise UsageError("a CA file or client certificate needs TLS")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings, checked now: a missing or unusable file is a one-line error.

        Raises :class:`~otakit.errors.InputFileError` for a file that cannot be read and
        :class:`~otakit.errors.UsageError` for one that holds no usable certificate or key.
        """
        if not self.tls:
            return None
        return client_context(self.cafile, self.certfile, self.keyfile)


@dataclass(frozen=True)
class PublisherConfig:
    """What the publisher listens to and how it sends.

    ``boards`` limits the publisher to those boards (``()``: every board of ``company``);
    ``app_prefix`` None accepts ``BOARD`` and ``APP_BOARD`` and answers as the device spells
    its board, True/False accept and answer only the ``APP_``/plain form. ``shared_group``
    subscribes through ``$share/GROUP/...`` so that publishers of one group split the requests.
    """

    broker: Broker = field(default_factory=Broker)
    company: str = mqtt.COMPANY
    boards: tuple[str, ...] = ()
    app_prefix: bool | None = None
    window: int = WINDOW
    chunk_size: int = mqtt.CHUNK_SIZE
    shared_group: str | None = None

    def __post_init__(self) -> None:
        _check_topic_level("company topic", self.company)
        boards = tuple(dict.fromkeys(_plain(_check_topic_level("board", b)) for b in self.boards))
        object.__setattr__(self, "boards", boards)
        if self.shared_group is not None:
            _check_topic_level("shared subscription group", self.shared_group)
        if not 1 <= self.window <= MAX_IN_FLIGHT:
            raise UsageError(
                f"window {self.window} is not from 1 to {MAX_IN_FLIGHT} chunks", value=self.window
            )
        if not 1 <= self.chunk_size <= mqtt.MAX_CHUNK_SIZE:
            raise UsageError(
                f"chunk size {self.chunk_size} is not from 1 to {mqtt.MAX_CHUNK_SIZE} bytes "
                "(the chunk header holds it in 16 bits)",
                value=self.chunk_size,
            )

    def forms(self, board: str) -> list[str]:
        """How ``board`` may appear in topics."""
        plain, prefixed = _plain(board), mqtt.APP_PREFIX + _plain(board)
        return (
            [plain, prefixed]
            if self.app_prefix is None
            else [prefixed if self.app_prefix else plain]
        )

    def filters(self) -> list[str]:
        """The topic filters the publisher subscribes to."""
        if self.boards:
            found = [
                mqtt.Topics(form, self.company).notify
                for board in self.boards
                for form in self.forms(board)
            ]
        else:
            found = [mqtt.notify_filter(self.company)]
        if self.shared_group:
            return [f"$share/{self.shared_group}/{f}" for f in found]
        return found


def _plain(board: str) -> str:
    """The board name without the ``APP_`` prefix."""
    if board.startswith(mqtt.APP_PREFIX) and len(board) > len(mqtt.APP_PREFIX):
        return board[len(mqtt.APP_PREFIX) :]
    return board


def boards_match(image_board: str | None, device_board: str) -> bool:
    """Whether an image for ``image_board`` (None: any) fits a device; ``APP_X`` is ``X``."""
    return not image_board or not device_board or _plain(image_board) == _plain(device_board)


# --- requests and releases ---------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One device message from ``COMPANY/BOARD/publish_notify``."""

    topic: str
    doc: JobDocument

    @property
    def message(self) -> str:
        return self.doc.message

    @property
    def topic_board(self) -> str:
        """The BOARD level of the topic, as the device wrote it."""
        return self.topic.split("/")[1]

    @property
    def board(self) -> str:
        """The device's board, spelled as the device compares a job's ``Board``: the topic's
        BOARD level. The original middleware builds its topics from its build target
        (``APP_<KIT>``) and compares the job's ``Board`` with that same string, while its
        request templates hard-code ``"BoardName": "CY8CPROTO_062_4343W"`` whatever the kit;
        so ``BoardName`` never decides (otakit's devices read their topic's spelling as their
        own board too)."""
        return self.topic_board

    @property
    def serial(self) -> str:
        return self.doc.serial_number

    @property
    def product(self) -> str:
        return self.doc.get("ProductID") or self.doc.product

    @property
    def version(self) -> str:
        """The version the device reports ("" when it does not)."""
        return self.doc.version

    @property
    def file(self) -> str:
        return self.doc.get("Filename") or self.doc.file

    @property
    def who(self) -> str:
        """The device, for log lines."""
        return f"{self.serial or 'a device'} ({self.topic_board})"

    @property
    def image_sha256(self) -> str | None:
        """The image digest the device says it runs (``ImageSHA256``), or None when it sends
        none or not 64 lowercase hex digits."""
        value = self.doc.get("ImageSHA256")
        return value if _is_sha256(value) else None

    @property
    def delta_accepts(self) -> tuple[str, ...]:
        """The compressions the device applies (``Delta``, comma-separated); () when it sends
        none or the list is not a short list of short names."""
        names = tuple(n.strip() for n in self.doc.get("Delta").split(",") if n.strip())
        if len(names) > DELTA_ACCEPTS_MAX or any(len(n) > DELTA_NAME_MAX for n in names):
            return ()
        return names

    @property
    def wants_delta(self) -> bool:
        """Whether the request asks for deltas: an otakit agent that sent both keys."""
        return self.image_sha256 is not None and bool(self.delta_accepts)

    @property
    def delta_error(self) -> str | None:
        """The DeltaError reason a result carries (``DeltaError``: at most 32 letters, digits,
        ``_``, ``.`` or ``-``, as the HTTP status report takes it), or None."""
        value = self.doc.get("DeltaError")
        return value if _DELTA_REASON.fullmatch(value) else None


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX64


@dataclass(frozen=True)
class DeltaRelease:
    """A patch a device may get instead of a release's image (the job's Delta* keys)."""

    key: str  # its blob key (= sha256)
    file: str  # DeltaFile: /deltas/<artifact>/<patch sha256>
    size: int
    sha256: str
    base: str  # image digest of the base
    new: str  # image digest of the new image
    compression: str


@dataclass(frozen=True)
class Release:
    """An image a device may get: what the job document says about it and where it is."""

    key: str  # what ImageSource.image loads (a blob key or a path)
    file: str  # the job document's File
    version: FirmwareVersion
    board: str | None = None  # None: any board
    deployment_id: int | None = None
    delta: DeltaRelease | None = None  # a patch to offer (or, explicitly asked, to send)

    @property
    def job_version(self) -> FirmwareVersion:
        """The version a job document can carry (a.b.c, no build number)."""
        return FirmwareVersion(self.version.major, self.version.minor, self.version.revision)


class Answer(StrEnum):
    """What the publisher answered on a device's unique topic (kept in ``mqtt_sessions``)."""

    UPDATE_AVAILABLE = "Update Available"  # "Update Availability": a job offering a deployment
    NO_UPDATE_AVAILABLE = "No Update Available"
    IMAGE = "Image"  # "Request Update" (or a first "Request Data Chunk"): a deployment's image
    NO_IMAGE = "No Image"  # the same with nothing to send


class Fate(StrEnum):
    """What became of a device's result."""

    RECORDED = "recorded"  # the device's status in the deployment it was offered
    LOGGED = "logged"  # a source without a database (one file): the log line is all
    NOT_AN_UPDATE = "not an update"  # the session's answer offered nothing: not recorded
    UNKNOWN_TOPIC = "unknown topic"  # no session on that topic: not recorded


@dataclass(frozen=True)
class ResultNote:
    """A result's fate and, for the publisher's log line, what was done (or why not)."""

    fate: Fate
    detail: str


class ImageSource(Protocol):
    """Where images come from and where results go."""

    description: str
    """For the "listening" line, e.g. ``file app.bin 1.2.0``."""

    async def offer(
        self, request: Request, *, explicit: bool, session: str | None = None
    ) -> Release | None:
        """The image for this device, or None. ``explicit`` (the device asks for the image
        itself) skips the version check, which belongs to "Update Availability". ``session``
        is the device's unique topic when the publisher answers there: a source that records
        results remembers under it which device asked and what it was offered (the device's
        result names nothing else)."""
        ...

    async def image(self, release: Release) -> bytes:
        """The bytes of a release; an :class:`OtakitError` when they cannot be had."""
        ...

    async def result(
        self, request: Request, status: str, error: str | None, *, session: str | None
    ) -> ResultNote:
        """Keep a device's result (``applying`` or ``error``) for what was answered on its
        unique topic ``session`` (None: it named none the publisher may use)."""
        ...

    async def close(self) -> None: ...


def _newer(release: Release, version: str) -> bool:
    """Whether the device at ``version`` ("" = unknown) would take ``release`` (§1: strictly
    newer, compared as the job document states it)."""
    if not version:
        return True
    try:
        current = job_version(version)
    except OtakitError:
        return True
    return release.job_version > current


def check_chunkable(size: int, chunk_size: int, what: str) -> None:
    """Raise :class:`ChunkHeaderError` if a ``size``-byte image cannot be sent in chunks."""
    if size <= 0:
        raise ChunkHeaderError(f"{what} is empty", value=size)
    if size > 0xFFFFFFFF:
        raise ChunkHeaderError(f"{what} is larger than the 4 GiB a chunk header counts", value=size)
    count = mqtt.payload_count(size, chunk_size)
    if count > MAX_PAYLOADS:
        raise ChunkHeaderError(
            f"{what} needs {count} chunks of {chunk_size} bytes, more than the {MAX_PAYLOADS} "
            "a chunk header counts; use a larger chunk size",
            value=count,
        )


class FileSource:
    """One image file for one board, like the original publisher (which also never decides;
    this one answers "No Update Available" to a device that already runs that version or
    newer, or is another board).

    The version is read from the MCUboot image header unless ``version`` is given. Raises
    :class:`~otakit.errors.InputFileError` for an unreadable file and
    :class:`~otakit.errors.UsageError` for a file without a version.
    """

    def __init__(
        self,
        path: Path,
        *,
        board: str = DEFAULT_KIT,
        version: FirmwareVersion | None = None,
        chunk_size: int = mqtt.CHUNK_SIZE,
    ) -> None:
        self.data = read_input(path, what="image")
        if version is None:
            try:
                header = ImageHeader.unpack(self.data[:IMAGE_HEADER_SIZE])
            except OtakitError as exc:
                raise UsageError(
                    f"{path} has no MCUboot image header to read its version from "
                    f"({exc.code}); give the version with --version",
                    value=str(path),
                ) from None
            version = FirmwareVersion.from_image(header.version)
        if max(version.major, version.minor, version.revision) > 0xFFFF:
            raise UsageError(
                f"version {version} does not fit the chunk header (16 bits a part)",
                value=str(version),
            )
        check_chunkable(len(self.data), chunk_size, f"image {path}")
        self.release = Release(str(path), path.name, version, _plain(board))
        self.description = f"file {path} version {version} for board {_plain(board)}"

    async def offer(
        self, request: Request, *, explicit: bool, session: str | None = None
    ) -> Release | None:
        if not boards_match(self.release.board, request.board):
            return None
        if not explicit and not _newer(self.release, request.version):
            return None
        return self.release

    async def image(self, release: Release) -> bytes:
        return self.data

    async def result(
        self, request: Request, status: str, error: str | None, *, session: str | None
    ) -> ResultNote:
        return ResultNote(Fate.LOGGED, "logged only (no server database)")

    async def close(self) -> None:
        return None


class _ImageCache:
    """Images by content key, loaded once however many devices ask at the same time."""

    def __init__(self, budget: int = IMAGE_CACHE_BYTES) -> None:
        self._budget = budget
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._loading: dict[str, asyncio.Future[bytes]] = {}

    async def get(self, key: str, load: Callable[[], Awaitable[bytes]]) -> bytes:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            data = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: the waiters re-raise it
            raise
        finally:
            del self._loading[key]
        future.set_result(data)
        self._items[key] = data
        while sum(len(v) for v in self._items.values()) > self._budget and len(self._items) > 1:
            self._items.popitem(last=False)
        return data


class DeploymentSource:
    """The update server's deployments: same database and blob store as ``otakit serve``.

    The rules are the HTTP device API's, from the same service functions
    (:func:`otakit.server.service.checkin.mqtt_request` and ``report``): a registered device
    (its ``SerialNumber``) gets the best active deployment that matches its tags, board and
    version; a device the server does not know gets what is deployed to the products that
    allow anonymous devices (its ``ProductID``, if it names one). A registered device's
    reported ``Version`` is kept, so a device that comes back running the deployed version
    counts as applied. What a registered device is answered on its unique topic ("Update
    Availability", "Request Update") is kept in ``mqtt_sessions``; its result, which names
    only that topic, is recorded from there like the HTTP result endpoint records one: with the
    rollout engine's clock, the server's ``history_per_device``, and the rollout evaluated
    after it (the engine is built here, not started).
    The job's ``File`` is ``/files/<sha256>/<name>``; a request naming it gets that artifact
    while it is still deployed to the device.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        rollouts: RolloutEngine,
    ) -> None:
        self._engine = engine
        self._sessions = sessions
        self._blobs = blobs
        self._cache = _ImageCache()
        # the HTTP servers' clock, rules and history limit: the engine is not started here
        # (each `otakit serve` process runs one); a result asks it to evaluate the rollout
        self._rollouts = rollouts
        self._keep = rollouts.settings.history_per_device
        self._swept = -math.inf  # when expired sessions were last deleted (time.monotonic)
        self.description = f"deployments ({blobs.name} blobs)"

    @classmethod
    def open(cls, settings: ServerSettings) -> DeploymentSource:
        """Open the database and blob store ``settings`` name (nothing is contacted yet)."""
        from otakit.server.blobs import open_blob_store
        from otakit.server.database import create_engine, redacted, sessionmaker
        from otakit.server.service.rollouts import RolloutEngine

        engine = create_engine(settings.database_url, pool_pre_ping=True)
        sessions = sessionmaker(engine)
        source = cls(
            engine,
            sessions,
            open_blob_store(settings.blob_url, settings.data_dir),
            RolloutEngine(sessions, settings),
        )
        source.description = (
            f"deployments in {redacted(settings.database_url)}, "
            f"blobs {settings.blob_url or settings.data_dir / 'blobs'}"
        )
        return source

    async def offer(
        self, request: Request, *, explicit: bool, session: str | None = None
    ) -> Release | None:
        from otakit.server import targeting
        from otakit.server.service import checkin

        async with self._sessions() as db:
            found = await checkin.mqtt_request(
                db,
                self._rollouts.now(),
                serial=request.serial,
                product=request.product,
                version=request.version,
                explicit=explicit,
                artifact_id=_artifact_of(request.file) if explicit else None,
                fits=lambda board: boards_match(board, request.board),
                image_sha256=None if explicit else request.image_sha256,
            )
            release = None
            if found.offer is not None:
                version = targeting.version_of(found.offer.artifact.version)
                assert version is not None  # targeting.wanted offers only readable versions
                artifact = found.offer.artifact
                release = Release(
                    key=artifact.id,
                    file=f"/files/{artifact.id}/{artifact.name}",
                    version=version,
                    board=found.board,
                    deployment_id=found.offer.deployment.id,
                    delta=await self._delta(db, request, found, explicit=explicit),
                )
            if session is not None and found.device is not None:
                await self._remember(db, session, request, found.device, release, explicit=explicit)
            await db.commit()
        await self._rollouts.changed(found.changed)
        return release

    async def _delta(
        self, db: AsyncSession, request: Request, found: MqttOffer, *, explicit: bool
    ) -> DeltaRelease | None:
        """The patch to offer with ``found``'s artifact: for "Update Availability" a ready delta
        from the device's image in a compression it applies (none after a delta failure of the
        device in that deployment; a base the server knows and no delta yet: queued, none
        now); for a "Request Data Chunk" of a DeltaFile, that ready delta of the artifact."""
        from sqlalchemy import select

        from otakit.server.models import ArtifactDelta
        from otakit.server.service import artifacts, checkin

        offer = found.offer
        assert offer is not None
        artifact = offer.artifact
        if explicit:
            named = _delta_of(request.file)
            if named is None or named[0] != artifact.id:
                return None
            row = (
                await db.execute(
                    select(ArtifactDelta)
                    .where(
                        ArtifactDelta.artifact_id == artifact.id,
                        ArtifactDelta.blob_key == named[1],
                        ArtifactDelta.state == "ready",
                    )
                    .limit(1)
                )
            ).scalar_one_or_none()
            return _delta_release(artifact.id, artifact.image_sha256, row)
        base, accepts = request.image_sha256, request.delta_accepts
        if base is None or not accepts:
            return None
        if artifact.image_sha256 is None:
            try:
                await artifacts.ensure_image_digest(db, self._blobs, artifact)
            except OtakitError as exc:
                log.warning("no delta of %s: %s", artifact.id[:12], exc.message)
                return None
        if artifact.image_sha256 is None or artifact.image_sha256 == base:
            return None
        # the HTTP check-in's rule (checkin.offered_delta): none after a delta failure of the
        # device in this deployment; a known base without a delta yet: queued, the full image now
        serial = found.device.serial if found.device is not None else ""
        row = await checkin.offered_delta(
            db,
            offer,
            serial,
            base,
            accepts,
            self._rollouts.settings.delta_compression,
            self._rollouts.now(),
        )
        return _delta_release(artifact.id, artifact.image_sha256, row)

    async def _remember(
        self,
        db: AsyncSession,
        topic: str,
        request: Request,
        device: Device,
        release: Release | None,
        *,
        explicit: bool,
    ) -> None:
        """Keep, under the unique topic, what a registered device was answered there: the
        device's result names only that topic. One row per device (its other sessions are
        dropped); a device the server does not know leaves none (its result names nobody).
        "Request Data Chunk" is noted only on a topic with no session yet."""
        from sqlalchemy import delete

        from otakit.server.database import insert
        from otakit.server.models import MqttSession

        if request.message == mqtt.REQUEST_DATA_CHUNK:
            noted = await db.get(MqttSession, topic)
            if noted is not None:
                return  # a piece of a transfer already noted (a device may ask only for pieces)
        if len(topic) > SESSION_TOPIC_MAX:
            log.warning(
                "%s: UniqueTopicName longer than %d characters, its result cannot be recorded",
                request.who,
                SESSION_TOPIC_MAX,
            )
            return
        if explicit:
            answer = Answer.IMAGE if release is not None else Answer.NO_IMAGE
        else:
            answer = Answer.UPDATE_AVAILABLE if release is not None else Answer.NO_UPDATE_AVAILABLE
        now = self._rollouts.now()
        await self._sweep(db, now)
        await db.execute(
            delete(MqttSession).where(
                MqttSession.device_serial == device.serial, MqttSession.topic != topic
            )
        )
        values = {
            "topic": topic,
            "device_serial": device.serial,
            "deployment_id": release.deployment_id if release is not None else None,
            "answer": answer.value,
            "answered_at": now,
        }
        statement = insert(db, MqttSession).values(**values)
        await db.execute(
            statement.on_conflict_do_update(
                index_elements=["topic"],
                set_={key: statement.excluded[key] for key in values if key != "topic"},
            )
        )

    async def _sweep(self, db: AsyncSession, now: datetime) -> None:
        """Delete expired sessions, at most every :data:`SESSION_SWEEP_S` (an index range)."""
        from sqlalchemy import delete

        from otakit.server.models import MqttSession

        if time.monotonic() - self._swept < SESSION_SWEEP_S:
            return
        self._swept = time.monotonic()
        await db.execute(delete(MqttSession).where(MqttSession.answered_at < now - SESSION_TTL))

    async def image(self, release: Release) -> bytes:
        async def load() -> bytes:
            path = await self._blobs.local_path(release.key)
            try:
                return await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                raise InputFileError(
                    f"cannot read blob {release.key}: {exc.strerror or exc}", value=release.key
                ) from None

        return await self._cache.get(release.key, load)

    async def result(
        self, request: Request, status: str, error: str | None, *, session: str | None
    ) -> ResultNote:
        """Record a result for the device and deployment remembered under its unique topic
        (each result of the session: otakit's devices report a revert after "Success"). A
        result on a topic with no session (never answered, replaced or expired), or after an
        answer that offered nothing ("No Update Available", after which the original device
        ends in INVALID_VERSION), is not recorded."""
        from otakit.server.models import MqttSession
        from otakit.server.service import checkin

        if session is None:
            return ResultNote(Fate.UNKNOWN_TOPIC, "not recorded: it names no unique topic")
        now = self._rollouts.now()
        async with self._sessions() as db:
            row = await db.get(MqttSession, session)
            if row is None or now - row.answered_at > SESSION_TTL:
                return ResultNote(
                    Fate.UNKNOWN_TOPIC,
                    f"not recorded: no session on {session} (never answered, or expired)",
                )
            serial, deployment_id = row.device_serial, row.deployment_id
            if deployment_id is None:
                return ResultNote(
                    Fate.NOT_AN_UPDATE,
                    f"not recorded: {serial} was answered {row.answer!r} on this topic, so no "
                    "update is under way",
                )
            changed = await checkin.report(
                db,
                serial,
                now,
                status=status,
                error=error,
                deployment_id=deployment_id,
                offered=True,  # the session holds what it was answered
                keep=self._keep,
                delta_error=request.delta_error,  # then full images only in this deployment
            )
            await db.commit()
        await self._rollouts.changed([changed])
        return ResultNote(
            Fate.RECORDED, f"recorded as {status} for {serial} in deployment {deployment_id}"
        )

    async def close(self) -> None:
        await self._engine.dispose()


def _artifact_of(file: str) -> str | None:
    """The artifact id in a ``/files/<sha256>/<name>`` File or a DeltaFile, or None."""
    parts = file.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "files" and len(parts[1]) == 64:
        return parts[1].lower()
    delta = _delta_of(file)
    return delta[0] if delta is not None else None


def _delta_of(file: str) -> tuple[str, str] | None:
    """The artifact id and patch sha256 in a ``/deltas/<sha256>/<sha256>`` DeltaFile, or None."""
    if not file.startswith(DELTA_PREFIX):
        return None
    parts = file[len(DELTA_PREFIX) :].split("/")
    if len(parts) == 2 and all(_is_sha256(part) for part in parts):
        return parts[0], parts[1]
    return None


def _delta_release(
    artifact_id: str, new: str | None, row: ArtifactDelta | None
) -> DeltaRelease | None:
    """What the job document says of a ready delta row (None without one, or incomplete)."""
    if row is None or row.blob_key is None or row.size is None or new is None:
        return None
    return DeltaRelease(
        key=row.blob_key,
        file=f"{DELTA_PREFIX}{artifact_id}/{row.blob_key}",
        size=row.size,
        sha256=row.blob_key,
        base=row.base_sha256,
        new=new,
        compression=row.compression,
    )


# --- the publisher -----------------------------------------------------------------------------


class _Client(aiomqtt.Client):
    """aiomqtt's client, without its count of all pending calls on every call (a warning
    threshold), which costs O(pending) per chunk when thousands are in flight by design."""

    @contextlib.contextmanager
    def _pending_call(self, mid: int, value: T, pending_dict: dict[int, T]) -> Iterator[None]:
        pending_dict[mid] = value
        try:
            yield
        finally:
            pending_dict.pop(mid, None)


class Publisher:
    """Answers device requests on the broker until :meth:`stop` is called.

    ``on_listening`` is called with the "listening" line each time the subscriptions are in
    place (first start and every reconnection); the line is also logged.
    """

    def __init__(
        self,
        config: PublisherConfig,
        source: ImageSource,
        *,
        on_listening: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.on_listening = on_listening
        self.stats: Counter[str] = Counter()
        self._tls = config.broker.tls_context()
        self._stopping: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._sending: set[str] = set()  # unique topics with a whole-image transfer under way
        self._direct: dict[str, asyncio.Lock] = {}
        self._in_flight: asyncio.Semaphore | None = None
        self._online = False  # connected to the broker

    # -- lifecycle --

    def stop(self) -> None:
        """Stop (from the publisher's event loop, e.g. a signal handler)."""
        if self._stopping is not None:
            self._stopping.set()

    async def run(self) -> None:
        """Connect, listen and answer until :meth:`stop`; reconnect with backoff when the
        broker goes away."""
        self._stopping = asyncio.Event()
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        delay = RECONNECT_MIN_S
        while not self._stopping.is_set():
            self._online = False
            session = asyncio.create_task(self._session())
            stopping = asyncio.create_task(self._stopping.wait())
            try:
                await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not session.done() and not self._online:
                    session.cancel()  # stopped while connecting: do not wait for the broker
                await asyncio.gather(session, return_exceptions=True)
            finally:
                for task in (session, stopping):
                    task.cancel()
            lost = None if session.cancelled() else session.exception()
            if self._stopping.is_set():
                break
            if not isinstance(lost, aiomqtt.MqttError):
                raise lost if lost is not None else RuntimeError("the MQTT session ended")
            delay = RECONNECT_MIN_S if self._online else delay
            log.warning(
                "broker %s: %s; reconnecting in %.1f s", self.config.broker.url, lost, delay
            )
            await self._pause(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
        log.info("stopped")

    async def _session(self) -> None:
        async with self._client() as client:
            self._online = True
            await self._serve(client)

    def _client(self) -> aiomqtt.Client:
        broker = self.config.broker
        return _Client(
            broker.host,
            broker.port,
            identifier=f"otakit-pub-{secrets.token_hex(4)}",
            keepalive=broker.keepalive,
            tls_context=self._tls,
            timeout=broker.connect_timeout,
            # no limit in paho: its default (20) would queue every transfer behind one another,
            # and any limit makes it scan all pending messages on each PUBACK; MAX_IN_FLIGHT
            # and the windows bound what is in flight instead
            max_inflight_messages=0,
            # small answers (job documents, PUBACK-paced chunks) must not wait for Nagle
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def _pause(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _serve(self, client: aiomqtt.Client) -> None:
        assert self._stopping is not None
        client.pending_calls_threshold = 1 << 30  # many calls pending is the point here
        filters = self.config.filters()
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=mqtt.QOS, timeout=REQUEST_TIMEOUT_S)
        line = (
            f"listening on {self.config.broker.url} for {', '.join(filters)}; "
            f"window {self.config.window}, chunks of {self.config.chunk_size} bytes; "
            f"images from {self.source.description}"
        )
        log.info("%s", line)
        if self.on_listening is not None:
            self.on_listening(line)
        listen = asyncio.create_task(self._listen(client))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({listen, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                await self._drain(client, filters, listen)
        finally:
            for task in (listen, stopping, *self._handlers):
                task.cancel()
            await asyncio.gather(listen, stopping, *self._handlers, return_exceptions=True)
            self._handlers.clear()
            self._sending.clear()
        lost = None if listen.cancelled() else listen.exception()
        if lost is not None:
            raise lost  # the broker went away

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._spawn(client, message)

    def _spawn(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        task = asyncio.create_task(self._handle(client, message))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _drain(
        self, client: aiomqtt.Client, filters: list[str], listen: asyncio.Task[None]
    ) -> None:
        """Stop taking requests, answer those already received, let transfers finish (for at
        most :data:`STOP_GRACE_S`); the caller cancels what is left."""
        listen.cancel()
        await asyncio.gather(listen, return_exceptions=True)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe(filters, timeout=REQUEST_TIMEOUT_S)
            messages = client.messages
            while len(messages):
                self._spawn(client, await anext(messages))
        if self._handlers:
            log.info("stopping: finishing %d requests under way", len(self._handlers))
            await asyncio.wait(set(self._handlers), timeout=STOP_GRACE_S)

    # -- requests --

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        parsed = mqtt.board_of(topic, self.config.company)
        if parsed is None:
            return
        board, prefixed = parsed
        if self.config.boards and board not in self.config.boards:
            return
        if self.config.app_prefix is not None and prefixed != self.config.app_prefix:
            log.debug(
                "ignored a request on %s: this publisher answers only %s",
                topic,
                "APP_ boards" if self.config.app_prefix else "boards without APP_",
            )
            return
        self.stats["requests"] += 1
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            request = Request(topic, parse_job_document(payload))
        except OtakitError as exc:
            self.stats["ignored"] += 1
            log.warning("ignored a malformed message on %s: %s", topic, exc.message)
            return
        try:
            await self._answer(client, request)
        except OtakitError as exc:
            self.stats["failed"] += 1
            log.warning(
                "could not answer %r from %s: %s", request.message, request.who, exc.message
            )
        except aiomqtt.MqttError as exc:
            self.stats["failed"] += 1
            log.warning("abandoned %r from %s: %s", request.message, request.who, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed database or store call must not stop the publisher
            self.stats["failed"] += 1
            log.error(
                "could not answer %r from %s: %s: %s",
                request.message,
                request.who,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )

    async def _answer(self, client: aiomqtt.Client, request: Request) -> None:
        kind = request.message
        if kind == mqtt.UPDATE_AVAILABILITY:
            await self._availability(client, request)
        elif kind == mqtt.REQUEST_UPDATE:
            await self._whole_image(client, request, direct=False)
        elif kind == mqtt.SEND_DIRECT_UPDATE:
            await self._whole_image(client, request, direct=True)
        elif kind == mqtt.REQUEST_DATA_CHUNK:
            await self._data_chunk(client, request)
        elif kind in mqtt.RESULTS:
            await self._result(client, request)
        else:
            self.stats["ignored"] += 1
            log.warning(
                "ignored %r from %s: not a request the publisher answers", kind, request.who
            )

    def _reply_topic(self, request: Request, *, required: bool = True) -> str | None:
        """The device's UniqueTopicName, if it is a topic the publisher may publish to."""
        topic = request.doc.unique_topic_name
        if not topic:
            if required:
                log.warning("ignored %r from %s: no UniqueTopicName", request.message, request.who)
            return None
        problem = None
        if any(c in topic for c in "+#\x00"):
            problem = "holds a wildcard"
        elif topic.startswith("$"):
            problem = "starts with '$'"
        elif topic.rsplit("/", 1)[-1] == mqtt.NOTIFY:
            problem = "is a publisher's request topic"
        if problem is not None:
            log.warning(
                "ignored %r from %s: UniqueTopicName %r %s",
                request.message,
                request.who,
                topic,
                problem,
            )
            return None
        return topic

    def _board_for(self, request: Request) -> str:
        """The job's Board: as the device spells its board, or the form the config pins."""
        if self.config.app_prefix is None:
            return request.board
        plain = _plain(request.board)
        return mqtt.APP_PREFIX + plain if self.config.app_prefix else plain

    async def _publish(self, client: aiomqtt.Client, topic: str, doc: JobDocument) -> None:
        await client.publish(
            topic, doc.to_json(), qos=mqtt.QOS, retain=False, timeout=REQUEST_TIMEOUT_S
        )

    async def _availability(self, client: aiomqtt.Client, request: Request) -> None:
        topic = self._reply_topic(request)
        if topic is None:
            return
        release = await self.source.offer(request, explicit=False, session=topic)
        identity = {
            "manufacturer": request.doc.manufacturer,
            "manufacturer_id": request.doc.manufacturer_id,
            "product": request.product,
            "serial_number": request.serial,
        }
        if release is None:
            doc = no_update(
                **identity,
                version=request.version,
                board=self._board_for(request),
                unique_topic_name=topic,
            )
            log.info("no update for %s at %s", request.who, request.version or "an unknown version")
        else:
            doc = update_available(
                **identity,
                version=release.job_version,
                board=self._board_for(request),
                connection="MQTT",
                broker="",
                port="",
                file=release.file,
                unique_topic_name=topic,
            )
            doc = self._offer_delta(doc, release, request)
            log.info(
                "offered %s %s to %s at %s%s",
                release.file,
                release.job_version,
                request.who,
                request.version or "an unknown version",
                f" with a {doc.delta_size}-byte delta" if doc.has_delta else "",
            )
        await self._publish(client, topic, doc)

    def _offer_delta(self, doc: JobDocument, release: Release, request: Request) -> JobDocument:
        """``doc`` with the release's delta, if it has one for this (otakit) device and the
        document can hold it (1024 bytes in all); else ``doc`` as it is."""
        delta = release.delta
        if delta is None or not request.wants_delta:
            return doc
        try:
            return with_delta(
                doc,
                file=delta.file,
                size=delta.size,
                sha256=delta.sha256,
                base=delta.base,
                new=delta.new,
                compression=delta.compression,
            )
        except OtakitError as exc:
            log.warning(
                "no delta for %s: the job document cannot hold it (%s)", request.who, exc.message
            )
            return doc

    async def _release(
        self, request: Request, *, session: str | None = None
    ) -> tuple[Release, bytes] | None:
        release = await self.source.offer(request, explicit=True, session=session)
        delta_file = _delta_of(request.file) is not None
        if delta_file and request.message == mqtt.REQUEST_DATA_CHUNK:
            # the patch of a delta offer: sent only while its artifact is offered to the device
            if release is None or release.delta is None:
                log.info(
                    "nothing to send for %r from %s: no delta %s for it",
                    request.message,
                    request.who,
                    request.file,
                )
                return None
            patch = release.delta
            data = await self.source.image(replace(release, key=patch.key, file=patch.file))
            check_chunkable(len(data), self.config.chunk_size, f"delta {patch.file}")
            return replace(release, file=patch.file), data
        if release is None or delta_file:
            log.info(
                "nothing to send for %r from %s: no image for it", request.message, request.who
            )
            return None
        data = await self.source.image(release)
        check_chunkable(len(data), self.config.chunk_size, f"image {release.file}")
        return release, data

    async def _whole_image(self, client: aiomqtt.Client, request: Request, *, direct: bool) -> None:
        if direct:
            # one transfer at a time on a direct topic: every device of the board hears it
            topic = mqtt.Topics(request.topic_board, self.config.company).direct
            async with self._direct.setdefault(topic, asyncio.Lock()):
                await self._send_image(client, request, topic, session=None)
            return
        found = self._reply_topic(request)
        if found is None:
            return
        if found in self._sending:
            log.info("already sending to %s; ignored a repeated %r", found, request.message)
            return
        self._sending.add(found)
        try:
            await self._send_image(client, request, found, session=found)
        finally:
            self._sending.discard(found)

    async def _send_image(
        self, client: aiomqtt.Client, request: Request, topic: str, *, session: str | None
    ) -> None:
        found = await self._release(request, session=session)
        if found is None:
            return
        release, data = found
        chunks = mqtt.range_chunks(data, release.version, 0, -1, self.config.chunk_size)
        await self._send(client, topic, chunks, release, len(data), request)

    async def _data_chunk(self, client: aiomqtt.Client, request: Request) -> None:
        session = self._reply_topic(request, required=False)
        topic = session or mqtt.Topics(request.topic_board, self.config.company).direct
        offset_text = request.doc.get("Offset")
        size_text = request.doc.get("Size") or request.doc.get("Length")
        try:
            offset = int(offset_text)
            size = int(size_text) if size_text else self.config.chunk_size
        except ValueError:
            offset, size = -1, 0
        if not offset_text or offset < 0 or not (size > 0 or size == -1):
            log.warning(
                "ignored %r from %s: Offset %r / Size %r are not a byte range",
                request.message,
                request.who,
                offset_text,
                size_text,
            )
            return
        found_release = await self._release(request, session=session)
        if found_release is None:
            return
        release, data = found_release
        if offset >= len(data):
            log.warning(
                "ignored %r from %s: Offset %d is past the end of the %d-byte %s",
                request.message,
                request.who,
                offset,
                len(data),
                "patch" if release.delta is not None else "image",
            )
            return
        chunks = mqtt.range_chunks(data, release.version, offset, size, self.config.chunk_size)
        await self._send(client, topic, chunks, release, len(data), request, part=(offset, size))

    async def _send(
        self,
        client: aiomqtt.Client,
        topic: str,
        chunks: Iterator[bytes],
        release: Release,
        size: int,
        request: Request,
        *,
        part: tuple[int, int] | None = None,
    ) -> None:
        """Publish ``chunks`` in order, at most ``window`` of them not yet acknowledged."""
        assert self._in_flight is not None
        in_flight = self._in_flight
        sent = 0
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while True:
                # take the next chunk and hand it to the client without yielding in between,
                # so that chunks go out in order whichever worker sends them
                async with in_flight:
                    payload = next(chunks, None)
                    if payload is None:
                        return
                    # no timer per chunk: a lost connection cancels the transfer instead
                    await client.publish(
                        topic, payload, qos=mqtt.QOS, retain=False, timeout=math.inf
                    )
                sent += 1

        workers = [asyncio.create_task(worker()) for _ in range(self.config.window)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
        elapsed = time.perf_counter() - started
        self.stats["chunks"] += sent
        what = (
            "image" if part is None else f"bytes {part[0]}+{part[1] if part[1] >= 0 else 'rest'} of"
        )
        if part is None:
            self.stats["images"] += 1
        # a whole image is news; the many single chunks a device asks for are detail
        log.log(
            logging.INFO if part is None else logging.DEBUG,
            "sent %s %s %s (%d bytes) to %s for %s: %d chunks in %.3f s",
            what,
            release.file,
            release.job_version,
            size,
            topic,
            request.who,
            sent,
            elapsed,
        )

    async def _result(self, client: aiomqtt.Client, request: Request) -> None:
        reason = request.doc.get("Reason") or request.doc.get("Error")
        result = of_result(request.message, reason)
        assert result is not None  # _answer sends only mqtt.RESULTS here
        status, error = result
        session = self._reply_topic(request, required=False)
        note = await self.source.result(request, status, error, session=session)
        self.stats[f"results {note.fate.value}"] += 1
        log.log(
            logging.WARNING if note.fate is Fate.UNKNOWN_TOPIC else logging.INFO,
            "result from %s: %s%s; %s",
            request.who,
            request.message,
            f" ({error})" if error else "",
            note.detail,
        )
        topic = session or mqtt.Topics(request.topic_board, self.config.company).direct
        await self._publish(client, topic, result_received(unique_topic_name=topic))
