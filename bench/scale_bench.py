"""Server CPU as the registry grows: 1,000, 10,000 and 100,000 registered devices, one rollout.

For each database (SQLite, PostgreSQL) and each registry size the script starts a fresh
``otakit serve`` (one worker), sets it up through the HTTP API (signing key, product, a signed
artifact), inserts the registered devices and their device tokens in bulk straight into the
``devices`` and ``tokens`` tables (SQLAlchemy ``executemany`` on the server's own tables, not
through the API: 100,000 enrollments through the API would take longer than the benchmark),
then creates a 3-phase rollout through the API (phase 1: the ``canary`` group, manual, so it
stays open; phase 2: 50%; phase 3: 100%). The registry:

- ``canary``: ``--canary`` devices (default 200) on 1.0.0 in the group of phase 1: they are
  offered the update and send the status reports;
- ``current``: every fifth other device, already on 1.1.0: nothing to do;
- ``waiting``: the rest, on 1.0.0 in the ``field`` group, in phases 2 and 3 that have not
  opened: targeted by the rollout but offered nothing yet.

Every device was last seen a day ago, so each check-in is the first in a long while (as at a
30-minute poll); a device checks in at most once per window (between windows its ``last_seen``
is set back a day in the database when the pool of devices has to be reused).

Measured, as CPU seconds (user + system) of the ``otakit serve`` process tree from /proc, over
the window in which the requests ran, divided by the number of requests:

- **offer check-in**: the first check-in of each canary device, answered with the job (200);
- **status report**: ``POST /api/v1/device/status`` of a canary device about the rollout's
  deployment, alternating ``downloading`` and ``interrupted`` so that every report changes the
  device's standing (and the rollout's counts);
- **idle check-in, waiting**: a device of a phase not yet open checks in (204);
- **idle check-in, current**: a device already on the new version checks in (204);
- **idle check-in, again**: current devices that checked in moments ago check in again (204):
  a poll less than a minute apart, nothing to write (the idle fast path, server/api/idle.py);
- **rollout view**: ``GET /api/v1/rollouts/{id}``;
- **dashboard refresh**: what one poll of the dashboard's default view costs
  (``dashboard/static/app.js``: ``GET /api/v1/deployments`` and ``GET /api/v1/rollouts/{id}``
  of its live rollout), and of its devices view (``GET /api/v1/devices?limit=N``, the first
  page, and ``GET /api/v1/device-counts``; a server without paging answers the whole registry,
  which is what that view cost; one without ``device-counts`` answers it 404);
- **background**: the server's CPU over ``--idle-s`` seconds without any request, started
  with its default settings (its periodic rollout evaluation included), as percent of a core.

The request windows run on a server started with ``--rollout-interval 0`` (no background
evaluation), so that the background's CPU is not counted per request; the background is
measured on the same data by a second start with the defaults. Each window stops after
``--requests`` requests or ``--cpu-budget`` seconds of server CPU, whichever comes first (at
least 3 requests): on a server whose cost grows with the registry the large sizes get fewer
requests, not a longer run.

Reference: nginx answering ``POST /api/v1/device/checkin`` with a fixed 204 (``return 204``),
started by this script and driven by the same client with the same requests, in the same run.

Aims (issue 16), printed as ratios, never asserted: per report and per idle check-in flat
within 1.5x from 1k to 100k (ratio largest/smallest size); background < 2% of a core; rollout
view and one dashboard refresh < 20 ms of CPU at 100k; idle check-in <= 0.5 ms of CPU.

With ``--fleet N`` the simulated fleet (``otakit.sim.fleet``) then runs N devices enrolling into
the canary group through a full update of the artifact at the largest size, on the same server:
server CPU per device updated.

Run: ``.venv/bin/python bench/scale_bench.py [--scales 1000,10000,100000] [--databases
sqlite,postgresql] [--name scale] [--results DIR]`` writes ``DIR/NAME.json`` (default
``bench/results/scale.json``). ``PYTHONPATH=/path/to/other/src`` measures another checkout's
server (the JSON records where ``otakit`` came from). ``--smoke --results DIR`` is the smallest
run that goes through every step (two tiny registries, a few requests each, SQLite and
PostgreSQL, nginx), written as ``DIR/scale-quick.json``; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import itertools
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from fleet_bench import NGINX_CONF as NGINX_204  # noqa: E402 - nginx answering check-ins, 204
from fleet_bench import _nginx, _nginx_version  # noqa: E402
from server_bench import (  # noqa: E402 - the same server start-up and CPU accounting
    BenchError,
    Running,
    add_smoke_options,
    check_smoke,
    cpu_seconds,
    nginx_server,
    otakit_server,
    postgres_database,
)

import otakit  # noqa: E402
from otakit.image.header import ImageVersion  # noqa: E402
from otakit.image.keys import SigningKey  # noqa: E402
from otakit.image.sign import SignOptions, sign_image  # noqa: E402

PRODUCT, BOARD = "scale-bench", "BOARD_A"
CANARY, FIELD = "canary", "field"
OLD, NEW = "1.0.0", "1.1.0"
PHASES = [{"group": CANARY, "manual": True}, {"percent": 50}, {"percent": 100}]
PRODUCT_TAG, GROUP_TAG = "productType", "deviceGroup"  # the device tags a condition matches
KEY = SigningKey.generate("ecdsa-p256")
MIN_REQUESTS = 3
AIM_FLAT, AIM_BACKGROUND_PCT, AIM_VIEW_MS, AIM_IDLE_MS = 1.5, 2.0, 20.0, 0.5


# --- the registry -------------------------------------------------------------------------------


def serial_of(i: int) -> str:
    return f"scale-{i:07d}"


def token_parts(i: int) -> tuple[str, str]:
    """(id, secret) of device i's token: derived from i, so nothing has to be kept."""
    return f"bench{i:011d}", f"scale-bench-secret-{i:07d}"


