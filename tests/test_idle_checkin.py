"""The idle check-in answered before the web framework (server/api/idle.py): 204 for a device
with nothing to do, in one statement; every other check-in gets the route's own answer, and
the route (not the fast path) is what gave it: the SQL trace of the server process shows
statements other than the fast path's one."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text, update

from otakit.server.database import create_engine, database_url
from otakit.server.models import Device, Token, utcnow

from .server_harness import Server, postgres_database, start_server
from .test_device_flows import IDLE_QUERY, QUIET, Setup, setup, statements, traced_env

CHECKIN = "/api/v1/device/checkin"


@pytest.fixture(params=["sqlite", "postgres"])
def traced(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    log = tmp_path / "sql.log"
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgres" else None
        srv = start_server(tmp_path / "data", database_url=url, env=traced_env(log), extra=QUIET)
        stack.callback(srv.stop)
        yield srv, log


class Traced:
    """Requests to one server, each with the SQL statements it cost."""

    def __init__(self, srv: Server, log: Path) -> None:
        self.srv = srv
        self.log = log

    def post(
        self, token: str | None, body: object = None, **kwargs: object
    ) -> tuple[httpx.Response, list[str]]:
        before = len(statements(self.log))
        with self.srv.client(token) as client:
            if body is not None:
                kwargs["json"] = body
            answer = client.post(CHECKIN, **kwargs)  # type: ignore[arg-type]
        return answer, statements(self.log)[before:]


SEEN_UPDATE = "UPDATE devices SET last_seen"  # api/idle.py's write of a due visit


def fast(sent: list[str]) -> bool:
    """The fast path answered: its one statement and nothing else."""
    return len(sent) == 1 and sent[0].startswith(IDLE_QUERY)


def routed(sent: list[str]) -> bool:
    """The route answered (its statements go through SQLAlchemy)."""
    return any(not s.startswith(IDLE_QUERY) for s in sent)


def change_token(srv: Server, token: str, column: str, value: object) -> None:
    """Set a token's ``revoked_at`` or ``expires_at`` in the database, as another process."""

    async def run() -> None:
        engine = create_engine(database_url(srv.database_url, srv.data))
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    update(Token).where(Token.id == token.split("_")[1]).values({column: value})
                )
        finally:
            await engine.dispose()

    asyncio.run(run())


def set_last_seen(srv: Server, values: dict[str, datetime | None]) -> None:
    """Set devices' ``last_seen`` through the ORM, as another process."""

    async def run() -> None:
        engine = create_engine(database_url(srv.database_url, srv.data))
        try:
            async with engine.begin() as conn:
                for serial, when in values.items():
                    await conn.execute(
                        update(Device).where(Device.serial == serial).values(last_seen=when)
                    )
        finally:
            await engine.dispose()

    asyncio.run(run())


def stored_last_seen(srv: Server, serial: str) -> tuple[datetime | None, object, list[str]]:
    """A device's ``last_seen`` as the ORM reads it, as the column holds it (raw), and the
    serials of the devices seen after a minute ago (an ORM comparison)."""

    async def run() -> tuple[datetime | None, object, list[str]]:
        engine = create_engine(database_url(srv.database_url, srv.data))
        try:
            async with engine.connect() as conn:
                orm = (
                    await conn.execute(select(Device.last_seen).where(Device.serial == serial))
                ).scalar_one()
                raw = (
                    await conn.execute(
                        text("SELECT last_seen FROM devices WHERE serial = :s"), {"s": serial}
                    )
                ).scalar_one()
                recent = (
                    await conn.execute(
                        select(Device.serial).where(
                            Device.last_seen > utcnow() - timedelta(minutes=1)
                        )
                    )
                ).scalars()
                return orm, raw, sorted(recent)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def idle_device(srv: Server, traced: Traced) -> tuple[Setup, str, str, dict[str, str]]:
    fleet = setup(srv)
    fleet.deploy(fleet.upload("1.2.0"))
    serial, token = fleet.device(srv, "1.2.0")
    body = {"serial": serial, "version": "1.2.0", "board": "B1"}
    first, sent = traced.post(token, body)  # writes last_seen: the route
    assert first.status_code == 204, (first.text, sent)
    assert routed(sent), (first.text, sent)
    return fleet, serial, token, body


