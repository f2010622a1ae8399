"""A fleet of simulated devices in one process, updating against an otakit server.

Every device is a small object with its own identity (serial, product, group, board), the
version it runs, its own device token (minted by the server at its first check-in with the
fleet's enrollment token), a flash model (:mod:`otakit.device.flash`) laid out by one flash map
shared by the fleet, its own resume journal (in memory), a poll interval with jitter and a fault
profile. All devices run as asyncio tasks on one event loop and share a few
``httpx.AsyncClient`` connection pools; at most ``concurrency`` requests are on the wire at once.
With an MQTT broker (:class:`MqttBroker`), devices still enroll with the server but take their
jobs and images from ``otakit publisher`` over one shared MQTT connection (§3).

Every device runs the device core of ``otakit agent`` (:mod:`otakit.device.core`); this module
only does the I/O around it (asyncio, httpx, aiomqtt), the fault injection and the bookkeeping:
the offer is checked by :func:`~otakit.device.core.job.check_offer`, the image comes through
:class:`~otakit.device.core.download.RangedDownload` (HTTP) or
:class:`~otakit.device.core.assembly.ChunkAssembly` (MQTT) into the storage the agent uses, what
a reboot means (confirm, or report the revert) is :func:`~otakit.device.core.after_boot.after_boot`
and the wait after a failed attempt, and giving up on an artifact, is
:class:`~otakit.device.core.retry.Backoff`. A fix to the agent's protocol logic is a fix to the
fleet, and the fleet benchmark measures it.

One update, as a device of the JSON check-in API does it (docs/agent.md, docs/server.md)::

    POST /api/v1/device/checkin  → job: signed URL, size, SHA-256, version, deployment
    check_offer                  board and version
    POST /api/v1/device/status   downloading
    GET  <signed URL>            RangedDownload: Range: bytes=a-b (If-Range: ETag on the first
                                 range of a resume), written and the journal committed after
                                 each range; a failed range is tried again within the attempt
    verify                       SHA-256 of the file, MCUboot hash and signature (trusted keys)
    set pending                  the bootloader's TEST request
    POST /api/v1/device/status   applying
    reboot, after_boot           Bootloader.boot() on the device's flash: swap or overwrite;
                                 confirm (image_ok), or a *broken* device never confirms: its
                                 image crashes, the next boot reverts, and the device reports
                                 the revert
    POST /api/v1/device/checkin  with the new version: the server counts it Applied

Faults, drawn per device from ``seed`` (the same seed gives every device the same profile and
the same draws): a *drop* throws a range's answer (or an MQTT chunk) away as if the link broke;
the range is tried again within the attempt (``range_tries``), the chunk asked for again after
a silence, and the report counts it as *retried*. A *power cut* (``Flash.cut_after``, torn)
hits a random flash operation of the download, the device reboots and resumes at its next poll;
a *slow link* sleeps after each range as long as the bytes take at the link's speed; *broken*
devices never confirm.

The report tells apart what the devices recovered from and what they did not: ``recovered``
counts the failed attempts of devices that settled afterwards and ``retried`` the ranges or
chunks asked again within an attempt; ``failed`` counts the devices that did not settle (or
gave up after ``give_up_after`` failed attempts of one artifact) and ``errors`` their failed
attempts. A run ends when every device settled, or when no device made progress (stored bytes,
finished an update, settled) for ``timeout`` seconds: a slow machine makes it longer, not
failed.

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

from otakit.device.bootloader import Bootloader, BootloaderConfig, ImageBoot, Strategy
from otakit.device.core.after_boot import REVERT_ERROR, BootVerdict, after_boot
from otakit.device.core.assembly import ChunkAssembly
from otakit.device.core.download import RangedDownload, RangeRequest
from otakit.device.core.job import check_offer, choose_download
from otakit.device.core.retry import Backoff, RetryPolicy
from otakit.device.delta_storage import DeltaStorage, delta_compressions
from otakit.device.flash import Flash, FlashStats, PowerCut, SectorWear
from otakit.device.flashmap import Area, FlashMap
from otakit.device.journal import Download, Journal, JournalRecord
from otakit.device.storage import Storage, UpdateStorage
from otakit.device.transports.base import DeltaJob
from otakit.errors import (
    BootError,
    DeltaError,
    FlashMapError,
    HashMismatchError,
    JobFetchError,
    OtakitError,
    TransferError,
    TransportUnsupportedError,
    UsageError,
)
from otakit.image.delta import image_digest
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

    __slots__ = ("_record",)

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
    timeout: float = 600.0  # seconds without progress of any device, then the run ends
    request_timeout: float = 30.0  # seconds per request
    range_tries: int = 3  # tries of one range (or MQTT re-requests) within an attempt
    retry: RetryPolicy | None = None  # after a failed attempt (None: see retry_policy)
    seed: int = 0
    serial_prefix: str = "FLEET"
    mqtt: MqttBroker | None = None  # jobs and images over MQTT (the server still enrolls)
    factory: bytes | None = None  # the signed image devices run at the start (None: the fleet's)
    # delta updates over HTTP: check-ins say what runs and the compressions applied (detools
    # installed), and an offered patch is downloaded and applied (otakit.device.delta_storage)
    deltas: bool = False

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
        if not 1 <= self.range_tries <= 100:
            raise UsageError(
                f"--range-tries {self.range_tries} is not from 1 to 100", value=self.range_tries
            )
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
    def retry_policy(self) -> RetryPolicy:
        """``retry``, or by default: the first wait one poll interval (at least 10 ms), doubling
        up to an hour, and giving up on an artifact after 5 failed attempts, as the agent."""
        if self.retry is not None:
            return self.retry
        return RetryPolicy(first=max(self.poll, 0.01), jitter=min(self.jitter, 0.5))

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


@dataclass(frozen=True, slots=True)
class FleetJob:
    """What a check-in answered: the image to fetch (docs/server.md, Device API)."""

    deployment_id: int
    version: str
    size: int
    sha256: str
    url: str
    board: str | None
    delta: DeltaJob | None = None  # a patch offered for the image the device runs

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
                delta=_delta(job.get("delta")),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise JobFetchError(
                f"the check-in answer holds a malformed job: {job!r:.200}"
            ) from None

    @property
    def source(self) -> str:
        """The image's URL without its signature: a new check-in signs it anew."""
        return urlsplit(self.url).path

    @property
    def artifact(self) -> str:
        """What the retry policy counts failures of: this deployment's image."""
        return f"{self.deployment_id}:{self.sha256}"

    def resumes(self, download: Download) -> bool:
        """Whether a partial download in the journal is this job's image."""
        return download.source == self.source and download.sha256 == self.sha256

    def patch(self) -> FleetJob:
        """The job that downloads this job's delta patch (same deployment and version)."""
        assert self.delta is not None
        d = self.delta
        return FleetJob(self.deployment_id, self.version, d.size, d.sha256, d.url, self.board)


