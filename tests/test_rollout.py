"""Rollouts with simulated devices: phases that advance by themselves, automatic abort, the
health gate, maintenance windows, late joiners, the CLI, and two server processes on one
PostgreSQL that never advance a phase twice.

Most tests share one server running in this process (uvicorn in a thread), so that its clock
can be moved: no test sleeps. Many devices are cheap raw check-ins and reports over HTTP; a few
are full simulated devices driven by the real agent (``otakit.sim.agent.run``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from sqlalchemy.exc import IntegrityError

from otakit.device.agent import Outcome
from otakit.errors import UsageError
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.jobdoc import NO_UPDATE_AVAILABLE, UPDATE_AVAILABLE, parse_job_document
from otakit.server.app import initialise, serving_app
from otakit.server.database import database_url
from otakit.server.models import RolloutEvent
from otakit.server.service import rollouts
from otakit.server.service.rollouts import Phase, RolloutEngine, bucket, check_phases, parse_window
from otakit.server.settings import ServerSettings
from otakit.server.tokens import Role, add_token
from otakit.sim.agent import run
from otakit.sim.device import Identity, SimDevice

from .server_harness import BIN, Server, free_port, postgres_database, start_server

KEY = SigningKey.generate("ecdsa-p256")
BOARD = "BOARD_A"
T = TypeVar("T")


def image(version: str, size: int = 20000) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


class Clock:
    """The server's clock, moved by the tests."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Live:
    """An otakit server in this process, on loopback, with an injectable clock."""

    def __init__(self, data: Path, url: str | None = None) -> None:
        settings = ServerSettings(
            data_dir=data, database_url=database_url(url, data), rollout_interval=0
        )
        first = initialise(settings)
        assert first.admin_token
        self.admin = first.admin_token
        self.asgi = serving_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.asgi, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.01)
        self.clock = Clock()
        self.engine.clock = self.clock

    @property
    def engine(self) -> RolloutEngine:
        engine: RolloutEngine = self.asgi.app.state.otakit_rollouts
        return engine

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run on the server's event loop (its database connections live there)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def tick(self) -> None:
        """One background round of the engine, now."""
        self.run(self.engine.tick())

    def mint(self, role: Role, *, product: str | None = None, group: str | None = None) -> str:
        async def create() -> str:
            async with self.asgi.app.state.otakit.sessions() as db:
                token = add_token(db, role, product=product, group=group)
                await db.commit()
                return token

        return self.run(create())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("rollout-server"))
    http = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {server.admin}"})
    assert http.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield server
    server.stop()


class Dev:
    def __init__(self, serial: str, token: str) -> None:
        self.serial = serial
        self.token = token


