"""A fleet of simulated devices in one process, updating against an otakit server.

Every device is a small object with its own identity (serial, product, group, board), the
version it runs, its own device token (minted by the server at its first check-in with the
fleet's enrollment token), a flash model (:mod:`otakit.device.flash`) laid out by one flash map
shared by the fleet, its own resume journal (in memory), a poll interval with jitter and a fault
profile. All devices run as asyncio tasks on one event loop and share a few
``httpx.AsyncClient`` connection pools; at most ``concurrency`` requests are on the wire at once.
With an MQTT broker (:class:`MqttBroker`), devices still enroll with the server but take their
jobs and images from ``otakit publisher`` over one shared MQTT connection (§3).

One update, as a device of the JSON check-in API does it (docs/agent.md, docs/server.md)::

    POST /api/v1/device/checkin  → job: signed URL, size, SHA-256, version, deployment
    POST /api/v1/device/status   downloading
    GET  <signed URL>            Range: bytes=a-b (If-Range: ETag on the first range of a resume)
                                 written through SlotStorage, journal committed after each range
    verify                       SHA-256 of the file, MCUboot hash and signature (trusted keys)
    set pending                  the bootloader's TEST request
    POST /api/v1/device/status   applying
    reboot                       Bootloader.boot() on the device's flash: swap or overwrite
    confirm                      image_ok (a *broken* device never confirms: its image crashes,
                                 the next boot reverts, and the device reports the revert)
    POST /api/v1/device/checkin  with the new version: the server counts it Applied

Faults, drawn per device from ``seed`` (the same seed gives every device the same profile and
the same draws): a *drop* fails a range (the answer is thrown away as if the link broke) and the
device reports ``interrupted`` and resumes from its journal at its next poll; a *power cut*
(``Flash.cut_after``, torn) hits a random flash operation of the download, the device reboots
and resumes; a *slow link* sleeps after each range as long as the bytes take at the link's
speed; *broken* devices never confirm.

Memory: the flash contents of every device live in one :class:`SectorPool` that keeps each
distinct sector once (all devices hold the same images, so 10,000 flashes of 1 MiB cost little
more than one); a device keeps a dictionary of references to the sectors it holds.
Wear counters are not kept per device.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiomqtt
import httpx

from otakit.device.bootloader import Action, Bootloader, BootloaderConfig, ImageBoot, Strategy
from otakit.device.flash import Flash, FlashStats, PowerCut, SectorWear
from otakit.device.flashmap import Area, FlashMap
from otakit.device.journal import Download, Journal, JournalRecord
from otakit.device.storage import SlotStorage
from otakit.device.transports.http import content_total
from otakit.errors import (
    BootError,
    ChunkHeaderError,
    FlashMapError,
    HashMismatchError,
    InvalidVersionError,
    JobFetchError,
    OtakitError,
    TransferError,
    TransportUnsupportedError,
    UsageError,
    WrongBoardError,
)
from otakit.image.keys import PublicKey, SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.trailer import SWAP_STATUS_ROW_SIZE, swap_status_area_size
from otakit.protocol import mqtt as wire
from otakit.protocol.fwinfo import FwError, FwStatus
from otakit.protocol.jobdoc import (
    NO_UPDATE_AVAILABLE,
    RESULT_RECEIVED,
    UPDATE_AVAILABLE,
    JobDocument,
    parse_job_document,
)
from otakit.protocol.version import FirmwareVersion, job_version

CHECKIN_PATH = "/api/v1/device/checkin"
STATUS_PATH = "/api/v1/device/status"
USER_AGENT = "otakit-fleet"
KIB = 1024
POOL_CONNECTIONS = 4  # per httpx client (see Fleet._connections)
REVERT_ERROR = "reverted: not confirmed after reboot"

EventSink = Callable[[dict[str, Any]], None]


# --- flash contents shared by the fleet ---------------------------------------------------------


class SectorPool:
    """Every distinct sector content of the fleet's flashes, kept once.

    Devices that hold the same image hold references to the same ``bytes`` objects. The pool
    only grows: it holds each content any device ever had (for one image and one strategy a
    few hundred sectors; a torn power cut adds the one sector it tore).
    """

    def __init__(self) -> None:
        self._sectors: dict[bytes, bytes] = {}

    def intern(self, data: bytes) -> bytes:
        return self._sectors.setdefault(data, data)

    def __len__(self) -> int:
        return len(self._sectors)

    @property
    def bytes(self) -> int:
        return sum(len(s) for s in self._sectors.values())


class SharedBacking:
    """Flash contents as references into a :class:`SectorPool`; erased sectors cost nothing.

    Implements :class:`otakit.device.flash.Backing`.
    """

    __slots__ = ("_erased", "_pool", "_sector", "_sectors")

    def __init__(self, pool: SectorPool, sector_size: int, erased: bytes) -> None:
        self._pool = pool
        self._sector = sector_size
        self._erased = erased  # one erased sector, shared
        self._sectors: dict[int, bytes] = {}

    def read(self, offset: int, length: int) -> bytes:
        size = self._sector
        index, inner = divmod(offset, size)
        if inner + length <= size:  # the common case: inside one sector
            return self._sectors.get(index, self._erased)[inner : inner + length]
        parts = []
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, size)
            step = min(end - offset, size - inner)
            parts.append(self._sectors.get(index, self._erased)[inner : inner + step])
            offset += step
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        size, pos = self._sector, 0
        while pos < len(data):
            index, inner = divmod(offset + pos, size)
            step = min(len(data) - pos, size - inner)
            if step == size:
                content = data[pos : pos + step]
            else:
                old = self._sectors.get(index, self._erased)
                content = old[:inner] + data[pos : pos + step] + old[inner + step :]
            if content == self._erased:
                self._sectors.pop(index, None)
            else:
                self._sectors[index] = self._pool.intern(content)
            pos += step

    @property
    def sectors_held(self) -> int:
        return len(self._sectors)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Uncounted(FlashStats):
    """No wear counters per sector: a fleet does not study wear (bench/flash_wear.py does)."""

    _scratch = SectorWear()

    def sector(self, index: int) -> SectorWear:
        return self._scratch


class MemoryJournal(Journal):
    """The resume journal of :mod:`otakit.device.journal`, kept in memory.

    It stands for the journal a real device keeps in its own non-volatile storage: it
    survives the fleet's simulated power cuts, which only touch the flash model.
    """

    def __init__(self) -> None:  # no file: nothing of Journal's own state is used
        self._record: JournalRecord | None = None

    def load(self) -> JournalRecord | None:
        record = self._record
        if record is not None and not 0 <= record.durable <= record.download.size:
            return None
        return record

    def save(self, record: JournalRecord) -> None:
        self._record = record

    def clear(self) -> None:
        self._record = None


def fleet_flashmap(
    strategy: Strategy, *, slot_size: int = 512 * KIB, sector_size: int = 4 * KIB
) -> FlashMap:
    """Primary and secondary slots of ``slot_size`` laid out for ``strategy`` as MCUboot needs
    them (swap-scratch: one scratch sector; swap-move: a primary one sector larger; swap-offset:
    a secondary one sector larger), MCUBOOT_MAX_IMG_SECTORS = the sectors of the larger slot.

    swap-status is Infineon's MCUBootApp on PSoC 6 internal flash, as the ``psoc6-2m-swap``
    preset: 0x200-byte rows as sectors and write size (``sector_size`` is not used), erased
    0x00, replacing row writes, the slots followed by the swap status partition (as small as
    ``swap_status.h`` allows for the slots' rows) and a 0x1000-byte scratch area.

    Raises FlashMapError for sizes that do not make a valid map (swap-status: slots much larger
    than 2 MiB need a status partition of more than the 64 rows MCUboot reads).
    """
    if strategy is Strategy.SWAP_STATUS:
        return _swap_status_flashmap(slot_size)
    extra_primary = sector_size if strategy is Strategy.SWAP_MOVE else 0
    extra_secondary = sector_size if strategy is Strategy.SWAP_OFFSET else 0
    primary_size = slot_size + extra_primary
    secondary_size = slot_size + extra_secondary
    areas = [
        Area("primary", 0, primary_size, image=0),
        Area("secondary", primary_size, secondary_size, image=0),
    ]
    end = primary_size + secondary_size
    if strategy is Strategy.SWAP_SCRATCH:
        areas.append(Area("scratch", end, sector_size))
        end += sector_size
    largest = max(primary_size, secondary_size)
    return FlashMap(
        name=f"fleet-{slot_size // KIB}k-{strategy.value}",
        flash_size=end,
        sector_size=sector_size,
        write_align=8,
        areas=tuple(areas),
        max_sectors=max(1, largest // sector_size if sector_size > 0 else 1),
        strategy=strategy,
    )


PSOC6_ROW = SWAP_STATUS_ROW_SIZE  # PSoC 6 internal flash row: MCUBootApp's sector and write size
SWAP_STATUS_SCRATCH = 0x1000  # the scratch area of the psoc6-2m-swap preset


def _swap_status_flashmap(slot_size: int) -> FlashMap:
    """swap-status slots of ``slot_size`` in PSoC 6 rows (see :func:`fleet_flashmap`)."""
    rows = slot_size // PSOC6_ROW if slot_size > 0 else 0
    status = swap_status_area_size(max(1, rows))
    status = -(-status // PSOC6_ROW) * PSOC6_ROW
    return FlashMap(
        name=f"fleet-{slot_size // KIB}k-{Strategy.SWAP_STATUS.value}",
        flash_size=2 * slot_size + status + SWAP_STATUS_SCRATCH,
        sector_size=PSOC6_ROW,
        write_align=PSOC6_ROW,
        areas=(
            Area("primary", 0, slot_size, image=0),
            Area("secondary", slot_size, slot_size, image=0),
            Area("status", 2 * slot_size, status, image=0),
            Area("scratch", 2 * slot_size + status, SWAP_STATUS_SCRATCH),
        ),
        max_sectors=max(1, rows),
        strategy=Strategy.SWAP_STATUS,
        erased_value=0x00,
        write_mode="replace",
    )


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultProfile:
    """What can go wrong for one device."""

    drop_rate: float = 0.0  # probability that a range fails (link dropped)
    power_cut_rate: float = 0.0  # probability that an update attempt meets a power cut
    bandwidth: float | None = None  # link speed in bytes/s (None: as fast as loopback)
    broken: bool = False  # the new image never confirms (reverts at the next boot)


@dataclass(frozen=True)
class MqttBroker:
    """Where MQTT devices ask ``otakit publisher`` for their jobs and images (§3)."""

    host: str
    port: int = wire.PORT
    company: str = wire.COMPANY
    app_prefix: bool = True  # topics name the board APP_<board>, as the original devices do
    sessions: int = 16  # device sessions at once over the fleet's one connection
    job_timeout: float = 10.0  # s to wait for the job document
    chunk_timeout: float = 5.0  # s without a chunk before asking for the rest
    request_tries: int = 3  # such requests without progress, then GET_DATA
    result_timeout: float = 5.0  # s to wait for "Result Received" (silence counts as received)


@dataclass(frozen=True)
class FleetConfig:
    """A fleet: how many devices, who they are, where they check in, and their faults."""

    server: str  # base URL of the update server
    token: str | None  # enrollment token (None: the product lets devices self-register)
    product: str
    devices: int = 100
    group: str | None = None
    board: str = "CY8CPROTO_062_4343W"
    manufacturer: str = "otakit"
    version: str = "1.0.0"  # what every device runs at the start
    keys: tuple[PublicKey, ...] = ()  # trusted keys; empty: images are checked for integrity only
    poll: float = 5.0  # seconds between check-ins of one device
    jitter: float = 0.1  # each interval is poll * uniform(1 - jitter, 1 + jitter)
    drop_rate: float = 0.0
    power_cut_rate: float = 0.0
    bandwidth: float | None = None
    broken: float = 0.0  # share of devices whose update never confirms
    concurrency: int = 64  # requests on the wire at once (and pooled connections)
    chunk_size: int = 64 * KIB
    strategy: Strategy | None = None  # None: overwrite, or swap-scratch with broken devices
    # (any MCUboot mode: swap-status lays the slots out in PSoC 6 rows, see fleet_flashmap)
    slot_size: int = 512 * KIB
    sector_size: int = 4 * KIB
    until_updated: str | None = None  # stop once every device runs this version (or newer)
    timeout: float = 600.0  # seconds for the whole run
    request_timeout: float = 30.0  # seconds per request
    seed: int = 0
    serial_prefix: str = "FLEET"
    mqtt: MqttBroker | None = None  # jobs and images over MQTT (the server still enrolls)
    factory: bytes | None = None  # the signed image devices run at the start (None: the fleet's)

    def check(self) -> None:
        """Raise UsageError for a value that cannot work, naming the option."""
        if not 1 <= self.devices <= 1_000_000:
            raise UsageError(
                f"--devices {self.devices} is not from 1 to 1000000", value=self.devices
            )
        scheme = urlsplit(self.server).scheme
        if scheme not in ("http", "https") or not urlsplit(self.server).netloc:
            raise UsageError(f"--server {self.server!r} is not an http(s) URL", value=self.server)
        for name, rate in (
            ("--drop-rate", self.drop_rate),
            ("--power-cut-rate", self.power_cut_rate),
            ("--broken", self.broken),
            ("--jitter", self.jitter),
        ):
            if not 0.0 <= rate <= 1.0 or math.isnan(rate):
                raise UsageError(f"{name} {rate} is not from 0 to 1", value=rate)
        if self.drop_rate >= 1.0:
            raise UsageError("--drop-rate must be below 1, or no download ever ends", value=1)
        if self.power_cut_rate >= 1.0:
            raise UsageError("--power-cut-rate must be below 1, or no update ever ends", value=1)
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise UsageError(f"--bandwidth {self.bandwidth} must be above 0", value=self.bandwidth)
        if not self.poll >= 0 or not self.timeout > 0 or not self.request_timeout > 0:
            raise UsageError("--poll must be 0 or more, --timeout above 0")
        if not 1 <= self.concurrency <= 10_000:
            raise UsageError(f"--concurrency {self.concurrency} is not from 1 to 10000")
        if not 512 <= self.chunk_size <= 16 * 1024 * KIB:
            raise UsageError(
                f"--chunk-size {self.chunk_size} is not from 512 B to 16 MiB", value=self.chunk_size
            )
        if self.broken > 0 and self.strategy is Strategy.OVERWRITE:
            raise UsageError(
                "broken devices revert at their next boot, which the overwrite strategy cannot "
                "do; use --strategy swap-scratch (the default with --broken)",
                value=self.strategy.value,
            )
        try:
            fleet_flashmap(
                self.chosen_strategy, slot_size=self.slot_size, sector_size=self.sector_size
            )
        except FlashMapError as exc:
            raise UsageError(
                f"--strategy {self.chosen_strategy.value} with --slot-size {self.slot_size}: "
                f"{exc.message}",
                value=self.slot_size,
            ) from None
        if self.mqtt is not None and not (self.mqtt.sessions >= 1 and 0 < self.mqtt.port < 65536):
            raise UsageError("the MQTT broker needs a port from 1 to 65535 and sessions >= 1")
        FirmwareVersion.parse(self.version)
        if self.until_updated is not None:
            FirmwareVersion.parse(self.until_updated)

    @property
    def chosen_strategy(self) -> Strategy:
        if self.strategy is not None:
            return self.strategy
        return Strategy.SWAP_SCRATCH if self.broken > 0 else Strategy.OVERWRITE


# --- per-device randomness ----------------------------------------------------------------------


class _Rng:
    """SplitMix64: a few bytes of state per device, the same draws for the same seed."""

    __slots__ = ("state",)
    _MASK = (1 << 64) - 1

    def __init__(self, seed: int, index: int) -> None:
        digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
        self.state = int.from_bytes(digest, "little")

    def next_int(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """Uniform in [0, 1)."""
        return (self.next_int() >> 11) / float(1 << 53)

    def below(self, n: int) -> int:
        return self.next_int() % n if n > 0 else 0


def fault_profiles(config: FleetConfig) -> list[FaultProfile]:
    """Each device's profile: ``round(broken * devices)`` broken devices chosen by the seed."""
    order = sorted(range(config.devices), key=lambda i: _Rng(config.seed, -1 - i).next_int())
    broken = set(order[: round(config.broken * config.devices)])
    return [
        FaultProfile(config.drop_rate, config.power_cut_rate, config.bandwidth, i in broken)
        for i in range(config.devices)
    ]


# --- jobs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetJob:
    """What a check-in answered: the image to fetch (docs/server.md, Device API)."""

    deployment_id: int
    version: str
    size: int
    sha256: str
    url: str
    board: str | None

    @classmethod
    def parse(cls, job: Any) -> FleetJob:
        try:
            return cls(
                deployment_id=int(job["deployment_id"]),
                version=str(job["version"]),
                size=int(job["size"]),
                sha256=str(job["sha256"]).lower(),
                url=str(job["url"]),
                board=None if job.get("board") is None else str(job["board"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise JobFetchError(
                f"the check-in answer holds a malformed job: {job!r:.200}"
            ) from None

    @property
    def source(self) -> str:
        """The image's URL without its signature: a new check-in signs it anew."""
        return urlsplit(self.url).path


class _Dropped(Exception):
    """An injected fault: the link dropped during a range."""


# --- how a job reaches a device -------------------------------------------------------------


class _Channel(Protocol):
    """The job a device got and the way its bytes and reports travel: the JSON API and
    ranged GETs (:class:`_HttpChannel`), or ``otakit publisher`` over MQTT (:class:`_MqttChannel`)."""

    key: str  # tells this job's image from another
    version: str
    board: str | None
    size: int | None  # when the job says it
    sha256: str | None  # when the job says it (checked on the whole file)
    chunk_size: int
    details: dict[str, Any]  # for the "job" event

    def resumes(self, download: Download) -> bool:
        """Whether a partial download in the journal is this job's image."""
        ...

    async def download(self, storage: SlotStorage) -> None: ...

    async def report(
        self, status: FwStatus, *, error: str | None = None, version: FirmwareVersion | None = None
    ) -> None: ...

    async def recheck(self) -> None:
        """Tell the server what runs now and learn whether anything else is offered."""
        ...


class _HttpChannel:
    def __init__(self, fleet: Fleet, device: FleetDevice, job: FleetJob) -> None:
        self.fleet, self.device, self.job = fleet, device, job
        self.key = job.sha256
        self.version = job.version
        self.board = job.board
        self.size: int | None = job.size
        self.sha256: str | None = job.sha256
        self.chunk_size = fleet.config.chunk_size
        self.details: dict[str, Any] = {"deployment": job.deployment_id}

    def resumes(self, download: Download) -> bool:
        return download.source == self.job.source and download.sha256 == self.job.sha256

    async def download(self, storage: SlotStorage) -> None:
        await self.fleet._download(self.device, self.job, storage)

    async def report(
        self, status: FwStatus, *, error: str | None = None, version: FirmwareVersion | None = None
    ) -> None:
        await self.fleet._report(
            self.device, status, self.job.deployment_id, error=error, version=version
        )

    async def recheck(self) -> None:
        await self.fleet._recheck(self.device)


class _MqttLink:
    """The fleet's one MQTT connection. Every device session subscribes nothing of its own:
    the link subscribes ``COMPANY/BOARD/OTAImage/+`` once and hands each message to the
    session whose unique topic it came on (new for every session, as on a real device)."""

    def __init__(self, broker: MqttBroker, board: str) -> None:
        self.broker = broker
        self.topics = wire.Topics(board, broker.company, broker.app_prefix)
        self._inboxes: dict[str, asyncio.Queue[bytes]] = {}
        self._client: aiomqtt.Client | None = None
        self._router: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _MqttLink:
        broker = self.broker
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"otakit-fleet-{secrets.token_hex(6)}",
            keepalive=wire.KEEPALIVE_S,
            clean_session=True,
        )
        try:
            await client.__aenter__()
            await client.subscribe(f"{self.topics.direct}/+", qos=wire.QOS)
        except aiomqtt.MqttError as exc:
            raise JobFetchError(
                f"cannot reach the MQTT broker {broker.host}:{broker.port}: {exc}",
                value=broker.host,
            ) from None
        self._client = client
        self._router = asyncio.create_task(self._route(client))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._router is not None:
            self._router.cancel()
            await asyncio.gather(self._router, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _route(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            inbox = self._inboxes.get(str(message.topic))
            if inbox is not None and isinstance(message.payload, bytes | bytearray):
                inbox.put_nowait(bytes(message.payload))

    def open(self) -> tuple[str, asyncio.Queue[bytes]]:
        """A new session: its unique topic and the queue its messages arrive in."""
        while True:
            topic = self.topics.unique(secrets.randbelow(10**9))
            if topic not in self._inboxes:
                inbox: asyncio.Queue[bytes] = asyncio.Queue()
                self._inboxes[topic] = inbox
                return topic, inbox

    def close(self, topic: str) -> None:
        self._inboxes.pop(topic, None)

    async def send(self, payload: bytes) -> None:
        """Publish one device request to ``COMPANY/BOARD/publish_notify``."""
        assert self._client is not None
        try:
            await self._client.publish(self.topics.notify, payload, qos=wire.QOS)
        except aiomqtt.MqttError as exc:
            raise TransferError(f"publishing to the MQTT broker failed: {exc}") from None


class _MqttChannel:
    """A job from ``otakit publisher``: the image comes in 32-byte-header chunks on the
    session's unique topic, in order on one connection; a gap or silence is asked for again
    with "Request Data Chunk" from the first missing byte. A resumed download asks
    ``Offset`` = the journal's durable bytes, ``Size`` -1. Results are "Success" (after
    verifying: the server records ``applying``) and "Failure" with a ``Reason`` (the revert of
    a broken device); interruptions are not reported, as on the original device."""

    def __init__(
        self,
        fleet: Fleet,
        device: FleetDevice,
        link: _MqttLink,
        session: tuple[str, asyncio.Queue[bytes]],
        doc: JobDocument,
    ) -> None:
        self.fleet, self.device, self.link, self.doc = fleet, device, link, doc
        self.topic, self.inbox = session
        self.version = str(job_version(doc.version))
        self.key = f"mqtt:{doc.file}@{self.version}"
        board = doc.board or None
        # the board as the topics spell it (APP_X) is this device's board
        self.board = fleet.config.board if board == link.topics.wire_board else board
        self.size: int | None = None
        self.sha256: str | None = None
        self.chunk_size = wire.CHUNK_SIZE
        self.details: dict[str, Any] = {"file": doc.file, "transport": "mqtt"}

    def resumes(self, download: Download) -> bool:
        return download.source == self.key and download.version == self.version

    def _ask(self, offset: int) -> bytes:
        return self.fleet._mqtt_message(
            self.device,
            wire.REQUEST_DATA_CHUNK,
            self.topic,
            ("Filename", self.doc.file),
            ("Offset", str(offset)),
            ("Size", "-1"),
        )

    async def download(self, storage: SlotStorage) -> None:
        device, broker = self.device, self.link.broker
        record = storage.progress()
        offset = record.durable if record is not None and self.resumes(record.download) else 0
        if record is not None and offset >= record.download.size:
            offset = max(0, record.download.size - wire.CHUNK_SIZE)
        if offset > 0:
            device.resumes += 1
            self.fleet._event(device, "resume", offset=offset)
            await self.link.send(self._ask(offset))
        else:
            request = self.fleet._mqtt_message(device, wire.REQUEST_UPDATE, self.topic)
            await self.link.send(request)
        expected = job_version(self.doc.version)
        total: int | None = None
        early: dict[int, bytes] = {}  # chunks past a gap (at most 64)
        tries = 0
        while total is None or offset < total:
            try:
                payload = await asyncio.wait_for(self.inbox.get(), broker.chunk_timeout)
            except TimeoutError:
                tries += 1
                if tries > broker.request_tries:
                    raise TransferError(
                        f"no chunk for {broker.chunk_timeout * tries:g} s at byte {offset}",
                        value=self.doc.file,
                    ) from None
                early.clear()
                await self.link.send(self._ask(offset))
                continue
            if payload[:1] == b"{":
                continue  # a stray JSON message (a late "Result Received"...)
            started = time.monotonic()
            header, data = wire.parse_chunk(payload)
            if header.firmware_version != expected:
                raise InvalidVersionError(
                    f"a chunk carries version {header.firmware_version}, the job {expected}",
                    value=str(header.firmware_version),
                )
            device.bytes += len(data)
            if device.profile.drop_rate and device.rng.random() < device.profile.drop_rate:
                raise _Dropped
            if total is None:
                total = header.total_size
                stored = storage.open(Download(source=self.key, size=total, version=self.version))
                if stored != offset:  # another image than the journal's: from the start
                    offset = stored
                    early.clear()
                    await self.link.send(self._ask(offset))
            elif header.total_size != total:
                raise ChunkHeaderError(
                    f"a chunk says the image is {header.total_size} bytes, the first {total}",
                    value=header.total_size,
                )
            if header.offset > offset:
                if len(early) < 64:
                    early[header.offset] = data
                continue
            if header.end <= offset:
                continue  # a duplicate
            data = data[offset - header.offset :]
            while True:
                storage.write(offset, data)
                offset += len(data)
                data = early.pop(offset, b"")
                if not data:
                    break
            storage.commit(offset)
            tries = 0
            bandwidth = device.profile.bandwidth
            if bandwidth:
                delay = header.data_size / bandwidth - (time.monotonic() - started)
                if delay > 0:
                    await asyncio.sleep(delay)

    async def _result(self, message: str, *extra: tuple[str, str]) -> None:
        fleet = self.fleet
        fleet.requests["mqtt-result"] += 1
        payload = fleet._mqtt_message(self.device, message, self.topic, *extra, file=self.doc.file)
        try:
            await self.link.send(payload)
        except TransferError as exc:
            fleet._error(self.device, exc, "report")
            return
        await _next_doc(self.inbox, self.link.broker.result_timeout, {RESULT_RECEIVED})

    async def report(
        self, status: FwStatus, *, error: str | None = None, version: FirmwareVersion | None = None
    ) -> None:
        if status is FwStatus.APPLYING:
            await self._result(wire.SUCCESS)
        elif status in (FwStatus.ERROR, FwStatus.INVALID):
            reason = error or "MCU Download fail"
            await self._result(wire.FAILURE, ("Error", "GENERAL"), ("Reason", reason[:64]))

    async def recheck(self) -> None:
        await self.fleet._mqtt_check(self.device, self.link, (self.topic, self.inbox))


async def _next_doc(
    inbox: asyncio.Queue[bytes], timeout: float, messages: set[str]
) -> JobDocument | None:
    """The next JSON message on a session whose Message is one of ``messages``, or None
    after ``timeout`` seconds; chunks and other messages are passed over."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            payload = await asyncio.wait_for(inbox.get(), left)
        except TimeoutError:
            return None
        if payload[:1] != b"{":
            continue
        try:
            doc = parse_job_document(payload)
        except OtakitError:
            continue
        if doc.message in messages:
            return doc
    return None


# --- one device ---------------------------------------------------------------------------------


class FleetDevice:
    """One simulated device: identity, token, flash, journal, faults and what happened to it."""

    __slots__ = (
        "boots",
        "bytes",
        "drops",
        "flash",
        "index",
        "job_started",
        "journal",
        "last_error",
        "power_cuts",
        "profile",
        "resumes",
        "reverted",
        "rng",
        "serial",
        "settled",
        "token",
        "updates",
        "version",
    )

    def __init__(
        self, index: int, serial: str, profile: FaultProfile, flash: Flash, version: str, seed: int
    ) -> None:
        self.index = index
        self.serial = serial
        self.profile = profile
        self.flash = flash
        self.journal = MemoryJournal()
        self.version = FirmwareVersion.parse(version)
        self.rng = _Rng(seed, index)
        self.token: str | None = None  # the device's own token, once enrolled
        self.boots = 0
        self.bytes = 0  # bytes received in ranges (dropped ones included)
        self.drops = 0
        self.power_cuts = 0
        self.resumes = 0
        self.updates = 0
        self.reverted = False  # the last update went back (broken image)
        self.settled = False
        self.job_started: tuple[str, float] | None = None  # (sha256, when first offered)
        self.last_error: str | None = None


# --- the fleet ----------------------------------------------------------------------------------


@dataclass
class FleetReport:
    """The outcome of :meth:`Fleet.run`; :meth:`to_dict` is the CLI's JSON report."""

    devices: int
    settled: int
    updated: int  # devices that confirmed at least one new image
    reverted: int  # devices whose update went back and was reported
    failed: dict[str, int]  # devices not settled at the end, by their last error
    errors: dict[str, int]  # attempts that failed for other reasons than injected faults
    resumes: int
    drops: int
    power_cuts: int
    bytes_downloaded: int
    requests: dict[str, int]
    wall_time_s: float
    update_seconds: dict[str, float | None]
    versions: dict[str, int]
    timed_out: bool
    strategy: str
    shared_sectors: int
    shared_sector_bytes: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: Sequence[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 4)


class Fleet:
    """``config.devices`` simulated devices; :meth:`run` updates them all against the server.

    ``on_event`` receives every event as a dict (``t`` seconds since the start, ``device``,
    ``event`` and details); :meth:`snapshot` gives counts for progress displays.
    """

    def __init__(self, config: FleetConfig, *, on_event: EventSink | None = None) -> None:
        config.check()
        self.config = config
        self.on_event = on_event
        self.strategy = config.chosen_strategy
        self.map = fleet_flashmap(
            self.strategy, slot_size=config.slot_size, sector_size=config.sector_size
        )
        # the image every device runs at the start, signed by a key only the fleet holds; the
        # bootloader trusts it next to the fleet's keys so that the factory image boots
        factory_key = SigningKey.generate("ecdsa-p256")
        self.keys = tuple(config.keys)
        self.boot_config = BootloaderConfig(
            strategy=self.strategy,
            keys=(*self.keys, factory_key.public_key) if self.keys else (),
        )
        factory = config.factory or sign_image(
            hashlib.sha256(b"otakit fleet factory image").digest() * 64,
            factory_key,
            SignOptions(FirmwareVersion.parse(config.version).to_image(), pad_header=True),
        )
        self.pool = SectorPool()
        self._erased = bytes([self.map.erased_value]) * self.map.sector_size
        self._factory = factory + bytes([self.map.erased_value]) * (
            -len(factory) % self.map.write_align
        )
        self.target = FirmwareVersion.parse(config.until_updated) if config.until_updated else None
        profiles = fault_profiles(config)
        width = max(6, len(str(config.devices - 1)))
        self.devices = [
            FleetDevice(
                i,
                f"{config.serial_prefix}-{i:0{width}d}",
                profiles[i],
                self._new_flash(),
                config.version,
                config.seed,
            )
            for i in range(config.devices)
        ]
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.durations: list[float] = []
        self._start = time.monotonic()
        self._clients: list[httpx.AsyncClient] = []
        self._mqtt: _MqttLink | None = None
        self._mqtt_gate = asyncio.Semaphore(1)
        self._net = asyncio.Semaphore(config.concurrency)

    def _new_flash(self) -> Flash:
        fmap = self.map
        flash = fmap.new_flash(SharedBacking(self.pool, fmap.sector_size, self._erased))
        flash.stats = _Uncounted()
        flash.write(fmap.primary(0).offset, self._factory)
        return flash

    # --- events and progress -------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self._start

    def _event(self, device: FleetDevice, event: str, **details: Any) -> None:
        if self.on_event is not None:
            self.on_event(
                {"t": round(self.now(), 4), "device": device.serial, "event": event, **details}
            )

    def _error(self, device: FleetDevice, exc: OtakitError, step: str) -> None:
        self._fail(device, exc.code, exc.message, step)

    def _fail(self, device: FleetDevice, code: str, message: str, step: str) -> None:
        """An attempt failed for another reason than an injected fault: count it."""
        device.last_error = code
        self.errors[code] += 1
        self._event(device, "failed", error=code, step=step, message=message)

    def snapshot(self) -> dict[str, int]:
        """Counts for a progress display."""
        return {
            "devices": len(self.devices),
            "settled": sum(d.settled for d in self.devices),
            "updated": sum(d.updates > 0 for d in self.devices),
            "reverted": sum(d.reverted for d in self.devices),
            "errors": sum(self.errors.values()),
            "bytes": sum(d.bytes for d in self.devices),
        }

    # --- running -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _connections(self) -> AsyncIterator[list[httpx.AsyncClient]]:
        """HTTP clients for ``concurrency`` connections in all, at most :data:`POOL_CONNECTIONS`
        each: httpcore's pool does work quadratic in its connections for every request, which
        made one client of 64 connections cost more CPU than the rest of the simulation."""
        limit = self.config.concurrency
        sizes = [POOL_CONNECTIONS] * (limit // POOL_CONNECTIONS)
        if limit % POOL_CONNECTIONS:
            sizes.append(limit % POOL_CONNECTIONS)
        tls = ssl.create_default_context()  # one for all clients (loading CAs takes a while)
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        headers={"user-agent": USER_AGENT},
                        timeout=self.config.request_timeout,
                        limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                        follow_redirects=False,
                        verify=tls,
                    )
                )
                for size in sizes
            ]
            yield clients

    def _client(self, device: FleetDevice) -> httpx.AsyncClient:
        return self._clients[device.index % len(self._clients)]

    async def run(
        self, *, on_tick: Callable[[dict[str, int]], None] | None = None, tick: float = 2.0
    ) -> FleetReport:
        """Run every device until all are settled (they run ``until_updated``, or the server
        offers them nothing more) or ``timeout`` passes; return the report."""
        self._start = time.monotonic()
        self._net = asyncio.Semaphore(self.config.concurrency)
        async with AsyncExitStack() as stack:
            self._clients = await stack.enter_async_context(self._connections())
            if self.config.mqtt is not None:
                self._mqtt = await stack.enter_async_context(
                    _MqttLink(self.config.mqtt, self.config.board)
                )
                self._mqtt_gate = asyncio.Semaphore(self.config.mqtt.sessions)
            tasks = [asyncio.create_task(self._life(d)) for d in self.devices]
            ticker = asyncio.create_task(self._ticker(on_tick, tick)) if on_tick else None
            done, pending = await asyncio.wait(
                tasks, timeout=self.config.timeout, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            for task in done:
                failure = task.exception()
                if failure is not None:
                    raise failure  # a bug in the simulator, not a device's failure
            if on_tick is not None:
                on_tick(self.snapshot())
        self._clients, self._mqtt = [], None
        return self.report(timed_out=bool(pending))

    async def _ticker(self, on_tick: Callable[[dict[str, int]], None], tick: float) -> None:
        while True:
            await asyncio.sleep(tick)
            on_tick(self.snapshot())

    def _interval(self, device: FleetDevice) -> float:
        jitter = self.config.jitter
        return self.config.poll * (1 - jitter + 2 * jitter * device.rng.random())

    async def _life(self, device: FleetDevice) -> None:
        await asyncio.sleep(self.config.poll * self.config.jitter * device.rng.random())
        while not device.settled:
            await self._attempt(device)
            if not device.settled:
                await asyncio.sleep(self._interval(device))

    async def check_in_all(self, server: str | None = None) -> dict[str, int]:
        """One idle check-in per device (as at every poll), at most ``concurrency`` at once;
        ``server`` overrides the fleet's (a reference server for a benchmark). Returns how
        many answered each HTTP status."""
        base = (server or self.config.server).rstrip("/")
        statuses: Counter[str] = Counter()
        self._net = asyncio.Semaphore(self.config.concurrency)
        async with self._connections() as clients:

            async def one(device: FleetDevice) -> None:
                client = clients[device.index % len(clients)]
                body = self._identity(device)
                token = device.token or self.config.token
                headers = {"authorization": f"Bearer {token}"} if token else {}
                try:
                    async with self._net:
                        response = await client.post(
                            base + CHECKIN_PATH, json=body, headers=headers
                        )
                    statuses[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

            await asyncio.gather(*(one(d) for d in self.devices))
        return dict(statuses)

    # --- the JSON API --------------------------------------------------------------------------

    def _identity(self, device: FleetDevice) -> dict[str, str]:
        """The check-in body: who the device is and what it runs."""
        return {
            "serial": device.serial,
            "board": self.config.board,
            "product": self.config.product,
            "manufacturer": self.config.manufacturer,
            "version": str(device.version),
        }

    async def _post(self, device: FleetDevice, path: str, body: object) -> httpx.Response:
        token = device.token or self.config.token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        async with self._net:
            return await self._client(device).post(
                self.config.server.rstrip("/") + path, json=body, headers=headers
            )

    async def _check_in(self, device: FleetDevice) -> dict[str, Any] | None:
        """The check-in's answer (None for 204); keeps a minted device token."""
        self.requests["checkin"] += 1
        try:
            response = await self._post(device, CHECKIN_PATH, self._identity(device))
        except httpx.HTTPError as exc:
            raise JobFetchError(
                f"cannot reach {self.config.server}: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code == 204:
            return None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            message = answer.get("message") if isinstance(answer, dict) else response.text[:200]
            raise JobFetchError(
                f"check-in refused: {response.status_code} {message}", value=response.status_code
            )
        minted = answer.get("device_token")
        if isinstance(minted, str) and minted:
            device.token = minted
            self._event(device, "enrolled")
        return answer

    async def _report(
        self,
        device: FleetDevice,
        status: FwStatus,
        deployment_id: int,
        *,
        error: str | None = None,
        version: FirmwareVersion | None = None,
    ) -> None:
        """POST a status report; one that is not delivered is counted as an error."""
        body: dict[str, Any] = {"status": status.value, "deployment_id": deployment_id}
        if error is not None:
            body["error"] = error
        if version is not None:
            body["version"] = str(version)
        self.requests["status"] += 1
        try:
            response = await self._post(device, STATUS_PATH, body)
        except httpx.HTTPError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code < 300:
                return
            failure = f"the server answered {response.status_code}"
        self._fail(device, "SENDING_RESULT", f"status report {status.value}: {failure}", "report")

    # --- one attempt ---------------------------------------------------------------------------

    async def _attempt(self, device: FleetDevice) -> None:
        """One poll: check in; on a job, update (download, verify, reboot, confirm, report)."""
        if self._mqtt is not None:
            await self._attempt_mqtt(device, self._mqtt)
            return
        try:
            answer = await self._check_in(device)
        except OtakitError as exc:
            self._error(device, exc, "checkin")
            return
        self._after_check_in(device, answer)
        job = (answer or {}).get("job")
        if job is None:
            return
        try:
            parsed = FleetJob.parse(job)
        except OtakitError as exc:
            self._error(device, exc, "checkin")
            return
        await self._update(device, _HttpChannel(self, device, parsed))

    def _after_check_in(self, device: FleetDevice, answer: dict[str, Any] | None) -> None:
        """Whether the device is done: it runs the target version (or a newer one), or,
        without a target (or after going back from it), the server offers it nothing."""
        answer = answer or {}
        abort = answer.get("abort")
        if isinstance(abort, dict) and device.journal.load() is not None:
            boot = Bootloader(device.flash, self.map, self.boot_config)
            SlotStorage(
                boot, device.journal, self.keys, current_version=str(device.version)
            ).abort()
            device.job_started = None
            self._event(device, "aborted", reason=str(abort.get("reason", ""))[:200])
        if self.target is not None and device.version >= self.target:
            settled = True
        else:
            settled = answer.get("job") is None and (self.target is None or device.reverted)
        if settled and not device.settled:
            device.settled = True
            self._event(device, "settled", running=str(device.version))

    async def _update(self, device: FleetDevice, channel: _Channel) -> None:
        """The update a job asks for, over the channel that brought it (HTTP or MQTT)."""
        if device.job_started is None or device.job_started[0] != channel.key:
            device.job_started = (channel.key, self.now())
            self._event(device, "job", version=channel.version, **channel.details)
        try:
            new = FirmwareVersion.parse(channel.version)
            if channel.board and channel.board != self.config.board:
                raise WrongBoardError(
                    f"the job is for board {channel.board}, not {self.config.board}",
                    value=channel.board,
                )
            if not new > device.version:
                raise InvalidVersionError(
                    f"the job's version {new} is not newer than the running {device.version}",
                    value=channel.version,
                )
        except OtakitError as exc:
            self._error(device, exc, "job")
            await channel.report(FwStatus.INVALID, error=exc.agent_error)
            return
        boot = Bootloader(device.flash, self.map, self.boot_config)
        storage = SlotStorage(boot, device.journal, self.keys, current_version=str(device.version))
        await channel.report(FwStatus.DOWNLOADING)
        if not await self._download_with_faults(device, channel, storage, boot):
            return
        try:
            version = FirmwareVersion.parse(storage.verify())
            if channel.sha256 is not None:
                self._check_sha256(boot, storage, channel.sha256)
        except OtakitError as exc:
            storage.abort()
            self._error(device, exc, "verify")
            error = FwError.SHA256_VERIFY_FAIL if isinstance(exc, HashMismatchError) else None
            await channel.report(FwStatus.ERROR, error=error or exc.agent_error)
            return
        storage.set_pending(permanent=False)
        self._event(device, "pending", version=str(version))
        await channel.report(FwStatus.APPLYING, version=version)
        first = self._reboot(device, boot)
        if first.version is None or FirmwareVersion.from_image(first.version) != version:
            reason = first.reason or f"the bootloader did {first.action.value}"
            self._fail(
                device,
                first.error or BootError.code,
                f"the new image did not start: {reason}",
                "boot",
            )
            await channel.report(FwStatus.ERROR, error=FwError.NONE)
            return
        if device.profile.broken:
            self._event(device, "crashed", running=str(version))
            back = self._reboot(device, boot)  # the watchdog: the unconfirmed image goes back
            running = back.version
            device.reverted = back.action is Action.REVERT
            if running is not None:
                device.version = FirmwareVersion.from_image(running)
            self._event(device, "reverted", running=str(device.version), action=back.action.value)
            await channel.report(FwStatus.ERROR, error=REVERT_ERROR, version=device.version)
            device.job_started = None
            await channel.recheck()
            return
        boot.confirm()
        device.version = version
        device.updates += 1
        device.reverted = False
        self.durations.append(self.now() - device.job_started[1])
        self._event(device, "updated", version=str(version), seconds=round(self.durations[-1], 4))
        device.job_started = None
        await channel.recheck()

    async def _recheck(self, device: FleetDevice) -> None:
        """Check in with what runs now: the server counts it (Applied, or the revert)."""
        try:
            answer = await self._check_in(device)
        except OtakitError as exc:
            self._error(device, exc, "checkin")
            return
        self._after_check_in(device, answer)

    def _reboot(self, device: FleetDevice, boot: Bootloader) -> ImageBoot:
        result = boot.boot()
        device.boots += 1
        image = result.images[0]
        self._event(
            device,
            "booted",
            action=image.action.value,
            running=None if image.version is None else str(image.version),
        )
        return image

    def _check_sha256(self, boot: Bootloader, storage: SlotStorage, expected: str) -> None:
        """The SHA-256 of the downloaded file, as the job gives it (§7); the storage hashes
        what it received, the bytes in the slot's trailer area (never written) included."""
        record = storage.progress()
        size = record.download.size if record is not None else 0
        actual = storage.sha256(size).hex()
        if actual != expected.lower():
            raise HashMismatchError(
                f"the downloaded file's SHA-256 is {actual}, the job says {expected}",
                value=actual,
            )

    # --- download ------------------------------------------------------------------------------

    async def _download_with_faults(
        self, device: FleetDevice, channel: _Channel, storage: SlotStorage, boot: Bootloader
    ) -> bool:
        """Download with the device's faults; True when every byte is stored."""
        flash = device.flash
        rng = device.rng
        if device.profile.power_cut_rate and rng.random() < device.profile.power_cut_rate:
            # a cut at a random flash operation of the download: the slot's erase (one per
            # sector) when it starts afresh, then one write per range
            size = channel.size or self.map.secondary(0).size
            record = device.journal.load()
            operations = math.ceil(size / channel.chunk_size)
            if record is None or not channel.resumes(record.download):
                operations += self.map.secondary(0).size // flash.sector_size
            flash.cut_after(rng.below(operations), tear=True, seed=rng.next_int())
        try:
            await channel.download(storage)
        except PowerCut:
            flash.power_on()
            device.power_cuts += 1
            durable = device.journal.load()
            self._event(device, "power-cut", durable=durable.durable if durable else 0)
            self._reboot(device, boot)  # nothing pending: the old image runs on
            return False
        except _Dropped:
            device.drops += 1
            durable = device.journal.load()
            self._event(device, "drop", durable=durable.durable if durable else 0)
            await channel.report(FwStatus.INTERRUPTED, error=FwError.NETWORK_TIMEOUT)
            return False
        except TransferError as exc:
            self._error(device, exc, "download")
            answered = exc.status is not None and exc.status >= 400
            error = FwError.HTTP_RESPONSE if answered else FwError.NETWORK_TIMEOUT
            await channel.report(FwStatus.INTERRUPTED, error=error)
            return False
        except OtakitError as exc:  # a bad chunk, or an image that does not fit the slot
            storage.abort()
            self._error(device, exc, "download")
            await channel.report(FwStatus.ERROR, error=FwError.FILE_OPERATION_FAIL)
            return False
        finally:
            flash.power_on()  # disarms a cut that did not happen
        return True

    async def _range(
        self, device: FleetDevice, url: str, first: int, last: int, etag: str | None
    ) -> httpx.Response:
        headers = {"range": f"bytes={first}-{last}"}
        if etag:
            headers["if-range"] = etag
        self.requests["range"] += 1
        try:
            async with self._net:
                response = await self._client(device).get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise TransferError(
                f"bytes {first}-{last}: {type(exc).__name__}: {exc}", value=urlsplit(url).path
            ) from None
        if response.status_code not in (200, 206):
            raise TransferError(
                f"bytes {first}-{last}: the server answered {response.status_code}",
                status=response.status_code,
                value=urlsplit(url).path,
            )
        return response

    async def _download(self, device: FleetDevice, job: FleetJob, storage: SlotStorage) -> int:
        """Ranged GETs into ``storage``, resuming from the journal, as
        :meth:`otakit.device.transports.http.HttpTransport.download` does: ``If-Range`` with
        the journal's ETag on the first range; 200 instead of 206 means the image changed, and
        the download starts over. The journal names the image by its URL path and SHA-256,
        since every check-in signs the URL anew."""
        chunk = self.config.chunk_size
        record = storage.progress()
        resume = None
        if record is not None:
            known = record.download
            if known.source == job.source and known.sha256 == job.sha256:
                resume = record
        offset = resume.durable if resume is not None else 0
        if resume is not None and offset >= resume.download.size:
            offset = max(0, resume.download.size - chunk)  # stored, not yet pending: re-check
        etag = resume.download.etag if resume is not None else None
        if offset > 0:
            device.resumes += 1
            self._event(device, "resume", offset=offset)
        total: int | None = None
        while total is None or offset < total:
            last = offset + chunk - 1 if total is None else min(offset + chunk, total) - 1
            started = time.monotonic()
            try:
                response = await self._range(
                    device, job.url, offset, last, etag if total is None else None
                )
            except TransferError as exc:
                if total is None and offset > 0 and exc.status == 416:
                    offset, etag = 0, None  # the journal's offset is past this image's end
                    continue
                raise
            data = response.content
            device.bytes += len(data)
            if device.profile.drop_rate and device.rng.random() < device.profile.drop_rate:
                raise _Dropped
            if total is None:
                if response.status_code == 200:
                    if offset != 0 or etag is not None:
                        offset, etag = 0, None  # the image changed: start over
                        continue
                    raise TransferError(
                        "the server does not answer ranged requests (no 206/Content-Range)",
                        value=job.source,
                    )
                total = content_total(response.headers, job.source)
                download = Download(
                    source=job.source,
                    size=total,
                    version=job.version,
                    etag=response.headers.get("etag"),
                    sha256=job.sha256,
                )
                stored = storage.open(download)
                if stored != offset:
                    offset = stored  # another image than the journal's: start over
                    continue
            elif response.status_code != 206:
                raise TransferError(
                    f"the server answered {response.status_code} to a range request",
                    status=response.status_code,
                    value=job.source,
                )
            if not data:
                raise TransferError(f"empty answer for bytes {offset}-{last}", value=job.source)
            storage.write(offset, data)
            offset += len(data)
            storage.commit(offset)
            received = len(data)
            # hold no image bytes while waiting for the next range: with thousands of devices
            # in the queue, that alone would cost a chunk of memory per device
            del response, data
            bandwidth = device.profile.bandwidth
            if bandwidth:
                delay = received / bandwidth - (time.monotonic() - started)
                if delay > 0:
                    await asyncio.sleep(delay)
        return total

    # --- MQTT ----------------------------------------------------------------------------------

    def _mqtt_message(
        self,
        device: FleetDevice,
        message: str,
        topic: str,
        *extra: tuple[str, str],
        file: str = "",
    ) -> bytes:
        """A device request of §3: identity, running version and session topic, all strings."""
        config = self.config
        return JobDocument(
            message=message,
            file=file,
            manufacturer=config.manufacturer,
            serial_number=device.serial,
            version=device.version.short,
            unique_topic_name=topic,
            extra=(("ProductID", config.product), ("BoardName", config.board), *extra),
        ).to_json()

    async def _attempt_mqtt(self, device: FleetDevice, link: _MqttLink) -> None:
        """One poll over MQTT: the device enrolls with the server once (the publisher serves
        registered devices), then asks the publisher."""
        if device.token is None and self.config.token is not None:
            try:
                await self._check_in(device)  # any job in the answer is the HTTP one: ignored
            except OtakitError as exc:
                self._error(device, exc, "enroll")
                return
        async with self._mqtt_gate:
            session = link.open()
            try:
                doc = await self._mqtt_check(device, link, session)
                if doc is not None:
                    await self._update(device, _MqttChannel(self, device, link, session, doc))
            finally:
                link.close(session[0])

    async def _mqtt_check(
        self, device: FleetDevice, link: _MqttLink, session: tuple[str, asyncio.Queue[bytes]]
    ) -> JobDocument | None:
        """ "Update Availability" with the running version: the job document, or None. The
        publisher keeps the version a registered device reports (Applied when it is the
        deployment's)."""
        topic, inbox = session
        self.requests["mqtt-check"] += 1
        try:
            await link.send(self._mqtt_message(device, wire.UPDATE_AVAILABILITY, topic))
        except TransferError as exc:
            self._error(device, exc, "check")
            return None
        answers = {UPDATE_AVAILABLE, NO_UPDATE_AVAILABLE}
        doc = await _next_doc(inbox, link.broker.job_timeout, answers)
        if doc is None:
            self._error(
                device,
                JobFetchError(f"no job document within {link.broker.job_timeout:g} s"),
                "check",
            )
            return None
        if doc.message == NO_UPDATE_AVAILABLE:
            self._after_check_in(device, None)
            return None
        if doc.connection != "MQTT":
            self._error(
                device,
                TransportUnsupportedError(
                    f"the publisher's job is for {doc.connection}; fleets take MQTT jobs over MQTT",
                    value=doc.connection,
                ),
                "check",
            )
            return None
        self._after_check_in(device, {"job": doc.file})
        return doc

    # --- the report ----------------------------------------------------------------------------

    def report(self, *, timed_out: bool = False) -> FleetReport:
        devices = self.devices
        failed: Counter[str] = Counter(d.last_error or "TIMEOUT" for d in devices if not d.settled)
        config = self.config
        settings = {
            "server": config.server,
            "product": config.product,
            "group": config.group,
            "board": config.board,
            "version": config.version,
            "until_updated": config.until_updated,
            "poll_s": config.poll,
            "jitter": config.jitter,
            "drop_rate": config.drop_rate,
            "power_cut_rate": config.power_cut_rate,
            "bandwidth": config.bandwidth,
            "broken": config.broken,
            "broken_devices": sum(d.profile.broken for d in devices),
            "concurrency": config.concurrency,
            "chunk_size": config.chunk_size,
            "slot_size": config.slot_size,
            "sector_size": config.sector_size,
            "trusted_keys": [k.fingerprint for k in self.keys],
            "seed": config.seed,
            "timeout_s": config.timeout,
        }
        return FleetReport(
            devices=len(devices),
            settled=sum(d.settled for d in devices),
            updated=sum(d.updates > 0 for d in devices),
            reverted=sum(d.reverted for d in devices),
            failed=dict(sorted(failed.items())),
            errors=dict(sorted(self.errors.items())),
            resumes=sum(d.resumes for d in devices),
            drops=sum(d.drops for d in devices),
            power_cuts=sum(d.power_cuts for d in devices),
            bytes_downloaded=sum(d.bytes for d in devices),
            requests=dict(sorted(self.requests.items())),
            wall_time_s=round(self.now(), 3),
            update_seconds={
                "p50": _percentile(self.durations, 0.50),
                "p99": _percentile(self.durations, 0.99),
                "max": _percentile(self.durations, 1.0),
            },
            versions=dict(sorted(Counter(str(d.version) for d in devices).items())),
            timed_out=timed_out,
            strategy=self.strategy.value,
            shared_sectors=len(self.pool),
            shared_sector_bytes=self.pool.bytes,
            settings=settings,
        )
