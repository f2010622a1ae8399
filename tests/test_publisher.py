"""The MQTT publisher (protocols.md §3) against a real Mosquitto.

Devices here are written from the wire facts alone, as the original middleware behaves, with
nothing of otakit's device code: a paho client, topics built by hand with the ``APP_`` board
prefix, JSON requests whose values are all strings, and chunk headers unpacked by hand with
``struct`` ``'<8s5H2I3H'``. The publisher runs in-process (a thread with its own event loop)
or as the real ``otakit publisher`` command. Nothing sleeps to synchronise: every wait is on a
queue or an event, with a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.server.publisher import (
    Broker as BrokerSettings,
)
from otakit.server.publisher import (
    DeploymentSource,
    FileSource,
    ImageSource,
    Publisher,
    PublisherConfig,
    boards_match,
)
from otakit.server.settings import ServerSettings

from .mqtt_harness import Broker, start_broker
from .server_harness import Server, start_server

OTAKIT = Path(sys.executable).parent / "otakit"
KIT = "CY8CPROTO_062_4343W"
WIRE_KIT = "APP_" + KIT  # how the original tools name the board in topics
COMPANY = "OTAUpdate"
HEADER = struct.Struct("<8s5H2I3H")  # the device's cy_ota_mqtt_chunk_payload_header_t
WAIT = 20.0  # seconds any single wait may take before the test fails
KEY = SigningKey.generate("ecdsa-p256")
_numbers = itertools.count(1000)


def signed_image(version: str, size: int) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


# --- a device as the original middleware is on the wire ---------------------------------------


class RawDevice:
    """One device: its own MQTT connection, a unique topic, requests sent to publish_notify."""

    def __init__(
        self,
        port: int,
        *,
        company: str = COMPANY,
        board: str = WIRE_KIT,
        serial: str = "ABC213450001",
        version: str = "1.0.0",
        product: str = "Easy Widgit",
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.company, self.board, self.serial = company, board, serial
        self.version, self.product = version, product
        self.unique = f"{company}/{board}/OTAImage/{next(_numbers)}"
        self.notify = f"{company}/{board}/publish_notify"
        self.direct = f"{company}/{board}/OTAImage"
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: queue.Queue[int] = queue.Queue()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:12]}")
        client.on_message = lambda _c, _u, m: self.inbox.put((m.topic, bytes(m.payload)))
        client.on_subscribe = lambda _c, _u, mid, *_: self._acks.put(mid)
        if tls is not None:
            client.tls_set(**tls)
        client.connect("127.0.0.1", port, keepalive=60)
        sock = client.socket()
        assert isinstance(sock, socket.socket)  # ssl.SSLSocket too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        self.client = client
        self.subscribe(self.unique)

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        while self._acks.get(timeout=WAIT) != mid:
            pass

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, message: str, *extra: tuple[str, str], unique: bool = True) -> None:
        """A request as the device formats it: one JSON object, every value a string."""
        fields = [
            ("Message", message),
            ("Manufacturer", "Express Widgits Corporation"),
            ("ManufacturerID", "EWCO"),
            ("ProductID", self.product),
            ("SerialNumber", self.serial),
            ("BoardName", self.board),
            ("Version", self.version),
        ]
        if unique:
            fields.append(("UniqueTopicName", self.unique))
        fields.extend(extra)
        text = "{" + ", ".join(f'"{key}": "{value}"' for key, value in fields) + "}"
        self.publish(self.notify, text.encode())

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def answer(self, topic: str | None = None) -> dict[str, str]:
        """The next message, which must be a JSON object of strings on ``topic``."""
        where, payload = self.inbox.get(timeout=WAIT)
        assert where == (topic or self.unique)
        doc = json.loads(payload)
        assert isinstance(doc, dict)
        assert all(isinstance(v, str) for v in doc.values()), doc
        return doc

    def chunks(self, count: int | None = None, topic: str | None = None) -> list[tuple[Any, ...]]:
        """``count`` chunks (or until the last payload), as (header fields..., data)."""
        got: list[tuple[Any, ...]] = []
        while count is None or len(got) < count:
            where, payload = self.inbox.get(timeout=WAIT)
            assert where == (topic or self.unique)
            fields = HEADER.unpack_from(payload)
            magic, to_data = fields[0], fields[1]
            assert magic == b"OTAImage"
            assert to_data == 32
            assert fields[8] == len(payload) - 32  # data_size
            got.append((*fields, payload[to_data:]))
            if count is None and fields[10] == fields[9] - 1:  # index == total - 1
                break
        return got

    def image(self, topic: str | None = None) -> bytes:
        """A whole image, checking every header against the previous ones."""
        got = self.chunks(topic=topic)
        total_size, payloads = got[0][6], got[0][9]
        assert [c[10] for c in got] == list(range(payloads))  # in order, each once
        offset = 0
        for c in got:
            _magic, _to, image_type, _ma, _mi, _bu, size, at, data_size, count, _i, _data = c
            assert (image_type, size, count, at) == (0, total_size, payloads, offset)
            offset += data_size
        assert offset == total_size
        return b"".join(c[-1] for c in got)

    def barrier(self) -> None:
        """Everything the broker took for this device before now has been delivered."""
        marker = f"barrier-{uuid.uuid4().hex}".encode()
        self.publish(self.unique, marker)
        extra = []
        while True:
            topic, payload = self.inbox.get(timeout=WAIT)
            if payload == marker:
                break
            extra.append((topic, payload))
        for item in extra:
            self.inbox.put(item)


def fresh_company() -> str:
    """A topic root of its own, for a test whose publisher shares the module's broker."""
    return f"T{uuid.uuid4().hex[:10]}"


