"""Rollouts at 10,000 devices: what one report, one check-in, one view and one background round
cost does not grow with the fleet.

The devices are inserted in bulk (one executemany into the server's SQLite database), then
driven over HTTP against a server in this process, whose database engine is metered: SQL
statements, rows returned and SQLite virtual-machine steps (the work SQLite did, which grows
with every row a statement reads, counted by a progress handler). No timing is measured.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy import insert as sa_insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util.concurrency import await_

from otakit.server.models import Device, RolloutEvent
from otakit.server.service.rollouts import bucket
from otakit.server.tokens import Role, add_token

from .server_harness import postgres_database
from .test_rollout import BOARD, KEY, Live, image

BIG = 10_000
SMALL = 100
STEP = 1  # SQLite VM instructions per progress-handler call
GROUP = "g"


@dataclass
class Cost:
    statements: int = 0
    rows: int = 0
    steps: int = 0
    sql: list[str] = field(default_factory=list, repr=False, compare=False)


class Meter:
    """Counts what the server's database engine does while :meth:`measure` is open."""

    def __init__(self, live: Live) -> None:
        self.engine: AsyncEngine = live.asgi.app.state.otakit.sessions.kw["bind"]
        self.cost: Cost | None = None
        self.steps = False
        sync = self.engine.sync_engine
        event.listen(sync, "after_cursor_execute", self._executed)
        event.listen(sync, "checkout", self._checkout)

    def _executed(self, _conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if self.cost is not None:
            self.cost.statements += 1
            self.cost.sql.append(" ".join(statement.split())[:150])
            self.cost.rows += len(getattr(cursor, "_rows", ()) or ())

    def _progress(self) -> int:
        if self.cost is not None:
            self.cost.steps += STEP
        return 0

    def _checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        """Count VM steps on connections taken while measuring (a handler called at every
        step slows everything else down, so it is there only then)."""
        if self.engine.dialect.name != "sqlite":
            return  # statements and rows only
        metered = self.cost is not None and self.steps
        if record.info.get("metered", False) != metered:
            handler = self._progress if metered else None
            await_(dbapi_connection._connection.set_progress_handler(handler, STEP))
            record.info["metered"] = metered

    @contextmanager
    def measure(self, *, steps: bool = True) -> Iterator[Cost]:
        """Count statements and rows (and, with ``steps``, SQLite's VM steps)."""
        self.cost, self.steps = (cost := Cost()), steps
        try:
            yield cost
        finally:
            self.cost = None


def bulk_devices(live: Live, product: str, count: int, version: str = "1.0.0") -> list[str]:
    """``count`` registered devices of ``product`` (group g), inserted in one executemany."""
    serials = [f"{product}-{n:05d}" for n in range(count)]
    tags = {"productType": product, "deviceGroup": GROUP}
    rows = [
        {"serial": s, "product": product, "board": BOARD, "tags": tags, "version": version}
        for s in serials
    ]

    async def insert() -> None:
        async with live.engine.sessions() as db:
            await db.execute(sa_insert(Device), rows)
            await db.commit()

    live.run(insert())
    return serials


class Product:
    """One product, its artifact 1.1.0 and the admin's calls."""

    def __init__(self, live: Live, http: httpx.Client, name: str) -> None:
        self.live, self.http, self.name = live, http, name
        assert http.put(f"/api/v1/products/{name}", json={"board": BOARD}).status_code == 200
        response = http.post(
            "/api/v1/artifacts", params={"name": "app.img"}, content=image("1.1.0")
        )
        assert response.status_code in (200, 201), response.text
        self.artifact = response.json()

    def rollout(self, phases: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        body = {
            "deployment": {
                "artifact_id": self.artifact["id"],
                "product": self.name,
                "group": GROUP,
            },
            "phases": phases,
            **options,
        }
        response = self.http.post("/api/v1/rollouts", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def show(self, rollout: dict[str, Any]) -> dict[str, Any]:
        response = self.http.get(f"/api/v1/rollouts/{rollout['id']}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def device(self, serial: str) -> httpx.Client:
        """A client with the device's own token."""
        return self.devices([serial])[0]

    def devices(self, serials: list[str]) -> list[httpx.Client]:
        """Clients with the devices' own tokens (minted in one transaction)."""

        async def mint() -> list[str]:
            async with self.live.engine.sessions() as db:
                tokens = [
                    add_token(db, Role.DEVICE, product=self.name, device_serial=serial)
                    for serial in serials
                ]
                await db.commit()
                return tokens

        return [
            httpx.Client(base_url=self.live.url, headers={"authorization": f"Bearer {t}"})
            for t in self.live.run(mint())
        ]


def report(device: httpx.Client, status: str, deployment_id: int, **fields: Any) -> None:
    body = {"status": status, "deployment_id": deployment_id, **fields}
    response = device.post("/api/v1/device/status", json=body)
    assert response.status_code == 204, response.text


def checkin(device: httpx.Client, serial: str, version: str = "1.0.0") -> Any:
    body = {"serial": serial, "board": BOARD, "version": version}
    response = device.post("/api/v1/device/checkin", json=body)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else None


def in_phase(deployment_id: int, serials: list[str], low: int, high: int) -> list[str]:
    return [s for s in serials if low <= bucket(deployment_id, s) < high]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("rollout-scale"))
    yield server
    server.stop()


def admin_of(live: Live) -> httpx.Client:
    http = httpx.Client(
        base_url=live.url, headers={"authorization": f"Bearer {live.admin}"}, timeout=60
    )
    assert http.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    return http


@pytest.fixture(scope="module")
def admin(live: Live) -> httpx.Client:
    return admin_of(live)


@pytest.fixture(scope="module")
def meter(live: Live) -> Meter:
    return Meter(live)


@dataclass
class Costs:
    report: Cost
    checkin: Cost
    view: Cost
    tick: Cost


def costs_of(
    live: Live, meter: Meter, product: Product, rollout: dict[str, Any], serials: list[str]
) -> Costs:
    """What one device's report, another's check-in, one view and one background round cost
    (each measured after the same kind of call once, so that caches are warm)."""
    deployment = rollout["deployment_id"]
    first, second, third, fourth = product.devices(serials[:4])
    report(first, "downloading", deployment)
    with meter.measure() as on_report:
        report(second, "downloading", deployment)
    checkin(third, serials[2])
    with meter.measure() as on_checkin:
        assert checkin(fourth, serials[3])["job"]["deployment_id"] == deployment
    product.show(rollout)
    with meter.measure() as on_view:
        product.show(rollout)
    live.tick()
    with meter.measure() as on_tick:
        live.tick()
    return Costs(on_report, on_checkin, on_view, on_tick)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, live: Live, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Live, httpx.Client, Meter]]:
    """The module's SQLite server, or a PostgreSQL one of its own."""
    if request.param == "sqlite":
        yield live, request.getfixturevalue("admin"), request.getfixturevalue("meter")
        return
    with postgres_database() as url:
        server = Live(tmp_path_factory.mktemp("rollout-scale-pg"), url)
        try:
            yield server, admin_of(server), Meter(server)
        finally:
            server.stop()


def test_a_report_costs_the_same_at_100_and_10000_devices(
    server: tuple[Live, httpx.Client, Meter],
) -> None:
    live, admin, meter = server
    sqlite = meter.engine.dialect.name == "sqlite"
    small = Product(live, admin, f"small-{uuid.uuid4().hex[:6]}")
    few = bulk_devices(live, small.name, SMALL)
    phases = [{"percent": 20, "success": 100}, {"percent": 50}, {"percent": 100}]
    slow = small.rollout(phases)
    assert slow["state"] == "running"
    assert slow["targeted"] == SMALL
    at_100 = costs_of(live, meter, small, slow, in_phase(slow["deployment_id"], few, 0, 2000))

    big = Product(live, admin, f"big-{uuid.uuid4().hex[:6]}")
    many = bulk_devices(live, big.name, BIG)
    fast = big.rollout(phases)
    shown = big.show(fast)
    assert shown["targeted"] == BIG  # every device got its row at the start, in one pass
    deployment = fast["deployment_id"]
    expected = [len(in_phase(deployment, many, low, high)) for low, high in
                ((0, 2000), (2000, 5000), (5000, 10000))]  # fmt: skip
    assert [p["targeted"] for p in shown["phases"]] == expected
    at_10000 = costs_of(live, meter, big, fast, in_phase(deployment, many, 0, 2000))

    # the same statements and rows; SQLite's own work differs only by a level of the indexes
    for kind in ("report", "checkin", "view"):
        low, high = getattr(at_100, kind), getattr(at_10000, kind)
        assert high.statements == low.statements, (kind, low, high)
        assert high.rows == low.rows, (kind, low, high)
        assert high.steps <= 1.5 * low.steps + 2 * STEP, (kind, low, high)
    # one background round: the same per live rollout (two now, one then), nothing per device
    assert at_10000.tick.statements <= 2 * at_100.tick.statements, (at_100.tick, at_10000.tick)
    assert at_10000.tick.steps <= 3 * at_100.tick.steps + 2 * STEP, (at_100.tick, at_10000.tick)
    if sqlite:  # a scan of the registry costs more than any of the above
        with meter.measure() as scan:
            live.run(_count_devices(meter.engine))
        biggest = max(at_10000.report.steps, at_10000.view.steps, at_10000.tick.steps)
        assert scan.steps > 10 * biggest, (scan, at_10000)


async def _count_devices(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.exec_driver_sql("SELECT count(*) FROM devices WHERE tags LIKE '%x%'")


def test_late_joiners_fall_into_phases_and_frozen_snapshots_hold(
    live: Live, admin: httpx.Client, meter: Meter
) -> None:
    dynamic = Product(live, admin, f"late-{uuid.uuid4().hex[:6]}")
    bulk_devices(live, dynamic.name, BIG)
    rollout = dynamic.rollout([{"percent": 1, "success": 100}, {"percent": 100}])
    deployment = rollout["deployment_id"]
    before = [p["targeted"] for p in rollout["phases"]]
    assert sum(before) == BIG
    enroll = live.mint(Role.ENROLL, product=dynamic.name, group=GROUP)
    joiners: dict[int, list[str]] = {1: [], 2: []}
    while min(len(v) for v in joiners.values()) < 2:
        serial = f"late-{uuid.uuid4().hex[:10]}"
        joiners[1 if bucket(deployment, serial) < 100 else 2].append(serial)
    client = httpx.Client(base_url=live.url, headers={"authorization": f"Bearer {enroll}"})
    tokens: dict[str, str] = {}
    for phase, serials in joiners.items():
        for serial in serials[:2]:
            answer = checkin(client, serial)  # enrolls: registered after the start
            tokens[serial] = answer["device_token"]
            assert (answer["job"] is not None) == (phase == 1), (phase, answer)
    shown = dynamic.show(rollout)
    assert [p["targeted"] for p in shown["phases"]] == [before[0] + 2, before[1] + 2]

    # phase 1 (1%: the devices of the pass and the two joiners) applies: the rollout advances
    # on the report that makes it 100%, without a background round
    first = [s for s in (f"{dynamic.name}-{n:05d}" for n in range(BIG))
             if bucket(deployment, s) < 100]  # fmt: skip
    assert len(first) == before[0]
    devices = dynamic.devices(first) + [
        httpx.Client(base_url=live.url, headers={"authorization": f"Bearer {tokens[s]}"})
        for s in joiners[1][:2]
    ]
    with meter.measure(steps=False) as applying:
        for device in devices[:-1]:
            report(device, "applied", deployment, version="1.1.0")
    # each report read a few rows (its device's, its phase's counts), none of the fleet's
    assert applying.rows <= 20 * (len(devices) - 1), applying
    assert dynamic.show(rollout)["phase"] == 1
    report(devices[-1], "applied", deployment, version="1.1.0")
    shown = dynamic.show(rollout)
    assert (shown["state"], shown["phase"]) == ("running", 2)
    assert shown["phases"][0]["succeeded"] == len(devices)
    assert shown["counts"]["Applied"] == len(devices)
    joiner = httpx.Client(
        base_url=live.url, headers={"authorization": f"Bearer {tokens[joiners[2][0]]}"}
    )
    assert checkin(joiner, joiners[2][0])["job"]["deployment_id"] == deployment

    frozen = Product(live, admin, f"frozen-{uuid.uuid4().hex[:6]}")
    members = bulk_devices(live, frozen.name, BIG)
    snapshot = frozen.rollout([{"percent": 100}], frozen=True)
    assert snapshot["targeted"] == BIG
    enroll = live.mint(Role.ENROLL, product=frozen.name, group=GROUP)
    client = httpx.Client(base_url=live.url, headers={"authorization": f"Bearer {enroll}"})
    newcomer = f"frozen-new-{uuid.uuid4().hex[:6]}"
    answer = checkin(client, newcomer)
    assert answer["job"] is None  # enrolled after the start: not in it
    outsider = httpx.Client(
        base_url=live.url, headers={"authorization": f"Bearer {answer['device_token']}"}
    )
    body = {"status": "downloading", "deployment_id": snapshot["deployment_id"]}
    assert outsider.post("/api/v1/device/status", json=body).status_code == 403
    member = frozen.device(members[0])
    assert checkin(member, members[0])["job"]["deployment_id"] == snapshot["deployment_id"]
    report(member, "downloading", snapshot["deployment_id"])  # a member's report counts
    shown = frozen.show(snapshot)
    assert (shown["targeted"], shown["counts"]["Downloading"]) == (BIG, 1)


def test_an_action_that_cannot_be_applied_answers_409(live: Live, admin: httpx.Client) -> None:
    product = Product(live, admin, f"stuck-{uuid.uuid4().hex[:6]}")
    bulk_devices(live, product.name, SMALL)
    rollout = product.rollout([{"percent": 50, "manual": True}, {"percent": 100}])

    # phase 1's advance is already recorded (as if by a process that then lost its update):
    # every attempt to approve it again is refused by the database
    async def record() -> None:
        async with live.engine.sessions() as db:
            db.add(RolloutEvent(rollout_id=rollout["id"], kind="advanced", phase=1, actor="x"))
            await db.commit()

    live.run(record())
    response = admin.post(f"/api/v1/rollouts/{rollout['id']}/approve")
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "CONFLICT"
    assert "could not be applied" in response.json()["message"]
    shown = product.show(rollout)
    assert (shown["state"], shown["phase"]) == ("running", 1)
    # an action that can be applied still is
    paused = admin.post(f"/api/v1/rollouts/{rollout['id']}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["state"] == "paused"
