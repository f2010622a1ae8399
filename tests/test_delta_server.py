"""Deltas offered over the HTTP device API, against a real ``otakit serve --delta-workers 1``:
a device that says which image it runs (``image_sha256``) and which compressions it applies
(``delta``) gets, once the server has made it, a patch from exactly that image with its job;
the patch is served like an artifact (Range, If-Range, HEAD) only to a device the image is
offered to; a device that reported a failed delta, runs an image the server does not know, or
says nothing new gets the full image, and an original device's answers do not change."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from otakit.image.delta import apply_delta, check_delta, image_digest
from otakit.image.header import ImageVersion
from otakit.image.sign import SignOptions, sign_image
from otakit.server.database import create_engine, database_url
from otakit.server.models import ArtifactDelta, Device

from .server_harness import Server, postgres_database, start_server
from .test_delta import firmware
from .test_device_flows import statements, traced_env
from .test_server import KEY, ORIGINAL

CHECKIN = "/api/v1/device/checkin"
STATUS = "/api/v1/device/status"
JOB_KEYS = [
    "deployment_id",
    "artifact_id",
    "kind",
    "name",
    "version",
    "size",
    "sha256",
    "board",
    "url",
    "url_expires",
]
DELTA_KEYS = {"url", "size", "sha256", "base_sha256", "new_sha256", "compression"}
# offers.delta_for's one statement (the device's delta_error, then the deltas of the offer)
DELTA_LOOKUP = "SELECT (SELECT deployment_devices.delta_error"
STALL = 30.0  # seconds a delta may stay in one state and progress before the test gives up
DONE = ("ready", "not-smaller", "failed")


def signed(version: str, payload: bytes) -> bytes:
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


V1 = signed("1.0.0", firmware())
V2 = signed("2.0.0", firmware(change=64))
V1_SHA = image_digest(V1).sha256.hex()
V2_SHA = image_digest(V2).sha256.hex()
V3 = signed("3.0.0", firmware(change=32))  # another test's image: no delta from the first
V3_SHA = image_digest(V3).sha256.hex()


@dataclass
class Target:
    data: bytearray = field(default_factory=bytearray)

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if len(self.data) < end:
            self.data += b"\xff" * (end - len(self.data))
        self.data[offset:end] = data


@dataclass
class Fleet:
    server: Server
    admin: httpx.Client
    product: str
    group: str = "group-1"
    enroll: str | None = None

    def upload(self, data: bytes, name: str) -> dict[str, Any]:
        response = self.admin.post(
            "/api/v1/artifacts",
            params={"name": name},
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        assert response.status_code in (200, 201), response.text
        uploaded: dict[str, Any] = response.json()
        return uploaded

    def device(self, version: str = "1.0.0") -> tuple[str, str]:
        """A new device of the product and group, enrolled by its first check-in (which sends
        nothing about deltas), and its device token."""
        if self.enroll is None:
            self.enroll = self.server.token(
                "enroll", "--product", self.product, "--group", self.group
            )
        serial = f"dev-{uuid.uuid4().hex[:8]}"
        response = self.check_in(self.enroll, serial, version=version)
        assert response.status_code == 200, response.text
        token: str = response.json()["device_token"]
        return serial, token

    def check_in(self, token: str, serial: str, **extra: object) -> httpx.Response:
        return self.traced_check_in(token, serial, **extra)[0]

    def traced_check_in(
        self, token: str, serial: str, **extra: object
    ) -> tuple[httpx.Response, list[str]]:
        """A check-in, and the SQL statements the server sent meanwhile that are about
        deltas (the background worker's own polls of artifact_deltas left out)."""
        log = self.server.data.parent / "sql.log"
        before = len(statements(log))
        body = {"serial": serial, "version": "1.0.0", "board": "BOARD_A", **extra}
        with self.server.client(token) as client:
            answer = client.post(CHECKIN, json=body)
        sent = statements(log)[before:]
        return answer, [
            s for s in sent if s.startswith(DELTA_LOOKUP) or "INTO artifact_deltas" in s
        ]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("deltas")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgres" else None
        srv = start_server(
            folder / "data",
            database_url=url,
            env=traced_env(folder / "sql.log"),
            extra=("--delta-workers", "1"),
        )
        stack.callback(srv.stop)
        with srv.admin_client() as admin:
            response = admin.post(
                "/api/v1/keys",
                content=KEY.public_key.pem(),
                headers={"content-type": "application/x-pem-file"},
            )
            assert response.status_code == 201, response.text
        yield srv


@pytest.fixture
def fleet(server: Server) -> Iterator[Fleet]:
    """A product of its own (its deployments offer nothing to another test's devices)."""
    with server.admin_client() as admin:
        product = f"prod-{uuid.uuid4().hex[:8]}"
        assert (
            admin.put(f"/api/v1/products/{product}", json={"board": "BOARD_A"}).status_code == 200
        )
        yield Fleet(server, admin, product)


def _from_database(srv: Server, query: Any) -> list[Any]:
    async def run() -> list[Any]:
        engine = create_engine(database_url(srv.database_url, srv.data))
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(query)).all())
        finally:
            await engine.dispose()

    return asyncio.run(run())


