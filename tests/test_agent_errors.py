"""Acceptance tests of the OTA agent's error handling against a legacy-style HTTP server.

The server is a small stub on loopback that behaves like the original OTA HTTP server
(protocols.md §1-§2): ``GET /ota_update.json`` answers a job document, the image is served with
``Range`` support (206, ``Content-Range: bytes a-b/TOTAL``, ``ETag``), and every ``POST`` (the
device's result) is recorded. A simulated PSoC 6 device running 1.0.0 is then asked to update
(:func:`otakit.device.agent.update_once` over :class:`HttpTransport`), and each bad job or bad
image must:

(a) end as FAILED with the original middleware's error name (protocols.md §8);
(b) be reported to the server as ``{"Message": "Failure", "File", "Error", "Reason"}`` when the
    job was parsed far enough to know the file (a document that cannot be parsed at all gives no
    job, so nothing can be posted: the agent reports it through its callback only);
(c) leave the device clean: the secondary slot erased, no resume journal, and the next boot
    still runs 1.0.0 with no upgrade action.

Also covered: a good job (the control that proves the harness), a Message other than "Update
Available" (no update, not a failure), unreachable job and image, a server without ranges, jobs
that send the device to another server or port, and an attempt that ends after the last
durable byte (the next attempt must finish it).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from otakit.device.agent import Outcome, Result, update_once
from otakit.device.bootloader import Action
from otakit.device.events import Answer, Event, Reason, State
from otakit.device.journal import Journal
from otakit.device.storage import SlotStorage
from otakit.device.transports.http import USER_AGENT, HttpSettings, HttpTransport
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.jobdoc import FIELD_LIMITS, MAX_DOCUMENT_BYTES, MAX_VALUE_BYTES
from otakit.sim.agent import JOURNAL_FILE
from otakit.sim.device import Identity, SimDevice

KEY = SigningKey.generate("ecdsa-p256")  # the key the device trusts
UNTRUSTED_KEY = SigningKey.generate("ecdsa-p256")
BOARD = "CY8CPROTO_062_4343W"
RUNNING = "1.0.0"
FILE = "/firmware/app-1.1.0.bin"
IMAGE_SIZE = 32_000


def image(
    version: str, size: int = IMAGE_SIZE, key: SigningKey | None = KEY, *, seed: str = ""
) -> bytes:
    """A signed MCUboot image (unsigned, hash TLV only, with ``key=None``)."""
    payload = random.Random(f"{version}/{size}/{seed}").randbytes(size)
    return sign_image(payload, key, SignOptions(ImageVersion.parse(version), pad_header=True))


def flipped(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# --- the legacy-style HTTP server stub ---------------------------------------------------------


@dataclass
class Posted:
    path: str
    body: Any  # the parsed JSON body, or the raw bytes when it is not JSON


@dataclass
class Stub:
    """What the stub serves and what it saw; change the fields before running the agent."""

    job: bytes = b""
    job_path: str = "/ota_update.json"
    job_status: int = 200
    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True  # False: a server that ignores Range and answers 200 with everything
    posts: list[Posted] = field(default_factory=list)
    gets: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    user_agents: set[str] = field(default_factory=set)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: Stub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the device's client uses it
    disable_nagle_algorithm = True  # no delayed-ACK stalls between header and body writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        stub = self.server.stub
        path = urlsplit(self.path).path
        requested = self.headers.get("Range")
        with stub.lock:
            stub.gets.append((path, requested))
            stub.user_agents.add(self.headers.get("User-Agent", ""))
        if path == stub.job_path:
            self._send(stub.job_status, stub.job, {"Content-Type": "application/json"})
            return
        data = stub.files.get(path)
        if data is None:
            self._send(404, b"not found", {"Content-Type": "text/plain"})
            return
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        whole = {"Content-Type": "application/octet-stream", "ETag": etag}
        if_range = self.headers.get("If-Range")
        if not stub.ranges or requested is None or (if_range is not None and if_range != etag):
            self._send(200, data, whole)
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested.strip())
        first = int(match[1]) if match else len(data)
        last = min(int(match[2]) if match and match[2] else len(data) - 1, len(data) - 1)
        if match is None or first > last:
            self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return
        self._send(
            206,
            data[first : last + 1],
            {**whole, "Content-Range": f"bytes {first}-{last}/{len(data)}"},
        )

    def do_POST(self) -> None:
        stub = self.server.stub
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        with stub.lock:
            stub.posts.append(Posted(urlsplit(self.path).path, body))
        self._send(200, b'{"Message":"Result Received"}', {"Content-Type": "application/json"})


class StubServer:
    """The listening server, shared by a module's tests; each test gets a fresh :class:`Stub`."""

    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.stub = Stub(url=self.url)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name="legacy-ota-stub", daemon=True
        )
        self.thread.start()

    def fresh(self) -> Stub:
        self.httpd.stub = Stub(url=self.url)
        return self.httpd.stub

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[StubServer, StubServer]]:
    pair = (StubServer(), StubServer())
    yield pair
    for server in pair:
        server.stop()


