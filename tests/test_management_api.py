"""The management API's operator rules over real HTTP (one SQLite server for the module): partial
product updates, refusing private keys, the token API, the read-only viewer role, short artifact
ids, one binary per version, idempotent deployments with a board and a targeted count, the
audit records of each action, and 507 on a full disk (a real file size limit on the server).
"""

from __future__ import annotations

import hashlib
import random
import resource
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError

from otakit.errors import StorageFullError, UsageError
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.server.context import http_answer
from otakit.server.service.tokens import TokenSpec, check
from otakit.server.storage import storage_full
from otakit.server.tokens import Role

from .server_harness import Server, start_server

KEY = SigningKey.generate("ecdsa-p256")
OCTETS = {"content-type": "application/octet-stream"}
PEM = {"content-type": "application/x-pem-file"}


def image(version: str, size: int = 4000, seed: str = "") -> bytes:
    payload = random.Random(f"{version}/{seed}").randbytes(size)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


@dataclass
class Api:
    server: Server
    admin: httpx.Client

    def product(self, **settings: Any) -> str:
        name = f"p-{uuid.uuid4().hex[:8]}"
        answer = self.admin.put(f"/api/v1/products/{name}", json=settings)
        assert answer.status_code == 200, answer.text
        return name

    def upload(self, data: bytes, **params: str) -> httpx.Response:
        return self.admin.post(
            "/api/v1/artifacts", params={"name": "app.img", **params}, content=data, headers=OCTETS
        )

    def token(self, role: str, **body: Any) -> str:
        answer = self.admin.post("/api/v1/tokens", json={"role": role, **body})
        assert answer.status_code == 201, answer.text
        token: str = answer.json()["token"]
        return token

    def audit(self, action: str, target: str) -> list[dict[str, Any]]:
        """The audit records of ``action`` on ``target``, read from the server's database."""
        with sqlite3.connect(self.server.data / "otakit.db") as db:
            rows = db.execute(
                "SELECT actor, details FROM audit_events WHERE action = ? AND target = ?",
                (action, target),
            ).fetchall()
        return [{"actor": actor, "details": details} for actor, details in rows]

    def files(self, folder: str) -> list[Path]:
        root = self.server.data / folder
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = start_server(tmp_path_factory.mktemp("management"))
    try:
        admin = server.admin_client()
        assert admin.post("/api/v1/keys", content=KEY.public_key.pem(), headers=PEM).is_success
        yield Api(server, admin)
    finally:
        server.stop()


def error_of(answer: httpx.Response) -> str:
    body: dict[str, str] = answer.json()
    assert set(body) == {"error", "message"}, body
    return body["error"]


# --- products ----------------------------------------------------------------------------------


def test_patch_changes_only_what_is_given_and_creates_a_missing_product(api: Api) -> None:
    name = api.product(board="BOARD_A", anonymous=True)
    patched = api.admin.patch(f"/api/v1/products/{name}", json={"self_register": True})
    assert patched.status_code == 200, patched.text
    assert patched.json() == {
        "name": name,
        "board": "BOARD_A",
        "allow_raw": False,
        "anonymous": True,  # PUT would have turned it off again
        "self_register": True,
    }
    cleared = api.admin.patch(f"/api/v1/products/{name}", json={"board": None}).json()
    assert cleared["board"] is None
    assert cleared["anonymous"] is True
    new = f"p-{uuid.uuid4().hex[:8]}"
    created = api.admin.patch(f"/api/v1/products/{new}", json={"allow_raw": True})
    assert created.status_code == 200
    assert created.json() == {
        "name": new,
        "board": None,
        "allow_raw": True,
        "anonymous": False,
        "self_register": False,
    }
    unknown = api.admin.patch(f"/api/v1/products/{new}", json={"colour": "red"})
    assert unknown.status_code == 422
    assert error_of(unknown) == "BADARG"
    assert len(api.audit("product.set", f"product {name}")) == 3  # PUT, then two PATCHes
    assert "first admin" in api.audit("product.set", f"product {new}")[0]["actor"]


# --- keys --------------------------------------------------------------------------------------


