"""The ranged download core (protocols.md §2) fed answers directly: no server, no socket.

A small in-memory storage keeps its journal as SlotStorage does (the same download continues
from its durable bytes, another one starts over), and a function plays the server: it answers
ranges of an image with 206 and its ETag, a 200 when If-Range names another ETag, and a 416
past the image's end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otakit.device.bootloader import Bootloader, BootloaderConfig
from otakit.device.core.download import (
    RangedDownload,
    RangeRequest,
    content_range,
    header,
)
from otakit.device.flash import Flash
from otakit.device.flashmap import preset
from otakit.device.journal import Download, Journal, JournalRecord
from otakit.device.storage import SlotStorage, Storage
from otakit.errors import ImageTooLargeError, TransferError

CHUNK = 4096
IMAGE = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes: two full ranges and a short one
ETAG = '"E1"'
SOURCE = "https://ota.example/images/app.bin?sig=first"

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class MemoryStorage:
    """A Storage in memory whose journal behaves as SlotStorage's."""

    capacity: int = 64 * 1024
    record: JournalRecord | None = None
    data: bytearray = field(default_factory=bytearray)
    opened: list[Download] = field(default_factory=list)
    writes: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    commits: list[int] = field(default_factory=list)

    def progress(self) -> JournalRecord | None:
        return self.record

    def open(self, download: Download) -> int:
        if download.size > self.capacity:
            raise ImageTooLargeError(f"{download.size} bytes do not fit", value=download.size)
        self.opened.append(download)
        if self.record is not None and self.record.download.same_image(download):
            return self.record.durable
        self.data = bytearray(b"\xff" * download.size)
        self.record = JournalRecord(download, 0)
        return 0

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, len(data)))
        self.data[offset : offset + len(data)] = data

    def commit(self, end: int) -> None:
        assert self.record is not None
        self.commits.append(end)
        self.record = JournalRecord(self.opened[-1], end)

    def verify(self) -> str:
        return "1.0.0"

    def set_pending(self, *, permanent: bool) -> None:
        self.record = None

    def abort(self) -> None:
        self.record, self.data = None, bytearray()


def holding(durable: int, *, image: bytes = IMAGE, source: str = SOURCE) -> MemoryStorage:
    """A storage whose journal says ``durable`` bytes of ``image`` (from ``source``) are in."""
    download = Download(source=source, size=len(image), etag=ETAG)
    storage = MemoryStorage(record=JournalRecord(download, durable))
    storage.data = bytearray(image[:durable] + b"\xff" * (len(image) - durable))
    storage.opened.append(download)
    return storage


@dataclass
class ImageServer:
    """Answers ranges of ``image`` as an otakit server does; ``script`` answers first."""

    image: bytes = IMAGE
    etag: str = ETAG
    script: list[Callable[[RangeRequest], Answer]] = field(default_factory=list)
    asked: list[RangeRequest] = field(default_factory=list)

    def __call__(self, request: RangeRequest) -> Answer:
        self.asked.append(request)
        if self.script:
            return self.script.pop(0)(request)
        return self.serve(request)

    def serve(self, request: RangeRequest) -> Answer:
        """The honest answer to ``request``."""
        size = len(self.image)
        if request.if_range is not None and request.if_range != self.etag:
            return 200, {"etag": self.etag}, self.image
        if request.first >= size:
            return 416, {"content-range": f"bytes */{size}"}, b""
        last = min(request.last, size - 1)
        headers = {"content-range": f"bytes {request.first}-{last}/{size}", "etag": self.etag}
        return 206, headers, self.image[request.first : last + 1]


def drive(download: RangedDownload, server: Callable[[RangeRequest], Answer]) -> Iterator[int]:
    """The driver loop of every transport, without I/O; yields the offset after each range
    stored."""
    while (request := download.next_request()) is not None:
        status, headers, body = server(request)
        want = download.response(status, headers)
        if want and download.body(body[:want]):
            yield download.offset


def answer(
    status: int, headers: dict[str, str] | None = None, body: bytes = b""
) -> Callable[[RangeRequest], Answer]:
    return lambda _request: (status, headers or {}, body)


def new(
    storage: Storage,
    *,
    version: str = "",
    sha256: str | None = None,
    tries: int = 3,
    same: Callable[[Download], bool] | None = None,
) -> RangedDownload:
    return RangedDownload(
        storage,
        source=SOURCE,
        version=version,
        sha256=sha256,
        chunk_size=CHUNK,
        tries=tries,
        same=same,
    )


# --- RangeRequest and Content-Range ------------------------------------------------------------