def deltas_of(fleet: Fleet, artifact_id: str) -> list[dict[str, Any]]:
    """The artifact's deltas as the management API lists them (its ``deltas``), or, on a
    server whose record has none yet, as the database holds them."""
    record = fleet.admin.get(f"/api/v1/artifacts/{artifact_id}")
    assert record.status_code == 200, record.text
    if "deltas" in record.json():
        listed: list[dict[str, Any]] = record.json()["deltas"]
        return listed
    rows = _from_database(
        fleet.server,
        select(
            ArtifactDelta.base_sha256,
            ArtifactDelta.compression,
            ArtifactDelta.state,
            ArtifactDelta.progress,
            ArtifactDelta.size,
        ).where(ArtifactDelta.artifact_id == artifact_id),
    )
    keys = ("base_sha256", "compression", "state", "progress", "size")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def wait_made(fleet: Fleet, artifact_id: str, base: str) -> dict[str, Any]:
    """The delta from ``base`` once the worker is done with it; fails when its state and
    progress stay the same for :data:`STALL` seconds."""
    seen: tuple[object, ...] | None = None
    deadline = time.monotonic() + STALL
    while True:
        rows = [d for d in deltas_of(fleet, artifact_id) if d["base_sha256"] == base]
        assert len(rows) == 1, rows
        row = rows[0]
        if row["state"] in DONE:
            return row
        now = (row["state"], row["progress"])
        if now != seen:
            seen, deadline = now, time.monotonic() + STALL
        assert time.monotonic() < deadline, f"the delta stayed {seen} for {STALL} s"
        time.sleep(0.05)  # the poll interval; the deadline above follows progress


def stored_image(srv: Server, serial: str) -> str | None:
    rows = _from_database(srv, select(Device.image_sha256).where(Device.serial == serial))
    value: str | None = rows[0][0]
    return value


def plain(job: dict[str, Any]) -> dict[str, Any]:
    """A job without what changes with the clock (the URL's expiry and signature)."""
    return {
        **job,
        "url": re.sub(r"\?expires=.*", "", job["url"]),
        "url_expires": None,
    }