def token_of(i: int) -> str:
    from otakit.server.tokens import PREFIX

    token_id, secret = token_parts(i)
    return f"{PREFIX}_{token_id}_{secret}"


@dataclass
class Registry:
    size: int
    canary: list[int]
    current: list[int]
    waiting: list[int]

    @classmethod
    def of(cls, size: int, canary: int) -> Registry:
        n = min(canary, size // 5)
        rest = range(n, size)
        return cls(
            size,
            list(range(n)),
            [i for i in rest if i % 5 == 0],
            [i for i in rest if i % 5 != 0],
        )

    def group(self, i: int) -> str:
        return CANARY if i < len(self.canary) else FIELD

    def version(self, i: int) -> str:
        return NEW if i >= len(self.canary) and i % 5 == 0 else OLD


def async_url(data: Path, database_url: str | None) -> str:
    if database_url is None:
        return f"sqlite+aiosqlite:///{(data / 'otakit.db').resolve()}"
    return database_url.replace("postgresql://", "postgresql+asyncpg://", 1)


class Database:
    """This script's own connection to the server's database: bulk inserts and resets."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        self.engine = create_async_engine(url)
        self.long_ago = datetime.now(UTC) - timedelta(days=1)

    async def insert_registry(self, registry: Registry, batch: int = 5_000) -> float:
        """Devices and device tokens in bulk (executemany on the server's tables, with their
        Python-side defaults); seconds taken."""
        from sqlalchemy import insert

        from otakit.server.models import Device, Token
        from otakit.server.tokens import hash_secret

        t0 = time.monotonic()
        for start in range(0, registry.size, batch):
            ids = range(start, min(registry.size, start + batch))
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(Device),
                    [
                        {
                            "serial": serial_of(i),
                            "product": PRODUCT,
                            "board": BOARD,
                            "tags": {PRODUCT_TAG: PRODUCT, GROUP_TAG: registry.group(i)},
                            "version": registry.version(i),
                            "last_seen": self.long_ago,
                        }
                        for i in ids
                    ],
                )
                await conn.execute(
                    insert(Token),
                    [
                        {
                            "id": token_parts(i)[0],
                            "secret_hash": hash_secret(token_parts(i)[1]),
                            "role": "device",
                            "product": PRODUCT,
                            "group": registry.group(i),
                            "device_serial": serial_of(i),
                            "label": "scale_bench",
                        }
                        for i in ids
                    ],
                )
        return time.monotonic() - t0

    async def forget_seen(self, ids: Sequence[int]) -> None:
        """Set these devices' ``last_seen`` back a day, so their next check-in is a first one."""
        from sqlalchemy import update

        from otakit.server.models import Device

        async with self.engine.begin() as conn:
            for start in range(0, len(ids), 500):
                serials = [serial_of(i) for i in ids[start : start + 500]]
                await conn.execute(
                    update(Device).where(Device.serial.in_(serials)).values(last_seen=self.long_ago)
                )

    async def add_enroll_token(self, group: str) -> str:
        from sqlalchemy import insert

        from otakit.server.models import Token
        from otakit.server.tokens import PREFIX, hash_secret

        token_id, secret = "benchenroll", "scale-bench-enroll-secret"
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(Token),
                [
                    {
                        "id": token_id,
                        "secret_hash": hash_secret(secret),
                        "role": "enroll",
                        "product": PRODUCT,
                        "group": group,
                        "label": "scale_bench",
                    }
                ],
            )
        return f"{PREFIX}_{token_id}_{secret}"

    async def close(self) -> None:
        await self.engine.dispose()


