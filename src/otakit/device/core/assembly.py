"""MQTT image chunks (protocols.md §3) put together into a
:class:`~otakit.device.storage.Storage`, without I/O.

:class:`ChunkAssembly` takes one chunk message at a time (:meth:`~ChunkAssembly.chunk`), writes
the image in order and commits it after every contiguous step, and says what to ask for again
when the chunks stop (:meth:`~ChunkAssembly.stalled`, :meth:`~ChunkAssembly.missing`). The
drivers do the I/O (the agent's :class:`~otakit.device.transports.mqtt.MqttTransport` with paho
and a thread, the fleet simulator with asyncio, ``otakit subscriber`` with paho into a file);
the rules are these, once:

- Every chunk goes through :func:`otakit.protocol.mqtt.parse_chunk` (the 32-byte header):
  a malformed one is a :class:`~otakit.errors.ChunkHeaderError` (``NOT_A_HEADER``).
- Versions: a chunk whose version is not the job's (``version``), or not strictly newer than
  the running one (``running``), is an :class:`~otakit.errors.InvalidVersionError`
  (``INVALID_VERSION``). The header has no build number: versions are compared as
  major.minor.revision. Without a job version (the direct flow) the first chunk's version is
  the image's, and a chunk that says another is a ChunkHeaderError.
- The first chunk gives the total size and opens the storage (which says how many bytes it
  already holds); a chunk that says another total size is a ChunkHeaderError. The number of
  payloads and the index are not compared between chunks: the original publisher counts a
  "Request Data Chunk" answer in units of the requested size.
- Chunks may come in any order, twice, or overlapping. A chunk whose bytes are all stored is a
  duplicate (with ``read``, its bytes are compared with the stored ones: a chunk that changes
  them is a :class:`~otakit.errors.TransferError`). A chunk past the first missing byte is held
  (at most ``max_early`` chunks and ``max_early_bytes`` bytes, each chunk counting at least
  :data:`MIN_HELD_COST` bytes so that tiny chunks cannot pile up); beyond that it is dropped and
  asked for again later. Held chunks are written as soon as they continue the stored bytes, so
  append-only storage works. Each chunk costs O(log n) in the held chunks.
- Resume: the storage's journal record (``storage.progress()``) is continued when ``same``
  says it is this download (by default: the same ``source``, and the same version and SHA-256
  when the job names them), from its durable bytes (:attr:`~ChunkAssembly.resumed_from`: ask "Request Data
  Chunk" ``Offset`` = it, ``Size`` -1, instead of "Request Update"). When every byte was durable
  but the image never became pending, the last 4096-byte chunk is asked again. Should the
  storage hold fewer bytes than that when it is opened (the journal was of another image),
  the bytes in between are asked for at once (:meth:`~ChunkAssembly.requests`).
- Silence: each :meth:`~ChunkAssembly.stalled` counts a try and returns where to ask from; the
  ``tries + 1``-th in a row without new bytes raises TransferError (``GET_DATA``) naming what is
  missing. New bytes (stored or held) end the run of tries;
  :attr:`~ChunkAssembly.recovered` counts the tries that new bytes followed.

Driver shape::

    assembly = ChunkAssembly(storage, source=..., version=job_version, running=running)
    if assembly.resumed_from:
        ask("Request Data Chunk", Offset=assembly.resumed_from, Size=-1)
    else:
        ask("Request Update")
    while not assembly.done:
        payload = <next binary message on the session's topics, or None after a timeout>
        if payload is None:
            first = assembly.stalled()          # raises TransferError when tries are used up
            for offset, size in assembly.missing() or [(first, -1)]:
                ask("Request Data Chunk", Offset=offset, Size=size)
            continue
        assembly.chunk(payload)                 # raises ChunkHeaderError, InvalidVersionError
        for offset, size in assembly.requests():
            ask("Request Data Chunk", Offset=offset, Size=size)
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable

from otakit.device.journal import Download
from otakit.device.storage import Storage
from otakit.errors import ChunkHeaderError, InvalidVersionError, TransferError
from otakit.protocol import mqtt as wire
from otakit.protocol.version import FirmwareVersion

log = logging.getLogger("otakit.assembly")

MAX_EARLY = 64
"""Chunks past a gap held by default; more are dropped and asked for again."""

MIN_HELD_COST = 256
"""Bytes a held chunk counts against ``max_early_bytes``, however small it is."""


def _image_version(version: FirmwareVersion) -> FirmwareVersion:
    """``version`` as a chunk header can carry it: major.minor.revision, no build."""
    return FirmwareVersion(version.major, version.minor, version.revision)


def ranges_text(ranges: list[tuple[int, int]], shown: int = 4) -> str:
    """``bytes a-b, c-d and N more ranges`` for ``(offset, size)`` ranges."""
    text = ", ".join(f"bytes {a}-{a + n - 1}" for a, n in ranges[:shown])
    return text + (f" and {len(ranges) - shown} more ranges" if len(ranges) > shown else "")


class ChunkAssembly:
    """MQTT image chunks (protocols.md §3, 32-byte header) into a Storage, in order; chunks
    past a gap are held (bounded); what is missing is asked for again. See the module docstring
    for the rules.

    ``source`` names the download in the journal. ``version`` is the job's version, which every
    chunk must carry (None: the first chunk's, in the direct flow); ``running``, when given, is
    the running version, which every chunk must be strictly newer than. ``resume`` False: start
    from byte 0 whatever the journal says. ``tries``: stalls in a row without new bytes before
    TransferError. ``max_early`` and ``max_early_bytes`` (default ``max_early`` x 4096) bound
    the held chunks. ``read(offset, size)``, when given, reads stored bytes back so that a
    repeated chunk is checked against them. ``sha256`` goes into the journal's record.

    Raises ValueError for a bound below 1.
    """

    __slots__ = (
        "_cost",
        "_early",
        "_expected",
        "_held",
        "_order",
        "_requests",
        "_tries",
        "_version_text",
        "header",
        "max_early",
        "max_early_bytes",
        "offset",
        "read",
        "recovered",
        "resumed_from",
        "running",
        "sha256",
        "source",
        "started",
        "storage",
        "total",
        "tries",
        "version",
    )

    def __init__(
        self,
        storage: Storage,
        *,
        source: str,
        version: FirmwareVersion | None,
        resume: bool = True,
        max_early: int = MAX_EARLY,
        same: Callable[[Download], bool] | None = None,
        running: FirmwareVersion | None = None,
        tries: int = 3,
        max_early_bytes: int | None = None,
        sha256: str | None = None,
        read: Callable[[int, int], bytes] | None = None,
    ) -> None:
        if max_early < 1 or (max_early_bytes is not None and max_early_bytes < 1):
            raise ValueError("max_early and max_early_bytes must be at least 1")
        self.storage = storage
        self.source = source
        self.sha256 = sha256
        self.running = None if running is None else _image_version(running)
        self._expected = None if version is None else _image_version(version)
        # the version the chunks carry: the job's, else the first chunk's
        self.version: FirmwareVersion | None = self._expected
        self._version_text = "" if version is None else str(version)  # the journal's
        self.tries = max(0, tries)
        self.max_early = max_early
        self.max_early_bytes = (
            max_early * wire.CHUNK_SIZE if max_early_bytes is None else max_early_bytes
        )
        self.read = read
        self.total: int | None = None  # from the first chunk
        self.started: int | None = None  # bytes the storage held when the first chunk opened it
        self.header: wire.ChunkHeader | None = None  # the last chunk taken
        self.recovered = 0  # stalls that new bytes followed
        self._tries = 0  # stalls in a row without new bytes
        self._early: dict[int, bytes] = {}  # offset -> data, past `offset`
        self._order: list[int] = []  # the held offsets, a heap
        self._cost = 0  # what the held chunks count against max_early_bytes
        self._held = 0  # their bytes: a running total, never a sum over them
        self._requests: list[tuple[int, int]] = []
        self.resumed_from = self._resume_point(same) if resume else 0
        self.offset = self.resumed_from  # the next byte wanted: all before it are stored

    def _resume_point(self, same: Callable[[Download], bool] | None) -> int:
        record = self.storage.progress()
        if record is None or record.durable <= 0:
            return 0
        download = record.download
        if same is None:
            ours = (
                download.source == self.source
                and (not self._version_text or download.version == self._version_text)
                and (
                    not self.sha256
                    or not download.sha256
                    or download.sha256.lower() == self.sha256.lower()
                )
            )
        else:
            ours = same(download)
        if not ours:
            return 0
        offset = record.durable
        if offset >= download.size:  # all stored, never pending: the last chunk again
            offset = (download.size - 1) // wire.CHUNK_SIZE * wire.CHUNK_SIZE
        log.info("resuming %s at byte %d of %d", self.source, offset, download.size)
        return offset

    # --- state -----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether every byte of the image is stored and committed."""
        return self.total is not None and self.offset >= self.total

    @property
    def held(self) -> int:
        """Bytes of chunks held past a gap."""
        return self._held

    @property
    def held_chunks(self) -> int:
        """Chunks held past a gap (at most ``max_early``)."""
        return len(self._early)

    def missing(self, split: int | None = None) -> list[tuple[int, int]]:
        """``(offset, size)`` of the bytes neither stored nor held, in order (empty before the
        first chunk: the size is not known). With ``split``, ranges are also cut at multiples
        of it (one request per publisher chunk)."""
        if self.total is None:
            return []
        gaps: list[tuple[int, int]] = []
        position = self.offset
        for start in sorted(self._early):
            if start > position:
                gaps.append((position, start - position))
            position = max(position, start + len(self._early[start]))
        if position < self.total:
            gaps.append((position, self.total - position))
        if split is None or split < 1:
            return gaps
        pieces: list[tuple[int, int]] = []
        for first, size in gaps:
            end = first + size
            while first < end:
                stop = min(end, (first // split + 1) * split)
                pieces.append((first, stop - first))
                first = stop
        return pieces

    # --- events ----------------------------------------------------------------------------

    def chunk(self, payload: bytes | bytearray | memoryview) -> bool:
        """Take one binary message; True when it brought bytes not stored nor held before.

        Raises :class:`ChunkHeaderError` for a malformed chunk or one that disagrees with the
        earlier ones (total size; version without a job version), :class:`InvalidVersionError`
        for a version that is not the job's or not newer than the running one,
        :class:`TransferError` when ``read`` shows a repeated chunk changing stored bytes, and
        whatever the storage raises (an image that does not fit, a flash error).
        """
        header, data = wire.parse_chunk(payload)
        self._check(header)
        self.header = header
        if self.total is None:
            self._open(header)
        new = self._place(header, data)
        if new and self._tries:
            self.recovered += self._tries
            self._tries = 0
        return new

    def stalled(self) -> int:
        """No new chunk for a while (or a gap that does not fill): count a try and return the
        first byte to ask for again ("Request Data Chunk" ``Offset``; see :meth:`missing` for
        the exact ranges).

        Raises :class:`TransferError` (``GET_DATA``) when ``tries`` stalls in a row have
        already been asked again without new bytes.
        """
        self._tries += 1
        if self._tries > self.tries:
            if self.total is None:
                what = "the whole image"
            else:
                what = f"{ranges_text(self.missing())} of {self.total}"
            raise TransferError(
                f"no new chunk after asking again {self.tries} times; missing {what}",
                value=self.source,
            )
        return self.offset

    def requests(self) -> list[tuple[int, int]]:
        """``(offset, size)`` ranges the driver must ask for now ("Request Data Chunk"), each
        returned once: after the first chunk, when the storage holds fewer bytes than the
        resume point (the journal was of another image), the bytes in between."""
        asked, self._requests = self._requests, []
        return asked

    # --- rules -----------------------------------------------------------------------------

    def _check(self, header: wire.ChunkHeader) -> None:
        carried = header.firmware_version
        running = self.running
        if running is not None and not carried > running:
            raise InvalidVersionError(
                f"chunk {header.index} carries version {carried}, not newer than the running "
                f"{running}",
                value=str(carried),
            )
        if self._expected is not None:
            if carried != self._expected:
                raise InvalidVersionError(
                    f"chunk {header.index} carries version {carried}, the job says "
                    f"{self._expected}",
                    value=str(carried),
                )
        elif self.version is not None and carried != self.version:
            raise ChunkHeaderError(
                f"chunk {header.index} carries version {carried}, earlier chunks {self.version}",
                value=str(carried),
            )
        if self.total is not None and header.total_size != self.total:
            raise ChunkHeaderError(
                f"chunk {header.index} says total size {header.total_size}, earlier chunks said "
                f"{self.total}",
                value=header.total_size,
            )

    def _open(self, header: wire.ChunkHeader) -> None:
        if self.version is None:
            self.version = header.firmware_version
            self._version_text = self._version_text or self.version.short
        download = Download(
            source=self.source,
            size=header.total_size,
            version=self._version_text,
            sha256=self.sha256,
        )
        stored = self.storage.open(download)
        log.info("image of %d bytes, %d already stored", header.total_size, stored)
        self.total, self.started = header.total_size, stored
        if stored < self.offset:  # the journal was of another image: the head too
            self._requests.append((stored, self.offset - stored))
        self.offset = stored

    def _place(self, header: wire.ChunkHeader, data: bytes) -> bool:
        start, end = header.offset, header.end
        if end <= self.offset:  # all stored: a duplicate
            self._compare(header.index, start, data)
            return False
        if start > self.offset:  # past a gap
            return self._hold(header, data)
        if start < self.offset:  # partly stored
            self._compare(header.index, start, data[: self.offset - start])
            data = data[self.offset - start :]
        self._write(data)
        return True

    def _compare(self, index: int | None, start: int, data: bytes) -> None:
        """With ``read``: raise TransferError when ``data`` at ``start`` differs from the
        stored bytes (``index`` None: a held chunk)."""
        if self.read is None or not data:
            return
        stored = self.read(start, len(data))
        if stored != data:
            same = (i for i, (a, b) in enumerate(zip(stored, data, strict=False)) if a != b)
            first = next(same, min(len(stored), len(data)))
            what = "a held chunk" if index is None else f"chunk {index}"
            raise TransferError(
                f"{what} changes bytes {start + first}-{start + len(data)} received before",
                value=start + first,
            )

    def _hold(self, header: wire.ChunkHeader, data: bytes) -> bool:
        start = header.offset
        before = self._early.get(start)
        if before is not None:
            if len(data) <= len(before):
                if data != before[: len(data)]:
                    raise TransferError(
                        f"chunk {header.index} changes bytes {start}-{header.end} received before",
                        value=start,
                    )
                return False  # a duplicate of a held chunk
            if data[: len(before)] != before:
                raise TransferError(
                    f"chunk {header.index} changes bytes {start}-{start + len(before)} "
                    "received before",
                    value=start,
                )
            grow = max(len(data), MIN_HELD_COST) - max(len(before), MIN_HELD_COST)
            if self._cost + grow > self.max_early_bytes:
                return False
            self._early[start] = data  # longer: it replaces the held one
            self._cost += grow
            self._held += len(data) - len(before)
            return True
        cost = max(len(data), MIN_HELD_COST)
        if len(self._early) >= self.max_early or self._cost + cost > self.max_early_bytes:
            log.debug("dropping early chunk %d: %d chunks held", header.index, len(self._early))
            return False  # asked for again when it is missing
        self._early[start] = data
        heapq.heappush(self._order, start)
        self._cost += cost
        self._held += len(data)
        return True

    def _next_held(self) -> tuple[int, bytes] | None:
        """The held chunk that continues ``offset``, if any; held chunks it passed are gone."""
        while self._order and self._order[0] <= self.offset:
            start = heapq.heappop(self._order)
            held = self._early.pop(start)
            self._cost -= max(len(held), MIN_HELD_COST)
            self._held -= len(held)
            self._compare(None, start, held[: self.offset - start])  # what is stored of it
            if start + len(held) > self.offset:
                return start, held
        return None

    def _write(self, data: bytes) -> None:
        """Write ``data`` at ``offset``, then every held chunk it makes contiguous; commit once."""
        while True:
            self.storage.write(self.offset, data)
            self.offset += len(data)
            following = self._next_held()
            if following is None:
                break
            start, held = following
            data = held[self.offset - start :]
        self.storage.commit(self.offset)
