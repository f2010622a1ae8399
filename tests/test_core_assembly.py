"""The MQTT chunk assembly core (otakit.device.core.assembly), fed chunk payloads directly:
no broker, no threads. The storage is an in-memory Storage with a journal record, which
records every write and commit so that the order of writes can be checked."""

from __future__ import annotations

import os

import pytest

from otakit.device.core.assembly import MIN_HELD_COST, ChunkAssembly
from otakit.device.journal import Download, JournalRecord
from otakit.errors import (
    ChunkHeaderError,
    ImageTooLargeError,
    InvalidVersionError,
    TransferError,
)
from otakit.protocol import mqtt as wire
from otakit.protocol.version import FirmwareVersion

pytestmark = pytest.mark.unit

V = FirmwareVersion(1, 2, 0)
SOURCE = "mqtt://broker:1883/OTAUpdate/BOARD/OTAImage"
CHUNK = wire.CHUNK_SIZE


class MemoryStorage:
    """A Storage in memory: one image, a journal record of its durable bytes."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.data = bytearray()
        self.record: JournalRecord | None = None
        self.download: Download | None = None
        self.writes: list[tuple[int, int]] = []  # (offset, length)
        self.commits: list[int] = []
        self.opened = 0

    def progress(self) -> JournalRecord | None:
        return self.record

    def open(self, download: Download) -> int:
        self.opened += 1
        if download.size > self.limit:
            raise ImageTooLargeError(f"{download.size} bytes do not fit", value=download.size)
        self.download = download
        if self.record is not None and self.record.download.same_image(download):
            return self.record.durable
        self.data = bytearray()
        self.record = JournalRecord(download, 0)
        return 0

    def write(self, offset: int, data: bytes) -> None:
        assert offset == len(self.data), "writes must be in order"
        self.writes.append((offset, len(data)))
        self.data += data

    def commit(self, end: int) -> None:
        assert self.download is not None
        self.commits.append(end)
        self.record = JournalRecord(self.download, end)

    def verify(self) -> str:
        assert self.download is not None
        return self.download.version

    def set_pending(self, *, permanent: bool) -> None:
        self.record = None

    def abort(self) -> None:
        self.data = bytearray()
        self.record = None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])


def chunks_of(image: bytes, version: FirmwareVersion = V, size: int = CHUNK) -> list[bytes]:
    return list(wire.range_chunks(image, version, 0, -1, size))


def assembly(storage: MemoryStorage, **options: object) -> ChunkAssembly:
    options.setdefault("version", V)
    return ChunkAssembly(storage, source=SOURCE, **options)  # type: ignore[arg-type]


@pytest.fixture
def image() -> bytes:
    return os.urandom(5 * CHUNK + 100)  # six chunks, the last one short


def test_chunks_in_order_are_written_and_committed_one_by_one(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, running=FirmwareVersion(1, 1, 9))
    assert (a.resumed_from, a.offset, a.total, a.done) == (0, 0, None, False)
    for payload in chunks_of(image):
        assert a.chunk(payload) is True
    assert a.done
    assert (a.total, a.offset, a.started, a.recovered) == (len(image), len(image), 0, 0)
    assert bytes(storage.data) == image
    assert storage.commits == [CHUNK, 2 * CHUNK, 3 * CHUNK, 4 * CHUNK, 5 * CHUNK, len(image)]
    assert storage.download == Download(source=SOURCE, size=len(image), version="1.2.0")
    assert a.version == V
    assert a.header is not None
    assert a.header.index == 5


def test_out_of_order_chunks_are_held_then_written_in_order(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage)
    chunks = chunks_of(image)
    for i in (3, 1, 5, 2):
        assert a.chunk(chunks[i]) is True
    assert storage.writes == []  # nothing continues byte 0 yet
    assert a.held == 3 * CHUNK + 100
    assert a.missing() == [(0, CHUNK), (4 * CHUNK, CHUNK)]
    assert a.chunk(chunks[0]) is True  # 0, then the held 1, 2, 3 in one step
    assert storage.writes == [(0, CHUNK), (CHUNK, CHUNK), (2 * CHUNK, CHUNK), (3 * CHUNK, CHUNK)]
    assert storage.commits == [4 * CHUNK]  # one commit for the whole step
    assert a.missing() == [(4 * CHUNK, CHUNK)]
    assert a.chunk(chunks[4]) is True
    assert a.done
    assert bytes(storage.data) == image
    assert a.held == 0


def test_a_gap_is_asked_for_again_from_its_first_byte(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage)
    chunks = chunks_of(image)
    for i in (0, 2, 3):
        a.chunk(chunks[i])
    assert a.stalled() == CHUNK
    assert a.missing() == [(CHUNK, CHUNK), (4 * CHUNK, CHUNK + 100)]
    assert a.missing(split=CHUNK) == [(CHUNK, CHUNK), (4 * CHUNK, CHUNK), (5 * CHUNK, 100)]
    # the publisher answers "Request Data Chunk" Offset=4096 Size=-1: the held ones repeat
    for payload in wire.range_chunks(image, V, CHUNK, -1):
        a.chunk(payload)
    assert a.done
    assert bytes(storage.data) == image
    assert a.recovered == 1


def test_nothing_missing_is_known_before_the_first_chunk() -> None:
    a = assembly(MemoryStorage())
    assert a.missing() == []
    assert a.stalled() == 0


def test_duplicates_bring_nothing(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, read=storage.read)
    chunks = chunks_of(image)
    assert a.chunk(chunks[0]) is True
    assert a.chunk(chunks[0]) is False  # stored already
    assert a.chunk(chunks[2]) is True
    assert a.chunk(chunks[2]) is False  # held already
    assert storage.writes == [(0, CHUNK)]
    for payload in chunks:
        a.chunk(payload)
    assert a.done
    assert bytes(storage.data) == image


def test_overlapping_unaligned_pieces(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, read=storage.read)
    for offset, size in ((0, 3000), (2000, 3000), (9000, -1), (4000, 6000)):
        for payload in wire.range_chunks(image, V, offset, size):
            a.chunk(payload)
    assert a.done
    assert bytes(storage.data) == image


def test_a_longer_chunk_replaces_a_shorter_held_one(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage)
    short = next(wire.range_chunks(image, V, 2 * CHUNK, 100))
    assert a.chunk(short) is True
    assert a.chunk(chunks_of(image)[2]) is True  # the same offset, more bytes
    assert a.missing() == [(0, 2 * CHUNK), (3 * CHUNK, len(image) - 3 * CHUNK)]


def test_a_repeated_chunk_that_changes_bytes_is_refused(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, read=storage.read)
    chunks = chunks_of(image)
    a.chunk(chunks[0])
    tampered = bytearray(chunks[0])
    tampered[-1] ^= 1
    with pytest.raises(TransferError, match="changes bytes 4095-4096"):
        a.chunk(bytes(tampered))
    a.chunk(chunks[3])
    tampered = bytearray(chunks[3])
    tampered[40] ^= 1
    with pytest.raises(TransferError, match="changes bytes"):
        a.chunk(bytes(tampered))


def test_a_held_chunk_that_disagrees_with_what_was_stored_is_refused(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, read=storage.read)
    piece = wire.ChunkHeader(
        version=(1, 2, 0),
        total_size=len(image),
        offset=3000,
        data_size=2000,
        total_payloads=wire.payload_count(len(image)),
        index=0,
    )
    data = bytearray(image[3000:5000])
    data[0] ^= 1
    assert a.chunk(piece.pack() + bytes(data)) is True  # held: nothing to compare with yet
    with pytest.raises(TransferError, match="a held chunk changes bytes 3000-4096"):
        a.chunk(chunks_of(image)[0])


def test_without_read_a_repeated_chunk_is_not_compared(image: bytes) -> None:
    a = assembly(MemoryStorage())
    chunk = chunks_of(image)[0]
    a.chunk(chunk)
    assert a.chunk(chunk[:-1] + bytes([chunk[-1] ^ 1])) is False


@pytest.mark.parametrize(
    ("options", "carried", "error", "text"),
    [
        ({"version": V}, FirmwareVersion(1, 1, 0), InvalidVersionError, "the job says 1.2.0"),
        ({"version": V}, FirmwareVersion(1, 2, 1), InvalidVersionError, "the job says 1.2.0"),
        (
            {"version": None, "running": V},
            V,
            InvalidVersionError,
            "not newer than the running 1.2.0",
        ),
        (
            {"version": V, "running": FirmwareVersion(1, 2, 0, 7)},
            V,
            InvalidVersionError,
            "not newer",
        ),
    ],
    ids=["older-than-job", "newer-than-job", "not-newer", "build-ignored"],
)
def test_a_chunk_of_the_wrong_version_is_refused(
    image: bytes,
    options: dict[str, object],
    carried: FirmwareVersion,
    error: type[Exception],
    text: str,
) -> None:
    storage = MemoryStorage()
    a = assembly(storage, **options)
    with pytest.raises(error, match=text):
        a.chunk(chunks_of(image, carried)[0])
    assert storage.opened == 0  # refused before anything was erased


def test_a_job_version_with_a_build_number_matches_the_header() -> None:
    a = assembly(MemoryStorage(), version=FirmwareVersion(1, 2, 0, 5))
    assert a.chunk(chunks_of(b"x" * 10)[0]) is True
    assert a.done


def test_without_a_job_version_the_first_chunk_sets_it(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, version=None)
    chunks = chunks_of(image)
    a.chunk(chunks[0])
    assert a.version == V
    assert storage.download is not None
    assert storage.download.version == "1.2.0"
    with pytest.raises(ChunkHeaderError, match=r"version 1\.3\.0, earlier chunks 1\.2\.0"):
        a.chunk(chunks_of(image, FirmwareVersion(1, 3))[1])


def test_a_changed_total_size_is_refused(image: bytes) -> None:
    a = assembly(MemoryStorage())
    a.chunk(chunks_of(image)[0])
    with pytest.raises(ChunkHeaderError, match="total size 24677, earlier chunks said 20580"):
        a.chunk(chunks_of(image + os.urandom(4097))[1])


def test_a_malformed_chunk_is_refused(image: bytes) -> None:
    a = assembly(MemoryStorage())
    with pytest.raises(ChunkHeaderError, match="magic"):
        a.chunk(b"NOTImage" + chunks_of(image)[0][8:])
    with pytest.raises(ChunkHeaderError, match="shorter than the 32-byte header"):
        a.chunk(b"OTAImage")


def test_what_the_storage_refuses_is_raised(image: bytes) -> None:
    a = assembly(MemoryStorage(limit=100))
    with pytest.raises(ImageTooLargeError):
        a.chunk(chunks_of(image)[0])


def test_held_chunks_are_bounded_in_number(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, max_early=2)
    chunks = chunks_of(image)
    assert [a.chunk(chunks[i]) for i in (5, 4, 3, 2, 1)] == [True, True, False, False, False]
    assert a.chunk(chunks[0]) is True
    assert a.offset == CHUNK  # 1 was dropped: 4 and 5 wait
    assert a.missing() == [(CHUNK, 3 * CHUNK)]
    for i in (1, 2, 3):
        a.chunk(chunks[i])
    assert a.done
    assert bytes(storage.data) == image


def test_held_chunks_are_bounded_in_bytes_tiny_ones_counting_more(image: bytes) -> None:
    a = assembly(MemoryStorage(), max_early_bytes=3 * MIN_HELD_COST)
    tiny = [next(wire.range_chunks(image, V, 1000 + 10 * i, 10)) for i in range(4)]
    assert [a.chunk(payload) for payload in tiny] == [True, True, True, False]
    big = assembly(MemoryStorage(), max_early_bytes=CHUNK)
    chunks = chunks_of(image)
    assert [big.chunk(chunks[i]) for i in (1, 2)] == [True, False]


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        assembly(MemoryStorage(), max_early=0)


def journal(storage: MemoryStorage, image: bytes, durable: int, **fields: str) -> None:
    download = Download(
        source=fields.get("source", SOURCE),
        size=len(image),
        version=fields.get("version", "1.2.0"),
    )
    storage.download = download
    storage.data = bytearray(image[:durable])
    storage.record = JournalRecord(download, durable)


def test_resume_from_the_journal_record(image: bytes) -> None:
    storage = MemoryStorage()
    journal(storage, image, 2 * CHUNK + 10)
    a = assembly(storage)
    assert (a.resumed_from, a.offset) == (2 * CHUNK + 10, 2 * CHUNK + 10)
    for payload in wire.range_chunks(image, V, a.resumed_from, -1):
        a.chunk(payload)
    assert a.done
    assert a.started == 2 * CHUNK + 10
    assert a.requests() == []
    assert storage.writes[0] == (2 * CHUNK + 10, CHUNK - 10)
    assert bytes(storage.data) == image


@pytest.mark.parametrize(
    ("fields", "options"),
    [
        ({"source": "mqtt://elsewhere:1883/X"}, {}),
        ({"version": "1.1.0"}, {}),
        ({}, {"resume": False}),
        ({}, {"same": lambda download: False}),
    ],
    ids=["other-source", "other-version", "no-resume", "not-same"],
)
def test_another_download_in_the_journal_starts_from_zero(
    image: bytes, fields: dict[str, str], options: dict[str, object]
) -> None:
    storage = MemoryStorage()
    journal(storage, image, 2 * CHUNK, **fields)
    assert assembly(storage, **options).resumed_from == 0


def test_another_sha256_in_the_journal_starts_from_zero(image: bytes) -> None:
    storage = MemoryStorage()
    journal(storage, image, 2 * CHUNK)
    assert storage.record is not None
    storage.record = JournalRecord(
        Download(SOURCE, len(image), "1.2.0", sha256="AB" * 32), 2 * CHUNK
    )
    assert assembly(storage, sha256="ab" * 32).resumed_from == 2 * CHUNK
    assert assembly(storage, sha256="cd" * 32).resumed_from == 0


def test_same_decides_what_continues(image: bytes) -> None:
    storage = MemoryStorage()
    journal(storage, image, CHUNK, source="key-1")
    seen: list[Download] = []

    def same(download: Download) -> bool:
        seen.append(download)
        return download.source == "key-1"

    a = assembly(storage, same=same)
    assert a.resumed_from == CHUNK
    assert seen == [storage.record.download]  # type: ignore[union-attr]


def test_without_a_job_version_any_version_in_the_journal_continues(image: bytes) -> None:
    storage = MemoryStorage()
    journal(storage, image, CHUNK, version="1.2.0")
    assert assembly(storage, version=None).resumed_from == CHUNK


def test_a_complete_but_not_pending_download_asks_for_its_last_chunk(image: bytes) -> None:
    storage = MemoryStorage()
    journal(storage, image, len(image))
    a = assembly(storage)
    assert a.resumed_from == 5 * CHUNK
    assert a.chunk(chunks_of(image)[5]) is False  # everything is stored
    assert a.done
    assert storage.writes == []


def test_a_storage_holding_less_than_the_journal_asks_for_the_head(image: bytes) -> None:
    storage = MemoryStorage()
    journal(storage, image, 3 * CHUNK)
    a = assembly(storage)
    assert a.resumed_from == 3 * CHUNK
    other = Download(source=SOURCE, size=len(image), version="1.2.0", sha256="ab" * 32)
    storage.record = JournalRecord(other, 3 * CHUNK)  # erased on open: another image
    a.sha256 = "cd" * 32
    rest = list(wire.range_chunks(image, V, a.resumed_from, -1))
    assert a.chunk(rest[0]) is True  # held: the storage starts from 0
    assert a.requests() == [(0, 3 * CHUNK)]
    assert a.requests() == []  # once
    for payload in [*wire.range_chunks(image, V, 0, 3 * CHUNK), *rest[1:]]:
        a.chunk(payload)
    assert a.done
    assert bytes(storage.data) == image


def test_tries_used_up_is_a_transfer_error_naming_what_is_missing(image: bytes) -> None:
    storage = MemoryStorage()
    a = assembly(storage, tries=2)
    chunks = chunks_of(image)
    for i in (0, 1, 2, 4):
        a.chunk(chunks[i])
    assert a.stalled() == 3 * CHUNK
    assert a.stalled() == 3 * CHUNK
    with pytest.raises(TransferError, match="bytes 12288-16383, bytes 20480-20579 of 20580") as e:
        a.stalled()
    assert e.value.code == "GET_DATA"
    assert storage.record is not None
    assert storage.record.durable == 3 * CHUNK


def test_tries_before_any_chunk(image: bytes) -> None:
    a = assembly(MemoryStorage(), tries=0)
    with pytest.raises(TransferError, match="the whole image"):
        a.stalled()


def test_new_bytes_end_a_run_of_tries_and_count_as_recovered(image: bytes) -> None:
    a = assembly(MemoryStorage(), tries=2)
    chunks = chunks_of(image)
    a.chunk(chunks[0])
    a.stalled()
    a.stalled()
    assert a.chunk(chunks[0]) is False  # a duplicate is no progress
    assert a.recovered == 0
    assert a.chunk(chunks[2]) is True  # held bytes are new bytes
    assert a.recovered == 2
    a.stalled()
    a.stalled()  # a new run: two more tries allowed
    a.chunk(chunks[1])
    assert a.recovered == 4
    for payload in chunks:
        a.chunk(payload)
    assert a.done
