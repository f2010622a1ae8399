"""Delta updates over MQTT (issue 20): the publisher offers a ready delta to an otakit agent that
asks for one, sends the patch in chunks like an image, and answers every other device exactly
as before.

Real Mosquitto (tests/mqtt_harness.py), a real ``otakit serve`` (its database and blob store,
deltas made by the server's own DeltaWorker run here, so that a test decides when a delta is
ready), the real publisher (in-process, DeploymentSource) and, for the agent's side, the real
MqttTransport. Devices written from the wire facts are RawDevice (tests/test_publisher.py).
Every wait is on a message or a log line, with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import random
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from otakit.device.journal import Download, JournalRecord
from otakit.device.transports.base import DeltaJob
from otakit.device.transports.mqtt import MqttSettings, MqttTransport
from otakit.errors import MalformedJobDocError, UsageError
from otakit.image.delta import apply_delta, image_digest, read_delta_header
from otakit.image.header import ImageVersion
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.jobdoc import (
    DELTA_KEYS,
    JobDocument,
    parse_job_document,
    to_json,
    update_available,
    with_delta,
)
from otakit.server.publisher import Broker as BrokerSettings
from otakit.server.publisher import DeploymentSource, FileSource, PublisherConfig
from otakit.server.settings import ServerSettings

from .mqtt_harness import Broker
from .server_harness import Server, start_server
from .test_publisher import (
    KEY,
    KIT,
    WAIT,
    WIRE_KIT,
    InProcess,
    RawDevice,
    in_process,
    own_broker,
)

HEX = "0123456789abcdef"
CHUNK = 128  # the publisher's chunk size here: a patch of a few hundred bytes in several chunks


# --- images whose delta is small ---------------------------------------------------------------


def images(seed: int) -> tuple[bytes, bytes]:
    """A base image 1.0.0 and a new image 1.1.0 that differs in a few places."""
    rng = random.Random(seed)
    payload = bytearray(rng.randbytes(60_000))
    base = sign_image(
        bytes(payload), KEY, SignOptions(ImageVersion.parse("1.0.0"), pad_header=True)
    )
    for at in (100, 20_000, 40_000):
        payload[at : at + 16] = rng.randbytes(16)
    new = sign_image(bytes(payload), KEY, SignOptions(ImageVersion.parse("1.1.0"), pad_header=True))
    return base, new


def digest(image: bytes) -> str:
    return image_digest(image).sha256.hex()


# --- the server, its database, and deltas made on demand ---------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with own_broker() as b:
        yield b


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # no delta worker in the server: the tests make queued deltas when they want them ready
    srv = start_server(tmp_path_factory.mktemp("delta-mqtt"), extra=("--delta-workers", "0"))
    admin = srv.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield srv
    srv.stop()


def server_settings(server: Server) -> ServerSettings:
    return ServerSettings(
        data_dir=server.data, database_url=f"sqlite+aiosqlite:///{server.data / 'otakit.db'}"
    )


def rows(server: Server, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(server.data / "otakit.db") as db:
        return db.execute(sql, args).fetchall()


def make_queued_deltas(server: Server) -> int:
    """Run the server's DeltaWorker here until nothing is queued; return how many it made."""
    from otakit.server.blobs import open_blob_store
    from otakit.server.database import create_engine, sessionmaker
    from otakit.server.service.deltas import DeltaWorker

    settings = server_settings(server)

    async def run() -> int:
        engine = create_engine(settings.database_url)
        try:
            blobs = open_blob_store(settings.blob_url, settings.data_dir)
            tmp = server.data / "delta-tmp"
            tmp.mkdir(exist_ok=True)
            worker = DeltaWorker(sessionmaker(engine), blobs, tmp_dir=tmp)
            made = 0
            while await worker.step():
                made += 1
            return made
        finally:
            await engine.dispose()

    return asyncio.run(run())


@dataclass
class Fleet:
    """One product with a base and a new image artifact, deployed to its group ``g``."""

    product: str
    base: bytes
    new: bytes
    artifact: str  # the new image's artifact id
    base_artifact: str
    deployment: int

    def register(self, server: Server, serial: str, version: str = "1.0.0") -> None:
        body = {"product": self.product, "group": "g", "board": KIT, "version": version}
        assert server.admin_client().put(f"/api/v1/devices/{serial}", json=body).status_code == 200