@contextmanager
def devices(count: int, port: int, **kwargs: Any) -> Iterator[list[RawDevice]]:
    made: list[RawDevice] = []
    try:
        for n in range(count):
            made.append(RawDevice(port, serial=f"SN{n:05d}", **kwargs))
        yield made
    finally:
        for device in made:
            device.close()


# --- the publisher, in-process or as the otakit command ----------------------------------------


class InProcess:
    """A publisher on its own event loop in a thread; ``listening`` gets each "listening" line."""

    def __init__(self, config: PublisherConfig, make_source: Callable[[], ImageSource]) -> None:
        self.listening: queue.Queue[str] = queue.Queue()
        self.line = ""  # the first "listening" line
        self.publisher: Publisher | None = None
        self._loop = asyncio.new_event_loop()
        self._failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(config, make_source), daemon=True)
        self._thread.start()

    def _run(self, config: PublisherConfig, make_source: Callable[[], ImageSource]) -> None:
        async def main() -> None:
            source = make_source()
            try:
                self.publisher = Publisher(config, source, on_listening=self.listening.put)
                await self.publisher.run()
            finally:
                await source.close()

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:
            self._failed.append(exc)
            self.listening.put(f"failed: {exc!r}")

    def wait_listening(self) -> str:
        line = self.listening.get(timeout=WAIT)
        assert line.startswith("listening on"), line
        return line

    def stop(self) -> None:
        if self.publisher is not None:
            self._loop.call_soon_threadsafe(self.publisher.stop)
        self._thread.join(timeout=WAIT)
        assert not self._thread.is_alive()
        assert not self._failed, self._failed

    @property
    def stats(self) -> dict[str, int]:
        assert self.publisher is not None
        return dict(self.publisher.stats)


@contextmanager
def in_process(
    config: PublisherConfig, make_source: Callable[[], ImageSource]
) -> Iterator[InProcess]:
    running = InProcess(config, make_source)
    try:
        running.line = running.wait_listening()
        yield running
    finally:
        running.stop()


