"""``otakit subscriber`` against a real Mosquitto and a small scripted publisher.

The publisher here is written with raw paho and ``otakit.protocol.mqtt`` only, so that these tests
check the subscriber on its own; it answers the device's requests as protocols.md §3 says, and can
be told to drop or corrupt chunks, to have no update, or to stay silent.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from otakit.device.core.assembly import ChunkAssembly
from otakit.errors import (
    ChunkHeaderError,
    ImageTooLargeError,
    InvalidVersionError,
    TransferError,
)
from otakit.host.subscriber import ImageFile, Verdict
from otakit.protocol import mqtt as wire
from otakit.protocol.jobdoc import (
    NO_UPDATE_AVAILABLE,
    UPDATE_AVAILABLE,
    JobDocument,
    no_update,
    parse_job_document,
    result_received,
    update_available,
)
from otakit.protocol.version import FirmwareVersion

from .conftest import Run
from .mqtt_harness import Broker, start_broker
from .server_harness import free_port

Otakit = Callable[..., Run]
KIT = "CY8CPROTO_062_4343W"
VERDICT = re.compile(
    r"OK: (\d+) bytes in (\d+\.\d\d) s \((\d+\.\d) (MiB|KiB)/s\), (\d+) chunks, "
    r"(\d+) re-requested, version (\S+)\n"
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("mqtt"))
    yield b
    b.stop()


@pytest.fixture
def company() -> str:
    """A topic root of its own for each test, so tests never hear each other."""
    return f"T{uuid.uuid4().hex[:10]}"


# --- the scripted publisher --------------------------------------------------------------------


@dataclass
class Script:
    image: bytes
    version: str = "1.2.0"
    answer: str = UPDATE_AVAILABLE  # or NO_UPDATE_AVAILABLE, or "" to stay silent
    drop: frozenset[int] = frozenset()  # chunks left out of the first whole-image send
    corrupt: frozenset[int] = frozenset()  # chunks sent with a wrong magic
    answer_result: bool = True
    original_pieces: bool = False  # answer "Request Data Chunk" as the original publisher does


@dataclass
class Seen:
    topic: str
    doc: JobDocument
    raw: dict[str, Any]


@dataclass
class ScriptedPublisher:
    broker: Broker
    company: str
    script: Script
    seen: list[Seen] = field(default_factory=list)
    result: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{self.company}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_connect = lambda client, *_: client.subscribe(
            wire.notify_filter(self.company), wire.QOS
        )

    def start(self) -> None:
        self.client.connect(self.broker.host, self.broker.port, wire.KEEPALIVE_S)
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms per answer
        self.client.loop_start()
        assert self.subscribed.wait(10), "the scripted publisher could not subscribe"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        assert not self.problems, self.problems

    def messages(self, name: str) -> list[Seen]:
        return [s for s in self.seen if s.doc.message == name]

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._answer(message.topic, bytes(message.payload))
        except Exception as exc:  # shown by stop(); a callback must not die silently
            self.problems.append(f"{type(exc).__name__}: {exc}")

    def _answer(self, topic: str, payload: bytes) -> None:
        script = self.script
        doc = parse_job_document(payload)
        self.seen.append(Seen(topic, doc, json.loads(payload)))
        found = wire.board_of(topic, self.company)
        assert found is not None, topic
        board, prefixed = found
        topics = wire.Topics(board, company=self.company, app_prefix=prefixed)
        reply_to = doc.unique_topic_name or topics.direct
        version = FirmwareVersion.parse(script.version)
        if doc.message == wire.UPDATE_AVAILABILITY:
            if script.answer == UPDATE_AVAILABLE:
                job = update_available(
                    version=script.version,
                    board=doc.get("BoardName"),
                    connection="MQTT",
                    unique_topic_name=doc.unique_topic_name,
                )
                self._publish(reply_to, job.to_json())
            elif script.answer == NO_UPDATE_AVAILABLE:
                answer = no_update(
                    board=doc.get("BoardName"), unique_topic_name=doc.unique_topic_name
                )
                self._publish(reply_to, answer.to_json())
        elif doc.message in (wire.REQUEST_UPDATE, wire.SEND_DIRECT_UPDATE):
            target = topics.direct if doc.message == wire.SEND_DIRECT_UPDATE else reply_to
            for index, chunk in enumerate(wire.range_chunks(script.image, version, 0, -1)):
                if index in script.drop:
                    continue
                if index in script.corrupt:
                    chunk = b"NOTImage" + chunk[8:]
                self._publish(target, chunk)
        elif doc.message == wire.REQUEST_DATA_CHUNK:
            offset, size = int(doc.get("Offset")), int(doc.get("Size"))
            if script.original_pieces:  # one chunk of Size bytes, counted in Size-byte payloads
                data = script.image[offset : offset + size]
                header = wire.ChunkHeader(
                    version=(version.major, version.minor, version.revision),
                    total_size=len(script.image),
                    offset=offset,
                    data_size=len(data),
                    total_payloads=wire.payload_count(len(script.image), size),
                    index=offset // size,
                )
                self._publish(reply_to, header.pack() + data)
                return
            for chunk in wire.range_chunks(script.image, version, offset, size):
                self._publish(reply_to, chunk)
        elif doc.message in wire.RESULTS:
            if script.answer_result:
                self._publish(reply_to, result_received(unique_topic_name=reply_to).to_json())
            self.result.set()

    def _publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=wire.QOS)


@pytest.fixture
def publish(broker: Broker, company: str) -> Iterator[Callable[[Script], ScriptedPublisher]]:
    started: list[ScriptedPublisher] = []

    def start(script: Script) -> ScriptedPublisher:
        publisher = ScriptedPublisher(broker, company, script)
        publisher.start()
        started.append(publisher)
        return publisher

    yield start
    for publisher in started:
        publisher.stop()


def run_subscriber(
    otakit: Otakit, broker: Broker, company: str, *args: str | Path, port: int | None = None
) -> Run:
    return otakit(
        "subscriber",
        "--host",
        broker.host,
        "--port",
        str(port or broker.port),
        "-e",
        company,
        "-k",
        KIT,
        "--timeout",
        "10",
        *args,
    )


def verdict(result: Run) -> tuple[int, int, int, str]:
    """(size, chunks, re-requested, version) of a success verdict; checks the format."""
    assert result.returncode == 0, result.stderr
    match = VERDICT.fullmatch(result.stdout)
    assert match, result.stdout
    return int(match[1]), int(match[5]), int(match[6]), match[7]


def one_line_error(result: Run, code: str, status: int = 1) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"otakit: error [{code}]: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


# --- end to end --------------------------------------------------------------------------------


def test_job_flow_receives_the_image(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(1024 * 1024)
    publisher = publish(Script(image))
    out = tmp_path / "received.bin"
    result = run_subscriber(otakit, broker, company, "-f", out)
    assert verdict(result) == (len(image), 256, 0, "1.2.0")
    assert out.read_bytes() == image

    asked = [s.doc.message for s in publisher.seen]
    assert asked == [wire.UPDATE_AVAILABILITY, wire.REQUEST_UPDATE, wire.SUCCESS]
    availability = publisher.seen[0]
    assert availability.topic == f"{company}/{KIT}/publish_notify"
    assert all(isinstance(v, str) for v in availability.raw.values())
    unique = availability.doc.unique_topic_name
    assert re.fullmatch(rf"{company}/{KIT}/OTAImage/\d+", unique)
    assert availability.doc.get("BoardName") == KIT
    assert availability.doc.board == KIT
    assert availability.doc.version == "0.0.0"
    assert publisher.seen[1].doc.unique_topic_name == unique
    assert publisher.seen[2].raw == {"Message": "Success", "UniqueTopicName": unique}


def test_direct_flow_with_app_prefix(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(100_000)
    publisher = publish(Script(image, version="2.0.1"))
    out = tmp_path / "direct.bin"
    result = run_subscriber(otakit, broker, company, "-d", "--app-prefix", "-f", out)
    assert verdict(result) == (100_000, 25, 0, "2.0.1")
    assert out.read_bytes() == image
    assert [s.doc.message for s in publisher.seen] == [wire.SEND_DIRECT_UPDATE, wire.SUCCESS]
    assert {s.topic for s in publisher.seen} == {f"{company}/APP_{KIT}/publish_notify"}
    assert publisher.seen[0].doc.get("BoardName") == f"APP_{KIT}"


def test_kit_named_with_app_prefix_implies_it(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
) -> None:  # fmt: skip
    publisher = publish(Script(os.urandom(5000)))
    result = run_subscriber(otakit, broker, company, "-k", f"APP_{KIT}")
    assert verdict(result)[:2] == (5000, 2)
    assert publisher.seen[0].topic == f"{company}/APP_{KIT}/publish_notify"


def test_tls_with_a_ca(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(20_000)
    publish(Script(image))
    out = tmp_path / "tls.bin"
    result = run_subscriber(
        otakit, broker, company, "tls", "--cafile", broker.tls.ca, "-f", out, port=broker.tls_port
    )
    assert verdict(result)[0] == 20_000
    assert out.read_bytes() == image


def test_mutual_tls_with_a_client_certificate(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(20_000)
    publish(Script(image))
    out = tmp_path / "mtls.bin"
    t = broker.tls
    result = run_subscriber(
        otakit, broker, company, "--cafile", t.ca, "--cert", t.client_cert, "--key", t.client_key,
        "-f", out, port=broker.mtls_port,
    )  # fmt: skip
    assert verdict(result)[0] == 20_000
    assert out.read_bytes() == image


def test_tls_failures_are_one_line_connect_errors(
    otakit: Otakit, broker: Broker, company: str
) -> None:
    t = broker.tls
    untrusted = run_subscriber(
        otakit, broker, company, "--cafile", t.other_ca, port=broker.tls_port
    )
    assert "certificate" in one_line_error(untrusted, "CONNECT").lower()
    no_cert = run_subscriber(
        otakit, broker, company, "tls", "--cafile", t.ca, port=broker.mtls_port
    )
    one_line_error(no_cert, "CONNECT")
    stranger = run_subscriber(
        otakit, broker, company, "--cafile", t.ca, "--cert", t.stranger_cert,
        "--key", t.stranger_key, port=broker.mtls_port,
    )  # fmt: skip
    one_line_error(stranger, "CONNECT")


def test_dropped_chunks_are_re_requested_when_the_last_one_arrives(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(16 * 4096 + 123)
    publisher = publish(Script(image, drop=frozenset({0, 2, 3, 9})))
    out = tmp_path / "gaps.bin"
    result = run_subscriber(otakit, broker, company, "-f", out)
    assert verdict(result) == (len(image), 17, 4, "1.2.0")
    assert out.read_bytes() == image
    asked = [
        (s.doc.get("Offset"), s.doc.get("Size")) for s in publisher.messages("Request Data Chunk")
    ]
    assert asked == [("0", "4096"), ("8192", "4096"), ("12288", "4096"), ("36864", "4096")]


def test_a_dropped_last_chunk_is_re_requested_after_the_chunk_wait(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(8 * 4096)
    publisher = publish(Script(image, drop=frozenset({5, 7})))
    out = tmp_path / "tail.bin"
    result = run_subscriber(otakit, broker, company, "--chunk-wait", "0.2", "-f", out)
    size, chunks, re_requested, _ = verdict(result)
    assert (size, chunks) == (len(image), 8)
    assert re_requested >= 2
    assert out.read_bytes() == image
    offsets = {s.doc.get("Offset") for s in publisher.messages("Request Data Chunk")}
    assert offsets >= {str(5 * 4096), str(7 * 4096)}  # more only if the machine stalls
    request = publisher.messages("Request Data Chunk")[0]
    assert request.doc.unique_topic_name == publisher.seen[0].doc.unique_topic_name
    assert all(isinstance(v, str) for v in request.raw.values())
    assert {"Filename", "Offset", "Size"} <= request.raw.keys()


def test_chunk_size_fetches_piece_by_piece(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(10_000)
    publisher = publish(Script(image))
    out = tmp_path / "pieces.bin"
    result = run_subscriber(otakit, broker, company, "-c", "3000", "-f", out)
    # the publisher keeps its 4096-byte boundaries: 0-3000, 3000-4096, 4096-6000, ...
    assert verdict(result) == (10_000, 6, 0, "1.2.0")
    assert out.read_bytes() == image
    asked = [
        (s.doc.get("Offset"), s.doc.get("Size")) for s in publisher.messages("Request Data Chunk")
    ]
    assert asked == [("0", "3000"), ("3000", "3000"), ("6000", "3000"), ("9000", "3000")]
    assert not publisher.messages(wire.REQUEST_UPDATE)


def test_chunk_size_with_the_original_publishers_headers(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(10_000)
    publish(Script(image, original_pieces=True))
    out = tmp_path / "pieces.bin"
    result = run_subscriber(otakit, broker, company, "-c", "3000", "-f", out)
    assert verdict(result) == (10_000, 4, 0, "1.2.0")
    assert out.read_bytes() == image


def test_direct_flow_piece_by_piece(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
) -> None:  # fmt: skip
    publisher = publish(Script(os.urandom(9000)))
    result = run_subscriber(otakit, broker, company, "-d", "-c", "4096")
    assert verdict(result)[:3] == (9000, 3, 0)
    assert [s.doc.message for s in publisher.seen] == [wire.REQUEST_DATA_CHUNK] * 3 + [wire.SUCCESS]


def test_no_update_available_is_a_clear_no(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    publish(Script(b"", answer=NO_UPDATE_AVAILABLE))
    out = tmp_path / "none.bin"
    out.write_bytes(b"old image")
    result = run_subscriber(otakit, broker, company, "-v", "1.4.0", "-f", out)
    line = one_line_error(result, "NO_UPDATE")
    assert "No Update Available" in line
    assert "1.4.0" in line
    assert not out.exists()  # as the original, the old image is gone: no stale result


def test_version_not_newer_is_refused(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
) -> None:  # fmt: skip
    publisher = publish(Script(os.urandom(100), version="1.2.0"))
    result = run_subscriber(otakit, broker, company, "--version", "1.2.0")
    assert "not newer" in one_line_error(result, "INVALID_VERSION")
    assert [s.doc.message for s in publisher.seen] == [wire.UPDATE_AVAILABILITY]


def test_corrupt_chunk_fails_and_reports_failure(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
) -> None:  # fmt: skip
    publisher = publish(Script(os.urandom(3 * 4096), corrupt=frozenset({1})))
    result = run_subscriber(otakit, broker, company)
    assert "magic" in one_line_error(result, "NOT_A_HEADER")
    assert publisher.result.wait(10)
    failure = publisher.messages(wire.FAILURE)
    assert len(failure) == 1
    assert failure[0].doc.get("Reason").startswith("NOT_A_HEADER: ")


def test_timeout_without_a_publisher(otakit: Otakit, broker: Broker, company: str) -> None:
    result = run_subscriber(otakit, broker, company, "--timeout", "0.3")
    line = one_line_error(result, "GET_JOB")
    assert f"{company}/{KIT}/publish_notify" in line


def test_missing_result_received_is_an_error(
    otakit: Otakit, broker: Broker, company: str, publish: Callable[[Script], ScriptedPublisher],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = os.urandom(5000)
    publish(Script(image, answer_result=False))
    out = tmp_path / "unacknowledged.bin"
    result = run_subscriber(otakit, broker, company, "-f", out, "--timeout", "2")
    assert "Result Received" in one_line_error(result, "SENDING_RESULT")
    assert out.read_bytes() == image  # the image itself arrived whole


def test_unreachable_broker(otakit: Otakit, broker: Broker, company: str) -> None:
    result = run_subscriber(otakit, broker, company, port=free_port())
    assert "cannot connect" in one_line_error(result, "CONNECT")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["-c", "0"], "BADARG"),
        (["-c", "65536"], "BADARG"),
        (["-c", "lots"], "BADARG"),
        (["--port", "http"], "BADARG"),
        (["--port", "70000"], "BADARG"),
        (["--timeout", "-1"], "BADARG"),
        (["--chunk-wait", "soon"], "BADARG"),
        (["ssl"], "BADARG"),
        (["--key", "client.key"], "BADARG"),
        (["-k", "CY8C/PROTO"], "BADARG"),
        (["-k", "CY8C#"], "BADARG"),
        (["-e", ""], "BADARG"),
        (["-b", "amazon"], "BADARG"),
        (["--serial", "x" * 33], "BADARG"),
        (["--version", "1.x"], "BAD_VERSION"),
        (["--cafile", "no-such-ca.pem"], "FILE"),
        (["-f", "no/such/folder/out.bin"], "FILE"),
        (["-f", "."], "FILE"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(
    otakit: Otakit, args: list[str], code: str, tmp_path: Path
) -> None:
    result = otakit("subscriber", "--port", "1", *args, cwd=tmp_path)
    one_line_error(result, code, status=2)


# --- the image file the core writes to ---------------------------------------------------------

V = FirmwareVersion(1, 2, 0)


def chunks_of(image: bytes, version: FirmwareVersion = V, size: int = 4096) -> list[bytes]:
    return list(wire.range_chunks(image, version, 0, -1, size))


def assembly_into(storage: ImageFile, version: FirmwareVersion | None = V) -> ChunkAssembly:
    """The core as the subscriber sets it up."""
    return ChunkAssembly(
        storage,
        source="mqtt://test",
        version=version,
        running=FirmwareVersion(0),
        resume=False,
        read=storage.read,
    )


def test_the_image_file_appears_only_when_whole(tmp_path: Path) -> None:
    image = os.urandom(5 * 4096 + 10)
    out = tmp_path / "image.bin"
    storage = ImageFile(out)
    a = assembly_into(storage)
    chunks = chunks_of(image)
    for i in (5, 0, 3, 3, 1, 4):
        a.chunk(chunks[i])
    assert a.missing(split=4096) == [(2 * 4096, 4096)]
    with pytest.raises(TransferError, match="not complete"):
        storage.verify()
    assert not out.exists()
    a.chunk(chunks[2])
    assert a.done
    assert storage.verify() == "1.2.0"
    storage.set_pending(permanent=True)
    assert out.read_bytes() == image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.bin"]  # no temporary file left
    storage.abort()  # after the hand-over: nothing to remove
    assert out.read_bytes() == image


def test_an_aborted_image_file_leaves_nothing(tmp_path: Path) -> None:
    storage = ImageFile(tmp_path / "image.bin")
    a = assembly_into(storage)
    a.chunk(chunks_of(os.urandom(9000))[0])
    assert len(list(tmp_path.iterdir())) == 1  # the temporary file
    storage.abort()
    assert list(tmp_path.iterdir()) == []


def test_an_image_file_without_a_path(tmp_path: Path) -> None:
    image = os.urandom(10_000)
    storage = ImageFile(None)
    a = assembly_into(storage)
    for offset, size in ((0, 3000), (2000, 3000), (9000, -1), (4000, 6000)):  # overlapping
        for payload in wire.range_chunks(image, V, offset, size):
            a.chunk(payload)
    assert a.done
    assert storage.read(0, 10_000) == image
    storage.set_pending(permanent=True)


def test_a_chunk_changing_bytes_received_before_is_refused(tmp_path: Path) -> None:
    image = os.urandom(3 * 4096)
    a = assembly_into(ImageFile(tmp_path / "image.bin"))
    chunks = chunks_of(image)
    a.chunk(chunks[0])
    tampered = bytearray(chunks[0])
    tampered[-1] ^= 1
    with pytest.raises(TransferError, match="changes bytes"):
        a.chunk(bytes(tampered))


def test_chunks_that_disagree_are_refused(tmp_path: Path) -> None:
    image = os.urandom(3 * 4096)
    a = assembly_into(ImageFile(None), version=None)
    a.chunk(chunks_of(image)[0])
    with pytest.raises(ChunkHeaderError, match="earlier chunks said"):
        a.chunk(chunks_of(image + b"x")[1])
    with pytest.raises(ChunkHeaderError, match=r"version 1\.2\.1"):
        a.chunk(chunks_of(image, FirmwareVersion(1, 2, 1))[1])
    with pytest.raises(InvalidVersionError, match=r"the job says 1\.3\.0"):
        assembly_into(ImageFile(None), version=FirmwareVersion(1, 3)).chunk(chunks_of(image)[0])


def test_the_image_file_has_a_size_limit() -> None:
    a = assembly_into(ImageFile(None, max_size=99))
    with pytest.raises(ImageTooLargeError, match="limit of 99"):
        a.chunk(chunks_of(os.urandom(100))[0])


def test_verdict_line() -> None:
    line = Verdict(1048576, 0.42, 256, 0, V).line()
    assert (
        line == "OK: 1048576 bytes in 0.42 s (2.4 MiB/s), 256 chunks, 0 re-requested, version 1.2.0"
    )
    assert "(97.7 KiB/s)" in Verdict(100_000, 1.0, 25, 3, V).line()
    assert VERDICT.fullmatch(line + "\n")
