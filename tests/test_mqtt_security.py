"""The MQTT device transport and the subscriber against a hostile publisher: bounded memory and
work, whatever the chunks look like.

- Early chunks: 40,000 one-byte chunks that all arrive before the first one. Before, every
  held chunk summed the sizes of all the others (37 s of CPU): the held-chunk map here counts
  how many entries the code walks, and fails the test at once beyond a linear budget. No wall
  clock is involved.
- The subscriber's reassembly, the same shape of attack: the Python lines it runs are counted
  (``sys.settrace``), again against a linear budget.
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
from otakit.device.transports.base import Job
from otakit.device.transports.http import HttpSettings
from otakit.device.transports.mqtt import MqttSettings, _Link, _Transfer
from otakit.errors import BrokerError
from otakit.host.subscriber import Reassembly
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


def transfer(early: dict[int, bytes], max_buffered: int) -> tuple[_Transfer, MemoryStorage]:
    storage = MemoryStorage(DATA)
    job = Job(url="mqtt://127.0.0.1:1883/OTAUpdate/APP_B/OTAImage", file="", version="1.1.0")
    asked: list[tuple[int, int]] = []
    held = _Transfer(
        job,
        storage,
        lambda done, total: None,
        FirmwareVersion(1, 0, 0),
        max_buffered,
        0,
        lambda offset, size: asked.append((offset, size)),
        early=early,
    )
    return held, storage


def test_forty_thousand_early_chunks_take_linear_work() -> None:
    """All but the first chunk arrive early and are held; the first one then writes them all.
    A running total of the held bytes, not a sum over them per chunk."""
    early = CountingDict(budget=4 * N)
    held, storage = transfer(early, max_buffered=1 << 30)
    for index in range(1, N):
        assert held.take(one_byte_chunk(index))
    assert len(held.early) == N - 1
    assert held.buffered == N - 1  # the running total
    assert not held.take(one_byte_chunk(N - 1))  # a duplicate
    assert held.take(one_byte_chunk(0))
    assert held.done
    assert bytes(storage.data) == DATA
    assert (held.buffered, len(held.early)) == (0, 0)
    assert early.walked <= 4 * N


def test_tiny_held_chunks_are_bounded_in_number() -> None:
    """With the default budget (64 chunks of 4 KiB), one-byte chunks do not get to fill it
    with 262,144 entries: each held chunk counts at least 256 bytes."""
    budget = MqttSettings(host="broker").max_buffered
    early = CountingDict(budget=4 * N)
    held, storage = transfer(early, max_buffered=budget)
    taken = [held.take(one_byte_chunk(index)) for index in range(N - 1, 0, -1)]  # reversed
    assert 0 < len(held.early) <= budget // 256
    assert taken.count(True) == len(held.early)
    assert held.buffered == len(held.early)
    assert held.take(one_byte_chunk(0))
    # the last chunks (sent first) are held; what was dropped is what is asked for again
    assert held.written == 1
    assert held.missing() == [(1, N - 1 - len(held.early))]
    assert storage.data[:1] == DATA[:1]


# --- the subscriber --------------------------------------------------------------------------


@contextmanager
def line_budget(budget: int, module: str) -> Iterator[list[int]]:
    """Count the Python lines run in ``module``'s functions; fail once past ``budget``."""
    count = [0]

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            count[0] += 1
            if count[0] > budget:
                raise AssertionError(f"more than {budget} lines run in {module}: quadratic")
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename.endswith(module) else None

    sys.settrace(calls)
    try:
        yield count
    finally:
        sys.settrace(None)


def subscriber_chunk(index: int) -> tuple[wire.ChunkHeader, bytes]:
    return wire.parse_chunk(one_byte_chunk(index))


def test_the_subscriber_reassembles_forty_thousand_scattered_chunks_in_linear_work() -> None:
    """Every other byte first (20,000 separate pieces), then the rest in between."""
    order = [*range(0, N, 2), *range(1, N, 2)]
    chunks = [subscriber_chunk(index) for index in order]
    reassembly = Reassembly(device_version=FirmwareVersion(1, 0, 0))
    with line_budget(60 * N, "otakit/host/subscriber.py"):
        for header, data in chunks:
            assert reassembly.add(header, data)
        assert not reassembly.add(*chunks[0])  # a duplicate
    assert reassembly.complete
    assert reassembly.image() == DATA
    assert reassembly.covers(0, N)


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