@pytest.fixture
def stub(servers: tuple[StubServer, StubServer]) -> Stub:
    return servers[0].fresh()


@pytest.fixture
def other_stub(servers: tuple[StubServer, StubServer]) -> Stub:
    """A second server, for jobs that send the device elsewhere."""
    return servers[1].fresh()


# --- job documents -----------------------------------------------------------------------------

MISSING = object()


def job_fields(**changes: object) -> dict[str, object]:
    """A valid HTTP job for this device offering 1.1.0, with ``changes`` (MISSING drops a key)."""
    doc: dict[str, object] = {
        "Message": "Update Available",
        "Manufacturer": "Infineon",
        "ManufacturerId": "IFX",
        "Product": "otakit-sim",
        "SerialNumber": "SIM-0001",
        "Version": "1.1.0",
        "Board": BOARD,
        "Connection": "HTTP",
        "Port": "",
        "Server": "",
        "File": FILE,
    }
    for key, value in changes.items():
        if value is MISSING:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def job(**changes: object) -> bytes:
    return json.dumps(job_fields(**changes), ensure_ascii=False).encode("utf-8")


# --- the device --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A booted device running 1.0.0, made once and copied for each test."""
    device = SimDevice.create(
        tmp_path_factory.mktemp("template") / "device",
        image(RUNNING),
        [KEY.public_key],
        layout="psoc6-2m-swap",
        identity=Identity(board=BOARD),
    )
    report = device.boot()
    assert report.result is not None
    assert report.result.images[0].action is Action.NONE
    return device.dir


@pytest.fixture
def device(template: Path, tmp_path: Path) -> SimDevice:
    target = tmp_path / "device"
    shutil.copytree(template, target)
    dev = SimDevice(target)
    assert dev.status()["slots"][0]["running"] == f"{RUNNING}+0"
    return dev


@dataclass
class Run:
    result: Result
    events: list[Event]


def run_agent(
    device: SimDevice,
    server: str,
    *,
    answer: Callable[[Event], Answer | None] | None = None,
    keeps_journal: bool = False,
    **settings: Any,
) -> Run:
    """One update attempt, wired exactly like ``otakit sim run`` wires it; ``answer`` plays the
    application's callback. Unless ``keeps_journal``, no resume journal may be left."""
    events: list[Event] = []

    def callback(event: Event) -> Answer | None:
        events.append(event)
        return answer(event) if answer is not None else None

    clock = settings.pop("clock", time.monotonic)
    transport = HttpTransport(HttpSettings(server=server, **settings), board=BOARD, clock=clock)
    try:
        with device.bootloader() as boot:
            storage = SlotStorage(
                boot,
                Journal(device.dir / JOURNAL_FILE),
                device.keys,
                current_version=RUNNING,
                allow_downgrade=device.state.allow_downgrade,
            )
            result = update_once(
                transport, storage, board=BOARD, version=RUNNING, callback=callback
            )
            if not keeps_journal:
                assert storage.progress() is None, "a resume journal was left behind"
    finally:
        transport.close()
    return Run(result, events)


