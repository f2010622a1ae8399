"""The fleet simulator and ``otakit agent`` run the same device core: a fault injected into the
shared core shows up in both, and without it both update.

For HTTP the shared part is :class:`otakit.device.core.download.RangedDownload` (driven by the
agent's :class:`~otakit.device.transports.http.HttpTransport` through ``update_once``, and by
the fleet's asyncio loop); for MQTT it is :class:`otakit.device.core.assembly.ChunkAssembly`
(driven by the agent's :class:`~otakit.device.transports.mqtt.MqttTransport` and by the
fleet's MQTT channel). Each test wraps the core's method that receives the image bytes with a
spy that counts which driver called it and, with ``corrupt``, flips the last byte of what it
passes on. Both drivers then get an update from the same real server (and, for MQTT, the same
real ``otakit publisher`` on a real Mosquitto): with the fault neither installs anything and
both fail verification; without it both install the image byte for byte.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from otakit.device.agent import Outcome, Result, update_once
from otakit.device.bootloader import Bootloader, BootloaderConfig, Strategy
from otakit.device.core.assembly import ChunkAssembly
from otakit.device.core.download import RangedDownload
from otakit.device.core.retry import RetryPolicy
from otakit.device.storage import UpdateStorage
from otakit.device.transports.base import Transport
from otakit.device.transports.http import HttpSettings, HttpTransport
from otakit.device.transports.mqtt import MqttSettings, MqttTransport
from otakit.sim.fleet import Fleet, FleetReport, MemoryJournal, MqttBroker, fleet_flashmap

from .server_harness import Server, start_server
from .test_fleet import BOARD, KEY, Product

pytestmark = pytest.mark.integration

DEVICES = 3
RETRY = RetryPolicy(first=0.01, factor=2.0, cap=0.05, jitter=0.0, give_up_after=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("core-shared-server"))
    admin = srv.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield srv
    srv.stop()


@pytest.fixture
def product(server: Server) -> Product:
    return Product(server)


def _corrupted(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF]) if data else data


class Spy:
    """Counts the calls of a core method per driver; with ``corrupt`` it damages the bytes."""

    def __init__(self, corrupt: bool) -> None:
        self.corrupt = corrupt
        self.calls: Counter[str] = Counter()
        self.driver = "none"

    def bytes(self, data: bytes) -> bytes:
        self.calls[self.driver] += 1
        return _corrupted(data) if self.corrupt else data


@pytest.fixture(params=[False, True], ids=["clean", "corrupt"])
def spy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Spy:
    """Wraps the bytes-receiving methods of both shared cores."""
    spy = Spy(corrupt=request.param)
    body, chunk = RangedDownload.body, ChunkAssembly.chunk

    def spied_body(self: RangedDownload, data: bytes) -> bool:
        return body(self, spy.bytes(data))

    def spied_chunk(self: ChunkAssembly, payload: bytes | bytearray | memoryview) -> bool:
        return chunk(self, spy.bytes(bytes(payload)))

    monkeypatch.setattr(RangedDownload, "body", spied_body)
    monkeypatch.setattr(ChunkAssembly, "chunk", spied_chunk)
    return spy


# --- the agent's side ---------------------------------------------------------------------------


class AgentDevice:
    """A device registered on the server with its own token, flash and memory journal."""

    def __init__(self, product: Product) -> None:
        self.serial = f"A-{uuid.uuid4().hex[:8]}"
        registered = {"product": product.name, "group": "g", "board": BOARD, "version": "1.0.0"}
        response = product.admin.put(f"/api/v1/devices/{self.serial}", json=registered)
        assert response.status_code == 200, response.text
        self.token = product.server.token("device", "--device", self.serial)
        fmap = fleet_flashmap(Strategy.OVERWRITE, slot_size=128 * 1024)
        self.map = fmap
        self.boot = Bootloader(
            fmap.new_flash(),
            fmap,
            BootloaderConfig(strategy=Strategy.OVERWRITE, keys=(KEY.public_key,)),
        )
        self.storage = UpdateStorage(
            self.boot, MemoryJournal(), (KEY.public_key,), current_version="1.0.0"
        )

    def update(self, transport: Transport, **extra: Any) -> Result:
        return update_once(transport, self.storage, board=BOARD, version="1.0.0", **extra)

    def secondary(self, size: int) -> bytes:
        return self.boot.secondary().read_at(0, size)


def fleet_run(product: Product, spy: Spy, **extra: Any) -> tuple[Fleet, FleetReport]:
    fleet = Fleet(product.config(DEVICES, retry=RETRY, **extra))
    spy.driver = "fleet"
    try:
        report = asyncio.run(fleet.run())
    finally:
        spy.driver = "none"
    return fleet, report


def check_fleet(product: Product, fleet: Fleet, report: FleetReport, spy: Spy) -> None:
    data = product.images["1.1.0"]
    assert not report.timed_out, report
    if spy.corrupt:
        assert (report.updated, report.gave_up) == (0, DEVICES), report
        assert sum(report.failed.values()) == DEVICES, report
        assert report.versions == {"1.0.0": DEVICES}
    else:
        assert (report.updated, report.failed) == (DEVICES, {}), report
        for device in fleet.devices:
            assert device.flash.read(fleet.map.primary(0).offset, len(data)) == data


def check_agent(product: Product, device: AgentDevice, result: Result, spy: Spy) -> None:
    data = product.images["1.1.0"]
    if spy.corrupt:
        assert result.outcome is Outcome.FAILED, result
        assert device.storage.progress() is None  # nothing half-installed is kept
    else:
        assert (result.outcome, result.version) == (Outcome.UPDATED, "1.1.0"), result
        assert device.secondary(len(data)) == data


# --- HTTP: RangedDownload -----------------------------------------------------------------------


def test_ranged_download_core_is_the_agents_and_the_fleets(product: Product, spy: Spy) -> None:
    product.deploy("1.1.0")
    device = AgentDevice(product)
    transport = HttpTransport(
        HttpSettings(server=product.server.url, token=device.token, chunk_size=16 * 1024),
        board=BOARD,
    )
    spy.driver = "agent"
    try:
        result = device.update(transport)
    finally:
        spy.driver = "none"
        transport.close()
    fleet, report = fleet_run(product, spy, chunk_size=16 * 1024)
    # both drivers handed every range to the shared core
    assert spy.calls["agent"] >= 4, spy.calls
    assert spy.calls["fleet"] >= 4 * DEVICES, spy.calls
    check_agent(product, device, result, spy)
    check_fleet(product, fleet, report, spy)


# --- MQTT: ChunkAssembly ------------------------------------------------------------------------


def test_chunk_assembly_core_is_the_agents_and_the_fleets(product: Product, spy: Spy) -> None:
    from .test_publisher import command, fresh_company, own_broker

    product.deploy("1.1.0")
    device = AgentDevice(product)
    company = fresh_company()
    with own_broker() as broker:
        args = ("--data", product.server.data, "-c", company, "--port", str(broker.port))
        with command(*args):
            settings = MqttSettings(
                host="127.0.0.1",
                port=broker.port,
                company=company,
                connect_timeout=10,
                job_timeout=10,
                chunk_timeout=1.0,
                result_timeout=2,
            )
            transport = MqttTransport(
                settings, board=BOARD, version="1.0.0", serial=device.serial, product=product.name
            )
            spy.driver = "agent"
            try:
                result = device.update(transport, transports={"MQTT": transport})
            finally:
                spy.driver = "none"
                transport.close()
            mqtt = MqttBroker("127.0.0.1", broker.port, company=company, chunk_timeout=1.0)
            fleet, report = fleet_run(product, spy, mqtt=mqtt)
    # 60 KB images in 4 KiB chunks: every chunk went through the shared core
    assert spy.calls["agent"] >= 15, spy.calls
    assert spy.calls["fleet"] >= 15 * DEVICES, spy.calls
    check_agent(product, device, result, spy)
    check_fleet(product, fleet, report, spy)
