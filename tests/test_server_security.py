"""Attacks on a running update server (issue 13), each reproduced against real ``otakit serve``
processes on loopback: reports that would steer another product's rollout, bodies sent to
exhaust memory, malformed signed URLs and ranges, leftover tokens, unbounded anonymous results,
and the decisions that close the rest (expiring and rotated tokens, one serial namespace,
held empty phases, no CDN pages, no trailer in an uploaded image).
"""

from __future__ import annotations

import select
import socket
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server_harness import Server, start_server
from .test_server import KEY, image

BOARD = "BOARD_A"


@dataclass
class Product:
    """A product with its own enrollment token, on a shared server."""

    server: Server
    admin: httpx.Client
    name: str
    enroll: str

    def device(self, serial: str | None = None, version: str = "1.0.0") -> tuple[str, str]:
        """Enroll a device as the agent does; (serial, its own token)."""
        serial = serial or f"{self.name}-{uuid.uuid4().hex[:6]}"
        answer = self.server.client(self.enroll).post(
            "/api/v1/device/checkin", json={"serial": serial, "board": BOARD, "version": version}
        )
        assert answer.status_code in (200, 204), answer.text
        return serial, answer.json()["device_token"]


def new_product(server: Server, *, group: str = "field", **policy: Any) -> Product:
    admin = server.admin_client()
    name = f"p{uuid.uuid4().hex[:8]}"
    response = admin.put(f"/api/v1/products/{name}", json={"board": BOARD, **policy})
    assert response.status_code == 200, response.text
    enroll = server.token("enroll", "--product", name, "--group", group)
    return Product(server, admin, name, enroll)


def trust_key(server: Server) -> None:
    response = server.admin_client().post("/api/v1/keys", content=KEY.public_key.pem())
    assert response.status_code in (200, 201, 409), response.text