def assert_failed(run: Run, error: str) -> None:
    assert run.result.outcome is Outcome.FAILED, run.result
    assert run.result.error == error, run.result
    assert run.result.message
    failures = [e for e in run.events if e.reason is Reason.FAILURE]
    assert [e.error for e in failures] == [error], failures
    assert not [e for e in run.events if e.reason is Reason.SUCCESS]


def assert_reported(stub: Stub, error: str, *, file: str = FILE) -> None:
    """Exactly one Failure result, POSTed to the file path (§2)."""
    assert len(stub.posts) == 1, stub.posts
    posted = stub.posts[0]
    assert posted.path == urlsplit(file).path
    assert isinstance(posted.body, dict), posted.body
    assert set(posted.body) == {"Message", "File", "Error", "Reason"}, posted.body
    assert posted.body["Message"] == "Failure"
    assert posted.body["File"] == file
    assert posted.body["Error"] == error
    assert isinstance(posted.body["Reason"], str)
    assert posted.body["Reason"].strip()


def assert_clean(device: SimDevice, image_size: int = IMAGE_SIZE) -> None:
    """Secondary slot erased (first 64 bytes, the image's bytes and the trailer) to the flash's
    erased value (0x00 on the PSoC 6 rows of psoc6-2m-swap), no journal, and the next boot runs
    1.0.0 as it was."""
    assert not (device.dir / JOURNAL_FILE).exists()
    with device.bootloader() as boot:
        erased = boot.flash.erased_value
        slot = boot.secondary()
        checked = min(max(64, image_size), slot.size)
        assert slot.read_at(0, checked) == bytes([erased]) * checked
        assert slot.read_at(0, slot.size).count(erased) == slot.size, "slot not fully erased"
    report = device.boot()
    assert report.result is not None
    boot_image = report.result.images[0]
    assert boot_image.action is Action.NONE, boot_image
    assert str(boot_image.version) == f"{RUNNING}+0"
    status = device.status()["slots"][0]
    assert status["running"] == f"{RUNNING}+0"
    assert status["next_boot"] == "none"
    assert status["secondary"]["request"] == "none"


# --- control: the harness does update a device -------------------------------------------------


