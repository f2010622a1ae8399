"""The device's MQTT transport against a real Mosquitto (plain, TLS with client certificates),
served by a scripted publisher each test makes misbehave on purpose.

The devices are simulated MCUboot devices (``otakit sim run``'s agent, SlotStorage), so every
update is really verified, marked pending and booted; the fleet test uses memory storage.
Nothing sleeps: every wait is on an event or a queue, with a timeout.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from otakit.device.agent import Flow, Outcome, update_once
from otakit.device.config import AgentConfig
from otakit.device.events import Event, State
from otakit.device.journal import Download, JournalRecord
from otakit.device.service import AgentService
from otakit.device.transports.mqtt import MqttSettings, MqttTransport
from otakit.errors import HashMismatchError, OtakitError
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol import mqtt as wire
from otakit.protocol.jobdoc import (
    JobDocument,
    no_update,
    parse_job_document,
    result_received,
    update_available,
)
from otakit.protocol.version import FirmwareVersion
from otakit.sim.agent import JOURNAL_FILE, SIMULATOR, run
from otakit.sim.device import Identity, SimDevice

from .mqtt_harness import Broker, running_broker

KEY = SigningKey.generate("ecdsa-p256")
BOARD = "BOARD_A"
WAIT = 30  # seconds: the longest any test waits for something that should happen at once


def image(version: str, size: int = 40_000) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with running_broker(tmp_path_factory.mktemp("mqtt")) as running:
        yield running


# --- a scripted publisher --------------------------------------------------------------------


class Publisher:
    """Answers device requests (raw paho, protocols.md §3). Tests set what goes wrong:
    ``job`` answers Update Availability (None: silence), the first whole-image send leaves out
    ``drop``, repeats ``duplicate``, reorders with ``order``, rewrites chunks with ``mangle``
    and, with ``hold_after``, stops after that many chunks (``held``) until ``resume``."""

    def __init__(self, broker: Broker, data: bytes, company: str, version: str = "1.1.0") -> None:
        self.data, self.company = data, company
        self.version = self.chunk_version = FirmwareVersion.parse(version)
        self.job: Callable[[JobDocument], bytes | None] = self.update
        self.drop: set[int] = set()
        self.duplicate: set[int] = set()
        self.order: Callable[[list[bytes]], list[bytes]] = lambda chunks: chunks
        self.mangle: dict[int, Callable[[bytes], bytes]] = {}
        self.serve_ranges = True
        self.hold_after: int | None = None
        self.held, self.resume = threading.Event(), threading.Event()
        self.requests: list[JobDocument] = []
        self.sent_to: list[str] = []
        self._work: queue.Queue[tuple[str, JobDocument] | None] = queue.Queue()
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex}")
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(wire.notify_filter(company), 1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._ready.wait(WAIT)
        self._worker = threading.Thread(target=self._serve, daemon=True)
        self._worker.start()

    def update(self, request: JobDocument) -> bytes:
        return update_available(
            version=self.version,
            board=request.get("BoardName"),
            connection="MQTT",
            unique_topic_name=request.unique_topic_name,
        ).to_json()

    def messages(self) -> list[str]:
        return [r.message for r in self.requests]

    def close(self) -> None:
        self._work.put(None)
        self._worker.join(WAIT)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with contextlib.suppress(OtakitError):
            self._work.put((message.topic, parse_job_document(message.payload)))

    def _publish(self, topic: str, payload: bytes) -> None:
        self.sent_to.append(topic)
        self.client.publish(topic, payload, qos=1)

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            topic, request = item
            self.requests.append(request)
            reply = request.unique_topic_name
            if request.message == wire.UPDATE_AVAILABILITY:
                answer = self.job(request)
                if answer is not None:
                    self._publish(reply, answer)
            elif request.message in (wire.REQUEST_UPDATE, wire.SEND_DIRECT_UPDATE):
                direct = request.message == wire.SEND_DIRECT_UPDATE
                self._whole(topic.rsplit("/", 1)[0] + "/" + wire.IMAGE if direct else reply)
            elif request.message == wire.REQUEST_DATA_CHUNK and self.serve_ranges:
                offset, size = int(request.get("Offset")), int(request.get("Size"))
                for chunk in wire.range_chunks(self.data, self.chunk_version, offset, size):
                    self._publish(reply, chunk)
            elif request.message in wire.RESULTS:
                self._publish(reply, result_received(unique_topic_name=reply).to_json())

    def _whole(self, topic: str) -> None:
        count = wire.payload_count(len(self.data))
        chunks = []
        for index in range(count):
            chunk = wire.chunk(self.data, self.chunk_version, index)
            if index in self.mangle:
                chunk = self.mangle[index](chunk)
            if index not in self.drop:
                chunks += [chunk] * (2 if index in self.duplicate else 1)
        self.drop = set()  # only the first send loses chunks
        for sent, chunk in enumerate(self.order(chunks)):
            if sent == self.hold_after:
                self.held.set()
                self.resume.wait(WAIT)
            self._publish(topic, chunk)


@pytest.fixture
def company() -> str:
    return f"T{uuid.uuid4().hex[:10]}"  # each test its own topics


@pytest.fixture
def publisher(broker: Broker, company: str) -> Iterator[Publisher]:
    pub = Publisher(broker, image("1.1.0"), company)
    yield pub
    pub.close()


def settings(broker: Broker, company: str, **extra: Any) -> MqttSettings:
    base = MqttSettings(
        host=broker.host,
        port=broker.port,
        company=company,
        connect_timeout=5,
        job_timeout=5,
        chunk_timeout=1.0,
        request_tries=4,
        result_timeout=2,
        data_timeout=WAIT,
    )
    return replace(base, **extra)


def new_device(tmp: Path, version: str = "1.0.0") -> SimDevice:
    serial = f"S-{uuid.uuid4().hex[:8]}"
    device = SimDevice.create(
        tmp / serial,
        image(version),
        [KEY.public_key],
        layout="psoc6-2m-swap",
        identity=Identity(board=BOARD, product="sensor", serial=serial, manufacturer="ACME"),
    )
    device.boot()
    return device


def slot_is_clean(device: SimDevice) -> bool:
    with device.bootloader() as boot:
        return boot.secondary().read_at(0, 4096) == bytes([boot.flash.erased_value]) * 4096


def data_requests(pub: Publisher) -> list[tuple[int, int]]:
    return [
        (int(r.get("Offset")), int(r.get("Size")))
        for r in pub.requests
        if r.message == wire.REQUEST_DATA_CHUNK
    ]


# --- flows -------------------------------------------------------------------------------------


def test_job_flow_verifies_boots_and_reports(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    device = new_device(tmp_path)
    events: list[Event] = []
    report = run(device.dir, None, mqtt=settings(broker, company), callback=events.append)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"
    with device.bootloader() as boot:
        assert boot.primary().read_at(0, len(publisher.data)) == publisher.data
    assert publisher.messages() == ["Update Availability", "Request Update", "Success"]
    ask = publisher.requests[0]
    unique = ask.unique_topic_name
    assert unique.startswith(f"{company}/APP_{BOARD}/OTAImage/")
    assert unique.rsplit("/", 1)[1].isdigit()
    assert {r.unique_topic_name for r in publisher.requests} == {unique}
    assert (ask.serial_number, ask.get("ManufacturerID"), ask.version) == (
        device.state.identity.serial,
        "",
        "1.0.0",
    )
    assert (ask.manufacturer, ask.get("ProductID"), ask.get("BoardName")) == (
        "ACME",
        "sensor",
        BOARD,
    )
    assert set(publisher.sent_to) == {unique}
    assert not (device.dir / JOURNAL_FILE).exists()
    assert [e.percentage for e in events if e.state is State.STORAGE_WRITE][-1] == 100


def test_direct_flow_over_tls_with_a_client_certificate(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    device = new_device(tmp_path)
    tls = broker.tls
    mtls = settings(
        broker,
        company,
        port=broker.mtls_port,
        ca_file=str(tls.ca),
        client_cert=str(tls.client_cert),
        client_key=str(tls.client_key),
    )
    report = run(device.dir, None, mqtt=mtls, flow=Flow.DIRECT)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"
    assert publisher.messages() == ["Send Direct Update", "Success"]
    assert f"{company}/APP_{BOARD}/OTAImage" in publisher.sent_to


def test_a_certificate_from_another_ca_is_refused(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    device = new_device(tmp_path)
    tls = broker.tls
    stranger = settings(
        broker,
        company,
        port=broker.mtls_port,
        ca_file=str(tls.ca),
        client_cert=str(tls.stranger_cert),
        client_key=str(tls.stranger_key),
        connect_timeout=2,
    )
    report = run(device.dir, None, mqtt=stranger)
    assert (report.result.outcome, report.result.error) == (Outcome.FAILED, "GET_JOB")
    assert "MQTT broker" in (report.result.message or "")
    assert publisher.requests == []


# --- chunks ------------------------------------------------------------------------------------


def test_dropped_chunks_are_asked_for_again_exactly(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    size = len(publisher.data)
    last = wire.payload_count(size) - 1
    publisher.drop = {2, 5, 6, last}
    report = run(tmp_path_device := new_device(tmp_path).dir, None, mqtt=settings(broker, company))
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"
    chunk = wire.CHUNK_SIZE
    assert sorted(set(data_requests(publisher))) == [
        (2 * chunk, chunk),
        (5 * chunk, 2 * chunk),
        (last * chunk, size - last * chunk),
    ]
    assert "Request Update" in publisher.messages()
    assert not (tmp_path_device / JOURNAL_FILE).exists()


def test_duplicate_and_out_of_order_chunks(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    publisher.duplicate = {0, 3, 9}
    publisher.order = lambda chunks: chunks[::-1]
    report = run(new_device(tmp_path).dir, None, mqtt=settings(broker, company))
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert data_requests(publisher) == []  # everything was held until it fitted


def test_held_chunks_are_bounded(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    """With room for two early chunks, the rest of a reversed image is dropped and asked again."""
    publisher.order = lambda chunks: chunks[::-1]
    bounded = settings(broker, company, max_buffered=2 * wire.CHUNK_SIZE)
    report = run(new_device(tmp_path).dir, None, mqtt=bounded)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert data_requests(publisher)


def _header(data: bytes, **fields: int) -> bytes:
    """``data`` (a chunk) with header fields replaced, packed without any check."""
    values = dict(
        zip(
            (
                "magic",
                "to_data",
                "image_type",
                "major",
                "minor",
                "build",
                "total",
                "offset",
                "size",
                "count",
                "index",
            ),
            wire.HEADER.unpack_from(data),
            strict=True,
        )
    )
    values.update(fields)
    return wire.HEADER.pack(*values.values()) + data[wire.HEADER_SIZE :]


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda c: b"OTAImagX" + c[8:], "magic"),
        (lambda c: _header(c, size=4000), "says 4000 data bytes"),
        (lambda c: _header(c, offset=10**6), "lie outside"),
        (lambda c: _header(c, to_data=16), "offset_to_data"),
        (lambda c: _header(c, image_type=1), "image type"),
        (lambda c: _header(c, index=99), "index 99"),
        (lambda c: _header(c, total=10**6), "total size"),
        (lambda c: c[:20], "shorter than the 32-byte header"),
    ],
    ids=["magic", "size", "offset", "to-data", "type", "index", "total", "short"],
)
def test_malformed_chunks_are_named(
    broker: Broker,
    company: str,
    publisher: Publisher,
    tmp_path: Path,
    mangle: Callable[[bytes], bytes],
    fragment: str,
) -> None:
    publisher.mangle = {3: mangle}
    device = new_device(tmp_path)
    report = run(device.dir, None, mqtt=settings(broker, company))
    assert (report.result.outcome, report.result.error) == (Outcome.FAILED, "NOT_A_HEADER")
    assert fragment in (report.result.message or "")
    assert slot_is_clean(device)
    failure = publisher.requests[-1]
    assert (failure.message, failure.get("Error")) == ("Failure", "NOT_A_HEADER")


@pytest.mark.parametrize(
    ("version", "fragment"),
    [("1.0.0", "not newer than the running 1.0.0"), ("1.2.0", "the job says 1.1.0")],
    ids=["older", "not-the-jobs"],
)
def test_chunks_of_another_version_than_the_jobs_are_refused(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path, version: str, fragment: str
) -> None:
    publisher.chunk_version = FirmwareVersion.parse(version)  # the job says 1.1.0
    device = new_device(tmp_path)
    report = run(device.dir, None, mqtt=settings(broker, company))
    assert (report.result.outcome, report.result.error) == (Outcome.FAILED, "INVALID_VERSION")
    assert fragment in (report.result.message or "")
    assert slot_is_clean(device)


# --- job documents -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "outcome", "error"),
    [
        (lambda r: b'{"Message": "Update Available", ', Outcome.FAILED, "NOT_A_JOB_DOC"),
        (
            lambda r: b'{"Message": "Update Available", "Version": 1}',
            Outcome.FAILED,
            "MALFORMED_JOB_DOC",
        ),
        (
            lambda r: update_available(version="1.1.0", board="OTHER", connection="MQTT").to_json(),
            Outcome.FAILED,
            "WRONG_BOARD",
        ),
        (
            lambda r: update_available(version="1.0.0", board=BOARD, connection="MQTT").to_json(),
            Outcome.FAILED,
            "INVALID_VERSION",
        ),
        (
            lambda r: no_update(unique_topic_name=r.unique_topic_name).to_json(),
            Outcome.NO_UPDATE,
            None,
        ),
        (lambda r: None, Outcome.NO_UPDATE, None),  # silence, as the original publisher's
    ],
    ids=["not-json", "malformed", "wrong-board", "older", "no-update", "silence"],
)
def test_job_answers(
    broker: Broker,
    company: str,
    publisher: Publisher,
    tmp_path: Path,
    answer: Callable[[JobDocument], bytes | None],
    outcome: Outcome,
    error: str | None,
) -> None:
    publisher.job = answer
    device = new_device(tmp_path)
    report = run(device.dir, None, mqtt=settings(broker, company, job_timeout=1))
    assert (report.result.outcome, report.result.error) == (outcome, error), report.result
    assert slot_is_clean(device)
    if error in ("WRONG_BOARD", "INVALID_VERSION"):  # a job was read: the refusal is reported
        assert publisher.messages() == ["Update Availability", "Failure"]
        assert publisher.requests[-1].get("Error") == error
    else:
        assert publisher.messages() == ["Update Availability"]


# --- outages and resumption --------------------------------------------------------------------


def test_broker_restart_mid_transfer(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    publisher.hold_after = 4
    device = new_device(tmp_path)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run, device.dir, None, mqtt=settings(broker, company))
        assert publisher.held.wait(WAIT)
        broker.restart()
        publisher.resume.set()
        report = future.result(timeout=60)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"


def test_power_cut_resumes_with_only_the_rest(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    publisher.data = image("1.1.0", 120_000)
    device = new_device(tmp_path)
    erase = device.map.secondary(0).size // device.map.sector_size
    mqtt = settings(broker, company)
    cut = run(device.dir, None, mqtt=mqtt, power_cut_after=erase + 10)
    assert (cut.result.outcome, cut.result.error) == (Outcome.FAILED, "POWER_CUT")
    durable = json.loads((device.dir / JOURNAL_FILE).read_text())["durable"]
    assert durable > 0
    before = len(publisher.requests)
    events: list[Event] = []
    done = run(device.dir, None, mqtt=mqtt, callback=events.append)
    assert done.result.outcome is Outcome.UPDATED, done.result
    assert done.running == "1.1.0+0"
    again = publisher.requests[before:]
    assert [r.message for r in again] == ["Update Availability", "Request Data Chunk", "Success"]
    assert (again[1].get("Offset"), again[1].get("Size")) == (str(durable), "-1")
    first = next(e for e in events if e.state is State.STORAGE_WRITE)
    assert first.bytes_done == durable


def test_unanswered_requests_end_in_get_data_and_the_next_attempt_resumes(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    publisher.drop, publisher.serve_ranges = {3}, False
    device = new_device(tmp_path)
    mqtt = settings(broker, company, request_tries=2)
    failed = run(device.dir, None, mqtt=mqtt)
    assert (failed.result.outcome, failed.result.error) == (Outcome.FAILED, "GET_DATA")
    assert "bytes 12288-16383" in (failed.result.message or "")
    assert len(data_requests(publisher)) == 2
    assert json.loads((device.dir / JOURNAL_FILE).read_text())["durable"] == 3 * wire.CHUNK_SIZE
    publisher.serve_ranges = True
    done = run(device.dir, None, mqtt=mqtt)
    assert done.result.outcome is Outcome.UPDATED, done.result
    assert data_requests(publisher)[-1] == (3 * wire.CHUNK_SIZE, -1)


# --- switching transports ----------------------------------------------------------------------


class Files(ThreadingHTTPServer):
    """A tiny HTTP server: GET (with Range) of ``files``, POSTed results in ``posts``."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _FileHandler)
        self.files = files
        self.gets: list[str] = []
        self.posts: list[dict[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _FileHandler(BaseHTTPRequestHandler):
    server: Files

    def do_GET(self) -> None:
        data = self.server.files.get(self.path)
        self.server.gets.append(self.path)
        if data is None:
            self.send_error(404)
            return
        status, body, first = 200, data, 0
        if ranged := self.headers.get("range"):
            first_text, last_text = ranged.removeprefix("bytes=").split("-")
            first, last = int(first_text), min(int(last_text), len(data) - 1)
            status, body = 206, data[first : last + 1]
        self.send_response(status)
        if status == 206:
            self.send_header("content-range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.server.posts.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def files() -> Iterator[Files]:
    server = Files({})
    yield server
    server.close()


def test_http_job_from_the_publisher_is_downloaded_over_http(
    broker: Broker, company: str, publisher: Publisher, files: Files, tmp_path: Path
) -> None:
    files.files["/fw/app.bin"] = publisher.data
    port = files.server_address[1]
    publisher.job = lambda r: update_available(
        version="1.1.0", board=BOARD, connection="HTTP", server="", port=port, file="/fw/app.bin"
    ).to_json()  # empty Server: the broker's host
    events: list[Event] = []
    report = run(
        new_device(tmp_path).dir, None, mqtt=settings(broker, company), callback=events.append
    )
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"
    assert State.JOB_REDIRECT in [e.state for e in events]
    assert publisher.messages() == ["Update Availability"]  # data and result went over HTTP
    assert set(files.gets) == {"/fw/app.bin"}
    assert files.posts == [{"Message": "Success", "File": "/fw/app.bin"}]


def test_mqtt_job_from_the_server_is_downloaded_over_mqtt(
    broker: Broker, company: str, publisher: Publisher, files: Files, tmp_path: Path
) -> None:
    job = update_available(
        version="1.1.0",
        board=BOARD,
        connection="MQTT",
        broker=broker.host,
        port=broker.port,
        unique_topic_name="replace",
    )
    files.files["/ota_update.json"] = job.to_json()
    device = new_device(tmp_path)
    mqtt = settings(broker, company)
    report = run(device.dir, files.url, mqtt=mqtt, fetch_with="http")
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"
    assert files.gets == ["/ota_update.json"]
    assert publisher.messages() == ["Request Update", "Success"]
    assert publisher.requests[0].unique_topic_name.startswith(f"{company}/APP_{BOARD}/OTAImage/")
    assert files.posts == []


# --- the commands ------------------------------------------------------------------------------


def test_sim_run_over_mqtt_with_client_certificates(
    broker: Broker,
    company: str,
    publisher: Publisher,
    tmp_path: Path,
    otakit: Callable[..., Any],
) -> None:
    device = new_device(tmp_path)
    tls = broker.tls
    done = otakit(
        "sim", "run", device.dir, "--mqtt", f"{broker.host}:{broker.mtls_port}",
        "--cafile", tls.ca, "--cert", tls.client_cert, "--key", tls.client_key,
        "--company", company, "--flow", "direct", "--once",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "updated to 1.1.0" in done.stderr
    assert publisher.messages() == ["Send Direct Update", "Success"]
    refused = otakit("sim", "run", device.dir, "--once")
    assert refused.returncode == 2
    assert "give --server URL or --mqtt HOST:PORT" in refused.stderr


def test_agent_service_asks_the_mqtt_publisher(
    broker: Broker, company: str, publisher: Publisher, tmp_path: Path
) -> None:
    device = new_device(tmp_path)
    config = AgentConfig.from_dict(
        {
            "agent": {"transport": "mqtt"},
            "identity": {"serial": "S-1", "board": BOARD, "version": "1.0.0"},
            "timing": {"job_timeout": 5, "data_timeout": WAIT},
            "behaviour": {"reboot_upon_completion": True},
            "storage": {"path": str(device.dir)},
            "mqtt": {
                "broker": broker.host,
                "port": broker.tls_port,
                "ca_file": str(broker.tls.ca),
                "company": company,
                "chunk_timeout": 1,
            },
        }
    )
    service = AgentService(config, callback=lambda event: None, simulator=SIMULATOR)
    result = service.run(threading.Event(), once=True)
    assert result is not None
    assert result.outcome is Outcome.UPDATED, result
    assert device.status()["slots"][0]["running"] == "1.1.0+0"
    assert publisher.messages() == ["Update Availability", "Request Update", "Success"]


# --- a fleet -----------------------------------------------------------------------------------


class MemoryStorage:
    """Storage in memory that accepts exactly ``expected``."""

    def __init__(self, expected: bytes) -> None:
        self.expected = expected
        self.data = bytearray()
        self.record: JournalRecord | None = None
        self.pending = False

    def progress(self) -> JournalRecord | None:
        return self.record

    def open(self, download: Download) -> int:
        self.data, self.record = bytearray(download.size), JournalRecord(download, 0)
        return 0

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def commit(self, end: int) -> None:
        assert self.record is not None
        self.record = JournalRecord(self.record.download, end)

    def verify(self) -> str:
        if bytes(self.data) != self.expected:
            raise HashMismatchError("the image is not the one published")
        return "1.1.0"

    def set_pending(self, *, permanent: bool) -> None:
        self.pending, self.record = True, None

    def abort(self) -> None:
        self.data, self.record = bytearray(), None


def test_a_hundred_devices_at_once(broker: Broker, company: str, publisher: Publisher) -> None:
    publisher.data = random.Random(7).randbytes(20_000)
    mqtt = settings(broker, company, chunk_timeout=3, data_timeout=60, result_timeout=10)

    def device(number: int) -> tuple[Outcome, bool]:
        transport = MqttTransport(mqtt, board=BOARD, version="1.0.0", serial=f"F-{number:03}")
        storage = MemoryStorage(publisher.data)
        try:
            result = update_once(
                transport, storage, board=BOARD, version="1.0.0", transports={"MQTT": transport}
            )
        finally:
            transport.close()
        return result.outcome, storage.pending

    with ThreadPoolExecutor(100) as pool:
        outcomes = list(pool.map(device, range(100), timeout=90))
    assert outcomes == [(Outcome.UPDATED, True)] * 100
    serials = {r.serial_number for r in publisher.requests if r.message == "Success"}
    assert len(serials) == 100
