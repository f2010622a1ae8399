"""The MQTT chunk assembly (otakit.device.core.assembly, which the agent's MQTT transport, the
fleet simulator and ``otakit subscriber`` all run) against a hostile publisher: bounded memory
and work, whatever the chunks look like.

- Early chunks: 40,000 one-byte chunks that all arrive before the first one. Before, every
  held chunk summed the sizes of all the others (37 s of CPU): the held-chunk map here counts
  how many entries the code walks, and fails the test at once beyond a linear budget. No wall
  clock is involved.
- Tiny held chunks: with the agent's and the fleet's bounds, one-byte chunks cannot pile up
  (each counts at least 256 bytes), and what was dropped is exactly what is asked for again.
- The subscriber's reassembly, the same shape of attack: the Python lines run in the assembly
  and the subscriber are counted (``sys.settrace``), again against a linear budget.
- Messages larger than any valid chunk or job document never reach the agent's queue whole
  (a real Mosquitto, a real connection).
- An HTTP(S) job from the publisher (anyone on the broker can answer) gets no credentials
  unless it names the configured server; plain HTTP for an HTTPS server is refused.
"""

from __future__ import annotations

import json
import random
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from otakit.device.agent import Outcome
from otakit.device.core.assembly import MAX_EARLY, MIN_HELD_COST, ChunkAssembly
from otakit.device.transports.http import HttpSettings
from otakit.device.transports.mqtt import MqttSettings, _Link
from otakit.errors import BrokerError
from otakit.host.subscriber import ImageFile, image_assembly
from otakit.protocol import mqtt as wire
from otakit.protocol.jobdoc import JobDocument, update_available
from otakit.protocol.version import FirmwareVersion
from otakit.sim.agent import run

from .mqtt_harness import Broker, running_broker
from .test_agent_security import TOKEN, Servers
from .test_mqtt_transport import (
    MemoryStorage,
    Publisher,
    image,
    new_device,
    settings,
    slot_is_clean,
)

N = 40_000  # one-byte chunks
DATA = random.Random(1).randbytes(N)
WAIT = 30
# the largest MQTT message the device can use: a chunk header and 65535 data bytes
LARGEST_MESSAGE = wire.HEADER_SIZE + 0xFFFF
SOURCE = "mqtt://127.0.0.1:1883/OTAUpdate/APP_B/OTAImage"
RUNNING = FirmwareVersion(1, 0, 0)


def one_byte_chunk(index: int) -> bytes:
    header = wire.ChunkHeader(
        version=(1, 1, 0),
        total_size=N,
        offset=index,
        data_size=1,
        total_payloads=N,
        index=index,
    )
    return header.pack() + DATA[index : index + 1]