def upload(product: Product, version: str) -> dict[str, Any]:
    response = product.admin.post(
        "/api/v1/artifacts",
        params={"name": "app.img", "product": product.name},
        content=image(version),
    )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def rollout(
    product: Product, artifact: dict[str, Any], phases: list[dict[str, Any]]
) -> dict[str, Any]:
    body = {
        "deployment": {"artifact_id": artifact["id"], "product": product.name, "group": "field"},
        "phases": phases,
    }
    response = product.admin.post("/api/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One SQLite server for the tests that read its log or its files."""
    server = start_server(tmp_path_factory.mktemp("secure"), extra=("--anonymous-history", "5"))
    try:
        trust_key(server)
        yield server
    finally:
        server.stop()


# --- 1. no device steers another's rollout ----------------------------------------------------


def test_reports_count_only_for_what_was_offered(server: Server) -> None:
    trust_key(server)
    sensor, other = new_product(server), new_product(server)
    real = [other.device(version="1.0.0") for _ in range(3)]
    plan = rollout(other, upload(other, "1.1.0"), [{"percent": 100, "success": 100}])
    deployment = plan["deployment_id"]

    # a device of product "sensor" reports a revert for product "other"'s deployment
    _serial, token = sensor.device()
    attacker = server.client(token)
    report = {"status": "error", "error": "reverted: to 1.0.0", "deployment_id": deployment}
    refused = attacker.post("/api/v1/device/status", json=report)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "NOT_OFFERED"
    # 30 devices minted with one enrollment token of "sensor" report that they applied it
    minted = [sensor.device() for _ in range(30)]
    applied = {"status": "applied", "version": "1.1.0", "deployment_id": deployment}
    for _serial, token in minted:
        answer = server.client(token).post("/api/v1/device/status", json=applied)
        assert answer.status_code == 403, answer.text

    shown = other.admin.get(f"/api/v1/rollouts/{plan['id']}").json()
    assert shown["state"] == "running", shown["reason"]
    assert shown["counts"]["Applied"] == shown["counts"]["Error"] == 0
    assert shown["targeted"] == len(real)

    # the deployment's own devices are counted
    for _serial, token in real:
        answer = server.client(token).post("/api/v1/device/status", json=applied)
        assert answer.status_code == 204, answer.text
    done = other.admin.get(f"/api/v1/rollouts/{plan['id']}").json()
    assert done["counts"]["Applied"] == len(real)
    assert done["state"] == "completed"
    # a deployment that does not exist is still 404
    missing = attacker.post("/api/v1/device/status", json={**applied, "deployment_id": 999_999})
    assert missing.status_code == 404


def test_a_refused_report_is_logged(live: Server) -> None:
    sensor, other = new_product(live), new_product(live)
    other.device()
    plan = rollout(other, upload(other, "1.1.0"), [{"percent": 100}])
    serial, token = sensor.device()
    report = {"status": "applied", "deployment_id": plan["deployment_id"]}
    assert live.client(token).post("/api/v1/device/status", json=report).status_code == 403
    line = live.wait_log("refused a report")
    assert serial in line
    assert str(plan["deployment_id"]) in line


def test_a_phase_that_matches_no_device_is_held(server: Server) -> None:
    trust_key(server)
    product = new_product(server, group="canary")
    serial, token = product.device()
    artifact = upload(product, "1.1.0")
    body = {
        "deployment": {"artifact_id": artifact["id"], "product": product.name},
        "phases": [{"group": "canry"}, {"percent": 100}],  # a mistyped group name
    }
    response = product.admin.post("/api/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    plan = response.json()
    assert plan["state"] == "running"
    assert plan["phase"] == 1  # not passed: it would open phase 2, everyone
    assert plan["phases"][0]["targeted"] == 0
    assert plan["awaiting_approval"] is True
    device = server.client(token)
    assert device.post("/api/v1/device/checkin", json={"serial": serial}).status_code == 204
    # the operator decides: approving opens the next phase
    approved = product.admin.post(f"/api/v1/rollouts/{plan['id']}/approve")
    assert approved.status_code == 200, approved.text
    assert approved.json()["phase"] == 2
    offered = device.post("/api/v1/device/checkin", json={"serial": serial})
    assert offered.status_code == 200
    assert offered.json()["job"]["version"] == "1.1.0"


# --- 3. bodies are bounded, and not read without credentials ----------------------------------


def _raw(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _status_of(sock: socket.socket) -> tuple[int, bytes]:
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    return int(answer.split(b" ", 2)[1]), answer


def test_a_huge_declared_body_is_refused_before_it_is_sent(live: Server) -> None:
    for path, auth in (
        ("/api/v1/device/checkin", b""),  # may enroll without a token: capped
        ("/api/v1/deployments", b""),  # needs a token: refused first
        ("/api/v1/deployments", f"authorization: Bearer {live.admin}\r\n".encode()),
        ("/ota-update.bin", b""),  # a result
    ):
        with _raw(live) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n".encode()
                + auth
                + f"content-length: {500 * 1024 * 1024}\r\n\r\n".encode()
            )
            status, answer = _status_of(sock)  # no body byte was sent
        assert status in (401, 413), answer
        assert status == (401 if path == "/api/v1/deployments" and not auth else 413), answer


def test_a_streamed_body_is_cut_off_at_its_limit(live: Server) -> None:
    """A chunked body without a length: the server answers 413 once it passes the limit,
    long before the client has sent the 64 MiB it is willing to send."""
    chunk = b"x" * 65536
    budget = 64 * 1024 * 1024
    with _raw(live) as sock:
        sock.sendall(
            b"POST /api/v1/device/checkin HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        sent = 0
        while sent < budget:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, answer = _status_of(sock)
    assert status == 413, answer
    assert b"TOO_LARGE" in answer or status == 413
    assert sent < budget // 2, f"the server read {sent} bytes before answering"


def test_large_json_is_413_for_devices_and_admins(live: Server) -> None:
    admin = live.admin_client()
    big = {"deployment": {"artifact_id": "x" * 70_000}}
    answer = admin.post("/api/v1/rollouts", json=big)
    assert answer.status_code == 413
    assert answer.json()["error"] == "TOO_LARGE"
    device = live.client().post("/api/v1/device/checkin", json={"serial": "a", "pad": "y" * 9000})
    assert device.status_code == 413
    assert device.json()["error"] == "TOO_LARGE"


# --- 7. no input makes a 500 ------------------------------------------------------------------


def test_malformed_signed_urls_and_ranges_are_refused_not_500(server: Server) -> None:
    trust_key(server)
    product = new_product(server, anonymous=True)
    artifact = upload(product, "1.0.1")
    client = server.client()
    deployed = product.admin.post(
        "/api/v1/deployments",
        json={"artifact_id": artifact["id"], "product": product.name, "priority": 2_000_000},
    )
    assert deployed.status_code == 201, deployed.text
    path = f"/dl/{artifact['id']}/app.img"
    try:
        for query, expected in (
            ("expires=%C2%B2&sig=x", 403),
            ("expires=" + "9" * 4301 + "&sig=x", 403),
            ("expires=99999999999&sig=%C3%A9", 403),
            ("expires=99999999999&sig=" + "A" * 43, 403),
            ("expires=-1&sig=x", 403),
            ("sig=x", 403),
        ):
            answer = client.get(f"{path}?{query}")
            assert answer.status_code == expected, (query, answer.text)
            assert answer.json()["error"] == "FORBIDDEN"
        huge = "9" * 5000
        serial, token = product.device()
        device_path = f"/devices/{serial}/files/{artifact['id']}/app.img"
        for target, auth in (("/ota-update.bin", None), (device_path, token)):
            files = server.client(auth)
            for header, expected in (
                (f"bytes={huge}-".encode(), 416),
                (f"bytes=0-{huge}".encode(), 206),
                (f"bytes=-{huge}".encode(), 206),
                (f"bytes={huge}-{huge}".encode(), 416),
                (f"bytes=0-1,{huge}-".encode(), 206),  # several ranges (Starlette's parser)
                (b"bytes=\xb2-", 200),  # not a range: ignored
            ):
                answer = files.get(target, headers={b"range": header})
                assert answer.status_code == expected, (target, header[:20], answer.text[:200])
                if expected == 416:
                    assert answer.headers["content-range"] == f"bytes */{artifact['size']}"
            whole = files.get(target, headers={"range": f"bytes=0-{huge}"})
            assert whole.status_code == 206
            assert len(whole.content) == artifact["size"]
    finally:
        product.admin.put(f"/api/v1/products/{product.name}", json={"board": BOARD})


# --- 8. the data folder is private --------------------------------------------------------------


def test_data_folder_and_database_are_private(live: Server) -> None:
    assert stat.S_IMODE(live.data.stat().st_mode) == 0o700
    for name in ("otakit.db", "otakit.db-wal"):
        assert stat.S_IMODE((live.data / name).stat().st_mode) == 0o600, name


def test_an_existing_open_data_folder_is_closed(tmp_path: Path) -> None:
    data = tmp_path / "open"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "otakit.db").touch()
    (data / "otakit.db").chmod(0o644)
    server = start_server(data)
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "otakit.db").stat().st_mode) == 0o600
    finally:
        server.stop()


