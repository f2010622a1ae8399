"""The MQTT OTA protocol (protocols.md §3): topics, message names and the 32-byte chunk header."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from otakit.errors import ChunkHeaderError, OtakitError
from otakit.protocol.mqtt import (
    CHUNK_SIZE,
    HEADER_SIZE,
    KEEPALIVE_S,
    MAGIC,
    MAX_CHUNK_SIZE,
    MTLS_PORT,
    PORT,
    QOS,
    REQUESTS,
    RESULTS,
    TLS_PORT,
    WILL_TOPIC,
    ChunkHeader,
    Topics,
    board_of,
    chunk,
    notify_filter,
    parse_chunk,
    payload_count,
    range_chunks,
)
from otakit.protocol.version import FirmwareVersion

BOARD = "CY8CPROTO_062_4343W"
V = FirmwareVersion(1, 2, 3)
KIB = 1024
MIB = 1024 * KIB


def raw_header(
    *,
    magic: bytes = b"OTAImage",
    to_data: int = 32,
    image_type: int = 0,
    version: tuple[int, int, int] = (1, 2, 3),
    total: int = 10000,
    offset: int = 4096,
    size: int = 4096,
    count: int = 3,
    index: int = 1,
) -> bytes:
    """A header built field by field with the layout of protocols.md §3, not with the module."""
    return struct.pack(
        "<8s5H2I3H", magic, to_data, image_type, *version, total, offset, size, count, index
    )


def sample(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes where every 4 KiB block differs from the others."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(251))
    data = (block * (size // len(block) + 1))[:size]
    return bytes(b ^ ((i >> 12) & 0xFF) for i, b in enumerate(data))


def assert_one_line(exc: OtakitError) -> None:
    assert exc.code == "NOT_A_HEADER"
    assert exc.agent_error == "NOT_A_HEADER"
    assert str(exc)
    assert "\n" not in str(exc)


# --- constants ---------------------------------------------------------------------------------


def test_wire_constants_are_the_originals() -> None:
    assert MAGIC == b"OTAImage"
    assert len(MAGIC) == 8
    assert HEADER_SIZE == 32 == struct.calcsize("<8s5H2I3H")
    assert CHUNK_SIZE == 4096
    assert MAX_CHUNK_SIZE == 0xFFFF
    assert (QOS, KEEPALIVE_S) == (1, 60)
    assert (PORT, TLS_PORT, MTLS_PORT) == (1883, 8883, 8884)
    assert WILL_TOPIC == "cy_ota_device/will"
    assert REQUESTS == (
        "Update Availability",
        "Request Update",
        "Send Direct Update",
        "Request Data Chunk",
    )
    assert RESULTS == ("Success", "Failure")


# --- header layout -----------------------------------------------------------------------------


def test_pack_matches_the_struct_layout_byte_for_byte() -> None:
    header = ChunkHeader(
        version=(1, 2, 3), total_size=10000, offset=4096, data_size=4096, total_payloads=3, index=1
    )
    assert header.pack() == raw_header()


def test_header_fields_sit_at_their_documented_offsets() -> None:
    header = ChunkHeader(
        version=(0x0102, 0x0304, 0x0506),
        total_size=0x0A0B0C0D,
        offset=0x00020304,
        data_size=0x1112,
        total_payloads=0x2122,
        index=0x2021,
    )
    b = header.pack()
    assert b[0:8] == b"OTAImage"
    assert b[8:10] == b"\x20\x00"  # offset_to_data 32
    assert b[10:12] == b"\x00\x00"  # image type 0
    assert b[12:18] == b"\x02\x01\x04\x03\x06\x05"  # major, minor, build, little-endian
    assert b[18:22] == b"\x0d\x0c\x0b\x0a"  # total size
    assert b[22:26] == b"\x04\x03\x02\x00"  # offset
    assert b[26:28] == b"\x12\x11"  # data size
    assert b[28:30] == b"\x22\x21"  # total payloads
    assert b[30:32] == b"\x21\x20"  # index


def test_parse_reads_a_header_built_by_hand() -> None:
    data = sample(4096)
    header, body = parse_chunk(raw_header() + data)
    assert header == ChunkHeader(
        version=(1, 2, 3), total_size=10000, offset=4096, data_size=4096, total_payloads=3, index=1
    )
    assert body == data
    assert header.end == 8192
    assert header.firmware_version == FirmwareVersion(1, 2, 3)
    assert str(header.firmware_version) == "1.2.3"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_accepts_any_bytes_like(kind: type) -> None:
    payload = raw_header(total=5, offset=0, size=5, count=1, index=0) + b"hello"
    header, body = parse_chunk(kind(payload))
    assert body == b"hello"
    assert isinstance(body, bytes)
    assert header.total_size == 5


def test_round_trip_of_extreme_fields() -> None:
    for header in (
        ChunkHeader((0, 0, 0), total_size=1, offset=0, data_size=1, total_payloads=1, index=0),
        ChunkHeader(
            (0xFFFF, 0xFFFF, 0xFFFF),
            total_size=0xFFFFFFFF,
            offset=0xFFFFFFFF - 0xFFFF,
            data_size=0xFFFF,
            total_payloads=0xFFFF,
            index=0xFFFE,
        ),
    ):
        data = b"\xa5" * header.data_size
        assert parse_chunk(header.pack() + data) == (header, data)


# --- validation --------------------------------------------------------------------------------

BAD_PAYLOADS = {
    "empty": b"",
    "short": raw_header()[:31],
    "header only, data missing": raw_header(),
    "bad magic": raw_header(magic=b"OTAImagE") + sample(4096),
    "NUL-padded magic": raw_header(magic=b"OTAImag\x00") + sample(4096),
    "offset_to_data 0": raw_header(to_data=0) + sample(4096),
    "offset_to_data 36": raw_header(to_data=36) + b"\0\0\0\0" + sample(4096),
    "image type 1": raw_header(image_type=1) + sample(4096),
    "zero data size": raw_header(size=0),
    "zero total size": raw_header(total=0, offset=0, size=1, count=1, index=0) + b"x",
    "offset + size beyond total": raw_header(total=8000) + sample(4096),
    "offset beyond total": raw_header(total=4000, offset=4096, size=1) + b"x",
    "size larger than total": raw_header(total=100, offset=0, size=101, count=1, index=0)
    + sample(101),
    "index == count": raw_header(index=3) + sample(4096),
    "index > count": raw_header(index=7) + sample(4096),
    "zero payloads": raw_header(count=0, index=0) + sample(4096),
    "data shorter than header says": raw_header() + sample(4095),
    "data longer than header says": raw_header() + sample(4097),
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_every_malformed_chunk_is_not_a_header(payload: bytes) -> None:
    with pytest.raises(ChunkHeaderError) as info:
        parse_chunk(payload)
    assert_one_line(info.value)


def test_errors_name_the_offending_value() -> None:
    cases = [
        (raw_header()[:10], "10 bytes", 10),
        (raw_header(magic=b"XXXXXXXX"), "magic", b"XXXXXXXX"),
        (raw_header(to_data=36), "offset_to_data is 36", 36),
        (raw_header(image_type=2), "type 2", 2),
        (raw_header(total=8000), "4096-8192", 4096),
        (raw_header(index=3), "index 3 of 3", 3),
        (raw_header() + b"abc", "carries 3", 3),
    ]
    for payload, words, value in cases:
        with pytest.raises(ChunkHeaderError) as info:
            parse_chunk(payload)
        assert words in str(info.value)
        assert info.value.value == value


@pytest.mark.parametrize(
    "change",
    [
        {"offset_to_data": 0},
        {"image_type": 1},
        {"version": (1, 2, 0x10000)},
        {"version": (-1, 0, 0)},
        {"total_size": 0},
        {"total_size": 0x1_0000_0000},
        {"data_size": 0},
        {"data_size": MAX_CHUNK_SIZE + 1, "total_size": 2 * MAX_CHUNK_SIZE},
        {"offset": -1},
        {"offset": 9000},
        {"index": 3},
        {"index": -1},
        {"total_payloads": 0x10000, "index": 0},
    ],
)
def test_pack_refuses_what_parse_would_refuse(change: dict[str, object]) -> None:
    good = ChunkHeader(
        version=(1, 2, 3), total_size=10000, offset=4096, data_size=4096, total_payloads=3, index=1
    )
    bad = dataclasses.replace(good, **change)  # type: ignore[arg-type]
    with pytest.raises(ChunkHeaderError) as info:
        bad.pack()
    assert_one_line(info.value)


@given(st.binary(max_size=200))
def test_fuzz_random_bytes_raise_only_chunk_header_error(data: bytes) -> None:
    try:
        header, body = parse_chunk(data)
    except ChunkHeaderError as exc:
        assert_one_line(exc)
        event("refused")
    else:
        assert len(body) == header.data_size
        event("accepted")


@given(
    st.tuples(
        st.integers(0, 0xFFFF),  # offset_to_data
        st.integers(0, 3),  # image type
        st.integers(0, 20),  # total size
        st.integers(0, 20),  # offset
        st.integers(0, 20),  # data size
        st.integers(0, 4),  # count
        st.integers(0, 4),  # index
    ),
    st.binary(max_size=24),
)
def test_fuzz_near_valid_headers_raise_only_chunk_header_error(
    fields: tuple[int, int, int, int, int, int, int], data: bytes
) -> None:
    to_data, image_type, total, offset, size, count, index = fields
    payload = (
        raw_header(
            to_data=to_data,
            image_type=image_type,
            total=total,
            offset=offset,
            size=size,
            count=count,
            index=index,
        )
        + data
    )
    try:
        header, body = parse_chunk(payload)
    except ChunkHeaderError as exc:
        assert_one_line(exc)
        event("refused")
    else:
        event("accepted")
        assert header.pack() + body == payload
        assert 0 < header.data_size == len(body)
        assert header.end <= header.total_size
        assert header.index < header.total_payloads


# --- chunking ----------------------------------------------------------------------------------


def reassemble(chunks: list[bytes]) -> tuple[bytes, list[ChunkHeader]]:
    headers = []
    image = bytearray()
    for payload in chunks:
        header, body = parse_chunk(payload)
        assert header.offset == len(image), "chunks must be contiguous and in order"
        image += body
        headers.append(header)
    return bytes(image), headers


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 4096, MIB])
def test_range_chunks_of_the_whole_image_cover_it_exactly(size: int) -> None:
    image = sample(size)
    chunks = list(range_chunks(image, V, 0, -1))
    count = payload_count(size)
    assert len(chunks) == count == -(-size // 4096)
    rebuilt, headers = reassemble(chunks)
    assert rebuilt == image
    for i, header in enumerate(headers):
        assert header.index == i
        assert header.total_payloads == count
        assert header.total_size == size
        assert header.offset == i * 4096
        assert header.data_size == (4096 if i < count - 1 else size - (count - 1) * 4096)
        assert header.version == (1, 2, 3)
    # chunk() gives the same bytes, one index at a time
    assert [chunk(image, V, i) for i in range(count)] == chunks


def test_whole_image_with_explicit_size_equals_size_minus_one() -> None:
    image = sample(10000)
    assert list(range_chunks(image, V, 0, 10000)) == list(range_chunks(image, V, 0, -1))
    assert list(range_chunks(image, V, 0, 50000)) == list(range_chunks(image, V, 0, -1))


def test_range_on_chunk_boundaries_keeps_the_images_indexes() -> None:
    image = sample(5 * 4096 + 100)
    chunks = list(range_chunks(image, V, 2 * 4096, 2 * 4096))
    assert [parse_chunk(c)[0].index for c in chunks] == [2, 3]
    assert chunks == [chunk(image, V, 2), chunk(image, V, 3)]
    tail = list(range_chunks(image, V, 4 * 4096, -1))
    assert tail == [chunk(image, V, 4), chunk(image, V, 5)]
    assert parse_chunk(tail[-1])[0].data_size == 100


@pytest.mark.parametrize(
    ("offset", "size"),
    [(1, 10), (100, 4096), (4095, 2), (5000, -1), (4096 * 3 - 1, 4096 * 2), (12345, 1)],
)
def test_unaligned_ranges_cover_exactly_the_asked_bytes(offset: int, size: int) -> None:
    image = sample(4 * 4096 + 7)
    end = len(image) if size < 0 else min(len(image), offset + size)
    chunks = list(range_chunks(image, V, offset, size))
    position = offset
    for payload in chunks:
        header, body = parse_chunk(payload)
        assert header.offset == position
        assert body == image[position : header.end]
        assert header.index == min(position // 4096, payload_count(len(image)) - 1)
        # a chunk never crosses one of the image's own chunk boundaries
        assert header.offset // 4096 == (header.end - 1) // 4096
        position = header.end
    assert position == end


def test_empty_and_out_of_range_requests_give_no_chunks() -> None:
    image = sample(5000)
    assert list(range_chunks(image, V, 0, 0)) == []
    assert list(range_chunks(image, V, 5000, -1)) == []
    assert list(range_chunks(image, V, 9000, 100)) == []


def test_range_at_a_negative_offset_is_refused() -> None:
    with pytest.raises(ChunkHeaderError):
        list(range_chunks(sample(5000), V, -10, 100))


@pytest.mark.parametrize("chunk_size", [1000, 1024, 65535])
def test_other_chunk_sizes(chunk_size: int) -> None:
    image = os.urandom(200_000)
    chunks = list(range_chunks(image, V, 0, -1, chunk_size))
    assert len(chunks) == payload_count(len(image), chunk_size)
    rebuilt, headers = reassemble(chunks)
    assert rebuilt == image
    assert max(h.data_size for h in headers) == chunk_size


def test_chunk_size_beyond_u16_is_refused() -> None:
    with pytest.raises(ChunkHeaderError):
        list(range_chunks(sample(70000), V, 0, -1, 65536))


def test_chunk_index_out_of_range_is_an_index_error() -> None:
    image = sample(5000)
    assert parse_chunk(chunk(image, V, 1))[0].data_size == 5000 - 4096
    for index in (2, 100, -1):
        with pytest.raises(IndexError, match="out of range"):
            chunk(image, V, index)
    with pytest.raises(IndexError, match="out of range"):
        chunk(b"", V, 0)  # an empty image has no chunk at all
    # inside a generator a leaking StopIteration would end the stream early without a word
    with pytest.raises(IndexError):
        list(chunk(image, V, i) for i in range(3))


def test_chunk_carries_build_as_the_third_version_field() -> None:
    header, _ = parse_chunk(chunk(sample(10), FirmwareVersion(2, 0, 7, 99), 0))
    assert header.version == (2, 0, 7)
    assert header.firmware_version == FirmwareVersion(2, 0, 7)


def test_payload_count() -> None:
    assert payload_count(0) == 1
    assert payload_count(1) == 1
    assert payload_count(4096) == 1
    assert payload_count(4097) == 2
    assert payload_count(MIB) == 256
    assert payload_count(10, 3) == 4


# --- topics ------------------------------------------------------------------------------------


def test_topics_without_app_prefix() -> None:
    t = Topics(BOARD)
    assert t.wire_board == BOARD
    assert t.notify == f"OTAUpdate/{BOARD}/publish_notify"
    assert t.direct == f"OTAUpdate/{BOARD}/OTAImage"
    assert t.unique(42) == f"OTAUpdate/{BOARD}/OTAImage/42"
    assert t.unique("abc") == f"OTAUpdate/{BOARD}/OTAImage/abc"


def test_topics_with_app_prefix_and_company() -> None:
    t = Topics(BOARD, company="Acme", app_prefix=True)
    assert t.wire_board == f"APP_{BOARD}"
    assert t.notify == f"Acme/APP_{BOARD}/publish_notify"
    assert t.direct == f"Acme/APP_{BOARD}/OTAImage"
    assert t.unique(7) == f"Acme/APP_{BOARD}/OTAImage/7"


def test_notify_filter() -> None:
    assert notify_filter() == "OTAUpdate/+/publish_notify"
    assert notify_filter("Acme") == "Acme/+/publish_notify"


@pytest.mark.parametrize(
    ("topic", "company", "expected"),
    [
        (f"OTAUpdate/{BOARD}/publish_notify", "OTAUpdate", (BOARD, False)),
        (f"OTAUpdate/APP_{BOARD}/publish_notify", "OTAUpdate", (BOARD, True)),
        (f"OTAUpdate/APP_{BOARD}/OTAImage/17", "OTAUpdate", (BOARD, True)),
        (f"Acme/{BOARD}/OTAImage", "Acme", (BOARD, False)),
        ("OTAUpdate/APP_/publish_notify", "OTAUpdate", ("APP_", False)),
        (f"Acme/{BOARD}/publish_notify", "OTAUpdate", None),
        (f"OTAUpdate/{BOARD}", "OTAUpdate", None),
        ("OTAUpdate//publish_notify", "OTAUpdate", None),
        ("", "OTAUpdate", None),
        (f"otaupdate/{BOARD}/publish_notify", "OTAUpdate", None),
    ],
)
def test_board_of(topic: str, company: str, expected: tuple[str, bool] | None) -> None:
    assert board_of(topic, company) == expected


def test_board_of_round_trips_topics() -> None:
    for prefix in (False, True):
        t = Topics(BOARD, company="Acme", app_prefix=prefix)
        for topic in (t.notify, t.direct, t.unique(3)):
            assert board_of(topic, "Acme") == (BOARD, prefix)