def test_a_private_key_is_refused_and_nothing_is_stored(api: Api) -> None:
    secret = SigningKey.generate("ed25519")
    before = api.admin.get("/api/v1/keys").json()
    for pem in (
        secret.to_pem(),
        secret.to_pem(password=b"pw"),
        secret.to_pem() + secret.public_key.pem(),
    ):
        refused = api.admin.post("/api/v1/keys", content=pem, headers=PEM)
        assert refused.status_code == 422, refused.text
        assert error_of(refused) == "PRIVATE_KEY"
        assert "send only its public part" in refused.json()["message"]
    assert api.admin.get("/api/v1/keys").json() == before
    fingerprint = secret.public_key.fingerprint
    assert api.audit("key.trust", f"key {fingerprint}") == []
    trusted = api.admin.post("/api/v1/keys", content=secret.public_key.pem(), headers=PEM)
    assert trusted.status_code == 201
    assert trusted.json()["fingerprint"] == fingerprint
    assert len(api.audit("key.trust", f"key {fingerprint}")) == 1
    assert api.admin.delete(f"/api/v1/keys/{fingerprint}").status_code == 204
    assert len(api.audit("key.delete", f"key {fingerprint}")) == 1
    garbage = api.admin.post("/api/v1/keys", content=b"not a key", headers=PEM)
    assert garbage.status_code == 422
    assert error_of(garbage) == "KEY_FORMAT"


# --- tokens and the viewer role ----------------------------------------------------------------


def test_token_api_creates_lists_and_revokes(api: Api) -> None:
    label = f"ci-{uuid.uuid4().hex[:6]}"
    created = api.admin.post(
        "/api/v1/tokens", json={"role": "viewer", "label": label, "expires_days": 2}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["token"].startswith(f"otk_{body['id']}_")
    assert body["role"] == "viewer"
    assert body["label"] == label
    assert body["expires_at"] is not None
    assert body["revoked_at"] is None
    viewer = api.server.client(body["token"])
    assert viewer.get("/api/v1/products").status_code == 200

    listed = api.admin.get("/api/v1/tokens", params={"role": "viewer"}).json()
    assert body["id"] in [t["id"] for t in listed]
    assert all(t["role"] == "viewer" and "token" not in t for t in listed)
    api.token("viewer")  # a second one, so that a page of one has a next page
    first = api.admin.get("/api/v1/tokens", params={"role": "viewer", "limit": 1})
    assert len(first.json()) == 1
    assert first.headers["x-next-cursor"]
    second = api.admin.get(
        "/api/v1/tokens",
        params={"role": "viewer", "limit": 1, "cursor": first.headers["x-next-cursor"]},
    )
    assert second.json()[0]["id"] != first.json()[0]["id"]

    assert api.admin.delete(f"/api/v1/tokens/{body['id']}").status_code == 204
    refused = viewer.get("/api/v1/products")
    assert refused.status_code == 401
    assert error_of(refused) == "UNAUTHORIZED"
    assert api.admin.delete(f"/api/v1/tokens/{body['id']}").status_code == 204  # again: no-op
    assert len(api.audit("token.create", f"token {body['id']}")) == 1
    assert len(api.audit("token.revoke", f"token {body['id']}")) == 1
    missing = api.admin.delete("/api/v1/tokens/0123456789abcdef")
    assert missing.status_code == 404
    assert error_of(missing) == "NOT_FOUND"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"role": "enroll"}, 422, "product"),
        ({"role": "device"}, 422, "device"),
        ({"role": "enroll", "product": 'bad"quote'}, 422, "product"),
        ({"role": "device", "device": "s" * 65}, 422, "device"),
        ({"role": "admin", "expires_days": 0}, 422, "expires_days"),
        ({"role": "admin", "expires_days": 36501}, 422, "expires_days"),
        ({"role": "root"}, 422, "role"),
    ],
)
def test_token_api_refuses_what_the_local_command_refuses(
    api: Api, body: dict[str, Any], status: int, words: str
) -> None:
    refused = api.admin.post("/api/v1/tokens", json=body)
    assert refused.status_code == status, refused.text
    assert error_of(refused) == "BADARG"
    assert words in refused.json()["message"]