def _delta(offer: Any) -> DeltaJob | None:
    """A check-in's ``job.delta``; None when absent or malformed (the full image then)."""
    if not isinstance(offer, dict):
        return None
    try:
        return DeltaJob(
            url=str(offer["url"]),
            size=int(offer["size"]),
            sha256=str(offer["sha256"]).lower(),
            base_sha256=str(offer["base_sha256"]).lower(),
            new_sha256=str(offer["new_sha256"]).lower(),
            compression=str(offer["compression"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed ``response`` as it arrives, to its end but no further than
    ``limit`` + 1 bytes (one more than allowed is enough to refuse it). Reading to the end lets
    the connection serve the next request: one left before its end is closed."""
    parts: list[bytes] = []
    size = 0
    async for piece in response.aiter_bytes():
        parts.append(piece[: limit + 1 - size])
        size += len(parts[-1])
        if size > limit:
            break
    return b"".join(parts)


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

    @property
    def artifact(self) -> str:
        """What the retry policy counts failures of."""
        ...

    @property
    def details(self) -> dict[str, Any]:
        """For the "job" event."""
        ...

    def resumes(self, download: Download) -> bool:
        """Whether a partial download in the journal is this job's image."""
        ...

    async def download(self, storage: Storage) -> None: ...

    async def report(
        self, status: FwStatus, *, error: str | None = None, version: FirmwareVersion | None = None
    ) -> None: ...

    async def recheck(self) -> None:
        """Tell the server what runs now and learn whether anything else is offered."""
        ...


class _HttpChannel:
    # every device holds one while it updates: no instance dict, and what is only needed
    # on a failure or for an event (artifact, details) made when asked for
    __slots__ = (
        "board",
        "chunk_size",
        "device",
        "fleet",
        "job",
        "key",
        "sha256",
        "size",
        "version",
    )

    def __init__(self, fleet: Fleet, device: FleetDevice, job: FleetJob) -> None:
        self.fleet, self.device, self.job = fleet, device, job
        self.key = job.sha256
        self.version = job.version
        self.board = job.board
        self.size: int | None = job.size
        self.sha256: str | None = job.sha256
        self.chunk_size = fleet.config.chunk_size

    @property
    def artifact(self) -> str:
        return self.job.artifact

    @property
    def details(self) -> dict[str, Any]:
        return {"deployment": self.job.deployment_id}

    def resumes(self, download: Download) -> bool:
        return self.job.resumes(download)

    async def download(self, storage: Storage) -> None:
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
        self.artifact = self.key
        # the board as the topics spell it (APP_X) is this device's board; an empty Board
        # matches no board (protocols.md §1), as the agent's check_job has it
        board = doc.board
        self.board: str | None = fleet.config.board if board == link.topics.wire_board else board
        self.size: int | None = None
        self.sha256: str | None = None
        self.chunk_size = wire.CHUNK_SIZE
        self.details: dict[str, Any] = {"file": doc.file, "transport": "mqtt"}

    def resumes(self, download: Download) -> bool:
        return download.source == self.key and download.version == self.version

    async def _ask(self, offset: int, size: int = -1) -> None:
        """Ask for ``size`` bytes from ``offset`` (-1: all the rest): "Request Data Chunk"."""
        await self.link.send(
            self.fleet._mqtt_message(
                self.device,
                wire.REQUEST_DATA_CHUNK,
                self.topic,
                ("Filename", self.doc.file),
                ("Offset", str(offset)),
                ("Size", str(size)),
            )
        )

    async def download(self, storage: Storage) -> None:
        """The image into ``storage``: the I/O of
        :class:`otakit.device.core.assembly.ChunkAssembly`, which checks and stores every
        chunk, holds those past a gap and says from which byte to ask again, as for
        ``otakit agent``'s MQTT transport.

        Faults: a *drop* loses a chunk (the gap is asked for again after ``chunk_timeout``
        seconds of silence); a *slow link* sleeps after each chunk as long as its bytes take.
        Raises TransferError when the re-requests are used up, the chunk errors the assembly
        raises (another version, another total, a bad header) and whatever the storage raises.
        """
        device, broker, fleet = self.device, self.link.broker, self.fleet
        assembly = ChunkAssembly(
            storage,
            source=self.key,
            version=job_version(self.doc.version),
            same=self.resumes,
            tries=broker.request_tries,
        )
        if assembly.resumed_from > 0:
            device.resumes += 1
            fleet._event(device, "resume", offset=assembly.resumed_from)
            await self._ask(assembly.resumed_from)
        else:
            await self.link.send(fleet._mqtt_message(device, wire.REQUEST_UPDATE, self.topic))
        profile = device.profile
        try:
            while not assembly.done:
                try:
                    payload = await asyncio.wait_for(self.inbox.get(), broker.chunk_timeout)
                except TimeoutError:
                    start = assembly.stalled()  # TransferError when the tries are used up
                    for first, length in assembly.missing() or [(start, -1)]:
                        await self._ask(first, length)
                    continue
                if payload[:1] == b"{":
                    continue  # a stray JSON message (a late "Result Received"...)
                started = time.monotonic()
                size = max(0, len(payload) - wire.HEADER_SIZE)
                device.bytes += size
                if profile.drop_rate and device.rng.random() < profile.drop_rate:
                    device.drops += 1
                    fleet._event(device, "drop", offset=assembly.offset)
                    continue
                if assembly.chunk(payload):
                    fleet._progressed()
                for first, length in assembly.requests():  # the journal was of another image
                    await self._ask(first, length)
                if profile.bandwidth:
                    delay = size / profile.bandwidth - (time.monotonic() - started)
                    if delay > 0:
                        await asyncio.sleep(delay)
        finally:
            device.retried += assembly.recovered

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


def _stored(journal: Journal) -> tuple[str, int] | None:
    """What the journal holds: the download's source and its durable bytes."""
    record = journal.load()
    return None if record is None else (record.download.source, record.durable)


# --- one device ---------------------------------------------------------------------------------


class FleetDevice:
    """One simulated device: identity, token, flash, journal, faults and what happened to it."""

    __slots__ = (
        "backoff",
        "boots",
        "bytes",
        "delta_journal",
        "delta_patch",
        "drops",
        "failures",
        "flash",
        "gave_up",
        "image_sha256",
        "index",
        "job_started",
        "journal",
        "last_error",
        "power_cuts",
        "profile",
        "resumes",
        "retried",
        "reverted",
        "rng",
        "serial",
        "settled",
        "token",
        "updates",
        "version",
        "wait",
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
        # failed attempts by error code (None until the first): the report counts them as
        # recovered when the device settles afterwards, as errors when it does not
        self.failures: Counter[str] | None = None
        self.retried = 0  # ranges or chunks asked again within an attempt, then stored
        self.backoff: Backoff | None = None  # made at the first failed attempt
        self.gave_up = False  # settled by giving up on the offered artifact
        self.wait: float | None = None  # the backoff before the next poll, after a failure
        # delta updates: what the primary slot runs (image_digest, hex; None: not yet known),
        # the patch being downloaded or applied and its journal (made at the first delta)
        self.image_sha256: str | None = None
        self.delta_patch: bytearray | None = None
        self.delta_journal: MemoryJournal | None = None


# --- the fleet ----------------------------------------------------------------------------------


@dataclass
class FleetReport:
    """The outcome of :meth:`Fleet.run`; :meth:`to_dict` is the CLI's JSON report."""

    devices: int
    settled: int
    updated: int  # devices that confirmed at least one new image
    reverted: int  # devices whose update went back and was reported
    failed: dict[str, int]  # devices not settled at the end or that gave up, by last error
    errors: dict[str, int]  # failed attempts of those devices, by error code
    recovered: dict[str, int]  # failed attempts of devices that settled afterwards, by code
    retried: int  # ranges or chunks asked for again within an attempt, then stored
    gave_up: int  # devices that gave up on the offered artifact after repeated failures
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
        self._accepts = delta_compressions() if config.deltas else ()
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
        self.retry = config.retry_policy
        self._start = time.monotonic()
        self._last_progress = self._start
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
        """An attempt failed for another reason than an injected fault: count it (the report
        tells apart the failures a device recovered from and those it did not)."""
        device.last_error = code
        self.errors[code] += 1
        if device.failures is None:
            device.failures = Counter()
        device.failures[code] += 1
        self._event(device, "failed", error=code, step=step, message=message)

    def _progressed(self) -> None:
        """Some device moved forward (bytes stored, an update done, a device settled): the
        run's timeout counts from the last such moment."""
        self._last_progress = time.monotonic()

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
            self._last_progress = time.monotonic()
            tasks = {asyncio.create_task(self._life(d)) for d in self.devices}
            ticker = asyncio.create_task(self._ticker(on_tick, tick)) if on_tick else None
            pending = await self._until_stalled(tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            for task in tasks - pending:
                failure = task.exception()
                if failure is not None:
                    raise failure  # a bug in the simulator, not a device's failure
            if on_tick is not None:
                on_tick(self.snapshot())
        self._clients, self._mqtt = [], None
        return self.report(timed_out=bool(pending))

    async def _until_stalled(self, tasks: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
        """Wait until every task ended, one raised, or no device made progress for
        ``timeout`` seconds (a slow machine makes the run longer, not a failure); the tasks
        still running."""
        pending = tasks
        while pending:
            idle = time.monotonic() - self._last_progress
            if idle >= self.config.timeout:
                break
            done, pending = await asyncio.wait(
                pending, timeout=self.config.timeout - idle, return_when=asyncio.FIRST_EXCEPTION
            )
            if any(not task.cancelled() and task.exception() for task in done):
                break
        return pending

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
            device.wait = None
            await self._attempt(device)
            if not device.settled:
                wait = device.wait  # the retry policy's, after a failed attempt
                await asyncio.sleep(self._interval(device) if wait is None else wait)

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

    def _identity(self, device: FleetDevice) -> dict[str, Any]:
        """The check-in body: who the device is and what it runs (with ``deltas``: the image
        digest of its primary slot and the compressions it applies)."""
        body: dict[str, Any] = {
            "serial": device.serial,
            "board": self.config.board,
            "product": self.config.product,
            "manufacturer": self.config.manufacturer,
            "version": str(device.version),
        }
        if self.config.deltas and self._accepts:
            running = self._running_sha256(device)
            if running is not None:
                body["image_sha256"] = running
                body["delta"] = list(self._accepts)
        return body

    def _running_sha256(self, device: FleetDevice) -> str | None:
        """image_digest of the device's primary slot, computed once per image it runs."""
        if device.image_sha256 is None:
            area = Bootloader(device.flash, self.map, self.boot_config).primary(0)
            try:
                device.image_sha256 = image_digest(area).sha256.hex()
            except OtakitError:
                return None
        return device.image_sha256

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
            self._progressed()
        return answer

    async def _report(
        self,
        device: FleetDevice,
        status: FwStatus,
        deployment_id: int,
        *,
        error: str | None = None,
        version: FirmwareVersion | None = None,
        delta_error: str | None = None,
    ) -> None:
        """POST a status report; one that is not delivered is counted as an error."""
        body: dict[str, Any] = {"status": status.value, "deployment_id": deployment_id}
        if error is not None:
            body["error"] = error
        if delta_error is not None:
            body["delta_error"] = delta_error
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
        del answer  # the check-in's JSON (~2 KiB) is not held while the device updates
        if job is None:
            return
        try:
            parsed = FleetJob.parse(job)
        except OtakitError as exc:
            self._error(device, exc, "checkin")
            return
        del job
        await self._update(device, _HttpChannel(self, device, parsed))

    def _after_check_in(self, device: FleetDevice, answer: dict[str, Any] | None) -> None:
        """Whether the device is done: it runs the target version (or a newer one), or,
        without a target (or after going back from it), the server offers it nothing."""
        answer = answer or {}
        abort = answer.get("abort")
        if isinstance(abort, dict) and device.journal.load() is not None:
            self._storage(device, Bootloader(device.flash, self.map, self.boot_config)).abort()
            device.job_started = None
            self._event(device, "aborted", reason=str(abort.get("reason", ""))[:200])
        if self.target is not None and device.version >= self.target:
            settled = True
        else:
            settled = answer.get("job") is None and (self.target is None or device.reverted)
        if settled and not device.settled:
            device.settled = True
            self._event(device, "settled", running=str(device.version))
            self._progressed()

    async def _update(self, device: FleetDevice, channel: _Channel) -> None:
        """The update a job asks for, over the channel that brought it (HTTP or MQTT): the
        offer checked by :func:`~otakit.device.core.job.check_offer`, the download, verify,
        set pending, reboot, and what the boot means decided by
        :func:`~otakit.device.core.after_boot.after_boot` (confirm, or report the revert), as
        ``otakit agent`` does. An artifact the retry policy gave up on is neither downloaded
        nor reported again: the device settles (the report counts it as failed)."""
        backoff = device.backoff
        if backoff is not None and backoff.gave_up(channel.artifact):
            if not device.settled:
                device.gave_up = device.settled = True
                failures = backoff.failures(channel.artifact)
                self._event(device, "gave-up", version=channel.version, failures=failures)
                self._progressed()
            return
        if device.job_started is None or device.job_started[0] != channel.key:
            device.job_started = (channel.key, self.now())
            self._event(device, "job", version=channel.version, **channel.details)
        try:
            check_offer(
                version=channel.version,
                board=channel.board,
                running=device.version,
                my_board=self.config.board,
            )
        except OtakitError as exc:
            self._error(device, exc, "job")
            await channel.report(FwStatus.INVALID, error=exc.agent_error)
            self._attempt_failed(device, channel.artifact)
            return
        await channel.report(FwStatus.DOWNLOADING)
        # made after the report: thousands of devices wait for a connection, none holds more
        # than it needs while it waits
        boot = Bootloader(device.flash, self.map, self.boot_config)
        storage = self._storage(device, boot)
        target: Storage = storage
        delta_error: str | None = None
        if isinstance(channel, _HttpChannel) and channel.job.delta is not None and self._accepts:
            applied, interrupted, delta_error = await self._delta(device, channel, storage, boot)
            if interrupted:
                return  # a power cut or a broken link: the next poll goes on
            if applied is not None:
                target = applied
        if target is storage and not await self._download_with_faults(
            device, channel, storage, boot
        ):
            return
        try:
            version = FirmwareVersion.parse(target.verify())
            if channel.sha256 is not None and target is storage:
                self._check_sha256(storage, channel.sha256)
        except OtakitError as exc:
            target.abort()
            self._error(device, exc, "verify")
            error = FwError.SHA256_VERIFY_FAIL if isinstance(exc, HashMismatchError) else None
            await channel.report(FwStatus.ERROR, error=error or exc.agent_error)
            self._attempt_failed(device, channel.artifact)
            return
        target.set_pending(permanent=False)
        del target
        # every image the update installed must run its new version (a package: several)
        expected: dict[int, FirmwareVersion] = dict(storage.installed) or {0: version}
        del storage  # done with: not held while the device waits to report
        self._event(device, "pending", version=str(version))
        if delta_error is not None and isinstance(channel, _HttpChannel):
            await self._report(
                device,
                FwStatus.APPLYING,
                channel.job.deployment_id,
                version=version,
                delta_error=delta_error,
            )
        else:
            await channel.report(FwStatus.APPLYING, version=version)
        previous = device.version
        healthy = not device.profile.broken  # a broken image crashes before it confirms
        booted = after_boot(
            self._reboot(device, boot), expected=expected, previous=previous, healthy=healthy
        )
        if booted.verdict is BootVerdict.NOT_STARTED and booted.report is None:
            # it started but is not healthy: it crashes before confirming, and the watchdog's
            # reset reverts it
            self._event(device, "crashed", running=str(version))
            booted = after_boot(self._reboot(device, boot), expected=expected, previous=previous)
        if booted.verdict is BootVerdict.REVERTED:
            device.reverted = True
            device.version = booted.running or previous
            self._event(device, "reverted", running=str(device.version))
            await channel.report(
                booted.report or FwStatus.ERROR,
                error=booted.error or REVERT_ERROR,
                version=device.version,
            )
            self._attempt_failed(device, channel.artifact)
            device.job_started = None
            await channel.recheck()
            return
        if booted.verdict is not BootVerdict.UPDATED:
            reason = booted.reason or f"the bootloader did not start {version}"
            code = booted.error or BootError.code
            self._fail(device, code, f"the new image did not start: {reason}", "boot")
            await channel.report(booted.report or FwStatus.ERROR, error=FwError.NONE)
            self._attempt_failed(device, channel.artifact)
            return
        if booted.confirm:
            boot.confirm()
        device.image_sha256 = None  # another image runs: its digest is computed again
        device.version = booted.running or version
        device.updates += 1
        device.reverted = False
        if device.backoff is not None:
            device.backoff.succeeded(channel.artifact)
        self.durations.append(self.now() - device.job_started[1])
        self._event(device, "updated", version=str(version), seconds=round(self.durations[-1], 4))
        self._progressed()
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

    async def _delta(
        self, device: FleetDevice, channel: _HttpChannel, storage: UpdateStorage, boot: Bootloader
    ) -> tuple[DeltaStorage | None, bool, str | None]:
        """The job's delta patch, as ``otakit agent`` decides and applies it
        (:func:`~otakit.device.core.job.choose_download`, :class:`DeltaStorage` in memory):
        the storage holding the applied new image (None: the full image comes), whether the
        attempt was interrupted (a power cut or a broken link: the next poll resumes the stored
        patch) and the ``delta_error`` to report."""
        offer = channel.job.delta
        assert offer is not None
        choice = choose_download(
            offer,
            running_sha256=self._running_sha256(device),
            accepts=self._accepts,
            single_image=True,
        )
        if not choice.delta:
            return None, False, choice.report
        if device.delta_patch is None or device.delta_journal is None:
            device.delta_patch, device.delta_journal = bytearray(), MemoryJournal()
        delta = DeltaStorage(storage, boot.primary(0), device.delta_journal, device.delta_patch)
        delta.prepare(offer, version=channel.version)
        try:
            if not delta.ready() and not await self._download_with_faults(
                device, _HttpChannel(self, device, channel.job.patch()), delta, boot
            ):
                return None, True, None
            delta.apply()
        except DeltaError as exc:
            self._event(device, "delta-refused", reason=exc.reason)
            delta.abort()
            return None, False, exc.reason
        except PowerCut:  # while applying: the device reboots, the patch stays
            device.flash.power_on()
            device.power_cuts += 1
            self._event(device, "power-cut", durable=0)
            self._reboot(device, boot)
            return None, True, None
        self._event(device, "delta", size=offer.size)
        return delta, False, None

    def _storage(self, device: FleetDevice, boot: Bootloader) -> UpdateStorage:
        """Where a download goes: the device's update storage on its flash and journal."""
        return UpdateStorage(boot, device.journal, self.keys, current_version=str(device.version))

    def _reboot(self, device: FleetDevice, boot: Bootloader) -> tuple[ImageBoot, ...]:
        images = boot.boot().images
        device.boots += 1
        image = images[0]
        self._event(
            device,
            "booted",
            action=image.action.value,
            running=None if image.version is None else str(image.version),
        )
        return images

    def _attempt_failed(self, device: FleetDevice, artifact: str, *, counts: bool = True) -> None:
        """An update attempt of ``artifact`` failed: the next poll waits as the retry policy
        says (:class:`~otakit.device.core.retry.Backoff`, as the agent), which also gives up on
        the artifact after ``give_up_after`` such failures. ``counts`` False: an interruption
        that is resumed at the next poll, after the usual interval."""
        if not counts:
            return
        if device.backoff is None:
            device.backoff = Backoff(self.retry)
        device.wait = device.backoff.failed(artifact, random=device.rng.random())

    def _check_sha256(self, storage: UpdateStorage, expected: str) -> None:
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
        self, device: FleetDevice, channel: _Channel, storage: Storage, boot: Bootloader
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
        before = _stored(device.journal)
        try:
            await channel.download(storage)
        except PowerCut:  # the device reboots: not a failure of the artifact
            flash.power_on()
            device.power_cuts += 1
            durable = device.journal.load()
            self._event(device, "power-cut", durable=durable.durable if durable else 0)
            self._reboot(device, boot)  # nothing pending: the old image runs on
            return False
        except TransferError as exc:
            self._error(device, exc, "download")
            answered = exc.status is not None and exc.status >= 400
            error = FwError.HTTP_RESPONSE if answered else FwError.NETWORK_TIMEOUT
            await channel.report(FwStatus.INTERRUPTED, error=error)
            # an interrupted download that stored bytes goes on at the next poll; one that
            # stored nothing counts as a failed attempt of the artifact
            after = _stored(device.journal)
            stored = after is not None and (
                before is None or after[0] != before[0] or after[1] > before[1]
            )
            self._attempt_failed(device, channel.artifact, counts=not stored)
            return False
        except OtakitError as exc:  # a bad chunk, or an image that does not fit the slot
            storage.abort()
            self._error(device, exc, "download")
            await channel.report(FwStatus.ERROR, error=FwError.FILE_OPERATION_FAIL)
            self._attempt_failed(device, channel.artifact)
            return False
        finally:
            flash.power_on()  # disarms a cut that did not happen
        return True

    async def _download(self, device: FleetDevice, job: FleetJob, storage: Storage) -> None:
        """Ranged GETs into ``storage``, resuming from the journal: the I/O of
        :class:`otakit.device.core.download.RangedDownload`, which decides every range, judges
        every answer and writes and commits the bytes, as for ``otakit agent``'s
        :class:`~otakit.device.transports.http.HttpTransport`. The journal names the image by
        its URL path and SHA-256, since every check-in signs the URL anew.

        Faults: a *drop* throws a range's body away as if the link broke (a failed try of the
        range, asked again within the attempt); a *slow link* sleeps after each range as long
        as its bytes take at the link's speed. Raises TransferError when a range's tries are
        used up or an answer is fatal, and whatever the storage raises.
        """
        download = RangedDownload(
            storage,
            source=job.source,
            version=job.version,
            sha256=job.sha256,
            chunk_size=self.config.chunk_size,
            tries=self.config.range_tries,
            same=job.resumes,
        )
        if download.resumed_from > 0:
            device.resumes += 1
            self._event(device, "resume", offset=download.resumed_from)
        client = self._client(device)
        bandwidth = device.profile.bandwidth
        try:
            while (request := download.next_request()) is not None:
                started = time.monotonic()
                self.requests["range"] += 1
                try:
                    received = await self._range(device, client, job.url, request, download)
                except httpx.HTTPError as exc:
                    download.failed(f"{request}: {type(exc).__name__}: {exc}")
                    continue
                if bandwidth and received:
                    delay = received / bandwidth - (time.monotonic() - started)
                    if delay > 0:
                        await asyncio.sleep(delay)
        finally:
            device.retried += download.recovered

    async def _range(
        self,
        device: FleetDevice,
        client: httpx.AsyncClient,
        url: str,
        request: RangeRequest,
        download: RangedDownload,
    ) -> int:
        """One ranged GET of ``download``: the answer to :meth:`RangedDownload.response`, its
        body (unless a *drop* throws it away) to :meth:`RangedDownload.body`; returns the bytes
        the slow link takes time for (0 for a dropped answer). A coroutine of its own so that
        nothing of the answer (response, request, headers, streams: about 3 KiB, and the body)
        outlives it: thousands of devices wait for their next range holding none of it."""
        async with self._net, client.stream("GET", url, headers=request.headers()) as response:
            want = download.response(response.status_code, response.headers)
            if not want:
                return 0
            data = await _read_at_most(response, want)
        device.bytes += len(data)
        if device.profile.drop_rate and device.rng.random() < device.profile.drop_rate:
            device.drops += 1
            self._event(device, "drop", offset=request.first)
            download.failed("the link dropped (injected fault)")
            return 0
        if download.body(data):
            self._progressed()
        return len(data)

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
        unwell = [d for d in devices if not d.settled or d.gave_up]
        failed: Counter[str] = Counter(d.last_error or "TIMEOUT" for d in unwell)
        errors: Counter[str] = Counter()
        recovered: Counter[str] = Counter()
        for device in devices:
            if device.failures:
                ended_well = device.settled and not device.gave_up
                (recovered if ended_well else errors).update(device.failures)
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
            "range_tries": config.range_tries,
            "retry": asdict(self.retry),
        }
        return FleetReport(
            devices=len(devices),
            settled=sum(d.settled for d in devices),
            updated=sum(d.updates > 0 for d in devices),
            reverted=sum(d.reverted for d in devices),
            failed=dict(sorted(failed.items())),
            errors=dict(sorted(errors.items())),
            recovered=dict(sorted(recovered.items())),
            retried=sum(d.retried for d in devices),
            gave_up=sum(d.gave_up for d in devices),
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