def test_a_range_request_names_its_bytes_and_if_range_only_when_set() -> None:
    assert RangeRequest(0, 4095, None).headers() == {"range": "bytes=0-4095"}
    assert RangeRequest(8192, 12287, ETAG).headers() == {
        "range": "bytes=8192-12287",
        "if-range": ETAG,
    }
    assert str(RangeRequest(1, 2)) == "bytes 1-2"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-4095/10244", (0, 4095, 10244)),
        ("BYTES\t4096-8191/10244", (4096, 8191, 10244)),
        ("bytes 10-9/100", None),  # first after last
        ("bytes 0-100/100", None),  # last at the total
        ("bytes 0-4095/*", None),
        ("bytes */10244", None),
        ("bytes 0-4095/" + "9" * 16, None),
        ("", None),
    ],
)
def test_content_range_is_read_only_when_possible(
    value: str, expected: tuple[int, int, int] | None
) -> None:
    assert content_range({"content-range": value}) == expected


def test_header_names_match_whatever_their_case() -> None:
    headers = {"Content-Range": "bytes 0-9/10", "ETag": ETAG}
    assert header(headers, "content-range") == "bytes 0-9/10"
    assert header(headers, "etag") == ETAG
    assert header(headers, "if-range") == ""
    assert content_range(headers) == (0, 9, 10)


# --- fresh download and resume -----------------------------------------------------------------


def test_a_fresh_download_asks_range_after_range_and_commits_each() -> None:
    storage, server = MemoryStorage(), ImageServer()
    download = new(storage, version="1.2.3", sha256="AB")
    assert (download.resumed_from, download.offset, download.total) == (0, 0, None)
    assert list(drive(download, server)) == [4096, 8192, len(IMAGE)]
    assert download.done
    assert download.next_request() is None
    assert [(r.first, r.last, r.if_range) for r in server.asked] == [
        (0, 4095, None),
        (4096, 8191, None),
        (8192, len(IMAGE) - 1, None),  # the last range clamped to the total
    ]
    assert bytes(storage.data) == IMAGE
    assert storage.commits == [4096, 8192, len(IMAGE)]
    assert storage.opened == [
        Download(source=SOURCE, size=len(IMAGE), version="1.2.3", etag=ETAG, sha256="AB")
    ]
    assert (download.total, download.recovered) == (len(IMAGE), 0)


def test_a_resume_asks_from_the_durable_byte_with_if_range_on_its_first_range_only() -> None:
    storage, server = holding(4096), ImageServer()
    download = new(storage)
    assert (download.resumed_from, download.offset) == (4096, 4096)
    list(drive(download, server))
    assert [(r.first, r.if_range) for r in server.asked] == [(4096, ETAG), (8192, None)]
    assert storage.writes == [(4096, 4096), (8192, len(IMAGE) - 8192)]  # byte 0-4095 kept
    assert bytes(storage.data) == IMAGE


def test_a_signed_url_with_another_query_resumes_by_default() -> None:
    storage = holding(4096, source="https://ota.example/images/app.bin?sig=old")
    assert new(storage).resumed_from == 4096


def test_another_sha256_at_the_same_path_is_not_resumed() -> None:
    download = Download(source=SOURCE, size=len(IMAGE), etag=ETAG, sha256="AA" * 32)
    storage = MemoryStorage(record=JournalRecord(download, 4096))
    assert new(storage, sha256="bb" * 32).resumed_from == 0
    assert new(storage, sha256="aa" * 32).resumed_from == 4096
    assert new(storage).resumed_from == 4096  # the job names no SHA-256


def test_same_decides_which_journal_download_is_continued() -> None:
    seen: list[Download] = []

    def never(known: Download) -> bool:
        seen.append(known)
        return False

    storage = holding(4096)
    download = new(storage, same=never)
    assert download.resumed_from == 0
    assert seen == [storage.opened[0]]
    assert new(holding(4096, source="/other.bin")).resumed_from == 0  # another path


def test_a_download_whose_bytes_are_all_stored_fetches_its_last_range_again() -> None:
    storage, server = holding(len(IMAGE)), ImageServer()
    download = new(storage)
    assert download.resumed_from == len(IMAGE) - CHUNK
    list(drive(download, server))
    # If-Range checks the image did not change; the storage says all its bytes are in
    assert [(r.first, r.if_range) for r in server.asked] == [(len(IMAGE) - CHUNK, ETAG)]
    assert storage.writes == []
    assert download.offset == len(IMAGE)
    assert download.done
    assert bytes(storage.data) == IMAGE


def test_a_changed_image_answers_200_to_if_range_and_the_download_starts_over() -> None:
    changed = bytes(reversed(IMAGE))
    storage, server = holding(8192), ImageServer(image=changed, etag='"E2"')
    download = new(storage)
    list(drive(download, server))
    assert [(r.first, r.if_range) for r in server.asked] == [
        (8192, ETAG),  # answered 200: not read
        (0, None),
        (4096, None),
        (8192, None),
    ]
    assert bytes(storage.data) == changed
    assert storage.opened[-1].etag == '"E2"'
    assert download.resumed_from == 8192
    assert download.recovered == 0