def test_a_viewer_reads_everything_and_changes_nothing(api: Api) -> None:
    viewer = api.server.client(api.token("viewer", label="wall screen"))
    for path in (
        "/api/v1/products",
        "/api/v1/keys",
        "/api/v1/artifacts",
        "/api/v1/devices",
        "/api/v1/device-counts",
        "/api/v1/deployments",
        "/api/v1/rollouts",
        "/api/v1/tokens",
        "/api/v1/anonymous-devices",
    ):
        assert viewer.get(path).status_code == 200, path
    metrics = viewer.get("/metrics")
    assert metrics.status_code == 200
    assert "otakit_build_info" in metrics.text
    for method, path, body in (
        ("PUT", "/api/v1/products/p-viewer", {}),
        ("PATCH", "/api/v1/products/p-viewer", {}),
        ("POST", "/api/v1/tokens", {"role": "admin"}),
        ("POST", "/api/v1/deployments", {"artifact_id": "0" * 64, "product": "x"}),
        ("DELETE", "/api/v1/devices/nobody", None),
    ):
        refused = viewer.request(method, path, json=body)
        assert refused.status_code == 403, (method, path, refused.text)
        assert error_of(refused) == "FORBIDDEN"
        assert refused.json()["message"].startswith("read-only token (viewer):")
    assert api.admin.get("/api/v1/products/p-viewer").status_code == 404
    enroll = api.server.client(api.token("enroll", product="p-viewer"))
    assert enroll.get("/api/v1/devices").status_code == 403
    assert enroll.get("/metrics").status_code == 403


# --- artifacts: short ids, one binary per version -----------------------------------------------


def test_short_artifact_ids(api: Api) -> None:
    uploaded = api.upload(image("3.1.0", seed="short"))
    assert uploaded.status_code == 201, uploaded.text
    full = uploaded.json()["id"]
    for given in (full[:12], full[:12].upper(), full[:40], full):
        found = api.admin.get(f"/api/v1/artifacts/{given}")
        assert found.status_code == 200, given
        assert found.json()["id"] == full
    short = api.admin.get(f"/api/v1/artifacts/{full[:11]}")
    assert short.status_code == 422
    assert error_of(short) == "BADARG"
    assert "at least 12 characters" in short.json()["message"]
    unknown = "f" * 12 if not full.startswith("f" * 12) else "0" * 12
    assert api.admin.get(f"/api/v1/artifacts/{unknown}").status_code == 404
    assert error_of(api.admin.get("/api/v1/artifacts/not-hex-at-all")) == "BADARG"

    # two artifacts whose ids share 12 digits cannot be made by uploading: write the records
    prefix = "abcdef012345"
    with sqlite3.connect(api.server.data / "otakit.db") as db:
        for tail in ("0" * 52, "1" * 52):
            db.execute(
                "INSERT INTO artifacts (id, name, container, kind, version, size, signature, "
                "details, created_at) VALUES (?, 'x.img', 'ota', 'raw', '1.0.0', 1, 'raw', '{}', "
                "'2026-01-01 00:00:00')",
                (prefix + tail,),
            )
    ambiguous = api.admin.get(f"/api/v1/artifacts/{prefix}")
    assert ambiguous.status_code == 409
    assert error_of(ambiguous) == "AMBIGUOUS"
    assert api.admin.get(f"/api/v1/artifacts/{prefix}1").json()["id"] == prefix + "1" * 52
    for tail in ("0" * 52, "1" * 52):
        assert api.admin.delete(f"/api/v1/artifacts/{prefix}{tail[:4]}").status_code == 204

    product = api.product()
    deployed = api.admin.post(
        "/api/v1/deployments", json={"artifact_id": full[:12], "product": product}
    )
    assert deployed.status_code == 201
    assert deployed.json()["artifact_id"] == full
    listed = api.admin.get("/api/v1/deployments", params={"artifact": full[:12]}).json()
    assert [d["id"] for d in listed] == [deployed.json()["id"]]
    too_short = api.admin.post(
        "/api/v1/deployments", json={"artifact_id": full[:8], "product": product}
    )
    assert too_short.status_code == 422


def test_one_binary_per_version_of_a_product(api: Api) -> None:
    product = api.product()
    data = image("2.0.0", seed="a")  # (ECDSA signatures differ each time: sign once)
    first = api.upload(data, product=product)
    assert first.status_code == 201, first.text
    again = api.upload(data, product=product)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = api.upload(image("2.0.0", seed="b"), product=product)
    assert other.status_code == 409
    assert error_of(other) == "VERSION_TAKEN"
    message = other.json()["message"]
    assert f"product {product} already has version 2.0.0" in message
    assert first.json()["id"][:12] in message
    assert "bump the version" in message
    # another container, or another product, is another namespace
    assert api.upload(image("2.0.0", seed="b"), product=product, container="ext").status_code == 201
    assert api.upload(image("2.0.0", seed="c"), product=api.product()).status_code == 201
    uploads = api.audit("artifact.upload", f"artifact {first.json()['id'][:12]}")
    assert len(uploads) == 1
    assert '"version": "2.0.0"' in uploads[0]["details"]


