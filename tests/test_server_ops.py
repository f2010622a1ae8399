"""Operating the update server: outages, health, serve options, and races between servers.

Everything here runs real ``otakit serve`` processes (tests/server_harness.py) on a real
PostgreSQL database and, where a bucket is needed, moto's S3 server. Outages are real too: the
test's own database refuses connections (``ALLOW_CONNECTIONS false`` and its backends ended),
the S3 server is stopped. Waiting is polling on what the server answers, with a deadline.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from otakit.server.app import SIGNING_KEY
from otakit.server.urls import sign_path

from .server_harness import (
    BIN,
    S3_ENV,
    Server,
    _psql,
    postgres_database,
    s3_service,
    start_server,
)
from .test_server import KEY, Fleet, image

DEADLINE = 60.0


def poll(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Ask ``check`` until it is true; AssertionError after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline:g} s")
        time.sleep(0.05)


def fleet_on(server: Server, product: str | None = None) -> Fleet:
    """Trusted key and product on ``server`` (idempotent: a second server may call it too)."""
    admin = server.admin_client()
    product = product or f"prod-{uuid.uuid4().hex[:8]}"
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code in (201, 409)
    assert admin.put(f"/api/v1/products/{product}", json={"board": "BOARD_A"}).status_code == 200
    return Fleet(server, admin, product, "group-1")


def upload(client: httpx.Client, data: bytes, name: str = "app.img") -> httpx.Response:
    return client.post(
        "/api/v1/artifacts",
        params={"name": name},
        content=data,
        headers={"content-type": "application/octet-stream"},
    )


def signed_path(server: Server, artifact: dict[str, Any]) -> str:
    """A signed download path for ``artifact``, as a job document would carry it (signed with
    the key the servers keep in their database)."""
    query = f"SELECT value FROM settings WHERE key = '{SIGNING_KEY}'"
    if server.database_url:
        found = subprocess.run(
            ["psql", server.database_url, "-tAc", query],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert found.returncode == 0, found.stderr
        key = found.stdout.strip()
    else:
        with sqlite3.connect(server.data / "otakit.db") as db:
            key = db.execute(query).fetchone()[0]
    return sign_path(key, f"/dl/{artifact['id']}/{artifact['name']}", 3600)


@contextmanager
def two_servers(
    tmp_path: Path, url: str, printed: list[str] | None = None, **kwargs: object
) -> Iterator[tuple[Server, Server]]:
    """Two ``otakit serve`` processes on one database, started at the same time; the admin
    tokens they printed go to ``printed``, and both servers get the one to use."""
    started: dict[str, Server] = {}
    failures: list[BaseException] = []

    def start(name: str) -> None:
        try:
            started[name] = start_server(tmp_path / name, database_url=url, **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if failures:
            raise failures[0]
        a, b = started["a"], started["b"]
        if printed is not None:
            printed += [t for t in (a.admin, b.admin) if t]
        a.admin = b.admin = a.admin or b.admin
        yield a, b
    finally:
        for server in started.values():
            server.stop()


def failed_lines(server: Server) -> list[str]:
    """The server's log so far (a clean stop, so that every line is in)."""
    server.stop()
    while True:
        line = server.stderr.get(timeout=30)
        if line is None:
            return server.log
        server.log.append(line)


# --- health ----------------------------------------------------------------------------------


def test_livez_and_healthz_report_what_they_check(tmp_path: Path) -> None:
    """/healthz asks the blob store (here a folder that cannot exist: 503 naming it), /livez
    does not."""
    in_the_way = tmp_path / "in-the-way"
    in_the_way.write_text("a file where the blob folder's parent should be")
    broken = start_server(tmp_path / "broken", blob_url=f"file://{in_the_way}/blobs")
    options = ("--pool-size", "2", "--pool-timeout", "3", "--statement-timeout", "5")
    fine = start_server(tmp_path / "fine", extra=(*options, "--keep-alive", "75"))
    try:
        ok = httpx.get(f"{fine.url}/healthz")
        assert ok.status_code == 200
        assert ok.json() | {"version": ""} == {
            "status": "ok",
            "version": "",
            "database": "ok",
            "blobs": "ok",
        }
        assert httpx.get(f"{broken.url}/livez").status_code == 200
        sick = httpx.get(f"{broken.url}/healthz")
        assert sick.status_code == 503
        assert sick.headers["retry-after"]
        assert sick.json()["database"] == "ok"
        assert str(in_the_way) in sick.json()["blobs"]
    finally:
        broken.stop()
        fine.stop()