class Command:
    """``otakit publisher ...`` as a user runs it; its stderr lines are collected."""

    def __init__(self, *args: str | Path, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(OTAKIT), "publisher", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        )
        self.lines: list[str] = []
        self.line = ""  # the "listening" line, once seen
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, text: str) -> str:
        while True:
            line = self._new.get(timeout=WAIT)
            if line is None:
                raise AssertionError(f"publisher exited:\n{''.join(self.lines)}")
            if text in line:
                return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextmanager
def command(*args: str | Path, cwd: Path | None = None) -> Iterator[Command]:
    running = Command(*args, cwd=cwd)
    try:
        running.line = running.wait_for("listening on")
        yield running
    finally:
        running.stop()


# --- fixtures ----------------------------------------------------------------------------------


@contextmanager
def own_broker() -> Iterator[Broker]:
    # Not under pytest's tmp_path: run as root, Mosquitto drops to its own user, which cannot
    # enter pytest's 0700 folders to read the certificates.
    folder = Path(tempfile.mkdtemp(prefix="otakit-publisher-"))
    folder.chmod(0o755)
    try:
        b = start_broker(folder / "broker")
        try:
            yield b
        finally:
            b.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with own_broker() as b:
        yield b


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "app.img"
    path.write_bytes(signed_image("2.0.0", 150_000))  # 37 chunks, the last one short
    return path


@pytest.fixture(scope="module")
def publisher(broker: Broker, image_file: Path) -> Iterator[InProcess]:
    """The file publisher of the original script: one image, one kit."""
    config = PublisherConfig(BrokerSettings(port=broker.port), boards=(KIT,))
    with in_process(config, lambda: FileSource(image_file, board=KIT)) as running:
        yield running


# --- the original device's flows ---------------------------------------------------------------


def test_job_flow_byte_for_byte(broker: Broker, publisher: InProcess, image_file: Path) -> None:
    data = image_file.read_bytes()
    device = RawDevice(broker.port)
    try:
        device.send("Update Availability")
        job = device.answer()
        assert job == {
            "Message": "Update Available",
            "Manufacturer": "Express Widgits Corporation",
            "ManufacturerId": "EWCO",
            "Product": "Easy Widgit",
            "SerialNumber": "ABC213450001",
            "Version": "2.0.0",
            "Board": WIRE_KIT,  # as the device spells its board
            "Connection": "MQTT",
            "Port": "",
            "File": "app.img",
            "Broker": "",
            "UniqueTopicName": device.unique,
        }
        device.send("Request Update")
        chunks = device.chunks()
        assert [c[10] for c in chunks] == list(range(37))
        assert {c[8] for c in chunks[:-1]} == {4096}
        assert chunks[-1][8] == len(data) - 36 * 4096
        assert all(c[3:6] == (2, 0, 0) for c in chunks)  # version major, minor, build
        assert b"".join(c[-1] for c in chunks) == data
        device.send("Success")
        result = device.answer()
        assert result["Message"] == "Result Received"
        assert result["UniqueTopicName"] == device.unique
    finally:
        device.close()


def test_direct_flow(broker: Broker, publisher: InProcess, image_file: Path) -> None:
    device = RawDevice(broker.port)
    try:
        device.subscribe(device.direct)
        device.send("Send Direct Update", unique=False)
        assert device.image(topic=device.direct) == image_file.read_bytes()
    finally:
        device.close()


def test_board_without_app_prefix_is_served_too(
    broker: Broker, publisher: InProcess, image_file: Path
) -> None:
    device = RawDevice(broker.port, board=KIT)
    try:
        device.send("Update Availability")
        job = device.answer()
        assert (job["Message"], job["Board"]) == ("Update Available", KIT)
        device.send("Request Update")
        assert device.image() == image_file.read_bytes()
    finally:
        device.close()


