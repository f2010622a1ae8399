"""Paged lists of the management API (service/listings.py, service/deployments.py), served by a
real ``otakit serve`` on SQLite and on PostgreSQL: every page is bounded, the cursor walks the
whole list once (no row skipped or repeated), filters and sorts are applied by the server, the
counts are one grouped count, and the queries are answered from indexes (no scan of the
registry, no sort of it) whatever page is asked for.

The registry is inserted in bulk (SQL executemany), as a large fleet would be.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, insert
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from otakit.protocol.states import STATES
from otakit.server.database import database_url
from otakit.server.models import Artifact, Deployment, DeploymentDevice, Device, StatusReport
from otakit.server.service import deployments, listings

from .server_harness import Server, postgres_database, start_server

DEVICES = 250
STATUSES = ("applied", "downloading", "error", None, "applying")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ARTIFACT = "a" * 64


def _device(n: int) -> dict[str, Any]:
    group = "lab" if n % 5 == 0 else "field"
    return {
        "serial": f"dev-{n:04d}",
        "product": "widget" if n % 2 == 0 else "gadget",
        "tags": {"productType": "widget" if n % 2 == 0 else "gadget", "deviceGroup": group},
        "version": f"1.{n % 3}.0",
        "status": STATUSES[n % len(STATUSES)],
        # every seventh device never seen; the others each at a different second, some equal
        "last_seen": None if n % 7 == 0 else NOW - timedelta(seconds=n // 2),
        "created_at": NOW,
    }


async def _fill(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(insert(Device), [_device(n) for n in range(DEVICES)])
        await conn.execute(
            insert(Artifact),
            [
                {
                    "id": f"{n:064x}",
                    "name": f"app-{n}.img",
                    "container": "ota",
                    "kind": "image",
                    "version": f"2.{n}.0",
                    "size": 10,
                    "signature": "valid",
                    "details": {},
                    "created_at": NOW - timedelta(minutes=n // 2),
                }
                for n in range(1, 131)
            ],
        )
        await conn.execute(
            insert(Deployment),
            [
                {
                    "id": n,
                    "artifact_id": f"{n:064x}",
                    "condition": "tags.productType='widget'",
                    "priority": 0,
                    "downgrade": False,
                    "created_at": NOW,
                    "expires_at": NOW + timedelta(days=3650),
                    "cancelled_at": NOW if n % 2 else None,
                }
                for n in range(1, 121)
            ],
        )
        await conn.execute(
            insert(DeploymentDevice),
            [
                {
                    "deployment_id": 120,
                    "device_serial": f"dev-{n:04d}",
                    "status": s,
                    "updated_at": NOW,
                }
                for n, s in enumerate(["applied"] * 5 + ["downloading"] * 3 + ["reverted"] * 2)
            ],
        )
        await conn.execute(
            insert(StatusReport),
            [
                {
                    "device_serial": "dev-0001",
                    "status": "downloading",
                    "created_at": NOW,
                    "source": "device",
                }
                for _ in range(130)
            ],
        )
    await engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    data = tmp_path_factory.mktemp(f"lists-{request.param}")
    if request.param == "sqlite":
        live = start_server(data)
        asyncio.run(_fill(database_url(None, data)))
        yield live
        live.stop()
        return
    with postgres_database() as url:
        live = start_server(data, database_url=url)
        asyncio.run(_fill(database_url(url, data)))
        yield live
        live.stop()


def _walk(http: httpx.Client, path: str, params: dict[str, Any]) -> list[list[Any]]:
    """Every page of a list, following X-Next-Cursor (and checking Link agrees)."""
    pages: list[list[Any]] = []
    cursor = None
    while True:
        answer = http.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        cursor = answer.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in answer.headers
            return pages
        assert f"cursor={cursor}" in answer.headers["link"]
        assert answer.headers["link"].endswith('; rel="next"')
        assert len(pages) < 100, "the cursor does not move"


def _expected(**where: Any) -> list[dict[str, Any]]:
    rows = [_device(n) for n in range(DEVICES)]
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def test_devices_are_paged_in_serial_order(server: Server) -> None:
    http = server.admin_client()
    pages = _walk(http, "/api/v1/devices", {"limit": 100})
    assert [len(p) for p in pages] == [100, 100, 50]
    serials = [d["serial"] for p in pages for d in p]
    assert serials == [f"dev-{n:04d}" for n in range(DEVICES)]
    # no limit: one page of the default size, not the whole registry
    first = http.get("/api/v1/devices")
    assert len(first.json()) == listings.DEFAULT_LIMIT
    assert "x-next-cursor" in first.headers
    assert http.get("/api/v1/devices", params={"limit": 1001}).status_code == 422


def test_device_filters_and_counts(server: Server) -> None:
    http = server.admin_client()
    wanted = {"product": "widget", "status": "applied"}
    found = [d for p in _walk(http, "/api/v1/devices", {**wanted, "limit": 7}) for d in p]
    assert [d["serial"] for d in found] == [r["serial"] for r in _expected(**wanted)]
    lab = [d for p in _walk(http, "/api/v1/devices", {"group": "lab", "limit": 9}) for d in p]
    assert {d["tags"]["deviceGroup"] for d in lab} == {"lab"}
    assert len(lab) == DEVICES // 5
    never = [d for p in _walk(http, "/api/v1/devices", {"status": "none", "limit": 20}) for d in p]
    assert len(never) == len(_expected(status=None))
    assert all(d["status"] is None for d in never)
    version = http.get("/api/v1/devices", params={"version": "1.2", "q": "dev-01"}).json()
    assert [d["serial"] for d in version] == [f"dev-{n:04d}" for n in range(100, 200) if n % 3 == 2]
    counts = http.get("/api/v1/device-counts", params={"product": "widget"}).json()
    assert counts["total"] == len(_expected(product="widget"))
    for status in ("applied", "downloading", "error", "applying"):
        assert counts["statuses"][status] == len(_expected(product="widget", status=status))
    assert counts["statuses"]["none"] == len(_expected(product="widget", status=None))
    assert counts["statuses"]["reverted"] == 0  # every state of protocol/states.py is named
    assert (*STATES, "none") == listings.DEVICE_STATUSES  # the API names every state
    bad = http.get("/api/v1/devices", params={"status": "sideways"})
    assert bad.status_code == 422


def test_devices_sorted_by_last_seen(server: Server) -> None:
    http = server.admin_client()
    newest = [
        d for p in _walk(http, "/api/v1/devices", {"sort": "-last_seen", "limit": 16}) for d in p
    ]
    seen = [r for r in _expected() if r["last_seen"] is not None]
    never = [r for r in _expected() if r["last_seen"] is None]
    want = sorted(seen, key=lambda r: (r["last_seen"], r["serial"]), reverse=True)
    want += sorted(never, key=lambda r: r["serial"], reverse=True)
    assert [d["serial"] for d in newest] == [r["serial"] for r in want]
    oldest = [
        d for p in _walk(http, "/api/v1/devices", {"sort": "last_seen", "limit": 16}) for d in p
    ]
    assert [d["serial"] for d in oldest] == [r["serial"] for r in reversed(want)]


def test_cursors_are_checked(server: Server) -> None:
    http = server.admin_client()
    cursor = http.get("/api/v1/devices", params={"limit": 5}).headers["x-next-cursor"]
    other_sort = http.get("/api/v1/devices", params={"cursor": cursor, "sort": "-last_seen"})
    assert other_sort.status_code == 404, other_sort.text
    assert other_sort.json()["error"] == "NOT_FOUND"
    for junk in ("!!!", "e30", "W10"):
        assert http.get("/api/v1/devices", params={"cursor": junk}).status_code == 404


def test_artifacts_deployments_and_history_are_paged(server: Server) -> None:
    http = server.admin_client()
    artifacts = [a for p in _walk(http, "/api/v1/artifacts", {"limit": 50}) for a in p]
    assert len(artifacts) == 130
    assert len({a["id"] for a in artifacts}) == 130
    keys = [(a["created_at"], a["id"]) for a in artifacts]
    assert keys == sorted(keys, reverse=True)

    pages = _walk(http, "/api/v1/deployments", {"limit": 50})
    assert [len(p) for p in pages] == [50, 50, 20]
    assert [d["id"] for p in pages for d in p] == list(range(120, 0, -1))
    assert pages[0][0]["counts"]["Applied"] == 5
    assert (pages[0][0]["counts"]["Error"], pages[0][0]["counts"]["Reverted"]) == (0, 2)
    active = [d for p in _walk(http, "/api/v1/deployments", {"active": "true"}) for d in p]
    assert [d["id"] for d in active] == list(range(120, 0, -2))

    history = _walk(http, "/api/v1/devices/dev-0001/history", {"limit": 60})
    assert [len(p) for p in history] == [60, 60, 10]
    ids = [h["id"] for p in history for h in p]
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == 130
    older = http.get("/api/v1/devices/dev-0001/history", params={"before": ids[9]}).json()
    assert [h["id"] for h in older][:3] == ids[10:13]


# --- the queries themselves: answered from an index, one page, never a scan -------------------


def _plans(url: str) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of the SQL each list and count sends (SQLite)."""
    sent: list[tuple[str, Any]] = []

    async def run() -> None:
        engine = create_async_engine(url)
        event.listen(
            engine.sync_engine,
            "before_cursor_execute",
            lambda _c, _cur, statement, params, _ctx, _many: sent.append((statement, params)),
        )
        async with AsyncSession(engine) as db:
            page = await listings.devices(db, listings.DeviceFilter(), limit=10)
            await listings.devices(db, listings.DeviceFilter(), limit=10, cursor=page.next)
            await listings.devices(db, listings.DeviceFilter(group="lab"), limit=10)
            await listings.devices(db, listings.DeviceFilter(status="applied"), limit=10)
            await listings.devices(db, listings.DeviceFilter(product="widget"), limit=10)
            page = await listings.devices(db, listings.DeviceFilter(), sort="-last_seen", limit=10)
            await listings.devices(
                db, listings.DeviceFilter(), sort="-last_seen", limit=10, cursor=page.next
            )
            await listings.device_counts(db, listings.DeviceFilter())
            await listings.history(db, "dev-0001", limit=10)
            await listings.artifacts(db, listings.ArtifactFilter(), limit=10, cursor=None)
            await deployments.counts(db, [120, 119])
            first = len(sent)
            plans: dict[str, list[str]] = {}
            conn = await db.connection()
            for statement, params in sent[:first]:
                explained = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
                plans[statement] = [str(row[-1]) for row in explained]
            result.update(plans)
        await engine.dispose()

    result: dict[str, list[str]] = {}
    asyncio.run(run())
    return result


