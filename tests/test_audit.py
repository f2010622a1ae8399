"""The audit log over HTTP (``GET /api/v1/audit``), on a real ``otakit serve``: rollout actions
recorded with the token's label as the actor, the engine's own abort recorded as ``engine``,
paging by cursor, filters, who may read it; and a rollout phase that holds no device yet is
never passed by itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from otakit.server.service.rollouts import bucket

from .server_harness import Server, start_server
from .test_server import KEY, image

pytestmark = pytest.mark.integration

BOARD = "BOARD_A"


@pytest.fixture(scope="module")
def audit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("audit"))
    assert server.admin_client().post("/api/v1/keys", content=KEY.public_key.pem()).is_success
    yield server
    server.stop()


class Product:
    """A product with its own artifact and enroll token, for one test."""

    def __init__(self, server: Server, admin: httpx.Client, version: str) -> None:
        self.server = server
        self.admin = admin
        self.name = f"p-{uuid.uuid4().hex[:8]}"
        put = admin.put(f"/api/v1/products/{self.name}", json={"board": BOARD})
        assert put.status_code == 200, put.text
        upload = admin.post("/api/v1/artifacts", params={"name": "a.img"}, content=image(version))
        assert upload.status_code == 201, upload.text
        self.artifact = upload.json()
        self.enroll = mint(server, "enroll", product=self.name, group="g")
        self.http = httpx.Client(base_url=server.url, timeout=30)

    def rollout(self, phases: list[dict[str, Any]]) -> dict[str, Any]:
        deployment = {"artifact_id": self.artifact["id"], "product": self.name, "group": "g"}
        created = self.admin.post(
            "/api/v1/rollouts", json={"deployment": deployment, "phases": phases}
        )
        assert created.status_code == 201, created.text
        return dict(created.json())

    def checkin(self, serial: str, token: str) -> httpx.Response:
        answer = self.http.post(
            "/api/v1/device/checkin",
            json={"serial": serial, "board": BOARD, "version": "1.0.0"},
            headers={"authorization": f"Bearer {token}"},
        )
        assert answer.status_code in (200, 204), answer.text
        return answer

    def enrolled(self, serial: str) -> str:
        """The device token of a new device (its first check-in)."""
        return str(self.checkin(serial, self.enroll).json()["device_token"])


def mint(server: Server, role: str, **spec: str) -> str:
    """A new token, made over the API (POST /api/v1/tokens) with the first admin token."""
    made = server.admin_client().post("/api/v1/tokens", json={"role": role, **spec})
    assert made.status_code == 201, made.text
    return str(made.json()["token"])


def log(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    answer = client.get("/api/v1/audit", params=params)
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def token_id(token: str) -> str:
    return token.split("_")[1]


def test_rollout_actions_are_recorded_with_who_did_them(audit_server: Server) -> None:
    token = mint(audit_server, "admin", label="ops-alice")
    alice = audit_server.client(token)
    actor = f"ops-alice ({token_id(token)})"
    product = Product(audit_server, alice, "2.0.0")
    rollout = product.rollout([{"percent": 50, "manual": True}, {"percent": 100}])
    number = rollout["id"]
    assert alice.post(f"/api/v1/rollouts/{number}/pause", json={"reason": "night"}).is_success
    assert alice.post(f"/api/v1/rollouts/{number}/resume").is_success
    assert alice.post(f"/api/v1/rollouts/{number}/approve", json={"phase": 1}).is_success
    abort = alice.post(f"/api/v1/rollouts/{number}/abort", json={"reason": "bad build"})
    assert abort.status_code == 200, abort.text
    # a pause of a rollout already aborted is refused, and so not recorded
    assert alice.post(f"/api/v1/rollouts/{number}/pause").status_code == 409

    mine = [e for e in log(alice, actor=actor) if e["target"] == f"rollout {number}"]
    assert [(e["action"], e["target"]) for e in mine] == [
        ("rollout.abort", f"rollout {number}"),
        ("rollout.approve", f"rollout {number}"),
        ("rollout.resume", f"rollout {number}"),
        ("rollout.pause", f"rollout {number}"),
        ("rollout.create", f"rollout {number}"),
    ]
    abort_record, approve, _resume, pause, create = mine
    assert abort_record["details"] == {
        "deployment": rollout["deployment_id"],
        "phase": 2,
        "state": "aborted",
        "reason": "bad build",
    }
    assert approve["details"]["to_phase"] == 2
    assert pause["details"]["reason"] == "night"
    assert create["details"]["phases"] == "50%, 100%"
    assert [e["id"] for e in mine] == sorted((e["id"] for e in mine), reverse=True)
    assert mine[0]["at"] >= mine[-1]["at"]

    # the rollout's own events name the same actor
    events = alice.get(f"/api/v1/rollouts/{number}/events").json()
    assert {e["actor"] for e in events if e["kind"] in ("paused", "aborted")} == {actor}

    paused = log(alice, action="rollout.pause", actor=actor)
    assert [e["id"] for e in paused] == [pause["id"]]
    # the label alone finds the same records (every token of that label)
    assert log(alice, actor="ops-alice") == log(alice, actor=actor)
    assert log(alice, actor="ops") == []


def test_the_log_is_paged_by_cursor(audit_server: Server) -> None:
    token = mint(audit_server, "admin", label="pager")
    admin = audit_server.client(token)
    actor = f"pager ({token_id(token)})"
    product = Product(audit_server, admin, "3.0.0")
    rollout = product.rollout([{"percent": 100}])
    for action in ("pause", "resume", "pause", "resume", "abort"):
        assert admin.post(f"/api/v1/rollouts/{rollout['id']}/{action}").is_success
    everything = log(admin, actor=actor)  # the product, upload, deployment and rollout's
    assert len(everything) >= 6

    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"actor": actor, "limit": 4}
        if cursor:
            params["cursor"] = cursor
        answer = admin.get("/api/v1/audit", params=params)
        assert answer.status_code == 200, answer.text
        seen += [e["id"] for e in answer.json()]
        pages += 1
        cursor = answer.headers.get("x-next-cursor")
        if cursor is None:
            break
        assert 'rel="next"' in answer.headers["link"]
    assert pages == -(-len(everything) // 4)
    assert seen == [e["id"] for e in everything]

    # a cursor of another list is no page of this one; an unknown action is named
    devices = admin.get("/api/v1/devices", params={"limit": 1})
    other = devices.headers.get("x-next-cursor") or "W10"
    assert admin.get("/api/v1/audit", params={"cursor": other}).status_code == 404
    bad = admin.get("/api/v1/audit", params={"action": "rollout.explode"})
    assert bad.status_code == 422
    assert bad.json()["error"] == "BADARG"
    assert "rollout.abort" in bad.json()["message"]


def test_the_engine_records_its_own_abort(audit_server: Server) -> None:
    admin = audit_server.admin_client()
    product = Product(audit_server, admin, "4.0.0")
    rollout = product.rollout([{"percent": 100, "max_errors": 0, "on_error": "abort"}])
    serial = f"d-{uuid.uuid4().hex[:8]}"
    device = product.enrolled(serial)
    assert product.checkin(serial, device).json()["job"]["version"] == "4.0.0"
    failed = product.http.post(
        "/api/v1/device/status",
        json={"status": "error", "error": "SHA256 verify fail"},
        headers={"authorization": f"Bearer {device}"},
    )
    assert failed.status_code == 204, failed.text
    assert admin.get(f"/api/v1/rollouts/{rollout['id']}").json()["state"] == "aborted"
    (record,) = [e for e in log(admin, actor="engine") if e["target"] == f"rollout {rollout['id']}"]
    assert record["action"] == "rollout.abort"
    assert record["details"]["reason"] == "phase 1: 1 of 1 devices failed"


def test_viewers_read_the_log_and_devices_do_not(audit_server: Server) -> None:
    admin = audit_server.admin_client()
    product = Product(audit_server, admin, "5.0.0")
    product.rollout([{"percent": 100}])
    viewer = audit_server.client(mint(audit_server, "viewer", label="auditor"))
    records = log(viewer, action="rollout.create")
    assert records, "the viewer sees the log"
    me = viewer.get("/api/v1/whoami")
    assert me.status_code == 200, me.text
    assert me.json()["role"] == "viewer"
    assert me.json()["actor"].startswith("auditor (")

    device = audit_server.client(product.enrolled(f"d-{uuid.uuid4().hex[:8]}"))
    refused = device.get("/api/v1/audit")
    assert refused.status_code == 403
    assert refused.json()["error"] == "FORBIDDEN"
    assert audit_server.client().get("/api/v1/audit").status_code == 401


def test_a_phase_without_devices_yet_is_not_passed(audit_server: Server) -> None:
    """Phase 1 (10 %) holds no device when the rollout starts and the devices that enroll
    later all fall into phase 2: phase 1 is held (even with a success rule of 0 %) and phase 2
    is not offered, until a device falls into phase 1 or an operator approves."""
    admin = audit_server.admin_client()
    product = Product(audit_server, admin, "6.0.0")
    rollout = product.rollout([{"percent": 10, "success": 0}, {"percent": 100, "success": 0}])
    number, deployment = rollout["id"], rollout["deployment_id"]
    assert (rollout["state"], rollout["phase"]) == ("running", 1)
    assert rollout["phases"][0]["targeted"] == 0

    later: list[str] = []
    while len(later) < 3:  # devices whose bucket puts them in phase 2
        serial = f"d-{uuid.uuid4().hex[:8]}"
        if bucket(deployment, serial) >= 1000:
            later.append(serial)
    for serial in later:
        token = product.enrolled(serial)
        assert product.checkin(serial, token).status_code == 204  # phase 2 is not open
    shown = admin.get(f"/api/v1/rollouts/{number}").json()
    assert (shown["state"], shown["phase"]) == ("running", 1)
    assert [p["targeted"] for p in shown["phases"]] == [0, 3]
    assert shown["phases"][0]["status"] == "current"
    assert shown["phases"][0]["completed_at"] is None
    assert shown["awaiting_approval"] is True
    kinds = [e["kind"] for e in admin.get(f"/api/v1/rollouts/{number}/events").json()]
    assert kinds == ["created", "started"]