class Pool:
    """Devices taken in turn; when the pool has to be reused its ``last_seen`` is reset first."""

    def __init__(self, ids: Sequence[int], db: Database) -> None:
        self.ids, self.db, self.next, self.rounds = list(ids), db, 0, 0

    async def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n and self.ids:
            if self.next == len(self.ids):
                self.next, self.rounds = 0, self.rounds + 1
                await self.db.forget_seen(self.ids)
            k = min(n - len(out), len(self.ids) - self.next)
            out += self.ids[self.next : self.next + k]
            self.next += k
        return out


# --- requests and windows -----------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    token: str | None = None
    body: dict[str, Any] | None = None


async def fire(client: httpx.AsyncClient, reqs: Sequence[Req], concurrency: int) -> Counter[str]:
    """Send ``reqs`` with ``concurrency`` on the wire; count the answers by status code."""
    answers: Counter[str] = Counter()
    queue: Iterator[Req] = iter(reqs)

    async def worker() -> None:
        for req in queue:
            headers = {"authorization": f"Bearer {req.token}"} if req.token else {}
            try:
                r = await client.request(req.method, req.path, json=req.body, headers=headers)
                answers[str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                answers[type(exc).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(reqs))))))
    return answers


@dataclass
class Window:
    """Requests sent in batches; the server's CPU is summed over the batches only."""

    requests: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)

    def result(self, expected: str) -> dict[str, Any]:
        per = self.cpu_s / self.requests if self.requests else None
        return {
            "requests": self.requests,
            "server_cpu_s": round(self.cpu_s, 3),
            "wall_s": round(self.wall_s, 3),
            "server_cpu_ms_per_request": round(1000 * per, 4) if per is not None else None,
            "requests_per_s": round(self.requests / self.wall_s, 1) if self.wall_s else None,
            "answers": dict(self.answers),
            "errors": self.requests - self.answers.get(expected, 0),
        }


async def measure(
    pid: int,
    prepare: Callable[[int], Awaitable[Any]],
    send: Callable[[Any], Awaitable[Counter[str]]],
    want: int,
    budget_s: float,
    expected: str,
) -> dict[str, Any]:
    """Up to ``want`` requests, or until ``budget_s`` of server CPU is spent (at least
    MIN_REQUESTS): ``prepare(n)`` (outside the window) makes a batch, ``send`` runs it."""
    w = Window()
    batch = min(want, MIN_REQUESTS)
    while w.requests < want and batch > 0:
        payload = await prepare(batch)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        got = await send(payload)
        w.wall_s += time.monotonic() - t0
        w.cpu_s += cpu_seconds(pid) - c0
        n = sum(got.values())
        if n == 0:
            break
        w.requests += n
        w.answers.update(got)
        if w.cpu_s >= budget_s:
            break
        per = w.cpu_s / w.requests
        left = want - w.requests
        # aim each batch at about a quarter of the budget, never past what is left of it
        size = int(min(0.25 * budget_s, budget_s - w.cpu_s) / per) if per > 0 else batch * 4
        batch = max(1, min(left, size))
    return w.result(expected)


# --- one server, one registry -------------------------------------------------------------------


@dataclass
class Setup:
    rollout_id: int
    deployment_id: int
    artifact_id: str


