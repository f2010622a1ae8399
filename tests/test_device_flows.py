"""Device flows through the service layer (issue 16): the cost of an idle check-in, offers that
follow changes made through another server, and enrollment that survives a lost answer and a
race between two servers. Every server here is a real ``otakit serve`` process; statements are
counted in the server process itself (tests/sql_trace/sitecustomize.py hooks its SQLAlchemy
engines)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from otakit.server.database import create_engine, database_url
from otakit.server.models import Device, utcnow

from .mqtt_harness import Broker
from .server_harness import Server, postgres_database, start_server
from .test_mqtt_results import OriginalDevice, _deploy, _product, _register
from .test_publisher import broker, command, fresh_company, server  # noqa: F401 - fixtures
from .test_server import KEY, image

TRACE = Path(__file__).parent / "sql_trace"
IDLE_QUERY = "SELECT t.secret_hash"  # api/idle.py's one statement
# no background work (rollout evaluation, delta making) between the requests counted
QUIET = ("--rollout-interval", "0", "--delta-workers", "0")


def traced_env(log: Path) -> dict[str, str]:
    """Environment for a server whose SQL statements go to ``log``."""
    path = os.pathsep.join(p for p in (str(TRACE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OTAKIT_SQL_LOG": str(log)}


@dataclass
class Setup:
    admin: httpx.Client
    product: str
    group: str = "group-1"

    def upload(self, version: str) -> str:
        response = self.admin.post(
            "/api/v1/artifacts",
            params={"name": "app.img"},
            content=image(version),
            headers={"content-type": "application/octet-stream"},
        )
        assert response.status_code in (200, 201), response.text
        return str(response.json()["id"])

    def deploy(self, artifact_id: str, **body: object) -> int:
        body = {"artifact_id": artifact_id, "product": self.product, "group": self.group, **body}
        response = self.admin.post("/api/v1/deployments", json=body)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def device(self, srv: Server, version: str) -> tuple[str, str]:
        serial = f"dev-{uuid.uuid4().hex[:8]}"
        body = {"product": self.product, "group": self.group, "version": version, "board": "B1"}
        response = self.admin.put(f"/api/v1/devices/{serial}", json=body)
        assert response.status_code == 200, response.text
        return serial, srv.token("device", "--device", serial)


def setup(srv: Server, admin_token: str | None = None) -> Setup:
    admin = srv.client(admin_token or srv.admin)
    response = admin.post(
        "/api/v1/keys",
        content=KEY.public_key.pem(),
        headers={"content-type": "application/x-pem-file"},
    )
    assert response.status_code in (201, 409), response.text
    product = f"prod-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": "B1"}).status_code == 200
    return Setup(admin, product)


@pytest.fixture(params=["sqlite", "postgres"])
def traced(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    log = tmp_path / "sql.log"
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgres" else None
        srv = start_server(tmp_path / "data", database_url=url, env=traced_env(log), extra=QUIET)
        stack.callback(srv.stop)
        yield srv, log


def statements(log: Path) -> list[str]:
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def test_idle_checkin_costs_one_statement(traced: tuple[Server, Path]) -> None:
    """A device that runs what is deployed asks again and again: each JSON check-in is one
    SELECT of the token, the device and the offers revision together, answered before the web
    framework (api/idle.py; it was five SELECTs: token, device, active deployments, the
    device's statuses, its rollout memberships, then two); the legacy job document route is
    the token lookup and one SELECT of the device with the revision; ``last_seen`` is written at
    most once a minute, on the legacy route too (it wrote every poll)."""
    srv, log = traced
    fleet = setup(srv)
    fleet.deploy(fleet.upload("1.2.0"))
    other = setup(srv)  # another product's deployment: active, for other devices
    other.deploy(other.upload("2.0.0"))
    serial, token = fleet.device(srv, "1.2.0")
    device = srv.client(token)
    checkin = {"serial": serial, "version": "1.2.0", "board": "B1"}
    job_path = f"/devices/{serial}/ota_update.json"
    assert device.post("/api/v1/device/checkin", json=checkin).status_code == 204  # warm
    assert device.get(job_path).json()["Message"] == "No Update Available"

    rounds = 20
    before = len(statements(log))
    for _ in range(rounds):
        assert device.post("/api/v1/device/checkin", json=checkin).status_code == 204
    json_api = statements(log)[before:]
    before = len(statements(log))
    for _ in range(rounds):
        assert device.get(job_path).json()["Message"] == "No Update Available"
    legacy = statements(log)[before:]

    assert 0 < len(json_api) <= rounds, "\n".join(json_api[:12])
    assert all(s.startswith(IDLE_QUERY) for s in json_api), json_api[:4]
    selects = [s for s in legacy if s.upper().startswith("SELECT")]
    writes = [s for s in legacy if s.upper().startswith(("INSERT", "UPDATE", "DELETE"))]
    assert len(selects) <= 2 * rounds, "\n".join(legacy[:12])
    assert len(writes) <= 1, writes  # last_seen, once the minute has passed
    assert any("revisions" in s for s in selects)


def test_a_poll_after_a_long_while_costs_two_statements(traced: tuple[Server, Path]) -> None:
    """A real fleet polls every few minutes or more: each such JSON check-in has its visit to
    write. That is the fast path's SELECT and one conditional UPDATE of ``last_seen``
    (api/idle.py), not the route (it was the route's six statements)."""
    srv, log = traced
    fleet = setup(srv)
    fleet.deploy(fleet.upload("1.2.0"))
    serial, token = fleet.device(srv, "1.2.0")
    device = srv.client(token)
    checkin = {"serial": serial, "version": "1.2.0", "board": "B1"}
    assert device.post("/api/v1/device/checkin", json=checkin).status_code == 204  # warm

    async def long_ago() -> None:
        engine = create_engine(database_url(srv.database_url, srv.data))
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    update(Device)
                    .where(Device.serial == serial)
                    .values(last_seen=utcnow() - timedelta(minutes=30))
                )
        finally:
            await engine.dispose()

    for _ in range(3):
        asyncio.run(long_ago())
        before = len(statements(log))
        assert device.post("/api/v1/device/checkin", json=checkin).status_code == 204
        sent = statements(log)[before:]
        assert len(sent) == 2, sent
        assert sent[0].startswith(IDLE_QUERY), sent
        assert sent[1].startswith("UPDATE devices SET last_seen"), sent
        seen = fleet.admin.get(f"/api/v1/devices/{serial}").json()["last_seen"]
        assert utcnow() - datetime.fromisoformat(seen) < timedelta(minutes=1), seen


def test_offers_follow_changes_made_through_another_server(tmp_path: Path) -> None:
    """Each server keeps the offers in memory; a deployment made, a product opened to
    anonymous devices or a deployment cancelled through one server changes what the other
    offers at its next check-in (the revision counter in the database)."""
    with postgres_database() as url:
        one = start_server(tmp_path / "one", database_url=url, extra=QUIET)
        try:
            two = start_server(tmp_path / "two", database_url=url, extra=QUIET)
            try:
                _follow(one, two)
            finally:
                two.stop()
        finally:
            one.stop()


def _follow(one: Server, two: Server) -> None:
    fleet = setup(one)
    admin_two = two.client(one.admin)
    serial, token = fleet.device(one, "1.0.0")
    checkin = {"serial": serial, "version": "1.0.0", "board": "B1"}
    anonymous_job = f"/products/{fleet.product}/ota_update.json"
    for srv in (one, two):  # both warm, nothing on offer
        assert srv.client(token).post("/api/v1/device/checkin", json=checkin).status_code == 204
        assert srv.client().get(anonymous_job).status_code == 401
    deployment = fleet.deploy(fleet.upload("1.2.0"), group=None)
    offered = two.client(token).post("/api/v1/device/checkin", json=checkin)
    assert offered.status_code == 200, offered.text
    assert offered.json()["job"]["deployment_id"] == deployment
    body = {"board": "B1", "anonymous": True}
    assert admin_two.put(f"/api/v1/products/{fleet.product}", json=body).status_code == 200
    job = one.client().get(anonymous_job)
    assert (job.status_code, job.json()["Message"]) == (200, "Update Available")
    cancelled = admin_two.post(f"/api/v1/deployments/{deployment}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert one.client(token).post("/api/v1/device/checkin", json=checkin).status_code == 204
    assert one.client().get(anonymous_job).json()["Message"] == "No Update Available"


def test_same_serial_enrolls_through_two_servers_at_once(tmp_path: Path) -> None:
    """Devices retrying their enrollment through two servers (behind one load balancer) at
    the same moment: one device each, no error, and exactly one of the two device tokens
    handed out works (the later enrollment replaced the earlier one's token)."""
    with postgres_database() as url:
        one = start_server(tmp_path / "one", database_url=url, extra=QUIET)
        try:
            two = start_server(tmp_path / "two", database_url=url, extra=QUIET)
            try:
                _race(one, two)
            finally:
                two.stop()
        finally:
            one.stop()


def _race(one: Server, two: Server) -> None:
    fleet = setup(one)
    enroll = one.token("enroll", "--product", fleet.product, "--group", fleet.group)
    serials = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    answers: dict[tuple[str, int], httpx.Response] = {}
    for serial in serials:
        barrier = threading.Barrier(2)

        def send(
            srv: Server, side: int, serial: str = serial, barrier: threading.Barrier = barrier
        ) -> None:
            with srv.client(enroll) as client:
                barrier.wait(timeout=30)
                answers[serial, side] = client.post(
                    "/api/v1/device/checkin", json={"serial": serial, "board": "B1"}
                )

        threads = [threading.Thread(target=send, args=(s, i)) for i, s in enumerate((one, two))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    for serial in serials:
        tokens = []
        for side in (0, 1):
            answer = answers[serial, side]
            assert answer.status_code == 200, answer.text
            tokens.append(answer.json()["device_token"])
        working = [
            t
            for t in tokens
            if one.client(t)
            .post("/api/v1/device/checkin", json={"serial": serial, "board": "B1"})
            .status_code
            == 204
        ]
        assert len(working) == 1, (serial, [answers[serial, s].text for s in (0, 1)])
        device = fleet.admin.get(f"/api/v1/devices/{serial}")
        assert device.status_code == 200, device.text
        assert device.json()["product"] == fleet.product


def test_mqtt_results_keep_the_history_limit(
    broker: Broker,  # noqa: F811 - the imported fixture
    server: Server,  # noqa: F811 - the imported fixture
) -> None:
    """Results through the MQTT publisher are kept like HTTP reports: the newest
    ``--history-per-device`` of the device (the publisher had no such limit of its own)."""
    admin = server.admin_client()
    product = _product(admin)
    _deploy(admin, product, "1.1.0", 20_000)
    serial = _register(admin, product)
    company = fresh_company()
    args = ("--data", server.data, "-c", company, "--port", str(broker.port), "--app-prefix")
    with command(*args, "--history-per-device", "2") as running:
        device = OriginalDevice(broker.port, company, serial)
        try:
            device.new_session()
            assert device.ask()["Message"] == "Update Available"
            for message in ("Failure", "Failure", "Success", "Failure"):
                assert device.report(message)["Message"] == "Result Received"
        finally:
            device.close()
        running.wait_for(f"recorded as error for {serial}")
    history = admin.get(f"/api/v1/devices/{serial}/history").json()
    assert [h["status"] for h in history] == ["error", "applying"]