def test_idle_checkins_are_answered_in_one_statement(traced: tuple[Server, Path]) -> None:
    srv, log = traced
    t = Traced(srv, log)
    _fleet, _serial, token, body = idle_device(srv, t)
    slow, _ = t.post(token, {**body, "manufacturer": "ACME"})  # the route: a change to keep
    for _ in range(5):
        answer, sent = t.post(token, {**body, "manufacturer": "ACME"})
        assert answer.status_code == 204, (answer.text, sent)
        assert fast(sent), (answer.text, sent)
        assert answer.content == b"" == slow.content
        assert sorted(answer.headers) == sorted(slow.headers)  # date, server: the same headers
    metrics = srv.client(srv.admin).get("/metrics").text
    assert 'otakit_checkins_total{api="json",code="204"}' in metrics


def test_what_the_fast_path_does_not_decide_goes_to_the_route(
    traced: tuple[Server, Path],
) -> None:
    srv, log = traced
    t = Traced(srv, log)
    fleet, serial, token, body = idle_device(srv, t)
    assert fast(t.post(token, body)[1])

    # the device says something new: kept by the route
    for change in ({"version": "1.3.0"}, {"board": "B2"}, {"manufacturer_id": "M1"}):
        answer, sent = t.post(token, {**body, **change})
        assert answer.status_code == 204, (change, answer.text, sent)
        assert routed(sent), (change, answer.text, sent)
        assert any(s.upper().startswith("UPDATE") for s in sent), sent
        body = {**body, **change}
        assert fast(t.post(token, body)[1])
    assert fleet.admin.get(f"/api/v1/devices/{serial}").json()["board"] == "B2"

    # a boot counter, an update under way: the route
    answer, sent = t.post(token, {**body, "boots": 3})
    assert answer.status_code == 204
    assert routed(sent)

    # an offer for it: the job
    body["board"] = "B1"
    assert t.post(token, body)[0].status_code == 204
    deployment = fleet.deploy(fleet.upload("1.4.0"))
    answer, sent = t.post(token, body)
    assert answer.status_code == 200, answer.text
    assert routed(sent), answer.text
    assert answer.json()["job"]["deployment_id"] == deployment

    # another device's token, an admin token, an enrollment token
    other_serial, other_token = fleet.device(srv, "1.4.0")
    answer, sent = t.post(other_token, body)
    assert (answer.status_code, answer.json()) == (
        403,
        {"error": "FORBIDDEN", "message": "a device token can only check in for its device"},
    )
    assert routed(sent)
    answer, sent = t.post(srv.admin, body)
    assert (answer.status_code, answer.json()["message"]) == (
        403,
        "admin tokens cannot check in as a device",
    )
    assert routed(sent)

    # a wrong secret, a revoked token, an expired one
    # (the secret may itself contain "_": split off the prefix and id only)
    bad = token[: -len(token.split("_", 2)[2])] + "x" * 20
    answer, sent = t.post(bad, body)
    assert (answer.status_code, answer.json()) == (
        401,
        {"error": "UNAUTHORIZED", "message": "unknown or revoked token"},
    )
    other_body = {"serial": other_serial, "version": "1.4.0", "board": "B1"}
    assert t.post(other_token, other_body)[0].status_code == 204
    assert fast(t.post(other_token, other_body)[1])
    change_token(srv, other_token, "expires_at", utcnow() - timedelta(seconds=1))
    answer, sent = t.post(other_token, other_body)
    assert (answer.status_code, answer.json()) == (
        401,
        {"error": "UNAUTHORIZED", "message": "this token has expired"},
    )
    assert routed(sent)
    change_token(srv, other_token, "revoked_at", utcnow())
    answer, sent = t.post(other_token, other_body)
    assert (answer.status_code, answer.json()) == (
        401,
        {"error": "UNAUTHORIZED", "message": "this token has revoked"},
    )
    assert routed(sent)