def test_sqlite_lists_and_counts_use_indexes(tmp_path: Path) -> None:
    live = start_server(tmp_path)
    try:
        url = database_url(None, tmp_path)
        asyncio.run(_fill(url))
        plans = _plans(url)
    finally:
        live.stop()
    assert len(plans) >= 10
    after_cursor = [s for s in plans if "devices.serial > ?" in s or ") < (?, ?)" in s]
    assert len(after_cursor) == 2
    for statement in after_cursor:  # a later page seeks to its cursor, whichever page it is
        assert plans[statement][0].startswith("SEARCH"), (plans[statement], statement)
    for statement, plan in plans.items():
        steps = " / ".join(plan)
        assert "TEMP B-TREE" not in steps, f"sorts the rows: {steps}\n{statement}"
        for step in plan:
            # a bare "SCAN devices" reads the table; a scan of an index is in index order
            if step.startswith("SCAN"):
                assert "INDEX" in step, f"reads the whole table: {steps}\n{statement}"


# --- clients: the CLI and ManagementClient read a page at a time ------------------------------


def test_cli_pages_through_rollouts(tmp_path: Path) -> None:
    from otakit.host.client import ManagementClient

    from .server_harness import BIN
    from .test_server import KEY, image

    live = start_server(tmp_path)
    try:
        admin = live.admin_client()
        admin.post("/api/v1/keys", content=KEY.public_key.pem()).raise_for_status()
        artifact = admin.post(
            "/api/v1/artifacts", params={"name": "app.img"}, content=image("1.0.0")
        ).json()
        created = []
        for n in range(5):
            body = {
                "deployment": {"artifact_id": artifact["id"], "product": f"p{n}"},
                "phases": [{"percent": 100}],
            }
            answer = admin.post("/api/v1/rollouts", json=body)
            assert answer.status_code == 201, answer.text
            created.append(answer.json()["id"])
        newest = sorted(created, reverse=True)
        pages = _walk(admin, "/api/v1/rollouts", {"limit": 2})
        assert [[r["id"] for r in p] for p in pages] == [newest[0:2], newest[2:4], newest[4:]]

        client = ManagementClient(live.url, live.admin)
        try:
            sizes = [len(p) for p in client.pages("/api/v1/rollouts", page_size=2)]
        finally:
            client.close()
        assert sizes == [2, 2, 1]

        env = {**live.env, "OTAKIT_SERVER": live.url, "OTAKIT_TOKEN": live.admin}
        listed = subprocess.run(
            [str(BIN / "otakit"), "rollout", "list", "--limit", "3", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert [r["id"] for r in json.loads(listed.stdout)] == newest[:3]
    finally:
        live.stop()