# --- serve options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ("--pool-size", "0"),
        ("--pool-timeout", "0"),
        ("--statement-timeout", "-1"),
        ("--keep-alive", "0"),
    ],
)
def test_serve_refuses_bad_pool_and_timeout_options(
    tmp_path: Path, option: tuple[str, str]
) -> None:
    result = subprocess.run(
        [str(BIN / "otakit"), "serve", "--data", str(tmp_path), *option],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"{option[0]} must" in result.stderr
    assert "Traceback" not in result.stderr


def test_pool_and_statement_timeouts_are_unavailable_not_bugs() -> None:
    """A statement past --statement-timeout and a request finding no free connection within
    --pool-timeout are 'try again' (503), on a real PostgreSQL."""
    from otakit.errors import UnavailableError
    from otakit.server.database import database_url, server_engine, unavailable

    with postgres_database() as url:

        async def run() -> tuple[UnavailableError | None, UnavailableError | None]:
            engine = server_engine(
                database_url(url, Path()), pool_size=1, pool_timeout=0.2, statement_timeout=0.1
            )
            try:
                try:
                    async with engine.connect() as connection:
                        await connection.execute(text("SELECT pg_sleep(5)"))
                    slow = None
                except Exception as exc:
                    slow = unavailable(exc)
                held = [await engine.connect(), await engine.connect()]  # pool + overflow
                try:
                    async with engine.connect():
                        busy = None
                except Exception as exc:
                    busy = unavailable(exc)
                for connection in held:
                    await connection.close()
                return slow, busy
            finally:
                await engine.dispose()

        slow, busy = asyncio.run(run())
        assert slow is not None
        assert "statement timeout" in str(slow.value)
        assert busy is not None
        assert busy.retry_after == 1


# --- the database goes away and comes back ---------------------------------------------------


def test_database_outage_is_503_with_retry_after_and_nothing_is_lost(tmp_path: Path) -> None:
    with postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        # rollouts evaluated often: the engine meets the outage too, and must not spill tracebacks
        server = start_server(
            tmp_path / "data", database_url=url, extra=("--rollout-interval", "0.2")
        )
        try:
            fleet = fleet_on(server)
            artifact = fleet.upload(image("2.0.0"))
            serial, token = fleet.device()
            device = server.client(token)
            checkin = {"serial": serial, "version": "1.0.0"}
            before = device.post("/api/v1/device/checkin", json=checkin)
            assert before.status_code in (200, 204), before.text
            first_range = {"range": "bytes=0-4095"}
            download = f"{server.url}{signed_path(server, artifact)}"
            assert httpx.get(download, headers=first_range).status_code == 206

            refused = _psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            assert refused.returncode == 0, refused.stderr
            ended = _psql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
            assert ended.returncode == 0, ended.stderr

            failing = [
                fleet.admin.get(f"/api/v1/artifacts/{artifact['id']}"),
                fleet.admin.get("/api/v1/products"),
                device.post("/api/v1/device/checkin", json=checkin),
                httpx.get(f"{server.url}/healthz"),
            ]
            for answer in failing:
                assert answer.status_code == 503, answer.text
                assert int(answer.headers["retry-after"]) > 0
            for answer in failing[:3]:
                assert answer.json()["error"] == "UNAVAILABLE"
                assert "database" in answer.json()["message"]
            assert failing[3].json()["blobs"] == "ok"
            assert httpx.get(f"{server.url}/livez").status_code == 200
            # nothing can be deleted while the database is away: signed URLs are still served
            assert httpx.get(download, headers=first_range).status_code == 206

            back = _psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert back.returncode == 0, back.stderr
            poll("healthy again", lambda: httpx.get(f"{server.url}/healthz").status_code == 200)
            again = fleet.admin.get(f"/api/v1/artifacts/{artifact['id']}")
            assert again.status_code == 200
            assert again.json()["sha256"] == artifact["sha256"]
            after = device.post("/api/v1/device/checkin", json=checkin)
            assert (after.status_code, after.content) == (before.status_code, before.content)
            assert fleet.admin.get(f"/api/v1/devices/{serial}").status_code == 200
        finally:
            log = failed_lines(server)
        assert not any("Traceback" in line for line in log), "".join(log)
        # one line for each request that failed (the /healthz 503 is an answer, not a failure)
        assert sum(": 503 the database is unavailable" in line for line in log) == 3, "".join(log)


# --- S3 ----------------------------------------------------------------------------------------


def test_s3_down_with_a_cold_cache_is_503_not_404(tmp_path: Path) -> None:
    with s3_service() as s3:
        server = start_server(tmp_path / "data", blob_url=s3.blob_url, env=S3_ENV)
        try:
            fleet = fleet_on(server)
            path = signed_path(server, fleet.upload(image("3.0.0")))
            s3.stop()
            answer = httpx.get(f"{server.url}{path}", headers={"range": "bytes=0-4095"}, timeout=60)
            assert answer.status_code == 503, answer.text
            assert int(answer.headers["retry-after"]) > 0
            assert answer.json()["error"] == "UNAVAILABLE"
            health = httpx.get(f"{server.url}/healthz", timeout=60)
            assert health.status_code == 503
            assert health.json()["database"] == "ok"
            assert health.json()["blobs"] != "ok"
        finally:
            log = failed_lines(server)
        assert not any("Traceback" in line for line in log), "".join(log)


# --- races between two servers on one database -----------------------------------------------


def test_same_artifact_through_two_servers_at_once_is_201_and_200(tmp_path: Path) -> None:
    blobs = tmp_path / "shared-blobs"
    with (
        postgres_database() as url,
        two_servers(tmp_path, url, blob_url=f"file://{blobs}") as (a, b),
    ):
        fleet_on(a)
        clients = [a.admin_client(), b.admin_client()]
        for round_ in range(5):
            data = image(f"1.{round_}.0")
            answers: list[httpx.Response] = []
            barrier = threading.Barrier(2)

            def send(
                client: httpx.Client,
                data: bytes = data,
                answers: list[httpx.Response] = answers,
                barrier: threading.Barrier = barrier,
            ) -> None:
                barrier.wait()
                answers.append(upload(client, data))

            threads = [threading.Thread(target=send, args=(c,)) for c in clients]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(r.status_code for r in answers) == [200, 201], [r.text for r in answers]
            assert answers[0].json()["id"] == answers[1].json()["id"]
        listed = clients[1].get("/api/v1/artifacts")
        assert listed.status_code == 200


@pytest.mark.parametrize("schema", ["none", "migrated"])
def test_two_hosts_on_an_empty_database_print_one_first_admin_token(
    tmp_path: Path, schema: str
) -> None:
    """Both hosts start at once on a database with no token: on a database with no schema yet
    (their migrations serialise, which spreads them apart), and on one whose schema an operator
    created first (``otakit token list``), where they reach the first token together."""
    for _round in range(4):
        tokens: list[str] = []
        with postgres_database() as url:
            if schema == "migrated":
                listed = subprocess.run(
                    [str(BIN / "otakit"), "token", "list", "--database-url", url],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert listed.returncode == 0, listed.stderr
            with two_servers(tmp_path / uuid.uuid4().hex, url, tokens) as (a, b):
                assert len(tokens) == 1, tokens
                # and it is a working admin token, on either server
                for server in (a, b):
                    assert server.client(tokens[0]).get("/api/v1/products").status_code == 200


def test_a_deleted_artifact_is_served_by_no_server_and_cached_copies_go(tmp_path: Path) -> None:
    """Server b has served (and cached) the artifact from S3; a deletes it: b answers 404 for
    the same signed URL at once and its cached copy is removed."""
    with ExitStack() as stack:
        url = stack.enter_context(postgres_database())
        s3 = stack.enter_context(s3_service())
        a, b = stack.enter_context(two_servers(tmp_path, url, blob_url=s3.blob_url, env=S3_ENV))
        fleet = fleet_on(a)
        data = image("5.0.0")
        artifact = fleet.upload(data)
        path = signed_path(a, artifact)
        assert httpx.get(f"{b.url}{path}").content == data
        cached = list((b.data / "blob-cache").glob("??/*"))
        assert [p.name for p in cached] == [artifact["id"]]

        assert fleet.admin.delete(f"/api/v1/artifacts/{artifact['id']}").status_code == 204

        for server in (b, a):
            gone = httpx.get(f"{server.url}{path}", headers={"range": "bytes=0-4095"})
            assert gone.status_code == 404, gone.text
        assert not cached[0].exists()


def test_a_server_drops_cached_copies_of_artifacts_deleted_elsewhere(tmp_path: Path) -> None:
    """Server b cached two artifacts; a deletes one while b is down, and b is never asked for
    it again: b removes that copy when it starts (its cache sweep), and keeps the other."""
    with ExitStack() as stack:
        url = stack.enter_context(postgres_database())
        s3 = stack.enter_context(s3_service())
        a, b = stack.enter_context(two_servers(tmp_path, url, blob_url=s3.blob_url, env=S3_ENV))
        fleet = fleet_on(a)
        kept, deleted = fleet.upload(image("6.0.0")), fleet.upload(image("6.1.0"))
        for artifact in (kept, deleted):
            assert httpx.get(f"{b.url}{signed_path(a, artifact)}").status_code == 200
        cache = b.data / "blob-cache"
        assert sorted(p.name for p in cache.glob("??/*")) == sorted([kept["id"], deleted["id"]])

        b.stop()
        assert fleet.admin.delete(f"/api/v1/artifacts/{deleted['id']}").status_code == 204
        again = start_server(b.data, database_url=url, blob_url=s3.blob_url, env=S3_ENV)
        stack.callback(again.stop)
        poll(
            "the stale copy removed",
            lambda: not (cache / deleted["id"][:2] / deleted["id"]).exists(),
        )
        assert [p.name for p in cache.glob("??/*")] == [kept["id"]]