def test_bodies_the_route_refuses_get_the_routes_answer(traced: tuple[Server, Path]) -> None:
    """Malformed, invalid and oversized bodies: with the device's token (which the fast path
    looks at) the same answer as without one (which it never looks at)."""
    srv, log = traced
    t = Traced(srv, log)
    _fleet, serial, token, _body = idle_device(srv, t)
    json_type = {"content-type": "application/json"}
    for content in (
        b'{"serial": ',
        b"[]",
        b'{"serial": "' + b"x" * 65 + b'"}',
        b'{"serial": "%s", "boots": -1}' % serial.encode(),
        b'{"serial": "%s", "pad": "%s"}' % (serial.encode(), b"x" * 9000),
    ):
        with_token, sent = t.post(token, content=content, headers=json_type)
        without, _ = t.post(None, content=content, headers=json_type)
        assert with_token.status_code in (413, 422), with_token.text
        assert (with_token.status_code, with_token.json()) == (
            without.status_code,
            without.json(),
        )
        assert not any(s.startswith(IDLE_QUERY) for s in sent), sent
    # an oversized body without Content-Length (chunked): the route reads the rest, 413
    chunks = [b'{"serial": "%s", "pad": "' % serial.encode(), b"x" * 9000, b'"}']
    with_token, sent = t.post(token, content=iter(chunks), headers=json_type)
    without, _ = t.post(None, content=iter(chunks), headers=json_type)
    assert with_token.status_code == 413, with_token.text
    assert with_token.json() == without.json()
    assert not any(s.startswith(IDLE_QUERY) for s in sent), sent
    # a JSON body sent as another type: the route's answer
    answer, sent = t.post(token, content=b'{"serial": "%s"}' % serial.encode())
    assert answer.status_code == 422
    assert routed(sent)


def test_an_offer_made_through_another_server_is_seen_at_once(tmp_path: Path) -> None:
    """The fast path of one server reads the offers revision with the device: a deployment
    made through another server reaches the device at its next check-in."""
    log = tmp_path / "sql.log"
    with postgres_database() as url:
        one = start_server(tmp_path / "one", database_url=url, extra=QUIET)
        try:
            two = start_server(tmp_path / "two", database_url=url, env=traced_env(log), extra=QUIET)
            try:
                t = Traced(two, log)
                fleet = setup(one)
                serial, token = fleet.device(one, "1.0.0")
                body = {"serial": serial, "version": "1.0.0", "board": "B1"}
                assert t.post(token, body)[0].status_code == 204
                assert fast(t.post(token, body)[1])
                deployment = fleet.deploy(fleet.upload("1.1.0"), group=None)  # through one
                answer, sent = t.post(token, body)
                assert answer.status_code == 200, answer.text
                assert routed(sent), answer.text
                assert answer.json()["job"]["deployment_id"] == deployment
            finally:
                two.stop()
        finally:
            one.stop()