def fleet(server: Server, seed: int) -> Fleet:
    admin = server.admin_client()
    product = f"p-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": KIT}).status_code == 200
    base, new = images(seed)
    ids = []
    for name, data in (("base.img", base), ("app.img", new)):
        answer = admin.post(
            "/api/v1/artifacts", params={"name": name, "product": product}, content=data
        )
        assert answer.status_code in (200, 201), answer.text
        ids.append(answer.json()["id"])
    body = {"artifact_id": ids[1], "product": product, "group": "g"}
    deployment = admin.post("/api/v1/deployments", json=body)
    assert deployment.status_code == 201, deployment.text
    return Fleet(product, base, new, ids[1], ids[0], deployment.json()["id"])


class LogLines(logging.Handler):
    """The publisher's log lines, to wait for one (a request that is answered by nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: queue.Queue[str] = queue.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.put(record.getMessage())

    def wait_for(self, text: str) -> str:
        while True:
            line = self.lines.get(timeout=WAIT)
            if text in line:
                return line


@contextmanager
def publisher(broker: Broker, server: Server) -> Iterator[tuple[InProcess, LogLines]]:
    lines = LogLines()
    logger = logging.getLogger("otakit.publisher")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    settings = server_settings(server)
    config = PublisherConfig(BrokerSettings(port=broker.port), boards=(KIT,), chunk_size=CHUNK)
    try:
        with in_process(config, lambda: DeploymentSource.open(settings)) as running:
            yield running, lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


def ask(device: RawDevice, image: bytes | None, accepts: str = "lzma,heatshrink") -> bytes:
    """An "Update Availability" (with the delta keys for ``image``); the raw answer."""
    extra = [] if image is None else [("ImageSHA256", digest(image)), ("Delta", accepts)]
    device.send("Update Availability", *extra)
    topic, payload = device.inbox.get(timeout=WAIT)
    assert topic == device.unique
    return payload


def old_answer(device: RawDevice, fleet: Fleet) -> bytes:
    """The answer as the publisher wrote it before deltas existed, byte for byte (the key order
    and compact form test_publisher.py's test_job_flow_byte_for_byte checks)."""
    return (
        '{"Message":"Update Available","Manufacturer":"Express Widgits Corporation",'
        '"ManufacturerId":"EWCO",'
        f'"Product":"{device.product}","SerialNumber":"{device.serial}","Version":"1.1.0",'
        f'"Board":"{WIRE_KIT}","Connection":"MQTT","Port":"",'
        f'"File":"/files/{fleet.artifact}/app.img","Broker":"",'
        f'"UniqueTopicName":"{device.unique}"}}'
    ).encode()


# --- the job document --------------------------------------------------------------------------


def test_job_document_delta_keys_only_when_set() -> None:
    doc = update_available(
        version="1.1.0", board=WIRE_KIT, connection="MQTT", file="/f", unique_topic_name="t/1"
    )
    plain = to_json(doc)
    assert plain == (
        b'{"Message":"Update Available","Version":"1.1.0","Board":"APP_CY8CPROTO_062_4343W",'
        b'"Connection":"MQTT","Port":"","File":"/f","Broker":"","UniqueTopicName":"t/1"}'
    )
    offered = with_delta(
        doc, file="/deltas/x", size=1416, sha256="a" * 64, base="b" * 64, new="c" * 64,
        compression="lzma",
    )  # fmt: skip
    data = to_json(offered)
    assert data == plain[:-1] + (
        b',"DeltaFile":"/deltas/x","DeltaSize":"1416","DeltaSHA256":"' + b"a" * 64
        + b'","DeltaBase":"' + b"b" * 64 + b'","DeltaNew":"' + b"c" * 64
        + b'","DeltaCompression":"lzma"}'
    )  # fmt: skip
    parsed = parse_job_document(data)
    assert parsed == offered
    assert parsed.has_delta
    assert parsed.get("deltasize") == "1416"
    assert not parse_job_document(plain).has_delta


@pytest.mark.parametrize(
    "change",
    [
        {"delta_size": ""},  # not all six
        {"delta_size": "0"},
        {"delta_size": "4294967296"},
        {"delta_size": "12a"},
        {"delta_sha256": "A" * 64},  # lowercase hex only
        {"delta_base": "b" * 63},
        {"delta_new": "c" * 65},
        {"delta_compression": "lz ma"},
        {"delta_compression": "x" * 17},
        {"delta_file": "/" + "d" * 255},
        {"message": "No Update Available"},  # only a job offers a delta
    ],
)
def test_job_document_refuses_a_bad_delta(change: dict[str, str]) -> None:
    good = JobDocument(
        message="Update Available", version="1.1.0", board="B", connection="MQTT",
        delta_file="/deltas/x", delta_size="1416", delta_sha256="a" * 64,
        delta_base="b" * 64, delta_new="c" * 64, delta_compression="lzma",
    )  # fmt: skip
    to_json(good)
    bad = replace(good, **change)  # type: ignore[arg-type]
    with pytest.raises(MalformedJobDocError):
        to_json(bad)
    keys = {key: bad.get(key) for key in DELTA_KEYS}
    raw = json.dumps({"Message": bad.message, "Version": "1.1.0", "Board": "B",
                      "Connection": "MQTT", **keys})  # fmt: skip
    with pytest.raises(MalformedJobDocError):
        parse_job_document(raw)


def test_a_delta_that_does_not_fit_the_1024_bytes_is_refused() -> None:
    doc = update_available(
        version="1.1.0", board="B" * 47, connection="MQTT", file="/" + "f" * 254,
        unique_topic_name="t/" + "u" * 253, manufacturer="m" * 63, product="p" * 63,
    )  # fmt: skip
    with pytest.raises(MalformedJobDocError, match="1024"):
        with_delta(
            doc, file="/deltas/" + "d" * 129, size=1, sha256="a" * 64, base="b" * 64,
            new="c" * 64, compression="lzma",
        )  # fmt: skip


# --- the publisher -----------------------------------------------------------------------------


def test_delta_offered_only_when_asked_and_ready(broker: Broker, server: Server) -> None:
    f = fleet(server, 1)
    serials = [f"D-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for serial in serials:
        f.register(server, serial)
    with publisher(broker, server) as (_running, lines):
        agent = RawDevice(broker.port, serial=serials[0], product=f.product)
        original = RawDevice(broker.port, serial=serials[1], product=f.product)
        try:
            # no delta made yet: the full image, and a delta of this known base is queued
            assert ask(agent, f.base) == old_answer(agent, f)
            queued = rows(
                server,
                "SELECT state, compression FROM artifact_deltas "
                "WHERE artifact_id = ? AND base_sha256 = ?",
                f.artifact,
                digest(f.base),
            )
            assert queued == [("queued", "lzma")]
            stored = rows(server, "SELECT image_sha256 FROM devices WHERE serial = ?", serials[0])
            assert stored == [(digest(f.base),)]
            assert make_queued_deltas(server) == 1
            (state, blob, size), *_ = rows(
                server,
                "SELECT state, blob_key, size FROM artifact_deltas WHERE artifact_id = ?",
                f.artifact,
            )
            assert state == "ready"

            # asked and ready: the same job plus the six keys
            payload = ask(agent, f.base)
            assert payload.startswith(old_answer(agent, f)[:-1] + b',"DeltaFile":')
            job = json.loads(payload)
            assert {k: job[k] for k in DELTA_KEYS} == {
                "DeltaFile": f"/deltas/{f.artifact}/{blob}",
                "DeltaSize": str(size),
                "DeltaSHA256": blob,
                "DeltaBase": digest(f.base),
                "DeltaNew": digest(f.new),
                "DeltaCompression": "lzma",
            }
            assert len(payload) <= 1024

            # its chunks: the patch, which turns the base into the new image
            agent.send(
                "Request Data Chunk", ("Filename", job["DeltaFile"]), ("Offset", "0"),
                ("Size", "-1"),
            )  # fmt: skip
            chunks = agent.chunks()
            assert {c[6] for c in chunks} == {size}  # total size = the patch's
            assert all(c[3:6] == (1, 1, 0) for c in chunks)  # the new image's version
            assert [c[7] for c in chunks] == list(range(0, size, CHUNK))
            assert len(chunks) > 1
            patch = b"".join(c[-1] for c in chunks)
            assert len(patch) == size
            assert hashlib.sha256(patch).hexdigest() == blob
            assert read_delta_header(patch).compression == "lzma"
            target = bytearray(len(f.new))

            class Target:
                def write(self, offset: int, data: bytes) -> None:
                    target[offset : offset + len(data)] = data

            apply_delta(f.base, patch, Target())
            end = image_digest(f.new).size
            assert bytes(target[:end]) == f.new[:end]

            # a part of it, as a device asks again for what it missed
            agent.send(
                "Request Data Chunk", ("Filename", job["DeltaFile"]), ("Offset", str(CHUNK)),
                ("Size", "100"),
            )  # fmt: skip
            (part,) = agent.chunks(1)
            assert (part[6], part[7], part[-1]) == (size, CHUNK, patch[CHUNK : CHUNK + 100])

            # an original device, with the delta ready: today's answer, byte for byte
            assert ask(original, None) == old_answer(original, f)
            # one key without the other, a compression the server did not make, another base:
            # the full image
            original.send("Update Availability", ("ImageSHA256", digest(f.base)))
            assert original.inbox.get(timeout=WAIT)[1] == old_answer(original, f)
            assert ask(original, f.base, accepts="heatshrink") == old_answer(original, f)
            assert ask(original, f.new) == old_answer(original, f)  # it runs the new one
            unknown = "".join(random.Random(3).choice(HEX) for _ in range(64))
            original.send("Update Availability", ("ImageSHA256", unknown), ("Delta", "lzma"))
            assert original.inbox.get(timeout=WAIT)[1] == old_answer(original, f)

            # a patch that is not this artifact's delta is not sent
            original.send(
                "Request Data Chunk", ("Filename", f"/deltas/{f.artifact}/{unknown}"),
                ("Offset", "0"), ("Size", "-1"),
            )  # fmt: skip
            lines.wait_for(f"no delta /deltas/{f.artifact}/{unknown}")
        finally:
            agent.close()
            original.close()


def test_no_delta_after_the_device_reported_a_delta_failure(broker: Broker, server: Server) -> None:
    f = fleet(server, 2)
    serial = f"E-{uuid.uuid4().hex[:8]}"
    f.register(server, serial)
    with publisher(broker, server):
        device = RawDevice(broker.port, serial=serial, product=f.product)
        try:
            ask(device, f.base)
            make_queued_deltas(server)
            assert b'"DeltaFile"' in ask(device, f.base)
            # the patch did not apply; the agent took the full image and says why
            device.send("Success", ("DeltaError", "CORRUPT"))
            assert json.loads(device.inbox.get(timeout=WAIT)[1])["Message"] == "Result Received"
            recorded = rows(
                server,
                "SELECT delta_error FROM deployment_devices "
                "WHERE deployment_id = ? AND device_serial = ?",
                f.deployment,
                serial,
            )
            assert recorded == [("CORRUPT",)]
            assert ask(device, f.base) == old_answer(device, f)  # still offered, no delta
        finally:
            device.close()


def test_file_publisher_answers_a_delta_request_as_before(broker: Broker, tmp_path: Path) -> None:
    """The original publisher's mode (one file) has no deltas: an otakit agent that asks for
    one gets exactly what an original device gets."""
    base, new = images(6)
    path = tmp_path / "app.img"
    path.write_bytes(new)
    config = PublisherConfig(BrokerSettings(port=broker.port), boards=(KIT,))
    with in_process(config, lambda: FileSource(path, board=KIT)):
        device = RawDevice(broker.port)
        try:
            plain = ask(device, None)
            assert ask(device, base) == plain
            assert json.loads(plain)["File"] == "app.img"
            assert b"Delta" not in plain
        finally:
            device.close()


# --- the agent's MQTT transport ----------------------------------------------------------------


class MemoryStorage:
    """A download target in memory (the Storage protocol)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.record: JournalRecord | None = None

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
        return "1.1.0"

    def set_pending(self, *, permanent: bool) -> None:
        self.record = None

    def abort(self) -> None:
        self.data, self.record = bytearray(), None


def test_transport_asks_fills_the_delta_and_downloads_patch_then_image(
    broker: Broker, server: Server
) -> None:
    f = fleet(server, 3)
    serial = f"T-{uuid.uuid4().hex[:8]}"
    f.register(server, serial)
    settings = MqttSettings("127.0.0.1", broker.port, job_timeout=WAIT, chunk_timeout=5)
    with publisher(broker, server):
        plain = MqttTransport(settings, board=KIT, version="1.0.0", serial=serial)
        transport = MqttTransport(
            settings, board=KIT, version="1.0.0", serial=serial,
            image_sha256=digest(f.base), delta=("lzma", "heatshrink"),
        )  # fmt: skip
        try:
            job = transport.fetch_job()
            assert job is not None
            assert job.delta is None
            make_queued_deltas(server)
            job = plain.fetch_job()  # an agent that does not ask
            assert job is not None
            assert job.delta is None
            assert job.document is not None
            assert not job.document.has_delta
            job = transport.fetch_job()
            assert job is not None
            assert job.delta is not None
            (blob, size), *_ = rows(
                server, "SELECT blob_key, size FROM artifact_deltas WHERE artifact_id = ?",
                f.artifact,
            )  # fmt: skip
            assert job.delta == DeltaJob(
                url=f"/deltas/{f.artifact}/{blob}", size=size, sha256=blob,
                base_sha256=digest(f.base), new_sha256=digest(f.new), compression="lzma",
            )  # fmt: skip
            patch_job = replace(
                job, url=job.delta.url, file=job.delta.url, sha256=job.delta.sha256, delta=None
            )
            patches = MemoryStorage()
            assert transport.download(patch_job, patches, lambda done, total: None) == size
            assert hashlib.sha256(patches.data).hexdigest() == blob
            # the fallback: the full image, in the same session, then the result
            image = MemoryStorage()
            assert transport.download(job, image, lambda done, total: None) == len(f.new)
            assert bytes(image.data) == f.new
            transport.send_result(job, success=True, error=None, message=None, delta_error="RESULT")
            recorded = rows(
                server,
                "SELECT delta_error FROM deployment_devices "
                "WHERE deployment_id = ? AND device_serial = ?",
                f.deployment,
                serial,
            )
            assert recorded == [("RESULT",)]
        finally:
            transport.close()
            plain.close()


# --- the agent end to end ----------------------------------------------------------------------

LAYOUT = "sim-small"  # 20 KiB slots


def small_images(seed: int) -> tuple[bytes, bytes]:
    """A 1.0.0 and a 1.1.0 image that fit the simulated device's slots, a few bytes apart."""
    rng = random.Random(seed)
    words = [rng.randrange(1 << 16) for _ in range(64)]
    payload = bytearray(b"".join(rng.choice(words).to_bytes(2, "little") for _ in range(6000)))
    base = sign_image(
        bytes(payload), KEY, SignOptions(ImageVersion.parse("1.0.0"), pad_header=True)
    )
    payload[4000:4064] = rng.randbytes(64)
    new = sign_image(bytes(payload), KEY, SignOptions(ImageVersion.parse("1.1.0"), pad_header=True))
    return base, new


@dataclass
class SimDevice:
    """A simulated MCUboot device (flash model) running ``image``; journal and patch in ``dir``."""

    flash: Any
    dir: Path

    @classmethod
    def make(cls, folder: Path, image: bytes) -> SimDevice:
        from otakit.device.flash import Flash
        from otakit.device.flashmap import preset

        fm = preset(LAYOUT)
        device = cls(Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align), folder)
        padded = image + b"\xff" * (-len(image) % fm.write_align)
        device.bootloader().primary().write(0, padded)
        return device

    def bootloader(self) -> Any:
        from otakit.device.bootloader import Bootloader, BootloaderConfig
        from otakit.device.flashmap import preset

        return Bootloader(self.flash, preset(LAYOUT), BootloaderConfig(keys=(KEY.public_key,)))

    def update(self, settings: MqttSettings, serial: str) -> Any:
        """One agent attempt over MQTT, with delta storage; the agent's Result."""
        from otakit.device.agent import update_once
        from otakit.device.delta_storage import DeltaStorage, delta_compressions
        from otakit.device.journal import Journal
        from otakit.device.storage import UpdateStorage

        boot = self.bootloader()
        journal = self.dir / "agent-journal.json"
        storage = UpdateStorage(boot, Journal(journal), (KEY.public_key,), current_version="1.0.0")
        delta = DeltaStorage.beside(storage, boot.primary(0), journal)
        transport = MqttTransport(
            settings, board=KIT, version="1.0.0", serial=serial,
            image_sha256=delta.running_sha256, delta=delta_compressions(),
        )  # fmt: skip
        try:
            return update_once(
                transport, storage, board=KIT, version="1.0.0",
                transports={"MQTT": transport}, delta=delta,
            )  # fmt: skip
        finally:
            transport.close()

    def runs(self, image: bytes) -> bool:
        """Boot (the bootloader installs what is pending), confirm; whether ``image`` runs."""
        boot = self.bootloader()
        boot.boot()
        boot.confirm(0)
        return image_digest(boot.primary(0)).sha256 == image_digest(image).sha256


def small_fleet(server: Server, seed: int, serial: str) -> Fleet:
    admin = server.admin_client()
    product = f"s-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": KIT}).status_code == 200
    base, new = small_images(seed)
    ids = []
    for name, data in (("base.img", base), ("app.img", new)):
        answer = admin.post(
            "/api/v1/artifacts", params={"name": name, "product": product}, content=data
        )
        assert answer.status_code in (200, 201), answer.text
        ids.append(answer.json()["id"])
    made = Fleet(product, base, new, ids[1], ids[0], 0)
    made.register(server, serial)
    body = {"artifact_id": ids[1], "product": product, "group": "g"}
    deployment = admin.post("/api/v1/deployments", json=body)
    assert deployment.status_code == 201, deployment.text
    made.deployment = deployment.json()["id"]
    return made