def test_an_unexpected_version_stores_nothing(api: Api) -> None:
    product = api.product()
    data = image("4.2.0", seed="expect")
    wrong = api.upload(data, product=product, expect_version="4.3.0")
    assert wrong.status_code == 422
    assert error_of(wrong) == "VERSION_MISMATCH"
    assert "4.2.0" in wrong.json()["message"]
    assert "4.3.0" in wrong.json()["message"]
    assert api.admin.get("/api/v1/artifacts", params={"product": product}).json() == []
    sha = hashlib.sha256(data).hexdigest()
    assert not (api.server.data / "blobs" / sha[:2] / sha).exists()
    assert api.files("tmp") == []
    assert api.audit("artifact.upload", f"artifact {sha[:12]}") == []
    bad = api.upload(data, product=product, expect_version="four")
    assert bad.status_code == 422
    assert "expect_version" in bad.json()["message"]
    right = api.upload(data, product=product, expect_version="4.2.0")
    assert right.status_code == 201
    assert right.json()["version"] == "4.2.0"
    again_wrong = api.upload(data, product=product, expect_version="4.3.0")  # the same bytes
    assert again_wrong.status_code == 422
    assert error_of(again_wrong) == "VERSION_MISMATCH"
    assert api.admin.delete(f"/api/v1/artifacts/{sha[:12]}").status_code == 204
    assert len(api.audit("artifact.delete", f"artifact {sha[:12]}")) == 1
    assert not (api.server.data / "blobs" / sha[:2] / sha).exists()


# --- deployments -------------------------------------------------------------------------------


def test_deploying_twice_gives_the_existing_deployment(api: Api) -> None:
    product = api.product()
    artifact = api.upload(image("5.0.0", seed="twice"), product=product).json()
    body = {"artifact_id": artifact["id"], "product": product, "group": "g1"}
    first = api.admin.post("/api/v1/deployments", json=body)
    assert first.status_code == 201
    assert first.json()["existing"] is False
    second = api.admin.post(
        "/api/v1/deployments", json={**body, "artifact_id": artifact["id"][:12]}
    )
    assert second.status_code == 200, second.text
    assert second.json()["existing"] is True
    assert second.json()["id"] == first.json()["id"]
    other_group = api.admin.post("/api/v1/deployments", json={**body, "group": "g2"})
    assert other_group.status_code == 201
    number = first.json()["id"]
    assert len(api.audit("deployment.create", f"deployment {number}")) == 1
    assert api.admin.post(f"/api/v1/deployments/{number}/cancel").status_code == 200
    assert len(api.audit("deployment.cancel", f"deployment {number}")) == 1
    after = api.admin.post("/api/v1/deployments", json=body)
    assert after.status_code == 201
    assert after.json()["id"] != number


def test_a_board_target_and_the_targeted_count(api: Api) -> None:
    product = api.product()
    artifact = api.upload(image("6.0.0", seed="board"), product=product).json()
    serials = {}
    for board in ("BOARD_A", "BOARD_A", "BOARD_B"):
        serial = f"d-{uuid.uuid4().hex[:8]}"
        put = api.admin.put(
            f"/api/v1/devices/{serial}",
            json={"product": product, "group": "g", "version": "1.0.0", "board": board},
        )
        assert put.status_code == 200
        assert "board" not in put.json()["tags"]  # matching sees the board; the tags shown don't
        serials[serial] = board
    everyone = api.admin.post(
        "/api/v1/deployments", json={"artifact_id": artifact["id"], "product": product}
    ).json()
    assert everyone["targeted"] == 3
    only_b = api.admin.post(
        "/api/v1/deployments",
        json={"artifact_id": artifact["id"], "product": product, "group": "g", "board": "BOARD_B"},
    )
    assert only_b.status_code == 201, only_b.text
    assert only_b.json()["targeted"] == 1
    assert only_b.json()["condition"].endswith("AND tags.board='BOARD_B'")
    tagged = api.admin.post(
        "/api/v1/deployments",
        json={"artifact_id": artifact["id"], "condition": "tags.colour='red'"},
    ).json()
    assert tagged["targeted"] is None
    assert api.admin.post(f"/api/v1/deployments/{everyone['id']}/cancel").status_code == 200
    for serial, board in serials.items():
        device = api.server.client(api.token("device", device=serial))
        answer = device.post(
            "/api/v1/device/checkin", json={"serial": serial, "version": "1.0.0", "board": board}
        )
        if board == "BOARD_B":
            assert answer.status_code == 200
            assert answer.json()["job"]["version"] == "6.0.0"
        else:
            assert answer.status_code == 204, answer.text