def _ok(response: httpx.Response, *codes: int) -> httpx.Response:
    if response.status_code not in codes:
        raise BenchError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:300]}"
        )
    return response


def items_of(body: Any) -> list[dict[str, Any]]:
    """A list answer, old shape (a list) or paged (the list under ``items``)."""
    if isinstance(body, dict):
        return list(body.get("items", []))
    return list(body)


async def set_up_product(admin: httpx.AsyncClient, image: bytes) -> str:
    pem = {"content-type": "application/x-pem-file"}
    _ok(await admin.post("/api/v1/keys", content=KEY.public_key.pem(), headers=pem), 201)
    _ok(await admin.put(f"/api/v1/products/{PRODUCT}", json={"board": BOARD}), 200)
    artifact = _ok(
        await admin.post(
            "/api/v1/artifacts",
            params={"name": "app.img"},
            content=image,
            headers={"content-type": "application/octet-stream"},
        ),
        200,
        201,
    ).json()
    return str(artifact["id"])


async def create_rollout(admin: httpx.AsyncClient, artifact_id: str) -> Setup:
    body = {"deployment": {"artifact_id": artifact_id, "product": PRODUCT}, "phases": PHASES}
    rollout = _ok(await admin.post("/api/v1/rollouts", json=body), 201).json()
    return Setup(int(rollout["id"]), int(rollout["deployment_id"]), artifact_id)


async def dashboard_deployments(admin: httpx.AsyncClient) -> Counter[str]:
    """One poll of the dashboard's deployments view: the list, then each live rollout."""
    answers: Counter[str] = Counter()
    # app.js asks for one page of the active ones (a server without paging ignores both)
    listed = await admin.get("/api/v1/deployments", params={"limit": 25, "active": "true"})
    answers[str(listed.status_code)] += 1
    ids = [d["rollout_id"] for d in items_of(listed.json()) if d.get("rollout_id") is not None]
    for got in await asyncio.gather(*(admin.get(f"/api/v1/rollouts/{i}") for i in ids)):
        answers[str(got.status_code)] += 1
    # one refresh is one request here, answered 200 only when all of its calls were
    return Counter({"200" if set(answers) == {"200"} else "failed": 1})


@dataclass
class Options:
    requests: int
    cpu_budget: float
    idle_s: float
    concurrency: int
    page_limit: int
    canary: int
    fleet: int
    fleet_timeout: float
    smoke: bool