# --- 9. a deleted device's tokens die with it ---------------------------------------------------


def test_deleting_a_device_revokes_its_tokens(server: Server) -> None:
    trust_key(server)
    first, second = new_product(server), new_product(server)
    serial, token = first.device()
    old = server.client(token)
    assert old.get(f"/devices/{serial}/ota_update.json").status_code == 200
    assert first.admin.delete(f"/api/v1/devices/{serial}").status_code == 204
    # the serial is registered again, for another product that has an update
    second.admin.post(
        "/api/v1/deployments",
        json={"artifact_id": upload(second, "3.0.0")["id"], "product": second.name},
    )
    _same, new_token = second.device(serial)
    assert new_token != token
    for answer in (
        old.get(f"/devices/{serial}/ota_update.json"),
        old.post("/api/v1/device/checkin", json={"serial": serial}),
    ):
        assert answer.status_code == 401, answer.text
        assert "revoked" in answer.json()["message"]
    assert server.client(new_token).get(f"/devices/{serial}/ota_update.json").status_code == 200


# --- 12. anonymous results are capped -----------------------------------------------------------


def test_anonymous_results_are_capped(live: Server) -> None:
    product = new_product(live, anonymous=True)
    artifact = upload(product, "1.0.2")
    response = product.admin.post(
        "/api/v1/deployments",
        json={"artifact_id": artifact["id"], "product": product.name, "priority": 3_000_000},
    )
    assert response.status_code == 201
    anonymous = live.client()
    try:
        for n in range(40):
            body = {"Message": "Failure", "Reason": f"attempt {n}"}
            assert anonymous.post("/ota-update.bin", json=body).status_code == 200
    finally:
        product.admin.put(f"/api/v1/products/{product.name}", json={"board": BOARD})
    with sqlite3.connect(live.data / "otakit.db") as db:
        rows = db.execute(
            "SELECT error FROM status_reports WHERE device_serial IS NULL ORDER BY id"
        ).fetchall()
    assert [error for (error,) in rows] == [f"attempt {n}" for n in range(35, 40)]


# --- 13. every error has the documented shape ---------------------------------------------------


def test_framework_errors_have_the_documented_shape(live: Server) -> None:
    client = live.client()
    for answer, status in (
        (client.get("/no/such/page"), 404),
        (client.delete("/healthz"), 405),
        (client.get("/docs"), 404),  # no CDN-loaded pages unless --api-docs
        (
            client.post(
                "/api/v1/device/checkin",
                content=b"[" * 3000 + b"]" * 3000,
                headers={"content-type": "application/json"},
            ),
            None,
        ),
        (
            client.post(
                "/api/v1/device/checkin", content=b"{", headers={"content-type": "application/json"}
            ),
            None,
        ),
    ):
        assert answer.status_code != 500
        if status is not None:
            assert answer.status_code == status
        body = answer.json()
        assert set(body) == {"error", "message"}, body
        assert body["error"]
        assert body["message"]
    assert client.get("/openapi.json").status_code == 200