def test_data_chunk_requests(broker: Broker, publisher: InProcess, image_file: Path) -> None:
    data = image_file.read_bytes()
    device = RawDevice(broker.port)
    try:
        device.send(
            "Request Data Chunk", ("Filename", "app.img"), ("Offset", "4096"), ("Size", "4096")
        )
        [one] = device.chunks(1)
        assert one[6:11] == (len(data), 4096, 4096, 37, 1)
        assert one[-1] == data[4096:8192]

        device.send("Request Data Chunk", ("Offset", "100"), ("Size", "10"))
        [small] = device.chunks(1)
        assert (small[7], small[8], small[-1]) == (100, 10, data[100:110])

        device.send("Request Data Chunk", ("Offset", "143360"), ("Size", "-1"))  # chunk 35 on
        rest = device.chunks(2)
        assert [c[10] for c in rest] == [35, 36]
        assert b"".join(c[-1] for c in rest) == data[143360:]

        device.send(
            "Request Data Chunk", ("Offset", str(len(data))), ("Size", "4096")
        )  # past the end
        device.send("Request Data Chunk", ("Offset", "x"), ("Size", "4096"))
        device.barrier()
        assert device.inbox.empty()
    finally:
        device.close()


@pytest.mark.parametrize("version", ["2.0.0", "3.1.0"])
def test_no_update_when_the_device_is_current_or_newer(
    broker: Broker, publisher: InProcess, version: str
) -> None:
    device = RawDevice(broker.port, version=version)
    try:
        device.send("Update Availability")
        answer = device.answer()
        assert answer["Message"] == "No Update Available"
        assert (answer["Version"], answer["UniqueTopicName"]) == (version, device.unique)
    finally:
        device.close()


def test_board_name_of_another_kit_is_answered_for_the_topics_board(
    broker: Broker, publisher: InProcess
) -> None:
    """The topic's board is the device's build target, the string it compares the job's
    Board with; the original's request templates hard-code BoardName whatever the kit."""
    for board_name in ("APP_CY8CKIT_062S2_43012", KIT):  # another kit; the template's, plain
        device = RawDevice(broker.port)
        device.board = board_name  # BoardName, on this kit's topic APP_<KIT>
        try:
            device.send("Update Availability")
            job = device.answer()
            assert (job["Message"], job["Board"]) == ("Update Available", WIRE_KIT)
        finally:
            device.close()


