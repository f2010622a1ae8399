"""The MQTT OTA protocol of the original middleware (protocols.md §3): topics, message names and
the 32-byte chunk header. The JSON messages themselves are :class:`JobDocument`s (same rules:
one object, string values only); the extra keys of the device's messages (``BoardName``,
``ProductID``, ``Filename``, ``Offset``, ``Size``) are read with ``JobDocument.get``.

Topics, for COMPANY (default ``OTAUpdate``) and BOARD (the kit name; the original publisher
prefixes it with ``APP_``, otakit accepts both)::

    COMPANY/BOARD/publish_notify        device -> publisher requests
    COMPANY/BOARD/OTAImage/<number>     the device's unique topic for one session
    COMPANY/BOARD/OTAImage              the direct flow's topic
    cy_ota_device/will                  the device's last will

Chunk: a header, then ``data_size`` bytes of the image, little-endian (struct ``<8s5H2I3H``)::

    offset  size  field
     0      8     magic "OTAImage" (no NUL)
     8      2     offset_to_data (32)
    10      2     image type (0 = a single file)
    12      6     version major, minor, build (u16 each)
    18      4     total size of the image
    22      4     offset of this chunk in the image
    26      2     data size of this chunk
    28      2     total number of payloads
    30      2     index of this payload (0-based)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from otakit.errors import ChunkHeaderError
from otakit.protocol.version import FirmwareVersion

COMPANY = "OTAUpdate"
APP_PREFIX = "APP_"
NOTIFY = "publish_notify"
IMAGE = "OTAImage"
WILL_TOPIC = "cy_ota_device/will"

# Device -> publisher message names
UPDATE_AVAILABILITY = "Update Availability"
REQUEST_UPDATE = "Request Update"
SEND_DIRECT_UPDATE = "Send Direct Update"
REQUEST_DATA_CHUNK = "Request Data Chunk"
SUCCESS = "Success"
FAILURE = "Failure"
REQUESTS = (UPDATE_AVAILABILITY, REQUEST_UPDATE, SEND_DIRECT_UPDATE, REQUEST_DATA_CHUNK)
RESULTS = (SUCCESS, FAILURE)

QOS = 1
KEEPALIVE_S = 60
PORT = 1883
TLS_PORT = 8883
MTLS_PORT = 8884

MAGIC = b"OTAImage"
HEADER = struct.Struct("<8s5H2I3H")
HEADER_SIZE = HEADER.size  # 32
CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 0xFFFF  # data_size is a u16
SINGLE_FILE = 0


@dataclass(frozen=True)
class Topics:
    """The topics of one board. ``app_prefix`` says how this side names the board on the wire
    (the original publisher and devices use ``APP_BOARD``)."""

    board: str
    company: str = COMPANY
    app_prefix: bool = False

    @property
    def wire_board(self) -> str:
        return APP_PREFIX + self.board if self.app_prefix else self.board

    @property
    def notify(self) -> str:
        return f"{self.company}/{self.wire_board}/{NOTIFY}"

    @property
    def direct(self) -> str:
        return f"{self.company}/{self.wire_board}/{IMAGE}"

    def unique(self, number: int | str) -> str:
        return f"{self.direct}/{number}"


def notify_filter(company: str = COMPANY) -> str:
    """The subscription that hears every board's requests."""
    return f"{company}/+/{NOTIFY}"