def test_api_docs_only_when_asked(tmp_path: Path) -> None:
    server = start_server(tmp_path / "docs", extra=("--api-docs",))
    try:
        assert server.client().get("/docs").status_code == 200
    finally:
        server.stop()


# --- decisions: tokens that expire and rotate, one serial namespace -----------------------------


def test_tokens_expire_and_device_tokens_rotate(live: Server) -> None:
    product = new_product(live)
    serial, token = product.device()
    device = live.client(token)
    rotated = device.post("/api/v1/device/token")
    assert rotated.status_code == 200, rotated.text
    answer = rotated.json()
    new = answer["device_token"]
    assert new != token
    assert answer["expires_at"] is None
    # the old token works for the grace period, the new one from now on
    assert device.get(f"/devices/{serial}/ota_update.json").status_code == 200
    assert live.client(new).get(f"/devices/{serial}/ota_update.json").status_code == 200
    # once the grace period is over the old one is refused: move its expiry to the past
    token_id = token.split("_")[1]
    with sqlite3.connect(live.data / "otakit.db") as db:
        (expires,) = db.execute(
            "SELECT expires_at FROM tokens WHERE id = ?", (token_id,)
        ).fetchone()
        assert expires is not None
        db.execute("UPDATE tokens SET expires_at = '2000-01-01 00:00:00' WHERE id = ?", (token_id,))
    refused = device.get(f"/devices/{serial}/ota_update.json")
    assert refused.status_code == 401
    assert refused.json()["message"] == "this token has expired"
    # rotations are bounded: a device holds at most 4 live tokens (1 now: the old one expired)
    again = [live.client(new).post("/api/v1/device/token") for _ in range(4)]
    assert [a.status_code for a in again] == [200, 200, 200, 409]
    assert again[3].json()["error"] == "TOO_MANY_TOKENS"
    # only device tokens rotate
    assert live.admin_client().post("/api/v1/device/token").status_code == 403

    # admins give any token a lifetime; `token list` shows it
    created = live.otakit("token", "create", "--role", "enroll", "--product", product.name,
                          "--expires-days", "2")  # fmt: skip
    assert created.returncode == 0, created.stderr
    listed = live.otakit("token", "list")
    row = next(line for line in listed.stdout.splitlines() if created.stdout.split("_")[1] in line)
    assert row.count(time.strftime("%Y-")) >= 2  # created and expires
    bad = live.otakit("token", "create", "--role", "admin", "--expires-days", "0")
    assert bad.returncode == 2
    assert "--expires-days" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_serial_of_another_product_cannot_be_claimed(live: Server) -> None:
    sensor, other = new_product(live), new_product(live)
    serial, token = sensor.device()
    claimed = live.client(other.enroll).post(
        "/api/v1/device/checkin", json={"serial": serial, "board": BOARD}
    )
    assert claimed.status_code == 409
    assert claimed.json()["error"] == "REGISTERED"
    assert "refused to enroll" in live.wait_log("refused to enroll")
    shown = sensor.admin.get(f"/api/v1/devices/{serial}").json()
    assert shown["product"] == sensor.name
    assert live.client(token).get(f"/devices/{serial}/ota_update.json").status_code == 200


# --- 5. no trailer in an uploaded image ---------------------------------------------------------


def test_an_image_with_a_trailer_or_appended_bytes_is_refused(
    live: Server, imgtool: Any, tmp_path: Path
) -> None:
    product = new_product(live)
    key = tmp_path / "key.pem"
    key.write_bytes(KEY.to_pem())
    payload = tmp_path / "app.bin"
    payload.write_bytes(bytes(20000))
    padded = tmp_path / "padded.img"
    result = imgtool("sign", "-k", key, "-v", "1.0.3", "-H", "0x200", "--pad-header", "--align", "8",
                     "-S", "0x10000", "--pad", "--confirm", payload, padded)  # fmt: skip
    assert result.returncode == 0, result.stderr
    plain = image("1.0.4")
    for data in (padded.read_bytes(), plain + b"\x01" * 16):
        answer = product.admin.post(
            "/api/v1/artifacts", params={"name": "x.img", "product": product.name}, content=data
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == "TRAILING_DATA"
        assert "after its signed part" in answer.json()["message"]
    accepted = product.admin.post(
        "/api/v1/artifacts", params={"name": "x.img", "product": product.name}, content=plain
    )
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["size"] == len(plain)