class Fleet:
    """One product with its own devices and one artifact (1.1.0), for one test."""

    def __init__(self, url: str, admin: str, enroll: Any, group: str = "g") -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.admin = {"authorization": f"Bearer {admin}"}
        self.product = f"p-{uuid.uuid4().hex[:8]}"
        self.group = group
        response = self.http.put(
            f"/api/v1/products/{self.product}", json={"board": BOARD}, headers=self.admin
        )
        assert response.status_code == 200, response.text
        self.enroll_token = enroll(self.product, group)
        self.artifact = self.upload(image("1.1.0"))

    def api(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = self.http.request(method, path, headers=self.admin, **kwargs)
        assert response.status_code == expect, response.text
        return response.json() if response.content else None

    def upload(self, data: bytes) -> dict[str, Any]:
        response = self.http.post(
            "/api/v1/artifacts", params={"name": "app.img"}, content=data, headers=self.admin
        )
        assert response.status_code in (200, 201), response.text
        return dict(response.json())

    def rollout(self, phases: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """A new deployment of the artifact to product/group, phased from the start."""
        body = {
            "deployment": {
                "artifact_id": self.artifact["id"],
                "product": self.product,
                "group": self.group,
            },
            "phases": phases,
            **options,
        }
        return dict(self.api("POST", "/api/v1/rollouts", 201, json=body))

    def show(self, rollout: dict[str, Any]) -> dict[str, Any]:
        return dict(self.api("GET", f"/api/v1/rollouts/{rollout['id']}"))

    def events(self, rollout: dict[str, Any]) -> list[tuple[str, int]]:
        found = self.api("GET", f"/api/v1/rollouts/{rollout['id']}/events")
        return [(e["kind"], e["phase"]) for e in found]

    def enroll(self, serial: str | None = None, version: str = "1.0.0", token: str = "") -> Dev:
        serial = serial or f"d-{uuid.uuid4().hex[:10]}"
        response = self.http.post(
            "/api/v1/device/checkin",
            json={"serial": serial, "board": BOARD, "version": version},
            headers={"authorization": f"Bearer {token or self.enroll_token}"},
        )
        assert response.status_code == 200, response.text
        return Dev(serial, response.json()["device_token"])

    def checkin(self, dev: Dev, version: str = "1.0.0", boots: int | None = None) -> Any:
        """The check-in's answer; None for 204 (nothing to do)."""
        body: dict[str, Any] = {"serial": dev.serial, "board": BOARD, "version": version}
        if boots is not None:
            body["boots"] = boots
        response = self.http.post(
            "/api/v1/device/checkin", json=body, headers={"authorization": f"Bearer {dev.token}"}
        )
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else None

    def job(self, dev: Dev) -> dict[str, Any] | None:
        answer = self.checkin(dev)
        return answer["job"] if answer else None

    def offered(self, dev: Dev) -> dict[str, Any]:
        """The job ``dev`` is offered; fails the test when there is none."""
        job = self.job(dev)
        assert job is not None, f"{dev.serial} was offered no job"
        return job

    def report(self, dev: Dev, status: str, **fields: Any) -> None:
        response = self.http.post(
            "/api/v1/device/status",
            json={"status": status, **fields},
            headers={"authorization": f"Bearer {dev.token}"},
        )
        assert response.status_code == 204, response.text

    def apply(self, dev: Dev, boots: int | None = None) -> None:
        """What an agent does: download, install, reboot into 1.1.0 and check in."""
        self.report(dev, "downloading")
        self.report(dev, "applying")
        self.checkin(dev, "1.1.0", boots=boots)


def serials(deployment_id: int, count: int, low: int, high: int) -> list[str]:
    """Serials whose bucket in the deployment is in [low, high) (phases admit by bucket)."""
    found: list[str] = []
    while len(found) < count:
        serial = f"d-{uuid.uuid4().hex[:10]}"
        if low <= bucket(deployment_id, serial) < high:
            found.append(serial)
    return found


@pytest.fixture
def fleet(live: Live) -> Fleet:
    def enroll(product: str, group: str) -> str:
        return live.mint(Role.ENROLL, product=product, group=group)

    return Fleet(live.url, live.admin, enroll)


def sim_device(tmp: Path, serial: str, product: str) -> SimDevice:
    device = SimDevice.create(
        tmp / serial,
        image("1.0.0"),
        [KEY.public_key],
        layout="psoc6-2m-swap",
        identity=Identity(board=BOARD, product=product, serial=serial),
    )
    device.boot()
    return device


def cli(live: Live, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OTAKIT_SERVER": live.url,
        "OTAKIT_TOKEN": live.admin,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [str(BIN / "otakit"), "rollout", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def scheduled(live: Live) -> str:
    """A start a minute from now: the rollout waits while the test enrolls its devices."""
    return (live.clock.now + timedelta(minutes=1)).isoformat()


def start(live: Live) -> None:
    live.clock.advance(minutes=2)
    live.tick()


# --- acceptance --------------------------------------------------------------------------------


def test_three_phases_advance_by_themselves(live: Live, fleet: Fleet, tmp_path: Path) -> None:
    rollout = fleet.rollout(
        [{"percent": p, "success": 80} for p in (10, 50, 100)], start_at=scheduled(live)
    )
    deployment = rollout["deployment_id"]
    assert rollout["state"] == "scheduled"
    first, sim_serial = serials(deployment, 4, 0, 1000)[:3], serials(deployment, 1, 0, 1000)[0]
    phase1 = [fleet.enroll(s) for s in first]
    phase2 = [fleet.enroll(s) for s in serials(deployment, 10, 1000, 5000)]
    phase3 = [fleet.enroll(s) for s in serials(deployment, 17, 5000, 10000)]
    assert fleet.job(phase1[0]) is None  # not started yet

    start(live)
    shown = fleet.show(rollout)
    assert (shown["state"], shown["phase"]) == ("running", 1)
    assert [p["targeted"] for p in shown["phases"]] == [3, 10, 17]  # the sim device enrolls later
    assert fleet.job(phase2[0]) is None  # its phase is not open
    assert fleet.job(phase3[0]) is None

    # a real device through the agent: job document, ranged download, reboot, confirm
    device = sim_device(tmp_path, sim_serial, fleet.product)
    report = run(device.dir, fleet.http.base_url.__str__(), token=fleet.enroll_token)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert report.running == "1.1.0+0"
    for dev in phase1[:2]:
        assert fleet.offered(dev)["version"] == "1.1.0"
        fleet.apply(dev)
    assert fleet.show(rollout)["phase"] == 1  # 3 of 4 is 75% < 80%
    fleet.apply(phase1[2])
    shown = fleet.show(rollout)  # advanced on the report that made it 100%, no tick needed
    assert (shown["state"], shown["phase"]) == ("running", 2)
    assert shown["phases"][0]["counts"]["Applied"] == 4

    assert fleet.offered(phase2[0])["version"] == "1.1.0"
    assert fleet.job(phase3[0]) is None
    for dev in phase2[:8]:
        fleet.apply(dev)
    assert fleet.show(rollout)["phase"] == 3
    for dev in phase3[:13]:
        fleet.apply(dev)
    assert fleet.show(rollout)["state"] == "running"  # 13 of 17 is 76%
    fleet.apply(phase3[13])
    shown = fleet.show(rollout)
    assert shown["state"] == "completed"
    assert [p["counts"]["Applied"] for p in shown["phases"]] == [4, 8, 14]
    assert [p["status"] for p in shown["phases"]] == ["done"] * 3
    assert shown["counts"]["Applied"] == 26
    assert fleet.events(rollout) == [
        ("created", 1),
        ("started", 1),
        ("advanced", 1),
        ("advanced", 2),
        ("completed", 3),
    ]
    assert fleet.offered(phase3[16])["version"] == "1.1.0"  # completed: everyone left gets it

    shown_cli = cli(live, "show", str(rollout["id"]), "--events")
    assert shown_cli.returncode == 0, shown_cli.stderr
    assert f"rollout {rollout['id']}: completed" in shown_cli.stdout
    assert "Reverted" in shown_cli.stdout
    assert "advanced" in shown_cli.stdout


def test_failures_past_the_threshold_abort(live: Live, fleet: Fleet) -> None:
    rollout = fleet.rollout(
        [{"percent": 10, "max_errors_percent": 20, "on_error": "abort"}, {"percent": 100}],
        start_at=scheduled(live),
    )
    deployment = rollout["deployment_id"]
    phase1 = [fleet.enroll(s) for s in serials(deployment, 5, 0, 1000)]
    later = [fleet.enroll(s) for s in serials(deployment, 30, 1000, 10000)]
    start(live)

    downloading = phase1[4]
    assert fleet.job(downloading) is not None
    fleet.report(downloading, "downloading")
    fleet.report(phase1[0], "error", error="SHA256 verify fail")
    assert fleet.show(rollout)["state"] == "running"  # 1 of 5 is 20%: allowed
    fleet.report(phase1[1], "interrupted", error="Network Timeout")
    fleet.report(phase1[2], "error", error="MCU Download fail")
    shown = fleet.show(rollout)  # 2 of 5: aborted at once, by the report
    assert shown["state"] == "aborted"
    assert "phase 1: 2 of 5 devices failed" in shown["reason"]
    assert shown["phases"][0]["counts"]["Error"] == 2
    assert shown["phases"][0]["counts"]["Interrupted"] == 1
    deployment_out = fleet.api("GET", f"/api/v1/deployments/{deployment}")
    assert not deployment_out["active"]
    assert deployment_out["rollout_id"] == rollout["id"]

    # the device that was downloading is told to stop, once
    answer = fleet.checkin(downloading)
    assert answer["job"] is None
    assert answer["abort"]["deployment_id"] == deployment
    assert "failed" in answer["abort"]["reason"]
    assert fleet.checkin(downloading) is None
    # nobody is offered the update any more, on any API
    for dev in [phase1[3], *later]:
        assert fleet.checkin(dev) is None
    auth = {"authorization": f"Bearer {phase1[3].token}"}
    doc = fleet.http.get(f"/devices/{phase1[3].serial}/ota_update.json", headers=auth)
    assert parse_job_document(doc.content).message == NO_UPDATE_AVAILABLE
    artifact = fleet.artifact
    file = fleet.http.get(
        f"/devices/{phase1[3].serial}/files/{artifact['id']}/{artifact['name']}", headers=auth
    )
    assert file.status_code == 403

    resumed = fleet.http.post(f"/api/v1/rollouts/{rollout['id']}/resume", headers=fleet.admin)
    assert resumed.status_code == 409
    refused = cli(live, "resume", str(rollout["id"]))
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1
    assert "aborted and cannot be resumed" in refused.stderr


def test_health_gate_reverts_timeouts_and_boot_loops(
    live: Live, fleet: Fleet, tmp_path: Path
) -> None:
    rollout = fleet.rollout(
        [{"percent": 20, "success": 100, "max_errors": 1}, {"percent": 100}],
        start_at=scheduled(live),
        confirm_timeout=3600,
        max_boots=3,
    )
    deployment = rollout["deployment_id"]
    sim_serial, *raw = serials(deployment, 6, 0, 2000)
    a, b, c, d, e = (fleet.enroll(s) for s in raw)
    start(live)

    # a real device that does not confirm: the bootloader reverts, the agent reports it
    device = sim_device(tmp_path, sim_serial, fleet.product)
    url = str(fleet.http.base_url)
    first = run(device.dir, url, token=fleet.enroll_token, confirm=False)
    assert first.result.outcome is Outcome.UPDATED
    assert device.boot().to_dict()["images"][0]["action"] == "revert"
    again = run(device.dir, url)  # reports the revert; not offered that version again
    assert again.result.outcome is Outcome.NO_UPDATE
    shown = fleet.show(rollout)
    assert shown["phases"][0]["counts"]["Reverted"] == 1
    assert shown["state"] == "running"  # 1 failure allowed

    # a device that checks in with its old version after running the new one reverted too
    fleet.apply(a)
    fleet.checkin(a, "1.0.0")
    shown = fleet.show(rollout)
    assert shown["state"] == "paused"
    assert shown["reason"] == "phase 1: 2 of 6 devices failed"
    assert shown["phases"][0]["counts"]["Reverted"] == 2
    assert fleet.job(e) is None  # paused: no new offers
    history = fleet.api("GET", f"/api/v1/devices/{a.serial}/history")
    assert [(h["status"], h["source"]) for h in history[:2]] == [
        ("reverted", "checkin"),
        ("applied", "checkin"),
    ]
    assert history[0]["error"] == "reverted to 1.0.0"

    resumed = fleet.api("POST", f"/api/v1/rollouts/{rollout['id']}/resume")
    assert resumed["state"] == "running"  # the two failures are acknowledged
    assert resumed["phases"][0]["acknowledged"] == 2
    assert fleet.job(a) is None  # it reverted this deployment: never again
    assert fleet.job(e) is not None

    # installed, but never runs the new version within the confirm timeout
    fleet.report(b, "downloading")
    fleet.report(b, "applying")
    live.clock.advance(minutes=61)
    live.tick()
    assert fleet.api("GET", f"/api/v1/devices/{b.serial}/history")[0] == {
        **fleet.api("GET", f"/api/v1/devices/{b.serial}/history")[0],
        "status": "error",
        "error": "not confirmed in time",
        "source": "server",
    }
    shown = fleet.show(rollout)
    assert shown["state"] == "running"  # 3 failures, 2 acknowledged: 1 allowed
    assert shown["phases"][0]["failed"] == 3

    # boots: 10 when it first ran the new version, 14 soon after: a boot loop
    fleet.apply(c, boots=10)
    fleet.checkin(c, "1.1.0", boots=12)
    assert fleet.show(rollout)["state"] == "running"
    fleet.checkin(c, "1.1.0", boots=14)
    shown = fleet.show(rollout)
    assert shown["state"] == "paused"
    assert shown["phases"][0]["counts"] == {
        "Downloading": 0,
        "Interrupted": 0,
        "Applying": 0,
        "Applied": 0,
        "Error": 2,
        "Reverted": 2,
        "Unknown": 0,
    }
    assert (
        fleet.api("GET", f"/api/v1/devices/{c.serial}/history")[0]["error"] == "boot loop: 4 boots"
    )
    deployment_out = fleet.api("GET", f"/api/v1/deployments/{deployment}")
    assert (deployment_out["counts"]["Error"], deployment_out["counts"]["Reverted"]) == (2, 2)
    del d


def test_maintenance_window_is_respected(live: Live, fleet: Fleet) -> None:
    devices = [fleet.enroll() for _ in range(3)]
    berlin = ZoneInfo("Europe/Berlin")
    today = live.clock.now.astimezone(berlin).date()
    monday = today + timedelta(days=(7 - today.weekday()) % 7 or 7)
    saturday = monday - timedelta(days=2)
    window = "mon-fri 02:00-05:00 Europe/Berlin"
    rollout = fleet.rollout([{"percent": 100}], window=window)

    def at(day: Any, hour: int, minute: int = 0) -> None:
        live.clock.now = datetime(day.year, day.month, day.day, hour, minute, tzinfo=berlin)

    at(saturday, 3)
    shown = fleet.show(rollout)
    assert not shown["window_open"]
    opening = datetime(monday.year, monday.month, monday.day, 2, tzinfo=berlin)
    assert datetime.fromisoformat(shown["next_window"]) == opening
    assert fleet.job(devices[0]) is None
    at(monday, 1, 59)
    assert fleet.job(devices[0]) is None
    at(monday, 2)
    assert fleet.show(rollout)["window_open"]
    assert fleet.offered(devices[0])["version"] == "1.1.0"
    fleet.report(devices[0], "downloading")
    at(monday, 5)
    assert fleet.job(devices[1]) is None  # closed again
    assert fleet.job(devices[0]) is not None  # but a download under way may resume
    at(monday + timedelta(days=1), 4, 59)
    assert fleet.job(devices[1]) is not None
    assert parse_window("22:00-02:00").contains(datetime(2030, 1, 1, 1, tzinfo=UTC))
    live.clock.now = datetime.now(UTC)


def test_late_joiners_get_it_unless_frozen(live: Live, fleet: Fleet) -> None:
    rollout = fleet.rollout(
        [{"percent": 50, "success": 100}, {"percent": 100}], start_at=scheduled(live)
    )
    deployment = rollout["deployment_id"]
    early = [fleet.enroll(s) for s in serials(deployment, 2, 0, 5000)]
    start(live)
    joiner, outside = serials(deployment, 2, 0, 5000)
    late = fleet.enroll(joiner)  # registers after the start, in the open phase
    assert fleet.offered(late)["deployment_id"] == deployment
    other = fleet.enroll(outside, token=live.mint(Role.ENROLL, product=fleet.product, group="lab"))
    assert fleet.job(other) is None  # another group: not targeted
    fleet.api("PUT", f"/api/v1/devices/{other.serial}", json={"group": fleet.group})
    assert fleet.offered(other)["deployment_id"] == deployment  # joined the group: targeted
    assert fleet.show(rollout)["phases"][0]["targeted"] == 4
    for dev in [*early, late, other]:
        fleet.apply(dev)
    assert fleet.show(rollout)["phase"] == 2
    newest = fleet.enroll(serials(deployment, 1, 5000, 10000)[0])
    assert fleet.offered(newest)["deployment_id"] == deployment

    # a frozen rollout keeps the devices it started with
    frozen_fleet = Fleet(fleet.http.base_url.__str__(), live.admin, fleet_enroller(live))
    before = [frozen_fleet.enroll() for _ in range(3)]
    frozen = frozen_fleet.rollout([{"percent": 100}], frozen=True)
    assert frozen["state"] == "running"
    after = frozen_fleet.enroll()
    assert all(frozen_fleet.job(dev) is not None for dev in before)
    assert frozen_fleet.job(after) is None
    assert frozen_fleet.show(frozen)["targeted"] == 3


def fleet_enroller(live: Live) -> Any:
    return lambda product, group: live.mint(Role.ENROLL, product=product, group=group)


def test_a_soak_holds_the_phase_until_it_ends(live: Live, fleet: Fleet) -> None:
    rollout = fleet.rollout(
        [{"percent": 50, "success": 100}, {"percent": 100}], start_at=scheduled(live), soak=600
    )
    deployment = rollout["deployment_id"]
    first = [fleet.enroll(s) for s in serials(deployment, 2, 0, 5000)]
    start(live)
    for dev in first:
        fleet.apply(dev)
    shown = fleet.show(rollout)
    assert (shown["phase"], shown["phases"][0]["counts"]["Applied"]) == (1, 2)
    assert shown["phases"][0]["succeeded"] == 0  # applied, not soaked yet
    live.clock.advance(minutes=11)
    assert fleet.show(rollout)["phases"][0]["succeeded"] == 2  # soaked, before any round
    live.tick()  # the round counts them and advances
    shown = fleet.show(rollout)
    assert (shown["phase"], shown["phases"][0]["succeeded"]) == (2, 2)
    # a device that reverts after soaking no longer counts as succeeded
    fleet.checkin(first[0], "1.0.0")
    shown = fleet.show(rollout)
    assert (shown["phases"][0]["succeeded"], shown["phases"][0]["failed"]) == (1, 1)
    live.clock.now = datetime.now(UTC)


def test_cli_manual_approval_and_group_phases(live: Live, fleet: Fleet) -> None:
    canary = fleet.enroll(token=live.mint(Role.ENROLL, product=fleet.product, group="canary"))
    field = [fleet.enroll() for _ in range(3)]
    bad = cli(live, "create", "--artifact", fleet.artifact["id"], "--phase", "0%")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "otakit: error [BADARG]: --phase '0%': a phase needs more than 0%"
    bad = cli(live, "create", "--artifact", fleet.artifact["id"], "--product", fleet.product,
              "--phase", "10%", "--window", "someday 02:00-05:00")  # fmt: skip
    assert bad.returncode != 0
    assert "'someday' is not a day" in bad.stderr

    # a new deployment for the whole product, phased: the canary group, then everyone
    created = cli(
        live, "create", "--artifact", fleet.artifact["id"], "--product", fleet.product,
        "--phase", "group:canary,manual", "--phase", "100%,max-errors=1,on-error=abort",
        "--confirm-timeout", "30m", "--max-boots", "3",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    rollout_id = int(created.stdout.strip())
    shown = fleet.api("GET", f"/api/v1/rollouts/{rollout_id}")
    assert (shown["state"], shown["phase"], shown["awaiting_approval"]) == ("running", 1, True)
    assert shown["confirm_timeout"] == 1800
    assert [p["targeted"] for p in shown["phases"]] == [1, 3]
    assert shown["phases"][1]["on_error"] == "abort"
    assert fleet.job(canary) is not None
    assert fleet.job(field[0]) is None
    fleet.apply(canary)
    assert fleet.api("GET", f"/api/v1/rollouts/{rollout_id}")["phase"] == 1  # manual: waits

    table = cli(live, "show", str(rollout_id))
    assert "waiting for approval" in table.stdout
    assert "group canary" in table.stdout
    approved = cli(live, "approve", str(rollout_id), "--phase", "1")
    assert approved.returncode == 0, approved.stderr
    assert "phase 2 of 2" in approved.stderr
    twice = cli(live, "approve", str(rollout_id), "--phase", "1")
    assert twice.returncode != 0
    assert "is in phase 2, not 1" in twice.stderr
    assert fleet.job(field[0]) is not None

    assert cli(live, "pause", str(rollout_id), "--reason", "look").returncode == 0
    assert fleet.job(field[1]) is None
    assert cli(live, "resume", str(rollout_id)).returncode == 0
    assert fleet.job(field[1]) is not None
    listed = cli(live, "list", "--state", "running")
    assert listed.returncode == 0
    assert f"{fleet.artifact['version']}" in listed.stdout
    assert cli(live, "abort", str(rollout_id)).returncode == 0
    events = [kind for kind, _phase in fleet.events({"id": rollout_id})]
    assert events == ["created", "started", "advanced", "paused", "resumed", "aborted"]


def test_status_history_is_capped(live: Live, fleet: Fleet) -> None:
    dev = fleet.enroll()
    keep = live.engine.settings.history_per_device
    for n in range(keep + 5):
        fleet.report(dev, "downloading", boots=n)
    history = fleet.api("GET", f"/api/v1/devices/{dev.serial}/history", params={"limit": 1000})
    assert len(history) == keep
    assert history[0]["boots"] == keep + 4
    assert history[-1]["boots"] == 5
    page = fleet.api(
        "GET", f"/api/v1/devices/{dev.serial}/history", params={"before": history[9]["id"]}
    )
    assert page[0]["id"] == history[10]["id"]
    live.clock.advance(days=live.engine.settings.history_days + 1)
    live.engine._pruned = None  # the next round prunes, whenever the last one was
    live.tick()
    assert fleet.api("GET", f"/api/v1/devices/{dev.serial}/history") == []
    live.clock.now = datetime.now(UTC)


def test_original_devices_follow_the_phases(live: Live, fleet: Fleet) -> None:
    """Job documents, files and results of the original middleware go through the rollout."""
    rollout = fleet.rollout(
        [{"percent": 50, "manual": True}, {"percent": 100}],
        start_at=scheduled(live),
        confirm_timeout=0,  # these devices never say which version they run
    )
    deployment = rollout["deployment_id"]
    inside = fleet.enroll(serials(deployment, 1, 0, 5000)[0])
    outside = fleet.enroll(serials(deployment, 1, 5000, 10000)[0])
    start(live)

    def get(dev: Dev, path: str) -> httpx.Response:
        auth = {"authorization": f"Bearer {dev.token}", "user-agent": "ota-http-client"}
        return fleet.http.get(path, headers=auth)

    assert get(outside, f"/devices/{outside.serial}/ota_update.json").json()["Message"] == (
        NO_UPDATE_AVAILABLE
    )
    doc = parse_job_document(get(inside, f"/devices/{inside.serial}/ota_update.json").content)
    assert doc.message == UPDATE_AVAILABLE
    assert get(inside, doc.file).status_code == 200
    artifact = fleet.artifact
    refused = get(outside, f"/devices/{outside.serial}/files/{artifact['id']}/{artifact['name']}")
    assert refused.status_code == 403
    auth = {"authorization": f"Bearer {inside.token}"}
    assert fleet.http.post(doc.file, headers=auth).status_code == 200  # the empty result
    assert fleet.show(rollout)["phases"][0]["counts"]["Unknown"] == 1  # outcome not said
    # the operator knows it runs 1.1.0 now: that counts as applied
    fleet.api("PUT", f"/api/v1/devices/{inside.serial}", json={"version": "1.1.0"})
    phase = fleet.show(rollout)["phases"][0]
    assert (phase["counts"]["Applied"], phase["succeeded"]) == (1, 1)
    history = fleet.api("GET", f"/api/v1/devices/{inside.serial}/history")
    assert [(h["status"], h["source"]) for h in history] == [
        ("applied", "admin"),
        ("unknown", "device"),
    ]


def test_a_transition_applies_once_even_from_a_stale_view(live: Live, fleet: Fleet) -> None:
    """What keeps processes from advancing twice, without the row lock (SQLite has none):
    the compare-and-set on the revision, and the unique event of each phase's advance."""
    rollout = fleet.rollout([{"percent": 50, "manual": True}, {"percent": 100}])
    engine = live.engine

    async def approve_from_two_sessions() -> tuple[bool, bool]:
        async with engine.sessions() as a, engine.sessions() as b:
            now = engine.now()
            first = await rollouts._load(a, rollout["id"], lock=False)
            second = await rollouts._load(b, rollout["id"], lock=False)
            assert first is not None
            assert second is not None
            stats = await rollouts.tally(a, first, now)
            step = rollouts.operator_step(first, "approve", stats, now)
            assert step is not None
            return (
                await engine._apply(a, first, step, "test", now),
                await engine._apply(b, second, step, "test", now),
            )

    assert live.run(approve_from_two_sessions()) == (True, False)
    assert fleet.show(rollout)["phase"] == 2

    async def record_twice() -> None:
        async with engine.sessions() as db:
            db.add(RolloutEvent(rollout_id=rollout["id"], kind="advanced", phase=1, actor="x"))
            with pytest.raises(IntegrityError):
                await db.commit()

    live.run(record_twice())
    assert fleet.events(rollout).count(("advanced", 1)) == 1


def test_windows_and_phases_are_checked() -> None:
    window = parse_window("mon-fri 02:00-05:00; sat,sun 22:00-24:00 Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    assert window.contains(datetime(2030, 1, 7, 2, 0, tzinfo=berlin))  # a Monday
    assert not window.contains(datetime(2030, 1, 7, 5, 0, tzinfo=berlin))
    assert window.contains(datetime(2030, 1, 12, 23, 59, tzinfo=berlin))  # Saturday night
    assert not window.contains(datetime(2030, 1, 13, 0, 30, tzinfo=berlin))
    overnight = parse_window("fri 22:00-02:00")  # UTC, into Saturday
    assert overnight.contains(datetime(2030, 1, 12, 1, 59, tzinfo=UTC))
    assert not overnight.contains(datetime(2030, 1, 13, 1, 0, tzinfo=UTC))
    assert overnight.next_opening(datetime(2030, 1, 12, 3, tzinfo=UTC)) == datetime(
        2030, 1, 18, 22, tzinfo=UTC
    )
    for bad, message in [
        ("", "has no time range"),
        ("mon-fri", "is not a time range"),
        ("02:00-05:00 Mars/Olympus", "unknown time zone"),
        ("mon-fry 02:00-05:00", "is not a day"),
        ("25:00-26:00", "is not a time of day"),
        ("02:00-02:00", "is empty"),
        ("mon tue 02:00-03:00", "spans joined by ';'"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_window(bad)
    for phases, message in [
        ([], "at least one phase"),
        ([Phase(percent=50), Phase(percent=10)], "must grow"),
        ([Phase(group="a"), Phase(group="a")], "repeated"),
        ([Phase()], "either a percentage or a group"),
        ([Phase(percent=10, on_error="explode")], "on_error"),
    ]:
        with pytest.raises(UsageError, match=message):
            check_phases(phases)
    # a device keeps its place in a deployment, and places spread evenly
    places = [bucket(7, f"dev-{n}") for n in range(4000)]
    assert places[:50] == [bucket(7, f"dev-{n}") for n in range(50)]
    assert 0.08 < sum(p < 1000 for p in places) / len(places) < 0.12


# --- several processes -------------------------------------------------------------------------


def test_two_processes_on_postgresql_never_advance_a_phase_twice(tmp_path: Path) -> None:
    with postgres_database() as url:
        one = start_server(tmp_path / "one", database_url=url)
        try:
            two = start_server(tmp_path / "two", database_url=url)
        except BaseException:
            one.stop()
            raise
        try:
            _race(one, two)
        finally:
            one.stop()
            two.stop()


def _race(one: Server, two: Server) -> None:
    admin = one.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    assert admin.put("/api/v1/products/race", json={"board": BOARD}).status_code == 200
    artifact = admin.post(
        "/api/v1/artifacts", params={"name": "app.img", "product": "race"}, content=image("1.1.0")
    ).json()
    enroll = one.token("enroll", "--product", "race", "--group", "g")
    clients = (one.client(), two.client())  # shared by the threads, one per server

    def post(n: int, path: str, token: str, body: dict[str, Any]) -> httpx.Response:
        auth = {"authorization": f"Bearer {token}"}
        return clients[n % 2].post(path, json=body, headers=auth)

    def enroll_device(n: int) -> Dev:
        serial = f"race-{n:03d}"
        answer = post(n, "/api/v1/device/checkin", enroll, {"serial": serial, "board": BOARD})
        assert answer.status_code == 200, answer.text
        return Dev(serial, answer.json()["device_token"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        devices = list(pool.map(enroll_device, range(80)))
    # phase 1 needs half its devices applied; the others pass as soon as they hold a device
    phases = [{"percent": p, "success": 50 if p == 10 else 0} for p in range(10, 101, 10)]
    body = {
        "deployment": {"artifact_id": artifact["id"], "product": "race", "group": "g"},
        "phases": phases,
    }
    response = admin.post("/api/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    rollout = response.json()
    rollout_id = rollout["id"]
    admin.post(f"/api/v1/rollouts/{rollout_id}/pause")

    def report(n: int) -> int:
        dev = devices[n % len(devices)]
        body = {"status": "applied", "version": "1.1.0", "deployment_id": rollout["deployment_id"]}
        return post(n, "/api/v1/device/status", dev.token, body).status_code

    # every device reports applied while paused in phase 1: only phase 1's devices were
    # offered the update, so only their reports count; the others are refused
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        first = list(pool.map(report, range(len(devices))))
    assert set(first) == {204, 403}
    paused = admin.get(f"/api/v1/rollouts/{rollout_id}").json()
    assert paused["state"] == "paused"
    assert paused["counts"]["Applied"] == first.count(204)
    assert paused["phases"][0]["targeted"] == first.count(204)

    # resume on one server while reports pour into both: every report evaluates the rollout,
    # in two processes at once, and all ten phases are due
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        statuses = pool.map(report, range(160))
        resumed = two.client(one.admin).post(f"/api/v1/rollouts/{rollout_id}/resume")
        assert resumed.status_code == 200, resumed.text
        assert set(statuses) <= {204, 403}
    deadline = time.monotonic() + 30
    while (shown := admin.get(f"/api/v1/rollouts/{rollout_id}").json())["state"] != "completed":
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    events = admin.get(f"/api/v1/rollouts/{rollout_id}/events").json()
    transitions = [(e["kind"], e["phase"]) for e in events if e["kind"] != "created"]
    assert transitions.count(("started", 1)) == 1
    advanced = sorted(p for kind, p in transitions if kind == "advanced")
    assert advanced == list(range(1, 10)), transitions
    assert transitions.count(("completed", 10)) == 1
    assert [p["status"] for p in shown["phases"]] == ["done"] * 10
    assert sum(p["targeted"] for p in shown["phases"]) == 80
    # once completed, the update is offered to every device, so every report counts
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(report, range(len(devices)))) == {204}
    assert admin.get(f"/api/v1/rollouts/{rollout_id}").json()["counts"]["Applied"] == 80
    # both servers agree
    assert (
        two.client(one.admin).get(f"/api/v1/rollouts/{rollout_id}").json()["state"] == "completed"
    )