async def measure_requests(
    server: Running, registry: Registry, setup: Setup, db: Database, opt: Options
) -> dict[str, Any]:
    pid = server.proc.pid
    out: dict[str, Any] = {}
    limits = httpx.Limits(
        max_connections=opt.concurrency, max_keepalive_connections=opt.concurrency
    )
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client,
        httpx.AsyncClient(
            base_url=server.url, timeout=600, headers={"authorization": f"Bearer {server.admin}"}
        ) as admin,
    ):

        def checkin(i: int) -> Req:
            body = {"serial": serial_of(i), "version": registry.version(i), "board": BOARD}
            return Req("POST", "/api/v1/device/checkin", token_of(i), body)

        async def send(reqs: list[Req]) -> Counter[str]:
            return await fire(client, reqs, opt.concurrency)

        # offer check-ins: each canary device's first check-in, answered with the job
        canary = Pool(registry.canary, db)

        async def offers(n: int) -> list[Req]:
            return [checkin(i) for i in await canary.take(n)]

        print("  offer check-ins (canary devices)", file=sys.stderr)
        out["offer_checkin"] = await measure(
            pid, offers, send, len(registry.canary), opt.cpu_budget, "200"
        )
        # the rest of the canary devices get their job too, unmeasured, before they report
        rest = registry.canary[out["offer_checkin"]["requests"] :]
        if rest:
            await fire(client, [checkin(i) for i in rest], opt.concurrency)

        # status reports, each one changing the device's standing
        reporters = Pool(registry.canary, db)
        status: dict[int, str] = {}

        async def reports(n: int) -> list[Req]:
            reqs = []
            for i in await reporters.take(n):
                status[i] = "interrupted" if status.get(i) == "downloading" else "downloading"
                body = {"status": status[i], "deployment_id": setup.deployment_id}
                reqs.append(Req("POST", "/api/v1/device/status", token_of(i), body))
            return reqs

        print("  status reports", file=sys.stderr)
        out["status_report"] = await measure(
            pid, reports, send, opt.requests, opt.cpu_budget, "204"
        )

        for name, ids in (("waiting", registry.waiting), ("current", registry.current)):
            pool = Pool(random.Random(registry.size).sample(ids, len(ids)), db)

            async def idle(n: int, pool: Pool = pool) -> list[Req]:
                return [checkin(i) for i in await pool.take(n)]

            print(f"  idle check-ins ({name})", file=sys.stderr)
            out[f"idle_checkin_{name}"] = await measure(
                pid, idle, send, opt.requests, opt.cpu_budget, "204"
            )

        # idle check-ins again: current devices that checked in moments ago ask again (a poll
        # less than checkin.LAST_SEEN_RESOLUTION apart: nothing to write, nothing targets them)
        again = registry.current[: max(1, min(len(registry.current), opt.requests))]
        await fire(client, [checkin(i) for i in again], opt.concurrency)  # their visit, written
        turn = itertools.cycle(again)

        async def repeat(n: int) -> list[Req]:
            return [checkin(next(turn)) for _ in range(n)]

        print("  idle check-ins (again, within the minute)", file=sys.stderr)
        out["idle_checkin_again"] = await measure(
            pid, repeat, send, opt.requests, opt.cpu_budget, "204"
        )

        async def same(n: int, req: Req | None = None) -> int:
            return n

        async def views(n: int) -> Counter[str]:
            got: Counter[str] = Counter()
            for _ in range(n):
                got[str((await admin.get(f"/api/v1/rollouts/{setup.rollout_id}")).status_code)] += 1
            return got

        async def refreshes(n: int) -> Counter[str]:
            got: Counter[str] = Counter()
            for _ in range(n):
                got.update(await dashboard_deployments(admin))
            return got

        counts_answers: Counter[str] = Counter()

        async def device_pages(n: int) -> Counter[str]:
            """The devices view: a page of devices and, where the server has them, the counts
            by status (``/api/v1/device-counts``: 404 on a server without it)."""
            got: Counter[str] = Counter()
            for _ in range(n):
                page, counts = await asyncio.gather(
                    admin.get("/api/v1/devices", params={"limit": opt.page_limit}),
                    admin.get("/api/v1/device-counts"),
                )
                counts_answers[str(counts.status_code)] += 1
                fine = page.status_code == 200 and counts.status_code in (200, 404)
                got["200" if fine else f"{page.status_code}/{counts.status_code}"] += 1
            return got

        views_wanted = max(MIN_REQUESTS, opt.requests // 20)
        print("  rollout view", file=sys.stderr)
        out["rollout_view"] = await measure(pid, same, views, views_wanted, opt.cpu_budget, "200")
        print("  dashboard refresh (deployments view)", file=sys.stderr)
        out["dashboard_refresh"] = await measure(
            pid, same, refreshes, views_wanted, opt.cpu_budget, "200"
        )
        print("  dashboard refresh (devices view, first page)", file=sys.stderr)
        out["dashboard_devices"] = await measure(
            pid, same, device_pages, views_wanted, opt.cpu_budget, "200"
        )
        out["dashboard_devices"]["device_counts_answers"] = dict(counts_answers)
        if any(isinstance(w, dict) and w.get("errors") for w in out.values()):
            out["server_log_tail"] = server.log[-40:]  # what the server said about them
        rollout = _ok(await admin.get(f"/api/v1/rollouts/{setup.rollout_id}"), 200).json()
        out["rollout_after"] = {
            "state": rollout.get("state"),
            "phase": rollout.get("phase"),
            "targeted": rollout.get("targeted"),
            "counts": rollout.get("counts"),
        }
    return out


def run_fleet(server: Running, token: str, image_devices: int, opt: Options) -> dict[str, Any]:
    """The fleet simulator: ``image_devices`` devices enroll (canary) and update fully."""
    from otakit.sim.fleet import Fleet, FleetConfig

    config = FleetConfig(
        server=server.url,
        token=token,
        product=PRODUCT,
        group=CANARY,
        board=BOARD,
        devices=image_devices,
        keys=(KEY.public_key,),
        poll=1.0,
        concurrency=64,
        chunk_size=16 * 1024,
        timeout=opt.fleet_timeout,
        serial_prefix="fleet",
    )
    fleet = Fleet(config)
    cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    report = asyncio.run(fleet.run())
    wall, cpu = time.monotonic() - t0, cpu_seconds(server.proc.pid) - cpu0
    return {
        "devices": report.devices,
        "updated": report.updated,
        "errors": sum(report.errors.values()),
        "timed_out": report.timed_out,
        "requests": report.requests,
        "wall_s": round(wall, 2),
        "server_cpu_s": round(cpu, 2),
        "server_cpu_ms_per_device": round(1000 * cpu / max(1, report.devices), 3),
    }


def one_size(
    database: str,
    database_url: str | None,
    tmp: Path,
    size: int,
    image: bytes,
    opt: Options,
    fleet_here: bool,
) -> dict[str, Any]:
    data = tmp / f"data-{database}-{size}"
    registry = Registry.of(size, opt.canary)
    result: dict[str, Any] = {
        "registered": size,
        "canary": len(registry.canary),
        "current": len(registry.current),
        "waiting": len(registry.waiting),
    }
    with otakit_server(data, database_url, 1, ["--rollout-interval", "0"]) as server:

        async def session() -> str | None:
            """Set-up, bulk insert, rollout and the request windows: one event loop, so that
            this script's database connections stay on it."""
            db = Database(async_url(data, database_url))
            try:
                async with httpx.AsyncClient(
                    base_url=server.url,
                    timeout=600,
                    headers={"authorization": f"Bearer {server.admin}"},
                ) as admin:
                    artifact = await set_up_product(admin, image)
                    result["bulk_insert_s"] = round(await db.insert_registry(registry), 2)
                    t0 = time.monotonic()
                    setup = await create_rollout(admin, artifact)
                    result["rollout_create_s"] = round(time.monotonic() - t0, 2)
                result.update(await measure_requests(server, registry, setup, db, opt))
                return await db.add_enroll_token(CANARY) if fleet_here and opt.fleet else None
            finally:
                await db.close()

        print(f"{database}, {size:,} devices: set-up and bulk insert", file=sys.stderr)
        token = asyncio.run(session())
        if token is not None:
            print(f"  fleet simulator: {opt.fleet} devices updating", file=sys.stderr)
            result["fleet"] = run_fleet(server, token, opt.fleet, opt)
            if result["fleet"]["errors"] or result["fleet"]["timed_out"]:
                result["fleet"]["server_log_tail"] = server.log[-40:]
    # background: the same data, the server's default settings, no request at all
    with otakit_server(data, database_url, 1) as server:
        print(f"  background, {opt.idle_s:g} s without requests", file=sys.stderr)
        time.sleep(min(2.0, opt.idle_s))  # let start-up work finish before the window
        c0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        time.sleep(opt.idle_s)  # the measurement window itself, not a synchronisation
        cpu, wall = cpu_seconds(server.proc.pid) - c0, time.monotonic() - t0
        result["background"] = {
            "wall_s": round(wall, 2),
            "server_cpu_s": round(cpu, 3),
            "percent_of_core": round(100 * cpu / wall, 3),
        }
    return result


def nginx_reference(nginx: str, stack: ExitStack, opt: Options, n: int) -> dict[str, Any]:
    prefix = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-nginx-")))
    with nginx_server(nginx, prefix, 1, NGINX_204) as server:

        async def go() -> dict[str, Any]:
            limits = httpx.Limits(
                max_connections=opt.concurrency, max_keepalive_connections=opt.concurrency
            )
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
                counter = iter(range(10**9))

                async def reqs(k: int) -> list[Req]:
                    out = []
                    for _ in range(k):
                        i = next(counter)
                        body = {"serial": serial_of(i), "version": OLD, "board": BOARD}
                        out.append(Req("POST", "/api/v1/device/checkin", token_of(i), body))
                    return out

                async def send(batch: list[Req]) -> Counter[str]:
                    return await fire(client, batch, opt.concurrency)

                # nginx's CPU per request is tiny: no budget, all ``n`` for resolution
                return await measure(server.proc.pid, reqs, send, n, 1e9, "204")

        return asyncio.run(go())


# --- ratios and the table -----------------------------------------------------------------------

PER_REQUEST = (
    "offer_checkin",
    "status_report",
    "idle_checkin_waiting",
    "idle_checkin_current",
    "idle_checkin_again",
    "rollout_view",
    "dashboard_refresh",
    "dashboard_devices",
)


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    nginx = results.get("reference") or {}
    nginx_ms = nginx.get("server_cpu_ms_per_request")
    out: dict[str, Any] = {}
    for database, sizes in results["databases"].items():
        ordered = sorted(sizes.values(), key=lambda s: s["registered"])
        if not ordered:
            continue
        small, large = ordered[0], ordered[-1]
        r: dict[str, Any] = {"smallest": small["registered"], "largest": large["registered"]}
        for key in PER_REQUEST:
            a = small[key]["server_cpu_ms_per_request"]
            b = large[key]["server_cpu_ms_per_request"]
            r[f"{key}_largest_vs_smallest"] = round(b / a, 2) if a and b else None
        r["background_percent_of_core_largest"] = large["background"]["percent_of_core"]
        r["rollout_view_ms_largest"] = large["rollout_view"]["server_cpu_ms_per_request"]
        r["dashboard_refresh_ms_largest"] = large["dashboard_refresh"]["server_cpu_ms_per_request"]
        r["dashboard_devices_ms_largest"] = large["dashboard_devices"]["server_cpu_ms_per_request"]
        for kind in ("waiting", "current", "again"):
            ms = large[f"idle_checkin_{kind}"]["server_cpu_ms_per_request"]
            r[f"idle_checkin_{kind}_ms_largest"] = ms
            r[f"idle_checkin_{kind}_vs_nginx"] = (
                round(ms / nginx_ms, 1) if ms and nginx_ms else None
            )

        def flat(key: str, r: dict[str, Any] = r) -> bool | None:
            v = r[f"{key}_largest_vs_smallest"]
            return None if v is None else v <= AIM_FLAT

        r["aims"] = {
            "report_flat_within_1.5x": flat("status_report"),
            "idle_checkin_flat_within_1.5x": flat("idle_checkin_waiting"),
            "background_under_2pct": r["background_percent_of_core_largest"] < AIM_BACKGROUND_PCT,
            "rollout_view_under_20ms": (r["rollout_view_ms_largest"] or 0) < AIM_VIEW_MS,
            "dashboard_refresh_under_20ms": (r["dashboard_refresh_ms_largest"] or 0) < AIM_VIEW_MS,
            "idle_checkin_at_most_0.5ms": max(
                r["idle_checkin_waiting_ms_largest"] or 0, r["idle_checkin_current_ms_largest"] or 0
            )
            <= AIM_IDLE_MS,
        }
        out[database] = r
    return out


def table(results: dict[str, Any]) -> str:
    nginx = results.get("reference")
    lines = [
        f"Server CPU per request (ms) by registered devices; otakit from "
        f"{results['machine']['otakit_from']}; load average {results['load_average']}",
        "",
        "| database | registered | offer check-in | report | idle waiting | idle current | "
        "idle again | rollout view | dashboard refresh | devices page | background % core |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for database, sizes in results["databases"].items():
        for s in sorted(sizes.values(), key=lambda s: s["registered"]):
            cells = [
                f"{s[k]['server_cpu_ms_per_request']} ({s[k]['requests']})" for k in PER_REQUEST
            ]
            lines.append(
                f"| {database} | {s['registered']:,} | "
                + " | ".join(cells)
                + f" | {s['background']['percent_of_core']} |"
            )
    if nginx:
        lines += [
            "",
            f"nginx `return 204`, same client, same run: {nginx['server_cpu_ms_per_request']} ms "
            f"per check-in ({nginx['requests']} requests).",
        ]
    lines += ["", "(requests measured in brackets)", ""]
    for database, r in results["ratios"].items():
        lines.append(
            f"{database}: {r['largest']:,} vs {r['smallest']:,} devices: report "
            f"{r['status_report_largest_vs_smallest']}x, idle check-in "
            f"{r['idle_checkin_waiting_largest_vs_smallest']}x; idle check-in vs nginx "
            f"{r['idle_checkin_waiting_vs_nginx']}x (waiting), "
            f"{r['idle_checkin_current_vs_nginx']}x (current), "
            f"{r['idle_checkin_again_vs_nginx']}x (again); aims: "
            + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in r["aims"].items())
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import uvicorn

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "otakit": otakit.__version__,
        "uvicorn": uvicorn.__version__,
        "nginx": _nginx_version(),
        "otakit_from": str(Path(otakit.__file__).parent),
    }


def main() -> int:
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack on stderr
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the servers are stopped
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1000,10000,100000", help="registered devices")
    parser.add_argument("--databases", default="sqlite,postgresql", help="sqlite,postgresql")
    parser.add_argument("--requests", type=int, default=1000, help="requests per window, at most")
    parser.add_argument(
        "--cpu-budget", type=float, default=10.0, help="server CPU seconds per window, at most"
    )
    parser.add_argument("--idle-s", type=float, default=30.0, help="background window, seconds")
    parser.add_argument("--canary", type=int, default=200, help="devices of phase 1 (reporting)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests on the wire")
    parser.add_argument("--page-limit", type=int, default=100, help="devices view page size")
    parser.add_argument("--nginx-requests", type=int, default=20_000, help="nginx check-ins")
    parser.add_argument("--fleet", type=int, default=0, help="fleet devices at the largest size")
    parser.add_argument("--fleet-timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--name", default="scale", help="NAME.json in the results folder")
    add_smoke_options(parser, "writes scale-quick.json", "folder for the JSON (bench/results)")
    args = parser.parse_args()
    check_smoke(parser, args)
    scales = [int(s) for s in args.scales.split(",") if s]
    databases = [d for d in args.databases.split(",") if d]
    if args.smoke:
        scales, args.requests, args.canary, args.idle_s = [50, 100], 6, 10, 0.3
        args.nginx_requests, args.cpu_budget, args.name = 20, 1.0, "scale-quick"
        args.fleet = 3
    unknown = set(databases) - {"sqlite", "postgresql"}
    if unknown or not scales or min(scales) < 10:
        parser.error("--databases takes sqlite and/or postgresql; --scales sizes of 10 or more")
    opt = Options(
        requests=args.requests,
        cpu_budget=args.cpu_budget,
        idle_s=args.idle_s,
        concurrency=args.concurrency,
        page_limit=args.page_limit,
        canary=args.canary,
        fleet=args.fleet,
        fleet_timeout=args.fleet_timeout,
        smoke=args.smoke,
    )
    payload = random.Random(1).randbytes(4096)
    image = sign_image(payload, KEY, SignOptions(ImageVersion.parse(NEW), pad_header=True))
    results: dict[str, Any] = {
        "machine": _machine(),
        "settings": {
            "scales": scales,
            "databases": databases,
            "requests_per_window": args.requests,
            "cpu_budget_s_per_window": args.cpu_budget,
            "idle_window_s": args.idle_s,
            "canary": args.canary,
            "concurrency": args.concurrency,
            "page_limit": args.page_limit,
            "phases": PHASES,
            "workers": 1,
            "smoke": args.smoke,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "databases": {},
    }
    load_before = round(os.getloadavg()[0], 2)
    nginx = _nginx()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-bench-")))
        if nginx is not None:
            print("nginx reference: idle check-ins answered 204", file=sys.stderr)
            results["reference"] = nginx_reference(nginx, stack, opt, args.nginx_requests)
        else:
            results["reference"] = None
            results["reference_missing"] = "nginx is not installed: absolute numbers only"
        for database in databases:
            sizes: dict[str, Any] = {}
            for size in scales:
                with ExitStack() as per_size:
                    url = None
                    if database == "postgresql":
                        url = per_size.enter_context(postgres_database())
                        if url is None:
                            break
                    sizes[str(size)] = one_size(
                        database, url, tmp, size, image, opt, size == max(scales)
                    )
            if sizes:
                results["databases"][database] = sizes
    results["load_average"] = {"before": load_before, "after": round(os.getloadavg()[0], 2)}
    results["ratios"] = ratios(results)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten {out}", file=sys.stderr)
    errors = [
        f"{database} {size} {key}: {s[key]['answers']}"
        for database, sizes in results["databases"].items()
        for size, s in sizes.items()
        for key in PER_REQUEST
        if s[key]["errors"]
    ]
    if errors:
        print("scale_bench: unexpected answers:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"scale_bench: {exc}", file=sys.stderr)
        sys.exit(1)