def test_control_a_good_job_updates(stub: Stub, device: SimDevice) -> None:
    """Without this, every failure below could be the harness's fault."""
    data = image("1.1.0")
    stub.job, stub.files[FILE] = job(), data
    run = run_agent(device, stub.url)
    assert run.result.outcome is Outcome.UPDATED, run.result
    assert run.result.version == "1.1.0"
    assert stub.posts == [Posted(FILE, {"Message": "Success", "File": FILE})]
    ranges = [r for p, r in stub.gets if p == FILE]
    assert ranges[0] == "bytes=0-4095"
    assert len(ranges) == -(-len(data) // 4096)  # one GET per 4 KiB range, no retries
    assert stub.user_agents == {USER_AGENT}
    assert not (device.dir / JOURNAL_FILE).exists()
    report = device.boot()
    assert report.result is not None
    assert report.result.images[0].action is Action.UPGRADE_TEST
    assert device.status()["slots"][0]["running"] == "1.1.0+0"


# --- the job is not for this device ------------------------------------------------------------


@pytest.mark.parametrize("board", ["CY8CPROTO_062_4343W_X", "cy8cproto_062_4343w", "OTHER"])
def test_wrong_board(stub: Stub, device: SimDevice, board: str) -> None:
    stub.job, stub.files[FILE] = job(Board=board), image("1.1.0")
    run = run_agent(device, stub.url)
    assert_failed(run, "WRONG_BOARD")
    assert_reported(stub, "WRONG_BOARD")
    assert [p for p, _ in stub.gets if p == FILE] == [], "the image was downloaded anyway"
    assert_clean(device)


@pytest.mark.parametrize("version", ["1.0.0", "0.9.9", "0.99.99", "1.00.0000"])
def test_version_not_newer(stub: Stub, device: SimDevice, version: str) -> None:
    stub.job, stub.files[FILE] = job(Version=version), image("1.1.0")
    run = run_agent(device, stub.url)
    assert_failed(run, "INVALID_VERSION")
    assert_reported(stub, "INVALID_VERSION")
    assert [p for p, _ in stub.gets if p == FILE] == []
    assert_clean(device)


def test_mqtt_job_on_an_http_agent(stub: Stub, device: SimDevice) -> None:
    """A valid job for the MQTT transport, which this agent was not given."""
    stub.job = job(Connection="MQTT", Broker="", UniqueTopicName="replace")
    run = run_agent(device, stub.url)
    assert_failed(run, "TRANSPORT_UNSUPPORTED")
    assert_reported(stub, "TRANSPORT_UNSUPPORTED")
    assert_clean(device)


# --- malformed job documents -------------------------------------------------------------------

REQUIRED = ("Message", "Version", "Board", "Connection", "File")
KNOWN_KEYS = tuple(FIELD_LIMITS)


def _over(key: str) -> str:
    """A value one UTF-8 byte longer than the device accepts (as long as its buffer, leaving no
    room for the NUL), otherwise as valid as possible."""
    limit = MAX_VALUE_BYTES[key]
    if key == "Version":  # leading zeros are valid (atoi): only the length is wrong
        return "0" * (limit - 9) + "1.1." + "0" * 6  # 00000001.1.000000 is 1.1.0
    if key == "Message":
        return "Update Available" + " " * (limit + 1 - len("Update Available"))
    if key == "Port":
        return "0" * (limit - 3) + "8080"
    if key == "Connection":
        return "HTTP" + " " * (limit + 1 - 4)
    if key == "File":
        return "/" + "f" * limit
    return "x" * (limit + 1)


def bad(name: str, reason: str, document: bytes) -> Any:
    """A parametrized case: the document and a fragment the failure's reason must contain."""
    return pytest.param(document, reason, id=name)


_JSON_TYPES: dict[str, tuple[str, object]] = {
    "null": ("null", None),
    "bool": ("a boolean", True),
    "array": ("an array", [1, 1, 0]),
    "object": ("an object", {"major": "1"}),
}

MALFORMED: list[Any] = [
    *(bad(f"missing-{key}", f"has no {key}", job(**{key: MISSING})) for key in REQUIRED),
    *(bad(f"number-{key}", f"{key!r} holds a number", job(**{key: 1})) for key in KNOWN_KEYS),
    bad("number-unknown-key", "'Extra' holds a number", job(Extra=1)),
    bad("float-Version", "'Version' holds a number", job(Version=1.1)),
    *(
        bad(f"{name}-Version", f"'Version' holds {what}", job(Version=value))
        for name, (what, value) in _JSON_TYPES.items()
    ),
    *(
        bad(f"version-{v or 'empty'}", "Version", job(Version=v))
        for v in ("1", "1.1", "1.1.x", "v1.1.0", "1.1.0.0", "1.1.0+1", " 1.1.0", "1..1", "")
    ),
    bad("empty-Message", "has no Message", job(Message="")),
    bad("empty-message-lowercase-key", "has no Message", job(Message=MISSING, message="")),
    *(
        bad(
            f"oversize-{key}",
            f"{key} is {FIELD_LIMITS[key]} bytes, more than the {MAX_VALUE_BYTES[key]}",
            job(**{key: _over(key)}),
        )
        for key in KNOWN_KEYS
    ),
    bad("oversize-Product-utf8-bytes", "Product is 66 bytes", job(Product="\u00e9" * 33)),
    *(
        bad(f"connection-{c or 'empty'}", "Connection", job(Connection=c))
        for c in ("FTP", "HTTP/1.1", "COAP", "")
    ),
    *(
        bad(f"port-{p}", "Port", job(Port=p))
        for p in ("0", "65536", "99999", "-1", "80a", " 80", "0x50", "+80")
    ),
    bad("http-without-File", "has no File", job(File="")),
    bad("duplicate-key-case-insensitive", "appears twice", job(board=BOARD)),
    bad("duplicate-ManufacturerID", "appears twice", job(ManufacturerID="IFX")),
    bad("nul-in-File", "NUL", job(File="/a\x00b.bin")),
    bad("document-over-1024-bytes", "more than the 1024", job(Note="n" * MAX_DOCUMENT_BYTES)),
    # an escaped lone surrogate: valid JSON, but not valid Unicode
    bad("lone-surrogate", "surrogate", json.dumps(job_fields(Board="\ud800")).encode()),
]


@pytest.mark.parametrize(("document", "reason"), MALFORMED)
def test_malformed_job_document(
    stub: Stub, device: SimDevice, document: bytes, reason: str
) -> None:
    stub.job, stub.files[FILE] = document, image("1.1.0")
    run = run_agent(device, stub.url)
    assert_failed(run, "MALFORMED_JOB_DOC")
    assert reason in (run.result.message or ""), run.result.message
    # fetch_job refuses the document before any Job exists: the agent has no file to report to,
    # so it reports the failure through its callback only (checked above) and posts nothing.
    assert run.result.job is None
    assert stub.posts == []
    assert [p for p, _ in stub.gets if p == FILE] == []
    assert_clean(device)


NOT_A_JOB: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"Update Available", id="text"),
    pytest.param(b"<html><body>502 Bad Gateway</body></html>", id="html"),
    pytest.param(job()[:-1], id="truncated-json"),
    pytest.param(b"[]", id="array"),
    pytest.param(json.dumps([job_fields()]).encode(), id="job-in-array"),
    pytest.param(b'"Update Available"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="bool"),
    pytest.param(b'{"Message": NaN}', id="nan"),
    pytest.param(job().replace(b"Infineon", b"Infin\xe9on"), id="latin1-not-utf8"),
    pytest.param(b"\xff\xfe" + job().decode().encode("utf-16-le"), id="utf16"),
]