def test_416_at_a_resumed_offset_starts_over() -> None:
    shorter = IMAGE[:5000]
    journal = Download(source=SOURCE, size=20000, etag=ETAG)
    storage = MemoryStorage(record=JournalRecord(journal, 12288))
    server = ImageServer(image=shorter)  # same ETag, so If-Range would pass
    download = new(storage)
    list(drive(download, server))
    assert [(r.first, r.if_range) for r in server.asked] == [(12288, ETAG), (0, None), (4096, None)]
    assert bytes(storage.data) == shorter
    assert download.total == 5000


def test_a_storage_that_holds_another_count_than_the_journal_continues_from_there() -> None:
    # same path, so a resume is asked; but the storage's own journal knows another size
    journal = Download(source=SOURCE, size=len(IMAGE) + 1, etag=ETAG)
    storage = MemoryStorage(record=JournalRecord(journal, 4096))
    server = ImageServer()
    download = new(storage)
    list(drive(download, server))
    assert [r.first for r in server.asked] == [4096, 0, 4096, 8192]
    assert storage.writes[0] == (0, 4096)  # the first answer was not written at 4096
    assert bytes(storage.data) == IMAGE


def test_an_image_larger_than_the_storage_fails_before_anything_is_written() -> None:
    storage = MemoryStorage(capacity=len(IMAGE) - 1)
    with pytest.raises(ImageTooLargeError):
        list(drive(new(storage), ImageServer()))
    assert storage.writes == []
    assert storage.record is None


def test_an_interrupted_download_into_a_slot_resumes_from_its_journal(tmp_path: Path) -> None:
    flashmap = preset("sim-small")
    flash = Flash(flashmap.flash_size, flashmap.sector_size, write_align=flashmap.write_align)
    boot = Bootloader(flash, flashmap, BootloaderConfig())
    journal = Journal(tmp_path / "journal.json")

    def slot() -> SlotStorage:  # a fresh storage object, as after a reboot
        return SlotStorage(boot, journal, (), current_version="0.0.1")

    server = ImageServer()
    server.script = [server.serve, server.serve, answer(503)]
    with pytest.raises(TransferError) as caught:
        list(drive(new(slot(), tries=1), server))
    assert caught.value.status == 503
    record = journal.load()
    assert record is not None
    assert (record.durable, record.download.etag) == (8192, ETAG)

    server = ImageServer()
    download = new(slot())
    assert download.resumed_from == 8192
    list(drive(download, server))
    assert [(r.first, r.if_range) for r in server.asked] == [(8192, ETAG)]
    assert boot.update_area(0).read_at(0, len(IMAGE)) == IMAGE


# --- answers that are not the bytes asked for --------------------------------------------------


@pytest.mark.parametrize(
    ("content_range_value", "fragment"),
    [
        (None, "no usable Content-Range"),
        ("bytes 0-4095/*", "no usable Content-Range"),
        ("bytes 1-4096/10244", "not the bytes asked for"),  # another start
        ("bytes 0-4096/10244", "not the bytes asked for"),  # past the end asked
    ],
)
def test_a_206_that_is_not_the_bytes_asked_for_fails_at_once(
    content_range_value: str | None, fragment: str
) -> None:
    headers = {} if content_range_value is None else {"content-range": content_range_value}
    storage = MemoryStorage()
    server = ImageServer(script=[answer(206, headers, IMAGE[:4096])])
    with pytest.raises(TransferError, match=fragment) as caught:
        list(drive(new(storage), server))
    assert len(server.asked) == 1
    assert storage.writes == []
    assert caught.value.code == "GET_DATA"


def test_a_later_range_must_name_the_first_answers_total() -> None:
    server = ImageServer()
    server.script = [server.serve, answer(206, {"content-range": "bytes 4096-8191/99999"}, IMAGE)]
    with pytest.raises(TransferError, match="first answer's total was 10244"):
        list(drive(new(MemoryStorage()), server))


def test_a_shorter_206_than_asked_is_taken_and_the_next_range_follows_it() -> None:
    short = answer(206, {"content-range": f"bytes 0-999/{len(IMAGE)}"}, IMAGE[:1000])
    storage, server = MemoryStorage(), ImageServer(script=[short])
    list(drive(new(storage), server))
    assert [r.first for r in server.asked] == [0, 1000, 5096, 9192]
    assert bytes(storage.data) == IMAGE