def test_a_due_visit_is_written_by_the_fast_path(traced: tuple[Server, Path]) -> None:
    """A device that polls less often than once a minute (checkin.LAST_SEEN_RESOLUTION) has
    its visit written by the fast path itself: the read and one conditional UPDATE, stored as
    the ORM stores it (read back, compared and sorted by the ORM); within the minute the next
    check-in writes nothing."""
    srv, log = traced
    t = Traced(srv, log)
    fleet, serial, token, body = idle_device(srv, t)
    before, after = fleet.device(srv, "1.2.0")[0], fleet.device(srv, "1.2.0")[0]
    start = utcnow()
    set_last_seen(
        srv,
        {
            serial: start - timedelta(minutes=30),
            before: start - timedelta(seconds=20),  # seen after serial's last visit...
            after: start + timedelta(minutes=5),  # ...and after its visit to come
        },
    )
    answer, sent = t.post(token, body)
    assert answer.status_code == 204, (answer.text, sent)
    assert len(sent) == 2, sent
    assert sent[0].startswith(IDLE_QUERY), sent
    assert sent[1].startswith(SEEN_UPDATE), sent
    seen = fleet.admin.get(f"/api/v1/devices/{serial}").json()["last_seen"]
    written = datetime.fromisoformat(seen)
    assert written.tzinfo is not None
    assert start <= written <= utcnow(), (start, seen)
    orm, raw, recent = stored_last_seen(srv, serial)
    assert orm == written
    assert serial in recent
    assert before in recent
    if isinstance(raw, str):  # SQLite: SQLAlchemy's text, UTC without a zone
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", raw), raw
        assert raw == written.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    newest = fleet.admin.get("/api/v1/devices", params={"sort": "-last_seen", "limit": 500})
    order = [d["serial"] for d in newest.json() if d["serial"] in (serial, before, after)]
    assert order == [after, serial, before], newest.json()

    # within the minute: nothing to write, the one statement
    answer, sent = t.post(token, body)
    assert answer.status_code == 204, (answer.text, sent)
    assert fast(sent), sent
    assert fleet.admin.get(f"/api/v1/devices/{serial}").json()["last_seen"] == seen

    # never seen: written too
    set_last_seen(srv, {serial: None})
    answer, sent = t.post(token, body)
    assert answer.status_code == 204
    assert [s[:12] for s in sent] == [IDLE_QUERY[:12], SEEN_UPDATE[:12]], sent
    assert fleet.admin.get(f"/api/v1/devices/{serial}").json()["last_seen"] is not None

    # due, and something else to write: the route, as before
    set_last_seen(srv, {serial: start - timedelta(minutes=30)})
    answer, sent = t.post(token, {**body, "version": "1.2.1"})
    assert answer.status_code == 204
    assert routed(sent), sent
    assert not any(s.startswith(SEEN_UPDATE) for s in sent), sent


def test_a_locked_sqlite_database_sends_the_due_visit_to_the_route(tmp_path: Path) -> None:
    """Another writer holds SQLite's write lock: the fast path does not wait for it (it would
    hold up the event loop) and hands the check-in to the route, which waits its turn."""
    log = tmp_path / "sql.log"
    srv = start_server(tmp_path / "data", env=traced_env(log), extra=QUIET)
    try:
        t = Traced(srv, log)
        fleet, serial, token, body = idle_device(srv, t)
        set_last_seen(srv, {serial: utcnow() - timedelta(minutes=30)})
        lock = sqlite3.connect(srv.data / "otakit.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        released = False
        answers: list[tuple[httpx.Response, list[str]]] = []
        poster = threading.Thread(target=lambda: answers.append(t.post(token, body)))
        try:
            before = len(statements(log))
            poster.start()
            # the fast path tried its UPDATE and the route began: release the lock then
            deadline = utcnow() + timedelta(seconds=20)
            while utcnow() < deadline:
                sent = statements(log)[before:]
                tried = [i for i, s in enumerate(sent) if s.startswith(SEEN_UPDATE)]
                if tried and len(sent) > tried[0] + 1:
                    break
                poster.join(0.01)
            lock.execute("ROLLBACK")
            released = True
        finally:
            if not released:
                lock.execute("ROLLBACK")
            lock.close()
            poster.join(30)
        answer, sent = answers[0]
        assert answer.status_code == 204, (answer.text, sent)
        assert sent[1].startswith(SEEN_UPDATE), sent
        assert routed(sent[2:]), sent
        seen = datetime.fromisoformat(
            fleet.admin.get(f"/api/v1/devices/{serial}").json()["last_seen"]
        )
        assert utcnow() - seen < timedelta(minutes=1)
    finally:
        srv.stop()