def test_agent_over_mqtt_applies_the_delta_and_boots_the_new_image(
    broker: Broker, server: Server, tmp_path: Path
) -> None:
    serial = f"A-{uuid.uuid4().hex[:8]}"
    f = small_fleet(server, 4, serial)
    assert make_queued_deltas(server) >= 1  # the deployment planned it from the earlier image
    ((blob, size),) = rows(
        server,
        "SELECT blob_key, size FROM artifact_deltas WHERE artifact_id = ? AND state = 'ready'",
        f.artifact,
    )
    device = SimDevice.make(tmp_path, f.base)
    settings = MqttSettings("127.0.0.1", broker.port, job_timeout=WAIT, chunk_timeout=5)
    with publisher(broker, server) as (running, lines):
        result = device.update(settings, serial)
        assert result.outcome.name == "UPDATED", result
        assert result.job.delta is not None
        assert result.job.delta.url == f"/deltas/{f.artifact}/{blob}"
        lines.wait_for(f"({size} bytes)")  # the patch was sent...
        assert running.stats.get("images", 0) == 0  # ...and never the whole image
    assert rows(
        server,
        "SELECT delta_error FROM deployment_devices WHERE deployment_id = ? AND device_serial = ?",
        f.deployment,
        serial,
    ) == [(None,)]
    assert device.runs(f.new)