def test_a_body_longer_than_its_content_range_is_refused() -> None:
    download = new(MemoryStorage())
    request = download.next_request()
    assert request is not None
    assert download.response(206, {"content-range": f"bytes 0-9/{len(IMAGE)}"}) == 10
    with pytest.raises(TransferError, match="more than the 10 bytes"):
        download.body(IMAGE[:11])


def test_200_to_a_fresh_download_means_no_range_support() -> None:
    server = ImageServer(script=[answer(200, {}, IMAGE)])
    with pytest.raises(TransferError, match="does not answer ranged requests"):
        list(drive(new(MemoryStorage()), server))


def test_200_after_the_first_range_is_a_protocol_error() -> None:
    server = ImageServer()
    server.script = [server.serve, answer(200, {}, IMAGE)]
    with pytest.raises(TransferError, match="answered 200") as caught:
        list(drive(new(MemoryStorage()), server))
    assert caught.value.status == 200


# --- failed tries ------------------------------------------------------------------------------


def test_a_short_body_is_a_failed_try_and_the_same_range_is_asked_again() -> None:
    def cut(request: RangeRequest) -> Answer:
        status, headers, body = ImageServer()(request)
        return status, headers, body[:100]

    storage, server = MemoryStorage(), ImageServer()
    server.script = [server.serve, cut]
    download = new(storage)
    list(drive(download, server))
    assert [r.first for r in server.asked] == [0, 4096, 4096, 8192]
    assert download.recovered == 1
    assert bytes(storage.data) == IMAGE


def test_failures_recovered_from_are_counted() -> None:
    storage, server = MemoryStorage(), ImageServer()
    download = new(storage)
    request = download.next_request()
    assert request is not None
    download.failed("ConnectTimeout: timed out")
    assert download.next_request() == request  # the same range again
    assert download.response(503, {}) == 0
    assert download.next_request() == request
    list(drive(download, server))
    assert download.recovered == 2
    assert download.done


def test_failures_before_a_restart_count_as_recovered_and_the_restart_has_fresh_tries() -> None:
    changed = bytes(reversed(IMAGE))
    storage, server = holding(8192), ImageServer(image=changed, etag='"E2"')
    server.script = [answer(503), answer(503), server.serve, answer(503), answer(503)]
    download = new(storage, tries=3)
    list(drive(download, server))
    assert [r.first for r in server.asked][:6] == [8192, 8192, 8192, 0, 0, 0]
    assert download.recovered == 4
    assert bytes(storage.data) == changed


def test_each_range_has_its_own_tries() -> None:
    storage, server = MemoryStorage(), ImageServer()
    server.script = [answer(500), server.serve, answer(500), answer(500), server.serve, answer(500)]
    download = new(storage, tries=3)
    list(drive(download, server))
    assert download.recovered == 4
    assert bytes(storage.data) == IMAGE


def test_used_up_tries_fail_with_the_servers_last_status() -> None:
    server = ImageServer(script=[answer(503)] * 3)
    with pytest.raises(TransferError, match=r"bytes 0-4095 failed: the server answered 503") as e:
        list(drive(new(MemoryStorage(), tries=3), server))
    assert e.value.status == 503
    assert len(server.asked) == 3


def test_used_up_tries_after_a_lost_connection_have_no_status() -> None:
    download = new(MemoryStorage(), tries=2)
    assert download.next_request() is not None
    assert download.response(502, {}) == 0
    assert download.next_request() is not None
    with pytest.raises(TransferError, match="ReadTimeout") as caught:
        download.failed("ReadTimeout: no answer")
    assert caught.value.status is None


def test_a_short_body_on_the_last_try_fails_the_download() -> None:
    def cut(request: RangeRequest) -> Answer:
        status, headers, body = ImageServer()(request)
        return status, headers, body[:10]

    server = ImageServer(script=[cut])
    with pytest.raises(TransferError, match="ended after 10 of its 4096 bytes"):
        list(drive(new(MemoryStorage(), tries=1), server))


@pytest.mark.parametrize("status", [401, 403, 404, 410, 416])
def test_answers_that_asking_again_would_not_change_fail_at_once(status: int) -> None:
    server = ImageServer(script=[answer(status)])
    with pytest.raises(TransferError) as caught:
        list(drive(new(MemoryStorage(), tries=5), server))
    assert caught.value.status == status
    assert len(server.asked) == 1


def test_errors_name_the_url_path_never_its_query() -> None:
    server = ImageServer(script=[answer(404)])
    with pytest.raises(TransferError) as caught:
        list(drive(new(MemoryStorage()), server))
    assert caught.value.value == "/images/app.bin"
    assert "sig=" not in caught.value.message


def test_the_driver_must_ask_before_it_answers() -> None:
    download = new(MemoryStorage())
    with pytest.raises(RuntimeError):
        download.response(206, {})
    download.next_request()
    with pytest.raises(RuntimeError):
        download.body(b"x")
