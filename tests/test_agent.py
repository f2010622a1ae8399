"""The OTA agent on simulated devices, end to end against a real otakit server on loopback."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otakit.device.agent import Flow, Outcome
from otakit.device.events import Event, Reason, State
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.sim.agent import JOURNAL_FILE, run
from otakit.sim.device import Identity, SimDevice

from .server_harness import Server, start_server

KEY = SigningKey.generate("ecdsa-p256")
BOARD = "BOARD_A"


def image(version: str, size: int = 40000, key: SigningKey = KEY) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, key, SignOptions(ImageVersion.parse(version), pad_header=True))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("agent-server"))
    admin = srv.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield srv
    srv.stop()


class Setup:
    def __init__(self, server: Server, tmp: Path) -> None:
        self.server = server
        self.admin = server.admin_client()
        self.product = f"p-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp
        self.admin.put(f"/api/v1/products/{self.product}", json={"board": BOARD})
        self.enroll = server.token("enroll", "--product", self.product, "--group", "g")

    def deploy(self, data: bytes, **extra: object) -> dict[str, Any]:
        artifact = self.admin.post(
            "/api/v1/artifacts", params={"name": "app.img"}, content=data
        ).json()
        body = {"artifact_id": artifact["id"], "product": self.product, "group": "g", **extra}
        response = self.admin.post("/api/v1/deployments", json=body)
        assert response.status_code == 201, response.text
        deployment: dict[str, Any] = response.json()
        return deployment

    def device(self, version: str = "1.0.0", *, board: str = BOARD) -> SimDevice:
        serial = f"S-{uuid.uuid4().hex[:8]}"
        device = SimDevice.create(
            self.tmp / serial,
            image(version),
            [KEY.public_key],
            layout="psoc6-2m-swap",
            identity=Identity(board=board, product=self.product, serial=serial),
        )
        device.boot()
        return device


@pytest.fixture
def setup(server: Server, tmp_path: Path) -> Setup:
    return Setup(server, tmp_path)


def test_job_flow_update_reboot_confirm(setup: Setup) -> None:
    deployment = setup.deploy(image("1.1.0"))
    device = setup.device()
    events: list[Event] = []
    report = run(device.dir, setup.server.url, token=setup.enroll, callback=events.append)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"
    assert report.confirmed
    assert (report.boot or {})["images"][0]["action"] == "upgrade-test"
    states = [e.state for e in events if e.reason is Reason.STATE_CHANGE]
    for expected in (
        State.START_UPDATE,
        State.JOB_PARSE,
        State.STORAGE_OPEN,
        State.STORAGE_WRITE,
        State.VERIFY,
    ):
        assert expected in states
    percentages = [e.percentage for e in events if e.state is State.STORAGE_WRITE]
    assert percentages[-1] == 100
    assert not (device.dir / JOURNAL_FILE).exists()
    counts = setup.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    assert counts["Applied"] == 1
    again = run(device.dir, setup.server.url)  # the device kept its own token
    assert again.result.outcome is Outcome.NO_UPDATE


def test_direct_flow(setup: Setup) -> None:
    setup.admin.put(f"/api/v1/products/{setup.product}", json={"board": BOARD, "anonymous": True})
    try:
        setup.deploy(image("1.2.0"), priority=2_000_000)
        device = setup.device()
        report = run(device.dir, setup.server.url, flow=Flow.DIRECT)
        assert report.result.outcome is Outcome.UPDATED, report.result
        assert report.running == "1.2.0+0"
    finally:
        setup.admin.put(
            f"/api/v1/products/{setup.product}", json={"board": BOARD, "anonymous": False}
        )


def test_unconfirmed_update_reverts_and_is_reported(setup: Setup) -> None:
    setup.deploy(image("1.3.0"))
    device = setup.device()
    report = run(device.dir, setup.server.url, token=setup.enroll, confirm=False)
    assert report.result.outcome is Outcome.UPDATED
    assert not report.confirmed
    reverted = device.boot().to_dict()
    assert reverted["images"][0]["action"] == "revert"
    run(device.dir, setup.server.url)  # the next run tells the server
    serial = device.state.identity.serial
    status = setup.admin.get(f"/api/v1/devices/{serial}").json()
    assert status["status"] == "error"
    assert "reverted" in status["error"]


def test_older_job_is_refused_reported_and_leaves_the_slot_clean(setup: Setup) -> None:
    """A downgrade deployment reaches the device; the agent refuses it (versions never go back)."""
    deployment = setup.deploy(image("0.9.0"), downgrade=True)
    device = setup.device()
    report = run(device.dir, setup.server.url, token=setup.enroll)
    assert report.result.outcome is Outcome.FAILED
    assert report.result.error == "INVALID_VERSION"
    with device.bootloader() as boot:
        assert boot.secondary().read_at(0, 64) == bytes([boot.flash.erased_value]) * 64
    assert report.running == "1.0.0"
    counts = setup.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    assert counts["Error"] == 1


def test_power_cut_during_download_resumes(setup: Setup) -> None:
    data = image("1.5.0", 120_000)
    setup.deploy(data)
    device = setup.device()
    # opening erases the slot (one operation per sector); then one write per 4 KiB range
    erase = device.map.secondary(0).size // device.map.sector_size
    cut = run(device.dir, setup.server.url, token=setup.enroll, power_cut_after=erase + 10)
    assert (cut.result.outcome, cut.result.error) == (Outcome.FAILED, "POWER_CUT")
    journal = (device.dir / JOURNAL_FILE).read_text()
    assert '"durable"' in journal
    events: list[Event] = []
    done = run(device.dir, setup.server.url, callback=events.append)
    assert done.result.outcome is Outcome.UPDATED, done.result
    first = next(e for e in events if e.state is State.STORAGE_WRITE)
    assert first.bytes_done is not None
    assert first.bytes_done > 4096  # resumed, not from zero
    assert done.running == "1.5.0+0"
    assert httpx.get(f"{setup.server.url}/healthz").status_code == 200


def test_update_completes_through_a_faulty_network(setup: Setup) -> None:
    """Drops, truncations, resets and stalls between agent and server: attempts resume from the
    journal until the update is done, and the image that runs is byte-exact."""
    from .faultproxy import Fault, FaultProxy

    data = image("1.6.0", 200_000)
    setup.deploy(data)
    device = setup.device()
    target = ("127.0.0.1", int(setup.server.url.rsplit(":", 1)[1]))
    faults: dict[Fault | str, float] = {
        Fault.DROP: 0.08,
        Fault.TRUNCATE: 0.08,
        Fault.RESET: 0.05,
        Fault.STALL: 0.02,
    }
    with FaultProxy(
        target, seed=7, probabilities=faults, fault_bytes=3000, stall_seconds=0.3
    ) as proxy:
        # the agent needs few connections (one keep-alive connection carries a whole download),
        # so also force drops mid-download on the next ones: each cuts the transfer at 60 KB
        proxy.force(Fault.DROP, count=4, at=60_000)
        token: str | None = setup.enroll
        outcomes = []
        for _attempt in range(40):
            report = run(device.dir, proxy.url, token=token)
            token = None  # the device keeps its own token after enrolling
            outcomes.append(report.result.outcome)
            if report.result.outcome is Outcome.UPDATED:
                break
        assert outcomes[-1] is Outcome.UPDATED, outcomes
        injected = sum(proxy.stats.faults.values())
    assert injected >= 3, "too few faults fired: the test would prove little"
    assert report.running == "1.6.0+0"
    with device.bootloader() as boot:
        assert boot.primary().read_at(0, len(data)) == data