@pytest.mark.parametrize("document", NOT_A_JOB)
def test_not_a_job_document(stub: Stub, device: SimDevice, document: bytes) -> None:
    stub.job, stub.files[FILE] = document, image("1.1.0")
    run = run_agent(device, stub.url)
    assert_failed(run, "NOT_A_JOB_DOC")
    # no job at all: nothing can be (and nothing is) posted; see test_malformed_job_document
    assert run.result.job is None
    assert stub.posts == []
    assert_clean(device)


@pytest.mark.parametrize("message", ["No Update Available", "Result Received", "Hello"])
def test_other_message_is_no_update(stub: Stub, device: SimDevice, message: str) -> None:
    """A well-formed document whose Message is not "Update Available" is not a failure: the
    agent's decision (jobdoc/http.py) is that there is no update. Nothing is posted."""
    stub.job, stub.files[FILE] = job(Message=message), image("1.1.0")
    run = run_agent(device, stub.url)
    assert run.result.outcome is Outcome.NO_UPDATE, run.result
    assert not [e for e in run.events if e.reason is Reason.FAILURE]
    assert stub.posts == []
    assert_clean(device)


def test_job_not_served(stub: Stub, device: SimDevice) -> None:
    stub.job, stub.job_status = b"not found", 404
    run = run_agent(device, stub.url)
    assert_failed(run, "GET_JOB")
    assert stub.posts == []  # no job: no file to report to
    assert_clean(device)


# --- bad images --------------------------------------------------------------------------------