def test_malformed_requests_are_ignored_and_serving_goes_on(
    broker: Broker, publisher: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    device = RawDevice(broker.port)
    bad = [
        b"not json",
        b"{",
        b'{"Message": 1}',
        b"\xff\xfe{}",
        b"[]",
        b'{"Message": "Update Availability", "Message": "Request Update"}',
        b'{"Message": "Update Availability", "Version": "1.0"}',
        b"{" + b'"Pad": "' + b"x" * 2000 + b'"}',
        b'{"Message": "Update Availability", "SerialNumber": "S"}',  # no UniqueTopicName
        b'{"Message": "Update Availability", "UniqueTopicName": "OTAUpdate/#"}',
        b'{"Message": "Hello"}',
    ]
    before = publisher.stats.get("ignored", 0)
    try:
        with caplog.at_level(logging.WARNING, logger="otakit.publisher"):
            for payload in bad:
                device.publish(device.notify, payload)
            device.send("Update Availability")  # the publisher still answers, and only this
            assert device.answer()["Message"] == "Update Available"
        device.barrier()
        assert device.inbox.empty()
    finally:
        device.close()
    assert publisher.stats["ignored"] - before == 9  # not a request at all, or an unknown one
    warnings = [r.getMessage() for r in caplog.records if r.name == "otakit.publisher"]
    assert len(warnings) == len(bad)
    assert all("\n" not in w and w.startswith("ignored") for w in warnings), warnings


def test_hundred_devices_at_once(broker: Broker, publisher: InProcess, image_file: Path) -> None:
    data = image_file.read_bytes()
    with devices(100, broker.port) as fleet:
        for device in fleet:
            device.send("Request Update")
        for device in fleet:
            assert device.image() == data
        for device in fleet:
            device.send("Success")
        for device in fleet:
            assert device.answer()["Message"] == "Result Received"


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_and_mutual_tls(broker: Broker, image_file: Path) -> None:
    t = broker.tls
    data = image_file.read_bytes()
    tls = BrokerSettings(port=broker.tls_port, tls=True, cafile=t.ca)
    mtls = BrokerSettings(
        port=broker.mtls_port, tls=True, cafile=t.ca, certfile=t.client_cert, keyfile=t.client_key
    )
    device_tls = {
        "ca_certs": str(t.ca),
        "certfile": str(t.client_cert),
        "keyfile": str(t.client_key),
    }
    for settings, kit in ((tls, "KIT_TLS"), (mtls, "KIT_MTLS")):
        config = PublisherConfig(settings, boards=(kit,))
        with in_process(config, partial(FileSource, image_file, board=kit)) as running:
            assert running.line.startswith(f"listening on mqtts://127.0.0.1:{settings.port} ")
            device = RawDevice(broker.mtls_port, board="APP_" + kit, tls=device_tls)
            try:
                device.send("Update Availability")
                assert device.answer()["Message"] == "Update Available"
                device.send("Request Update")
                assert device.image() == data
            finally:
                device.close()


def test_mutual_tls_without_a_client_certificate_keeps_retrying(
    broker: Broker, image_file: Path
) -> None:
    refused = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "reconnecting in" in record.getMessage():
                refused.set()

    watch = Watch()
    logging.getLogger("otakit.publisher").addHandler(watch)
    settings = BrokerSettings(
        port=broker.mtls_port, tls=True, cafile=broker.tls.ca, connect_timeout=1.0
    )
    running = InProcess(PublisherConfig(settings, boards=(KIT,)), lambda: FileSource(image_file))
    try:
        assert refused.wait(WAIT)
        assert running.listening.empty()
    finally:
        running.stop()
        logging.getLogger("otakit.publisher").removeHandler(watch)


# --- broker restarts ---------------------------------------------------------------------------


def test_reconnects_after_the_broker_restarts(image_file: Path) -> None:
    data = image_file.read_bytes()
    with own_broker() as own:
        config = PublisherConfig(BrokerSettings(port=own.port), boards=(KIT,))
        with in_process(config, lambda: FileSource(image_file, board=KIT)) as running:
            own.restart()
            running.wait_listening()  # subscribed again on the new broker
            device = RawDevice(own.port)
            try:
                device.send("Request Update")
                assert device.image() == data
            finally:
                device.close()


# --- the otakit publisher command --------------------------------------------------------------


def test_command_serves_a_file_under_another_company_topic(
    broker: Broker, image_file: Path
) -> None:
    data = image_file.read_bytes()
    args = ("-f", image_file, "-k", KIT, "-c", "ACME", "--port", str(broker.port))
    with command(*args) as running:
        line = running.line
        assert "ACME/CY8CPROTO_062_4343W/publish_notify" in line
        assert "ACME/APP_CY8CPROTO_062_4343W/publish_notify" in line
        assert "OTAUpdate/" not in line
        device = RawDevice(broker.port, company="ACME")
        try:
            device.send("Update Availability")
            job = device.answer()
            assert (job["Message"], job["Version"], job["File"]) == (
                "Update Available",
                "2.0.0",
                "app.img",
            )
            device.send("Request Update")
            assert device.image() == data
            device.send("Failure", ("Reason", "VERIFY"))
            assert device.answer()["Message"] == "Result Received"
        finally:
            device.close()
        assert running.stop() == 0
    text = "".join(running.lines)
    assert "result from ABC213450001 (APP_CY8CPROTO_062_4343W): Failure (VERIFY)" in text
    assert "Traceback" not in text
    assert text.rstrip().endswith("stopped")


def _one_line_error(args: list[str], code: str, cwd: Path) -> None:
    result = subprocess.run(
        [str(OTAKIT), "publisher", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"otakit: error [{code}]: "), result.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--window", "many"], "BADARG"),
        (["--window", "0"], "BADARG"),
        (["--chunk-size", "65536"], "BADARG"),
        (["--port", "http"], "BADARG"),
        (["ssl"], "BADARG"),
        (["-b", "hivemq"], "BADARG"),
        (["-b", "amazon"], "BADARG"),
        (["-c", "OTA/Update"], "BADARG"),
        (["-k", "KIT+"], "BADARG"),
        (["--shared", "a/b"], "BADARG"),
        (["--key", "client.key"], "BADARG"),
        (["-f", "missing.bin"], "FILE"),
        ([], "FILE"),  # the original's default, ota-update.bin, is not here
        (["-f", "raw.bin"], "BADARG"),  # no MCUboot header and no --version
        (["-f", "raw.bin", "--version", "1.x"], "BAD_VERSION"),
        (["-f", "raw.bin", "--data", "."], "BADARG"),
        (["--data", "no-server-here"], "BADARG"),
        (["tls", "--cafile", "missing-ca.pem", "-f", "raw.bin", "--version", "1.0.0"], "FILE"),
        (["tls", "--cafile", "raw.bin", "-f", "raw.bin", "--version", "1.0.0"], "BADARG"),
    ],
)
def test_bad_arguments_are_one_line_errors(args: list[str], code: str, tmp_path: Path) -> None:
    (tmp_path / "raw.bin").write_bytes(os.urandom(5000))
    _one_line_error(args, code, tmp_path)