def test_a_delta_is_queued_made_offered_and_served(fleet: Fleet) -> None:
    v1 = fleet.upload(V1, "app-1.img")
    v2 = fleet.upload(V2, "app-2.img")
    response = fleet.admin.post(
        "/api/v1/deployments",
        json={"artifact_id": v2["id"], "product": fleet.product, "group": fleet.group},
    )
    assert response.status_code == 201, response.text
    deployment = response.json()["id"]
    assert v1["id"] != v2["id"]
    assert deltas_of(fleet, v2["id"]) == []  # nothing planned: the artifacts name no product

    # an original device, and an otakit agent that sends nothing new: today's answers
    original, original_token = fleet.device()
    old, old_token = fleet.device()
    with fleet.server.client(original_token) as client:
        doc_before = client.get(f"/devices/{original}/ota_update.json", headers=ORIGINAL)
    assert doc_before.status_code == 200, doc_before.text
    old_before, sent = fleet.traced_check_in(old_token, old)
    assert sent == []  # no keys: nothing about deltas is looked up
    assert old_before.status_code == 200, old_before.text
    assert list(old_before.json()["job"]) == JOB_KEYS

    # the first check-in on v1 asks for the delta: queued, the full image this time
    serial, token = fleet.device()
    first, sent = fleet.traced_check_in(token, serial, image_sha256=V1_SHA, delta=["lzma"])
    assert [s.startswith(DELTA_LOOKUP) for s in sent] == [True, False], sent  # looked, queued
    assert first.status_code == 200, first.text
    assert list(first.json()["job"]) == JOB_KEYS
    assert first.json()["job"]["sha256"] == v2["id"]
    assert stored_image(fleet.server, serial) == V1_SHA
    made = wait_made(fleet, v2["id"], V1_SHA)
    assert (made["state"], made["compression"]) == ("ready", "lzma"), made
    assert len(deltas_of(fleet, v2["id"])) == 1

    # now the job comes with the delta; every other key as before
    second, sent = fleet.traced_check_in(
        token, serial, image_sha256=V1_SHA, delta=["heatshrink", "lzma"]
    )
    assert len(sent) == 1, sent  # one lookup, nothing queued (lzma is there)
    assert second.status_code == 200, second.text
    job = second.json()["job"]
    assert list(job) == [*JOB_KEYS, "delta"]
    assert plain({k: v for k, v in job.items() if k != "delta"}) == plain(first.json()["job"])
    delta = job["delta"]
    assert set(delta) == DELTA_KEYS
    assert (delta["base_sha256"], delta["new_sha256"], delta["compression"]) == (
        V1_SHA,
        V2_SHA,
        "lzma",
    )
    assert delta["url"].startswith(fleet.server.url + "/")
    assert delta["size"] == made["size"]

    # served like an artifact: HEAD, Range, If-Range on the patch's ETag
    anyone = httpx.Client(timeout=30)
    head = anyone.head(delta["url"])
    assert head.status_code == 200, head.text
    assert int(head.headers["content-length"]) == delta["size"]
    etag = head.headers["etag"]
    assert etag == f'"{delta["sha256"]}"'
    part = anyone.get(delta["url"], headers={"range": "bytes=0-99"})
    assert part.status_code == 206, part.text
    assert part.headers["content-range"] == f"bytes 0-99/{delta['size']}"
    rest = anyone.get(delta["url"], headers={"range": "bytes=100-", "if-range": etag})
    assert rest.status_code == 206, rest.text
    stale = anyone.get(delta["url"], headers={"range": "bytes=100-", "if-range": '"other"'})
    assert stale.status_code == 200  # If-Range not matching: the whole file
    patch = part.content + rest.content
    assert stale.content == patch
    assert len(patch) == delta["size"]
    assert hashlib.sha256(patch).hexdigest() == delta["sha256"]
    assert check_delta(patch).compression == "lzma"
    target = Target()
    apply_delta(V1, patch, target)
    assert hashlib.sha256(target.data).hexdigest() == V2_SHA
    assert bytes(target.data) == V2[: len(target.data)]

    # another base the server has no image of: no delta, nothing queued
    stranger, stranger_token = fleet.device()
    unknown = hashlib.sha256(b"another image").hexdigest()
    other, sent = fleet.traced_check_in(
        stranger_token, stranger, image_sha256=unknown, delta=["lzma"]
    )
    assert len(sent) == 1, sent  # looked; nothing to queue from an image nobody uploaded
    assert other.status_code == 200, other.text
    assert list(other.json()["job"]) == JOB_KEYS
    assert [d["base_sha256"] for d in deltas_of(fleet, v2["id"])] == [V1_SHA]
    # a compression the device does not apply: no delta
    heat, sent = fleet.traced_check_in(token, serial, image_sha256=V1_SHA, delta=["heatshrink"])
    assert "delta" not in heat.json()["job"]
    assert len(sent) == 1, sent  # looked, and queued none: the server makes lzma deltas

    # the original device and the agent that sends nothing new: the same answers as before
    with fleet.server.client(original_token) as client:
        doc_after = client.get(f"/devices/{original}/ota_update.json", headers=ORIGINAL)
    assert doc_after.content == doc_before.content
    assert b"elta" not in doc_after.content
    old_after = fleet.check_in(old_token, old)
    assert list(old_after.json()) == list(old_before.json())
    assert plain(old_after.json()["job"]) == plain(old_before.json()["job"])
    assert "delta" not in old_after.text
    # and the device that got the delta, when it sends the keys no more
    without = fleet.check_in(token, serial)
    assert list(without.json()["job"]) == JOB_KEYS
    with fleet.server.client(token) as client:
        twin = client.get("/api/v1/device/twin")
    assert twin.status_code == 200, twin.text
    assert set(twin.json()["desired"]["extFwInfo"]) == {"version", "size", "url", "sas", "sha256"}
    assert "elta" not in twin.text

    # a delta that failed on the device: the full image only, for this deployment
    peer, peer_token = fleet.device()
    assert (
        "delta"
        in fleet.check_in(peer_token, peer, image_sha256=V1_SHA, delta=["lzma"]).json()["job"]
    )
    with fleet.server.client(token) as client:
        report = client.post(
            STATUS,
            json={"status": "downloading", "deployment_id": deployment, "delta_error": "CORRUPT"},
        )
        assert report.status_code == 204, report.text
        bad = client.post(STATUS, json={"status": "downloading", "delta_error": "x" * 33})
        assert bad.status_code == 422
    after = fleet.check_in(token, serial, image_sha256=V1_SHA, delta=["lzma"])
    assert after.status_code == 200, after.text
    assert list(after.json()["job"]) == JOB_KEYS
    # ... which says nothing about another device on the same base
    again = fleet.check_in(peer_token, peer, image_sha256=V1_SHA, delta=["lzma"])
    assert again.json()["job"]["delta"]["sha256"] == delta["sha256"]

    # the URL is the device's: refused for another serial, and once the image is no longer
    # deployed to the device it was signed for
    peer_url = again.json()["job"]["delta"]["url"]
    assert anyone.get(peer_url, headers={"range": "bytes=0-9"}).status_code == 206
    forged = peer_url.replace(f"/{peer}/", f"/{stranger}/")
    assert forged != peer_url
    assert anyone.get(forged).status_code == 403
    moved = fleet.admin.put(f"/api/v1/devices/{peer}", json={"group": "elsewhere"})
    assert moved.status_code == 200, moved.text
    refused = anyone.get(peer_url)
    assert refused.status_code == 403, refused.text
    assert "not deployed" in refused.json()["message"]
    assert anyone.head(peer_url).status_code == 403


def test_the_image_a_device_runs_is_kept_and_idle_check_ins_stay_idle(fleet: Fleet) -> None:
    v3 = fleet.upload(V3, "app-3.img")
    response = fleet.admin.post(
        "/api/v1/deployments",
        json={"artifact_id": v3["id"], "product": fleet.product, "group": fleet.group},
    )
    assert response.status_code == 201, response.text
    serial, token = fleet.device(version="3.0.0")
    said = {"version": "3.0.0", "image_sha256": V3_SHA, "delta": ["lzma"]}
    assert fleet.check_in(token, serial, **said).status_code == 204
    assert stored_image(fleet.server, serial) == V3_SHA
    assert fleet.check_in(token, serial, **said).status_code == 204
    # a device up to date that now runs another image (said on an idle check-in): kept
    assert fleet.check_in(token, serial, **{**said, "image_sha256": V1_SHA}).status_code == 204
    assert stored_image(fleet.server, serial) == V1_SHA
    for wrong in ({"image_sha256": "AB" * 32}, {"delta": ["lzma"] * 5}, {"delta": ["x" * 17]}):
        refused = fleet.check_in(token, serial, **{**said, **wrong})
        assert refused.status_code == 422, wrong
    assert deltas_of(fleet, v3["id"]) == []