GOOD = image("1.1.0")
BAD_IMAGES: list[Any] = [
    pytest.param(image("1.1.0", key=None), "VERIFY", id="unsigned"),
    pytest.param(image("1.1.0", key=UNTRUSTED_KEY), "VERIFY", id="untrusted-key"),
    pytest.param(flipped(GOOD, len(GOOD) // 2), "VERIFY", id="tampered-payload"),
    pytest.param(flipped(GOOD, 0), "VERIFY", id="tampered-header-magic"),
    pytest.param(flipped(GOOD, len(GOOD) - 1), "VERIFY", id="tampered-signature"),
    pytest.param(GOOD[: len(GOOD) - 100], "VERIFY", id="truncated"),
    pytest.param(random.Random(3).randbytes(IMAGE_SIZE), "VERIFY", id="not-an-image"),
    # the job offers 1.1.0 but the image inside is not newer than the running one
    pytest.param(image(RUNNING, seed="again"), "INVALID_VERSION", id="image-same-version"),
    pytest.param(image("0.9.0"), "INVALID_VERSION", id="image-older"),
]


@pytest.mark.parametrize(("data", "error"), BAD_IMAGES)
def test_bad_image(stub: Stub, device: SimDevice, data: bytes, error: str) -> None:
    stub.job, stub.files[FILE] = job(), data
    run = run_agent(device, stub.url)
    assert_failed(run, error)
    assert run.result.job is not None
    assert_reported(stub, error)
    assert len([p for p, _ in stub.gets if p == FILE]) == -(-len(data) // 4096)
    assert_clean(device, len(data))


def test_image_larger_than_the_slot(stub: Stub, device: SimDevice) -> None:
    """Content-Range announces more bytes than the secondary slot holds: refused at the first
    range (storage.open raises ImageTooLargeError, whose original name is VERIFY)."""
    slot_size = device.map.secondary(0).size
    data = image("1.1.0", slot_size)
    assert len(data) > slot_size
    stub.job, stub.files[FILE] = job(), data
    run = run_agent(device, stub.url)
    assert_failed(run, "VERIFY")
    assert "larger than" in (run.result.message or "")
    assert_reported(stub, "VERIFY")
    assert [r for p, r in stub.gets if p == FILE] == ["bytes=0-4095"]  # no more than one range
    assert_clean(device, len(data))


def test_image_that_overlaps_the_trailer(stub: Stub, device: SimDevice) -> None:
    """It fits the slot, but not below the slot's trailer: downloaded, then refused."""
    slot_size = device.map.secondary(0).size
    data = image("1.1.0", device.map.max_image_size(0))
    assert device.map.max_image_size(0) < len(data) <= slot_size
    stub.job, stub.files[FILE] = job(), data
    run = run_agent(device, stub.url, chunk_size=64 * 1024)
    assert_failed(run, "VERIFY")
    assert_reported(stub, "VERIFY")
    assert_clean(device, len(data))


# --- the image cannot be fetched ---------------------------------------------------------------


def test_image_not_found(stub: Stub, device: SimDevice) -> None:
    stub.job = job()  # and no file
    run = run_agent(device, stub.url)
    assert_failed(run, "GET_DATA")
    assert_reported(stub, "GET_DATA")
    assert [r for p, r in stub.gets if p == FILE] == ["bytes=0-4095"]  # a 404 is not retried
    assert_clean(device)


def test_server_without_range_support(stub: Stub, device: SimDevice) -> None:
    stub.job, stub.files[FILE], stub.ranges = job(), image("1.1.0"), False
    run = run_agent(device, stub.url)
    assert_failed(run, "GET_DATA")
    assert_reported(stub, "GET_DATA")
    assert_clean(device)


def test_download_longer_than_data_timeout_stops_and_resumes(stub: Stub, device: SimDevice) -> None:
    """data_timeout bounds the whole download; the bytes stored so far are kept for the next
    attempt. The clock advances 100 s per look, so the third range is past the 250 s limit."""
    stub.job, stub.files[FILE] = job(), image("1.1.0")
    ticks = iter(range(0, 100_000, 100))
    run = run_agent(
        device,
        stub.url,
        keeps_journal=True,
        job_timeout=1e9,
        data_timeout=250,
        clock=lambda: next(ticks),
    )
    assert_failed(run, "GET_DATA")
    assert "did not finish within 250 s" in (run.result.message or "")
    assert [r for p, r in stub.gets if p == FILE] == ["bytes=0-4095", "bytes=4096-8191"]
    again = run_agent(device, stub.url)
    assert again.result.outcome is Outcome.UPDATED, again.result
    assert [r for p, r in stub.gets if p == FILE][2] == "bytes=8192-12287"  # resumed


def test_job_timeout_bounds_the_job_fetch(stub: Stub, device: SimDevice) -> None:
    stub.job = job()
    ticks = iter(range(0, 100_000, 100))
    run = run_agent(device, stub.url, job_timeout=30, clock=lambda: next(ticks))
    assert_failed(run, "GET_JOB")
    assert "no answer within 30 s" in (run.result.message or "")
    assert stub.gets == []


# --- a job that sends the device to another server ---------------------------------------------


def test_redirected_job_reports_to_the_image_server(
    stub: Stub, other_stub: Stub, device: SimDevice
) -> None:
    """Server/Port name another server (§1): the image comes from there and the Failure result
    goes there, to the file path (§2)."""
    port = str(urlsplit(other_stub.url).port)
    stub.job = job(Server="127.0.0.1", Port=port)
    stub.files[FILE] = image("1.1.0")  # must not be used
    other_stub.files[FILE] = flipped(GOOD, len(GOOD) // 2)
    run = run_agent(device, stub.url)
    assert_failed(run, "VERIFY")
    assert run.result.job is not None
    assert run.result.job.url == f"{other_stub.url}{FILE}"
    assert [p for p, _ in stub.gets] == ["/ota_update.json"]
    assert stub.posts == []
    assert_reported(other_stub, "VERIFY")
    assert_clean(device)


def test_redirect_to_another_port_of_the_same_server(
    stub: Stub, other_stub: Stub, device: SimDevice
) -> None:
    """Only Port is given: an empty Server is the server the job came from (§1), on that port."""
    stub.job = job(Server="", Port=str(urlsplit(other_stub.url).port))
    other_stub.files[FILE] = flipped(GOOD, len(GOOD) // 2)
    run = run_agent(device, stub.url)
    assert run.result.job is not None
    assert run.result.job.url == f"{other_stub.url}{FILE}"
    assert_failed(run, "VERIFY")
    assert_reported(other_stub, "VERIFY")
    assert stub.posts == []
    assert_clean(device)


def test_redirect_to_a_named_server_on_the_same_port(stub: Stub, device: SimDevice) -> None:
    """Only Server is given: an empty Port is the port the job came from (§1)."""
    host = urlsplit(stub.url).hostname
    stub.job = job(Server=host, Port="")
    stub.files[FILE] = flipped(GOOD, len(GOOD) // 2)
    run = run_agent(device, stub.url)
    assert run.result.job is not None
    assert run.result.job.url == f"{stub.url}{FILE}"
    assert_failed(run, "VERIFY")
    assert_reported(stub, "VERIFY")
    assert_clean(device)


# --- an attempt that ends between the last durable byte and set_pending ------------------------


class PowerLost(Exception):
    """Not an OtakitError: it escapes update_once, as a power cut or a kill would end it."""


def _at_verify(then: Callable[[], Answer]) -> Callable[[Event], Answer | None]:
    def answer(event: Event) -> Answer | None:
        if event.state is State.VERIFY and event.reason is Reason.STATE_CHANGE:
            return then()
        return None

    return answer


def _power_lost() -> Answer:
    raise PowerLost


@pytest.mark.parametrize("how", ["power-lost-at-verify", "app-stop-at-verify"])
def test_attempt_ended_after_the_whole_image_is_durable_resumes(
    stub: Stub, device: SimDevice, how: str
) -> None:
    """The journal then says every byte is durable; the next attempt must finish the update
    (verify and set pending), not ask the server for a range past the end of the file."""
    data = image("1.1.0")
    stub.job, stub.files[FILE] = job(), data
    if how == "power-lost-at-verify":
        with pytest.raises(PowerLost):
            run_agent(device, stub.url, answer=_at_verify(_power_lost), keeps_journal=True)
    else:
        first = run_agent(
            device, stub.url, answer=_at_verify(lambda: Answer.STOP), keeps_journal=True
        )
        assert_failed(first, "APP_RETURNED_STOP")
        assert_reported(stub, "APP_RETURNED_STOP")
    journal = json.loads((device.dir / JOURNAL_FILE).read_text())
    assert journal["durable"] == journal["download"]["size"] == len(data)
    stub.posts.clear()
    stub.gets.clear()
    again = run_agent(device, stub.url, keeps_journal=True)
    assert again.result.outcome is Outcome.UPDATED, (again.result, stub.gets)
    assert not (device.dir / JOURNAL_FILE).exists()
    assert stub.posts == [Posted(FILE, {"Message": "Success", "File": FILE})]
    report = device.boot()
    assert report.result is not None
    assert report.result.images[0].action is Action.UPGRADE_TEST