def test_agent_over_mqtt_falls_back_from_a_corrupt_patch_and_says_why(
    broker: Broker, server: Server, tmp_path: Path
) -> None:
    serial = f"C-{uuid.uuid4().hex[:8]}"
    f = small_fleet(server, 5, serial)
    make_queued_deltas(server)
    ((blob,),) = rows(
        server,
        "SELECT blob_key FROM artifact_deltas WHERE artifact_id = ? AND state = 'ready'",
        f.artifact,
    )
    (path,) = [p for p in (server.data / "blobs").rglob(blob) if p.is_file()]
    spoiled = bytearray(path.read_bytes())
    spoiled[-1] ^= 0xFF  # the patch the publisher sends is no longer the one offered
    path.write_bytes(bytes(spoiled))
    device = SimDevice.make(tmp_path, f.base)
    settings = MqttSettings("127.0.0.1", broker.port, job_timeout=WAIT, chunk_timeout=5)
    with publisher(broker, server) as (running, _lines):
        result = device.update(settings, serial)
        assert result.outcome.name == "UPDATED", result
        assert running.stats["images"] == 1  # the full image, after the patch
    (recorded,) = rows(
        server,
        "SELECT delta_error FROM deployment_devices WHERE deployment_id = ? AND device_serial = ?",
        f.deployment,
        serial,
    )
    assert recorded == ("CORRUPT",)  # the reason the agent gave, kept by the publisher
    assert device.runs(f.new)


def test_transport_refuses_delta_keys_it_cannot_send() -> None:
    settings = MqttSettings("127.0.0.1", 1883)
    with pytest.raises(UsageError, match="delta keys"):
        MqttTransport(
            settings, board=KIT, version="1.0.0", image_sha256="a" * 1024, delta=("lzma",)
        )
    # neither key alone asks for anything
    for kwargs in ({"image_sha256": "a" * 64}, {"delta": ("lzma",)}):
        transport = MqttTransport(settings, board=KIT, version="1.0.0", **kwargs)
        assert transport._delta_keys == {}