def test_a_rollout_creates_its_deployment_from_a_short_id(api: Api) -> None:
    product = api.product()
    artifact = api.upload(image("7.0.0", seed="rollout"), product=product).json()
    created = api.admin.post(
        "/api/v1/rollouts",
        json={
            "deployment": {"artifact_id": artifact["id"][:12], "product": product},
            "phases": [{"percent": 50}, {"percent": 100}],
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["artifact_id"] == artifact["id"]
    number = created.json()["deployment_id"]
    assert len(api.audit("deployment.create", f"deployment {number}")) == 1


# --- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_is_507_and_leaves_nothing_behind(api: Api) -> None:
    """A real limit: the server process may write no file past 4 MiB (RLIMIT_FSIZE, as
    ``ulimit -f`` sets), so a 4.25 MiB upload fails writing with EFBIG. Python ignores SIGXFSZ,
    so the write fails instead of the process being killed."""
    product = api.product(allow_raw=True)
    limit = 4 * 1024 * 1024
    data = random.Random("full").randbytes(limit + 256 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    pid = api.server.proc.pid
    old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        full = api.upload(data, product=product, version="1.0.0")
        assert full.status_code == 507, full.text
        assert error_of(full) == "STORAGE_FULL"
        assert "storage is full" in full.json()["message"]
        # nothing half-written: no temporary upload, no blob, no record
        assert api.files("tmp") == []
        assert not (api.server.data / "blobs" / sha[:2] / sha).exists()
        assert [p for p in api.files("blobs") if p.name.startswith(".")] == []
        assert api.admin.get(f"/api/v1/artifacts/{sha}").status_code == 404
        # and it goes on serving, small writes included
        small = api.upload(b"small raw file", product=product, version="1.0.1")
        assert small.status_code == 201, small.text
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
    assert api.upload(data, product=product, version="1.0.0").status_code == 201
    api.server.wait_log("507")


@pytest.mark.unit
def test_a_full_database_is_storage_full(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full" (a page limit stands in for the disk), through
    SQLAlchemy as the server meets it, is answered 507; other database errors are not."""
    engine = create_engine(f"sqlite:///{tmp_path / 'full.db'}")

    @event.listens_for(engine, "connect")
    def _small(connection: Any, _record: Any) -> None:
        connection.execute("PRAGMA max_page_count = 8")

    with engine.begin() as db:
        db.execute(text("CREATE TABLE t (v BLOB)"))
    with pytest.raises(OperationalError) as raised, engine.begin() as db:
        db.execute(
            text(
                "INSERT INTO t SELECT randomblob(4096) FROM (SELECT 1 UNION SELECT 2 "
                "UNION SELECT 3 UNION SELECT 4 UNION SELECT 5 UNION SELECT 6 "
                "UNION SELECT 7 UNION SELECT 8 UNION SELECT 9 UNION SELECT 10)"
            )
        )
    found = storage_full(raised.value)
    assert isinstance(found, StorageFullError)
    status, body, _ = http_answer(found)
    assert status == 507
    assert body["error"] == "STORAGE_FULL"
    with pytest.raises(OperationalError) as other, engine.begin() as db:
        db.execute(text("SELECT * FROM no_such_table"))
    assert storage_full(other.value) is None
    engine.dispose()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (TokenSpec(role="enroll"), "an enroll token needs a product"),
        (TokenSpec(role="device"), "a device token needs the device's serial"),
        (TokenSpec(role="root"), "unknown role 'root'; choose admin, viewer, enroll, device"),
        (TokenSpec(role="enroll", product='a"b'), "product: "),
        (TokenSpec(role="admin", expires_days=0), "expires_days must be more than 0"),
    ],
)
def test_the_token_rules_the_local_command_shares(spec: TokenSpec, words: str) -> None:
    with pytest.raises(UsageError) as refused:
        check(spec)
    assert words in refused.value.message


@pytest.mark.unit
def test_a_valid_token_spec_names_its_role() -> None:
    assert check(TokenSpec(role="viewer", label="wall")) is Role.VIEWER
    assert check(TokenSpec(role="device", device="dev-1", expires_days=30)) is Role.DEVICE