def board_of(topic: str, company: str = COMPANY) -> tuple[str, bool] | None:
    """``(board, had_app_prefix)`` of a ``COMPANY/BOARD/...`` topic, or None for another
    company or a malformed topic. ``APP_X`` and ``X`` name the same board ``X``."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != company or not parts[1]:
        return None
    board = parts[1]
    if board.startswith(APP_PREFIX) and len(board) > len(APP_PREFIX):
        return board[len(APP_PREFIX) :], True
    return board, False


@dataclass(frozen=True)
class ChunkHeader:
    """One chunk's header; ``pack`` and :func:`parse_chunk` check every field."""

    version: tuple[int, int, int]  # major, minor, build
    total_size: int
    offset: int
    data_size: int
    total_payloads: int
    index: int
    image_type: int = SINGLE_FILE
    offset_to_data: int = HEADER_SIZE

    @property
    def firmware_version(self) -> FirmwareVersion:
        major, minor, build = self.version
        return FirmwareVersion(major, minor, build)

    @property
    def end(self) -> int:
        return self.offset + self.data_size

    def pack(self) -> bytes:
        self.check()
        return HEADER.pack(
            MAGIC,
            self.offset_to_data,
            self.image_type,
            *self.version,
            self.total_size,
            self.offset,
            self.data_size,
            self.total_payloads,
            self.index,
        )

    def check(self) -> None:
        """Raise :class:`ChunkHeaderError` for a header no publisher should send."""
        if self.offset_to_data != HEADER_SIZE:
            raise ChunkHeaderError(
                f"chunk offset_to_data is {self.offset_to_data}, not {HEADER_SIZE}",
                value=self.offset_to_data,
            )
        if self.image_type != SINGLE_FILE:
            raise ChunkHeaderError(
                f"chunk image type {self.image_type} is not 0 (a single file)",
                value=self.image_type,
            )
        if not all(0 <= part <= 0xFFFF for part in self.version):
            raise ChunkHeaderError(f"chunk version {self.version} does not fit u16 fields")
        if not 0 < self.total_size <= 0xFFFFFFFF:
            raise ChunkHeaderError(
                f"chunk total size {self.total_size} is not positive", value=self.total_size
            )
        if not 0 < self.data_size <= MAX_CHUNK_SIZE:
            raise ChunkHeaderError(
                f"chunk data size {self.data_size} is out of range", value=self.data_size
            )
        if self.offset < 0 or self.end > self.total_size:
            raise ChunkHeaderError(
                f"chunk bytes {self.offset}-{self.end} lie outside the {self.total_size}-byte "
                "image",
                value=self.offset,
            )
        if not 0 <= self.index < self.total_payloads <= 0xFFFF:
            raise ChunkHeaderError(
                f"chunk index {self.index} of {self.total_payloads} payloads is out of range",
                value=self.index,
            )


def parse_chunk(payload: bytes | bytearray | memoryview) -> tuple[ChunkHeader, bytes]:
    """The header and data of one chunk message.

    Raises :class:`ChunkHeaderError` (the original's ``NOT_A_HEADER``) for a short payload, a
    wrong magic, an inconsistent header or a data length that differs from the header's.
    """
    data = bytes(payload)
    if len(data) < HEADER_SIZE:
        raise ChunkHeaderError(
            f"chunk of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header",
            value=len(data),
        )
    magic, to_data, image_type, major, minor, build, total, offset, size, count, index = (
        HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise ChunkHeaderError(f"chunk magic is {magic!r}, not {MAGIC!r}", value=magic)
    header = ChunkHeader(
        version=(major, minor, build),
        total_size=total,
        offset=offset,
        data_size=size,
        total_payloads=count,
        index=index,
        image_type=image_type,
        offset_to_data=to_data,
    )
    header.check()
    body = data[to_data:]
    if len(body) != size:
        raise ChunkHeaderError(
            f"chunk {index} says {size} data bytes but carries {len(body)}", value=len(body)
        )
    return header, body


def payload_count(total_size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return max(1, -(-total_size // chunk_size))


def chunk(
    image: bytes | memoryview, version: FirmwareVersion, index: int, chunk_size: int = CHUNK_SIZE
) -> bytes:
    """Chunk ``index`` of ``image`` (header and data), as the publisher sends it.

    Raises IndexError for an index outside ``0 .. payload_count - 1`` (never StopIteration,
    which would silently end a caller's loop or generator).
    """
    count = payload_count(len(image), chunk_size)
    if not 0 <= index < count or not image:
        raise IndexError(f"chunk index {index} is out of range for {count} chunk(s)")
    return next(range_chunks(image, version, index * chunk_size, chunk_size, chunk_size))


def range_chunks(
    image: bytes | memoryview,
    version: FirmwareVersion,
    offset: int,
    size: int,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[bytes]:
    """The chunks that answer a Request Data Chunk for ``size`` bytes at ``offset`` (``size``
    -1: the rest of the file). Chunks keep the image's own boundaries and indexes when
    ``offset`` is on one; otherwise the first chunk starts at ``offset``."""
    end = len(image) if size < 0 else min(len(image), offset + size)
    count = payload_count(len(image), chunk_size)
    position = offset
    while position < end:
        index = min(position // chunk_size, count - 1)
        stop = min(end, (index + 1) * chunk_size)
        data = bytes(image[position:stop])
        header = ChunkHeader(
            version=(version.major, version.minor, version.revision),
            total_size=len(image),
            offset=position,
            data_size=len(data),
            total_payloads=count,
            index=index,
        )
        yield header.pack() + data
        position = stop