class CountingDict(dict[int, bytes]):
    """A dict that counts the entries walked over (iteration, keys, values, items) and fails
    the test as soon as that passes ``budget``."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.walked = 0

    def _walk(self) -> None:
        self.walked += len(self)
        if self.walked > self.budget:
            raise AssertionError(
                f"walked {self.walked} held-chunk entries with {len(self)} held: "
                "quadratic buffering"
            )

    def __iter__(self) -> Iterator[int]:
        self._walk()
        return super().__iter__()

    def keys(self) -> Any:
        self._walk()
        return super().keys()

    def values(self) -> Any:
        self._walk()
        return super().values()

    def items(self) -> Any:
        self._walk()
        return super().items()


def counted(early: CountingDict, **bounds: int) -> tuple[ChunkAssembly, MemoryStorage]:
    """An assembly of the job's version 1.1.0 over running 1.0.0, as the agent builds it, with
    ``bounds`` (max_early, max_early_bytes; none: the core's defaults, as the fleet) and its
    held-chunk map replaced by ``early``, which counts the walks over it."""
    storage = MemoryStorage(DATA)
    assembly = ChunkAssembly(
        storage,
        source=SOURCE,
        version=FirmwareVersion(1, 1, 0),
        running=RUNNING,
        **bounds,  # type: ignore[arg-type]
    )
    assert assembly.held_chunks == 0
    assembly._early = early  # the map the held chunks live in, empty until the first is held
    return assembly, storage


def agent_bounds(settings: MqttSettings) -> dict[str, int]:
    """The bounds MqttTransport.download gives the assembly for these settings."""
    return {
        "max_early": max(1, settings.max_buffered // MIN_HELD_COST),
        "max_early_bytes": max(1, settings.max_buffered),
    }


def test_forty_thousand_early_chunks_take_linear_work() -> None:
    """All but the first chunk arrive early and are held; the first one then writes them all.
    A running total of the held bytes, not a sum over them per chunk."""
    early = CountingDict(budget=4 * N)
    assembly, storage = counted(early, max_early=N, max_early_bytes=1 << 30)
    for index in range(1, N):
        assert assembly.chunk(one_byte_chunk(index))
        assert assembly.held == index  # read as often as a driver likes: a running total
    assert len(early) == assembly.held_chunks == N - 1
    assert assembly.held == N - 1  # the running total
    assert assembly.offset == 0
    assert assembly.missing() == [(0, 1)]
    assert not assembly.chunk(one_byte_chunk(N - 1))  # a duplicate
    assert assembly.chunk(one_byte_chunk(0))
    assert assembly.done
    assert storage.record is not None
    assert storage.record.durable == N  # committed
    assert bytes(storage.data) == DATA
    assert (assembly.held, assembly.held_chunks, len(early)) == (0, 0, 0)
    assert early.walked <= 4 * N


@pytest.mark.parametrize(
    ("bounds", "held"),
    [
        # the agent: MqttTransport.download with the default max_buffered (64 chunks of 4 KiB)
        (agent_bounds(MqttSettings(host="broker")), 64 * wire.CHUNK_SIZE // MIN_HELD_COST),
        # the bytes alone bound them: each held chunk counts at least 256 bytes
        ({"max_early": N, "max_early_bytes": 64 * wire.CHUNK_SIZE}, 1024),
        # the core's defaults (the fleet simulator)
        ({}, MAX_EARLY),
    ],
    ids=["agent", "bytes-only", "fleet"],
)
def test_tiny_held_chunks_are_bounded_in_number(bounds: dict[str, int], held: int) -> None:
    """With the default budget (64 chunks of 4 KiB), one-byte chunks do not get to fill it
    with 262,144 entries: each held chunk counts at least 256 bytes. What was dropped is what
    is asked for again, and once it comes the image is whole."""
    budget = MqttSettings(host="broker").max_buffered
    assert budget == 64 * wire.CHUNK_SIZE
    early = CountingDict(budget=4 * N)
    assembly, storage = counted(early, **bounds)
    taken = [assembly.chunk(one_byte_chunk(index)) for index in range(N - 1, 0, -1)]  # reversed
    assert 0 < assembly.held_chunks <= budget // MIN_HELD_COST
    assert assembly.held_chunks == len(early) == held
    assert taken == [True] * held + [False] * (N - 1 - held)  # the first ones held, then none
    assert assembly.held == held  # one byte each
    assert assembly.chunk(one_byte_chunk(0))
    # the last chunks (sent first) are held; what was dropped is what is asked for again
    assert assembly.offset == 1
    assert storage.data[:1] == DATA[:1]
    assert assembly.missing() == [(1, N - 1 - held)]
    assert assembly.stalled() == 1  # "Request Data Chunk" Offset=1
    [(first, size)] = assembly.missing()
    for index in range(first, first + size):  # the publisher answers the request
        assert assembly.chunk(one_byte_chunk(index))
    assert assembly.done
    assert bytes(storage.data) == DATA
    assert assembly.recovered == 1
    assert early.walked <= 4 * N


# --- the subscriber --------------------------------------------------------------------------


@contextmanager
def line_budget(budget: int, *modules: str) -> Iterator[list[int]]:
    """Count the Python lines run in ``modules``' functions; fail once past ``budget``."""
    count = [0]

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            count[0] += 1
            if count[0] > budget:
                raise AssertionError(f"more than {budget} lines run in {modules}: quadratic")
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename.endswith(modules) else None

    sys.settrace(calls)
    try:
        yield count
    finally:
        sys.settrace(None)


def test_the_subscriber_reassembles_forty_thousand_scattered_chunks_in_linear_work(
    tmp_path: Path,
) -> None:
    """Every other byte first (20,000 separate pieces, held), the missing ones listed as the
    subscriber re-requests them, then the rest in between. The assembly is the subscriber's
    own (its bounds, its image file, repeated chunks read back and compared)."""
    order = [*range(0, N, 2), *range(1, N, 2)]
    chunks = [one_byte_chunk(index) for index in order]
    output = tmp_path / "image.bin"
    storage = ImageFile(output)
    assembly = image_assembly(storage, source=SOURCE, version=None, running=RUNNING)
    early = CountingDict(budget=4 * N)  # walks over the held chunks, which run in C
    assembly._early = early
    with line_budget(60 * N, "otakit/host/subscriber.py", "otakit/device/core/assembly.py"):
        for payload in chunks[: N // 2]:
            assert assembly.chunk(payload)
        assert assembly.held_chunks == N // 2 - 1
        assert assembly.missing(split=wire.CHUNK_SIZE) == [(i, 1) for i in range(1, N, 2)]
        for payload in chunks[N // 2 :]:
            assert assembly.chunk(payload)
        assert not assembly.chunk(chunks[0])  # a duplicate, compared with the file
        assert not assembly.chunk(chunks[-1])
    assert assembly.done
    assert assembly.held_chunks == 0
    assert assembly.missing() == []
    assert early.walked <= 4 * N
    storage.verify()
    storage.set_pending(permanent=True)
    assert output.read_bytes() == DATA


# --- whole messages -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with running_broker(tmp_path_factory.mktemp("mqtt")) as running:
        yield running


@pytest.fixture
def company() -> str:
    return f"S{uuid.uuid4().hex[:10]}"


def publish(broker: Broker, messages: Iterable[tuple[str, bytes]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{uuid.uuid4().hex}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(WAIT)
    finally:
        client.disconnect()
        client.loop_stop()


def test_huge_messages_are_not_queued_whole(broker: Broker, company: str) -> None:
    """Three 4 MiB messages on a session topic (the inbox holds up to 512 messages): what is
    queued for the agent is cut just past the largest valid message."""
    topic = f"{company}/APP_B/OTAImage/1"
    link = _Link(
        settings(broker, company),
        broker.host,
        broker.port,
        client_id=f"dev-{uuid.uuid4().hex}",
        will=b"gone",
        context=None,
    )
    link.open(WAIT, BrokerError)
    try:
        link.subscribe([topic], WAIT, BrokerError)
        small = one_byte_chunk(5)
        publish(broker, [(topic, b"{" * (4 << 20))] * 3 + [(topic, small)])
        queued = [link.inbox.get(timeout=WAIT) for _ in range(4)]
    finally:
        link.close()
    assert [len(payload) for _, payload in queued] == [LARGEST_MESSAGE + 1] * 3 + [len(small)]
    assert queued[-1] == (topic, small)


def test_a_huge_job_document_over_mqtt_is_malformed(
    broker: Broker, company: str, tmp_path: Path
) -> None:
    publisher = Publisher(broker, image("1.1.0"), company)
    try:
        publisher.job = lambda request: json.dumps(
            {"Message": "Update Available", "Padding": "x" * (2 << 20)}
        ).encode()
        device = new_device(tmp_path)
        report = run(device.dir, None, mqtt=settings(broker, company))
    finally:
        publisher.close()
    assert (report.result.outcome, report.result.error) == (Outcome.FAILED, "MALFORMED_JOB_DOC")
    assert "1024" in (report.result.message or "")


# --- an HTTP(S) job from the publisher -----------------------------------------------------------


def _http_job(port: int, connection: str = "HTTP") -> Callable[[JobDocument], bytes]:
    return lambda request: update_available(
        version="1.1.0",
        board=request.get("BoardName"),
        connection=connection,
        server="127.0.0.1",
        port=port,
        file="/fw/app.bin",
    ).to_json()


@pytest.fixture
def servers() -> Iterator[Servers]:
    running = Servers()
    yield running
    running.stop()


def test_a_publisher_naming_another_host_gets_no_token(
    broker: Broker, company: str, tmp_path: Path, servers: Servers
) -> None:
    """Anyone who answers "Update Availability" can name an HTTP host: the image is fetched
    and the result posted there without the token, which only the configured server gets."""
    configured, other = servers.start(), servers.start()
    publisher = Publisher(broker, image("1.1.0"), company)
    other.files["/fw/app.bin"] = publisher.data
    publisher.job = _http_job(other.port)
    try:
        report = run(
            new_device(tmp_path).dir,
            HttpSettings(server=configured.url, token=TOKEN),
            mqtt=settings(broker, company),
            fetch_with="mqtt",
        )
    finally:
        publisher.close()
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert configured.seen
    assert set(configured.tokens()) == {f"Bearer {TOKEN}"}  # its check-ins
    assert [s.method for s in other.seen][-1] == "POST"
    assert set(other.tokens()) == {None}, "the token went to the host the publisher named"


def test_a_publisher_naming_a_plain_http_host_is_refused_for_an_https_server(
    broker: Broker, company: str, tmp_path: Path, servers: Servers
) -> None:
    tls = broker.tls  # a server certificate for 127.0.0.1 from the test CA
    configured, other = servers.start(tls), servers.start()
    publisher = Publisher(broker, image("1.1.0"), company)
    other.files["/fw/app.bin"] = publisher.data
    publisher.job = _http_job(other.port)
    device = new_device(tmp_path)
    try:
        report = run(
            device.dir,
            HttpSettings(server=configured.url, token=TOKEN, ca_file=str(tls.ca)),
            mqtt=settings(broker, company),
            fetch_with="mqtt",
        )
    finally:
        publisher.close()
    assert (report.result.outcome, report.result.error) == (Outcome.FAILED, "REDIRECT")
    assert other.seen == []
    assert slot_is_clean(device)