def test_config_topics_and_board_forms() -> None:
    both = PublisherConfig(boards=("APP_KIT",))
    assert both.boards == ("KIT",)
    assert both.filters() == ["OTAUpdate/KIT/publish_notify", "OTAUpdate/APP_KIT/publish_notify"]
    assert PublisherConfig(app_prefix=True, boards=("KIT",)).filters() == [
        "OTAUpdate/APP_KIT/publish_notify"
    ]
    assert PublisherConfig(app_prefix=False, boards=("KIT",)).filters() == [
        "OTAUpdate/KIT/publish_notify"
    ]
    assert PublisherConfig(company="ACME", shared_group="fleet").filters() == [
        "$share/fleet/ACME/+/publish_notify"
    ]
    assert boards_match("KIT", "APP_KIT")
    assert boards_match(None, "ANY")
    assert not boards_match("KIT", "OTHER")


# --- deployments of a real otakit server -------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("publisher-server"))
    admin = srv.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield srv
    srv.stop()


def test_deployments_from_the_server_with_results_recorded(broker: Broker, server: Server) -> None:
    admin = server.admin_client()
    product = f"p-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": KIT}).status_code == 200
    data = signed_image("1.1.0", 60_000)
    artifact = admin.post("/api/v1/artifacts", params={"name": "app.img"}, content=data).json()
    body = {"artifact_id": artifact["id"], "product": product, "group": "g"}
    deployment = admin.post("/api/v1/deployments", json=body).json()
    serials = [f"S-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for serial in serials:
        registered = {"product": product, "group": "g", "board": KIT, "version": "1.0.0"}
        assert admin.put(f"/api/v1/devices/{serial}", json=registered).status_code == 200

    company = fresh_company()  # every board of it: no other publisher may hear these devices
    with command("--data", server.data, "-c", company, "--port", str(broker.port)) as running:
        assert f"{company}/+/publish_notify" in running.line
        good = RawDevice(broker.port, serial=serials[0], company=company, product=product)
        bad = RawDevice(broker.port, serial=serials[1], company=company, product=product)
        stranger = RawDevice(broker.port, serial="NOT-REGISTERED", company=company, product=product)
        try:
            good.send("Update Availability")
            job = good.answer()
            assert job["Message"] == "Update Available"
            assert (job["Version"], job["Board"]) == ("1.1.0", WIRE_KIT)
            assert job["File"] == f"/files/{artifact['id']}/app.img"
            good.send("Request Update")
            assert good.image() == data
            good.send("Success")
            assert good.answer()["Message"] == "Result Received"
            status = admin.get(f"/api/v1/devices/{serials[0]}").json()
            assert status["status"] == "applying"

            good.version = "1.1.0"  # rebooted into the new image
            good.send("Update Availability")
            assert good.answer()["Message"] == "No Update Available"

            bad.send("Request Data Chunk", ("Offset", "0"), ("Size", "-1"))
            assert b"".join(c[-1] for c in bad.chunks()) == data
            bad.send("Failure", ("Reason", "SHA256 verify fail"))
            assert bad.answer()["Message"] == "Result Received"

            stranger.send("Update Availability")  # unknown, and the product is not anonymous
            assert stranger.answer()["Message"] == "No Update Available"
        finally:
            for device in (good, bad, stranger):
                device.close()
    after = admin.get(f"/api/v1/devices/{serials[1]}").json()
    assert (after["status"], after["error"]) == ("error", "SHA256 verify fail")
    counts = admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    assert (counts["Applied"], counts["Error"]) == (1, 1)
    assert admin.get(f"/api/v1/devices/{serials[0]}").json()["version"] == "1.1.0"


def test_anonymous_product_devices_in_process(broker: Broker, server: Server) -> None:
    admin = server.admin_client()
    product = f"anon-{uuid.uuid4().hex[:8]}"
    settings = {"board": "KIT_ANON", "anonymous": True}
    assert admin.put(f"/api/v1/products/{product}", json=settings).status_code == 200
    data = signed_image("4.0.0", 9000)
    artifact = admin.post("/api/v1/artifacts", params={"name": "a.img"}, content=data).json()
    body = {"artifact_id": artifact["id"], "product": product, "priority": 1_000_000}
    assert admin.post("/api/v1/deployments", json=body).status_code == 201
    server_settings = ServerSettings(
        data_dir=server.data, database_url=f"sqlite+aiosqlite:///{server.data / 'otakit.db'}"
    )
    config = PublisherConfig(BrokerSettings(port=broker.port), boards=("KIT_ANON",))
    with in_process(config, lambda: DeploymentSource.open(server_settings)):
        device = RawDevice(broker.port, board="APP_KIT_ANON", serial="", product=product)
        try:
            device.send("Update Availability")
            job = device.answer()
            assert (job["Message"], job["Version"]) == ("Update Available", "4.0.0")
            device.subscribe(device.direct)
            device.send("Send Direct Update", unique=False)
            assert device.image(topic=device.direct) == data
            device.send("Success", unique=False)
            assert device.answer(topic=device.direct)["Message"] == "Result Received"
        finally:
            device.close()


# --- several publishers for one fleet ----------------------------------------------------------


def test_two_publishers_with_a_shared_subscription_serve_each_request_once(
    broker: Broker, image_file: Path
) -> None:
    data = image_file.read_bytes()
    company = fresh_company()
    args = ("-f", image_file, "-k", KIT, "-c", company, "--port", str(broker.port))
    first, second = Command(*args, "--shared", "fleet"), Command(*args, "--shared", "fleet")
    try:
        for running in (first, second):
            assert f"$share/fleet/{company}/" in running.wait_for("listening on")
        with devices(20, broker.port, company=company) as fleet:
            for device in fleet:
                device.send("Update Availability")
            for device in fleet:
                assert device.answer()["Message"] == "Update Available"
                device.send("Request Update")
            for device in fleet:
                assert device.image() == data
            assert first.stop() == 0
            assert second.stop() == 0
            for device in fleet:
                device.barrier()  # whatever either publisher sent has arrived by now
                assert device.inbox.empty()  # no second job document, no second image
    finally:
        first.stop()
        second.stop()
    sent = [
        line.split(" to ", 1)[1].split()[0]
        for running in (first, second)
        for line in running.lines
        if " sent image " in line
    ]
    assert sorted(sent) == sorted(d.unique for d in fleet)  # each image sent exactly once
    for running in (first, second):  # the broker split the requests between the two
        assert any(" sent image " in line for line in running.lines)
