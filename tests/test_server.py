"""The update server over real HTTP on loopback, on SQLite, PostgreSQL and S3 blobs.

Original-middleware devices are driven exactly as the original device does: the job document,
then 4096-byte ranged GETs with the total taken from the first Content-Range, then a result POST
with an empty body.
"""

from __future__ import annotations

import hashlib
import random
import ssl
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from otakit.device.core.job import check_job
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.verify import verify_image
from otakit.protocol.jobdoc import (
    NO_UPDATE_AVAILABLE,
    UPDATE_AVAILABLE,
    parse_job_document,
)

from .server_harness import BIN, Server

KEY = SigningKey.generate("ecdsa-p256")
ORIGINAL = {"user-agent": "ota-http-client"}
RANGE = 4096


def image(version: str, size: int = 30000, key: SigningKey = KEY) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, key, SignOptions(ImageVersion.parse(version), pad_header=True))


@dataclass
class Fleet:
    """A product, group and helpers for one test, isolated by unique names."""

    server: Server
    admin: httpx.Client
    product: str
    group: str

    def upload(self, data: bytes, name: str = "app.img", **params: str) -> dict[str, Any]:
        response = self.admin.post(
            "/api/v1/artifacts",
            params={"name": name, **params},
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        assert response.status_code in (200, 201), response.text
        uploaded: dict[str, Any] = response.json()
        return uploaded

    def deploy(self, artifact: dict[str, Any], **body: object) -> dict[str, Any]:
        body = {"artifact_id": artifact["id"], "product": self.product, "group": self.group, **body}
        response = self.admin.post("/api/v1/deployments", json=body)
        assert response.status_code == 201, response.text
        deployment: dict[str, Any] = response.json()
        return deployment

    def device(
        self, serial: str | None = None, *, version: str = "1.0.0", board: str = "BOARD_A"
    ) -> tuple[str, str]:
        serial = serial or f"dev-{uuid.uuid4().hex[:8]}"
        response = self.admin.put(
            f"/api/v1/devices/{serial}",
            json={"product": self.product, "group": self.group, "version": version, "board": board},
        )
        assert response.status_code == 200, response.text
        return serial, self.server.token("device", "--device", serial)


@pytest.fixture
def fleet(server: Server) -> Fleet:
    admin = server.admin_client()
    response = admin.post(
        "/api/v1/keys",
        content=KEY.public_key.pem(),
        headers={"content-type": "application/x-pem-file"},
    )
    assert response.status_code == 201, response.text
    product = f"prod-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": "BOARD_A"}).status_code == 200
    return Fleet(server, admin, product, "group-1")


def download_like_original(client: httpx.Client, path: str) -> bytes:
    """Ranged GETs of 4096 bytes; the total comes from the first Content-Range."""
    data = bytearray()
    total = None
    while total is None or len(data) < total:
        end = len(data) + RANGE - 1 if total is None else min(len(data) + RANGE, total) - 1
        response = client.get(path, headers={**ORIGINAL, "range": f"bytes={len(data)}-{end}"})
        assert response.status_code == 206, response.text
        content_range = response.headers["content-range"]
        assert content_range.startswith(f"bytes {len(data)}-{end}/")
        total = int(content_range.rsplit("/", 1)[1])
        data += response.content
    return bytes(data)


# --- original middleware ----------------------------------------------------------------------


def test_original_job_flow_per_device(fleet: Fleet) -> None:
    v12 = image("1.2.0")
    artifact = fleet.upload(v12)
    deployment = fleet.deploy(artifact)
    serial, token = fleet.device(version="1.0.0")
    device = fleet.server.client(token)

    response = device.get(f"/devices/{serial}/ota_update.json", headers=ORIGINAL)
    assert response.status_code == 200
    assert len(response.content) <= 1024
    doc = parse_job_document(response.content)  # strings only, fields of §1
    assert doc.message == UPDATE_AVAILABLE
    check_job(doc, board="BOARD_A", current_version="1.0.0")
    assert (doc.version, doc.connection, doc.server, doc.port) == ("1.2.0", "HTTP", "", "")

    received = download_like_original(device, doc.file)
    assert received == v12
    assert verify_image(received, [KEY.public_key]).version == ImageVersion(1, 2, 0)

    result = device.post(doc.file, headers=ORIGINAL)  # the original sends an empty body
    assert result.status_code == 200
    assert parse_job_document(result.content).message == "Result Received"
    # an empty result says the device finished, not whether it succeeded
    counts = fleet.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    assert (counts["Unknown"], counts["Applying"], counts["Error"]) == (1, 0, 0)
    assert fleet.admin.get(f"/api/v1/devices/{serial}").json()["status"] == "unknown"

    # the operator who knows (or the device's application, through the JSON API) says it runs
    # 1.2.0: applied, and there is nothing newer
    fleet.admin.put(f"/api/v1/devices/{serial}", json={"version": "1.2.0"})
    counts = fleet.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    assert (counts["Unknown"], counts["Applied"]) == (0, 1)
    again = parse_job_document(device.get(f"/devices/{serial}/ota_update.json").content)
    assert again.message == NO_UPDATE_AVAILABLE


def test_anonymous_job_and_direct_flows(fleet: Fleet) -> None:
    anonymous = fleet.server.client()
    v2 = image("2.0.0", 10000)
    artifact = fleet.upload(v2)
    fleet.deploy(artifact, priority=1_000_000)  # outranks other tests' deployments
    # anonymous access is off by default
    assert anonymous.get("/ota-update.bin", headers=ORIGINAL).status_code == 401
    fleet.admin.put(
        f"/api/v1/products/{fleet.product}", json={"board": "BOARD_A", "anonymous": True}
    )
    try:
        doc = parse_job_document(anonymous.get("/ota_update.json", headers=ORIGINAL).content)
        assert doc.message == UPDATE_AVAILABLE
        assert doc.board == "BOARD_A"
        assert download_like_original(anonymous, doc.file) == v2
        assert (
            anonymous.post(doc.file, json={"Message": "Success", "File": doc.file}).status_code
            == 200
        )
        # direct flow: the known file name
        assert download_like_original(anonymous, "/ota-update.bin") == v2
        head = anonymous.head("/ota-update.bin")
        assert int(head.headers["content-length"]) == len(v2)
        assert anonymous.post("/ota-update.bin").status_code == 200
        # resume from the middle: Range: bytes=N-
        part = anonymous.get("/ota-update.bin", headers={"range": "bytes=6000-"})
        assert part.status_code == 206
        assert part.content == v2[6000:]
        assert part.headers["content-range"] == f"bytes 6000-{len(v2) - 1}/{len(v2)}"
        # If-Range with the ETag keeps the range; a stale one gets the whole file
        etag = head.headers["etag"]
        assert etag == f'"{artifact["id"]}"'
        assert (
            anonymous.get(
                "/ota-update.bin", headers={"range": "bytes=10-", "if-range": etag}
            ).status_code
            == 206
        )
        assert (
            anonymous.get(
                "/ota-update.bin", headers={"range": "bytes=10-", "if-range": '"old"'}
            ).status_code
            == 200
        )
        unsatisfiable = anonymous.get("/ota-update.bin", headers={"range": f"bytes={len(v2) + 5}-"})
        assert unsatisfiable.status_code == 416
        assert unsatisfiable.headers["content-range"] == f"bytes */{len(v2)}"
    finally:
        fleet.admin.put(
            f"/api/v1/products/{fleet.product}", json={"board": "BOARD_A", "anonymous": False}
        )


def test_cross_device_access_is_denied(fleet: Fleet) -> None:
    fleet.deploy(fleet.upload(image("1.3.0")))
    alice, alice_token = fleet.device()
    bob, _bob_token = fleet.device()
    as_alice = fleet.server.client(alice_token)
    assert as_alice.get(f"/devices/{alice}/ota_update.json").status_code == 200
    assert as_alice.get(f"/devices/{bob}/ota_update.json").status_code == 403
    doc = parse_job_document(as_alice.get(f"/devices/{alice}/ota_update.json").content)
    assert as_alice.get(doc.file.replace(alice, bob)).status_code == 403
    assert as_alice.post("/api/v1/device/checkin", json={"serial": bob}).status_code == 403
    assert fleet.server.client().get(f"/devices/{alice}/ota_update.json").status_code == 401
    assert as_alice.get("/api/v1/devices").status_code == 403  # management needs admin
    assert fleet.server.client("otk_0000_forged").get("/api/v1/devices").status_code == 401


def test_downgrade_refused_unless_explicit(fleet: Fleet) -> None:
    serial, token = fleet.device(version="2.0.0")
    device = fleet.server.client(token)
    old = fleet.upload(image("1.9.0"))
    fleet.deploy(old)
    checkin = {"serial": serial, "version": "2.0.0", "board": "BOARD_A"}
    assert device.post("/api/v1/device/checkin", json=checkin).status_code == 204
    doc = parse_job_document(device.get(f"/devices/{serial}/ota_update.json").content)
    assert doc.message == NO_UPDATE_AVAILABLE
    fleet.deploy(old, downgrade=True)
    job = device.post("/api/v1/device/checkin", json=checkin).json()["job"]
    assert job["version"] == "1.9.0"


def test_wrong_board_gets_nothing(fleet: Fleet) -> None:
    fleet.deploy(fleet.upload(image("1.4.0"), board="BOARD_A"))
    serial, token = fleet.device(board="BOARD_B")
    device = fleet.server.client(token)
    assert (
        device.post(
            "/api/v1/device/checkin",
            json={"serial": serial, "version": "1.0.0", "board": "BOARD_B"},
        ).status_code
        == 204
    )
    assert (
        parse_job_document(device.get(f"/devices/{serial}/ota_update.json").content).message
        == NO_UPDATE_AVAILABLE
    )


# --- JSON API: agent and gateway --------------------------------------------------------------


def test_enrollment_checkin_signed_download_and_status(fleet: Fleet) -> None:
    v15 = image("1.5.0")
    artifact = fleet.upload(v15)
    deployment = fleet.deploy(artifact)
    enroll = fleet.server.token("enroll", "--product", fleet.product, "--group", fleet.group)
    serial = f"new-{uuid.uuid4().hex[:8]}"
    identity = {"serial": serial, "version": "1.0.0", "board": "BOARD_A", "manufacturer": "ACME"}

    first = fleet.server.client(enroll).post("/api/v1/device/checkin", json=identity)
    assert first.status_code == 200, first.text
    body = first.json()
    device_token = body["device_token"]
    job = body["job"]
    assert job["sha256"] == hashlib.sha256(v15).hexdigest()
    assert job["size"] == len(v15)
    # the first answer lost: enrolling again with the same token gives a fresh device token,
    # and the first one stops working
    again = fleet.server.client(enroll).post("/api/v1/device/checkin", json=identity)
    assert again.status_code == 200, again.text
    lost, device_token = device_token, again.json()["device_token"]
    assert device_token != lost
    assert (
        fleet.server.client(lost).post("/api/v1/device/checkin", json=identity).status_code == 401
    )
    history = fleet.admin.get(f"/api/v1/devices/{serial}/history").json()
    assert [(h["status"], h["source"]) for h in history] == [("re-enrolled", "enroll")]
    # another enrollment token (another product's, or a leaked one) never takes it over
    other = fleet.server.token("enroll", "--product", fleet.product, "--group", "other")
    assert (
        fleet.server.client(other).post("/api/v1/device/checkin", json=identity).status_code == 409
    )
    device = fleet.server.client(device_token)
    assert device.post("/api/v1/device/checkin", json=identity).json()["device_token"] is None

    # the signed URL works without any token, and resumes
    anyone = httpx.Client(timeout=30)
    whole = anyone.get(job["url"])
    assert whole.status_code == 200
    assert whole.content == v15
    assert anyone.get(job["url"], headers={"range": "bytes=100-199"}).content == v15[100:200]
    forged = job["url"][:-3] + ("AAA" if not job["url"].endswith("AAA") else "BBB")
    assert anyone.get(forged).status_code == 403
    expired = job["url"].replace("expires=", "expires=1&old=")
    assert anyone.get(expired).status_code == 403
    assert "expired" in anyone.get(expired).json()["message"]

    for status in ("downloading", "interrupted", "downloading", "applying"):
        sent = device.post(
            "/api/v1/device/status", json={"status": status, "deployment_id": deployment["id"]}
        )
        assert sent.status_code == 204, sent.text
    assert (
        fleet.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]["Applying"] == 1
    )
    # reboot into the new version: the next check-in counts as applied
    assert (
        device.post("/api/v1/device/checkin", json={**identity, "version": "1.5.0"}).status_code
        == 204
    )
    counts = fleet.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    assert counts == {
        "Downloading": 0,
        "Interrupted": 0,
        "Applying": 0,
        "Applied": 1,
        "Error": 0,
        "Reverted": 0,
        "Unknown": 0,
    }
    bad = device.post("/api/v1/device/status", json={"status": "exploded"})
    assert bad.status_code == 422  # not one of the states of §7
    assert bad.json()["error"] == "BADARG"


def test_gateway_raw_file_twin_and_reported_state(fleet: Fleet) -> None:
    raw = random.Random(7).randbytes(5000)
    refused = fleet.admin.post(
        "/api/v1/artifacts",
        params={"name": "mcu.bin", "version": "3", "product": fleet.product},
        content=raw,
    )
    assert refused.status_code == 422  # raw files need the product's permission
    fleet.admin.put(f"/api/v1/products/{fleet.product}", json={"allow_raw": True})
    artifact = fleet.upload(raw, "mcu.bin", version="3", product=fleet.product)
    assert (artifact["kind"], artifact["signature"], artifact["version"]) == ("raw", "raw", "3")
    fleet.deploy(artifact, priority=3)
    serial, token = fleet.device(version="2")
    device = fleet.server.client(token)
    twin = device.get("/api/v1/device/twin").json()
    info = twin["desired"]["extFwInfo"]
    assert info["version"] == 3
    assert info["size"] == len(raw)
    assert info["sha256"] == hashlib.sha256(raw).hexdigest().upper()
    assert httpx.get(f"{info['url']}?{info['sas']}", timeout=30).content == raw
    report = {"extFwInfo": {"Status": "applied", "Error": "None", "Version": 3}}
    assert device.post("/api/v1/device/status", json=report).status_code == 204
    reported = fleet.admin.get(f"/api/v1/devices/{serial}/twin").json()["reported"]["extFwInfo"]
    assert reported == {"Status": "applied", "Error": "None", "Version": 3}


# --- management -------------------------------------------------------------------------------


def test_artifacts_are_checked_and_idempotent(fleet: Fleet) -> None:
    data = image("1.6.0")
    first = fleet.admin.post("/api/v1/artifacts", params={"name": "a.img"}, content=data)
    second = fleet.admin.post("/api/v1/artifacts", params={"name": "a.img"}, content=data)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"] == hashlib.sha256(data).hexdigest()
    assert first.json()["signature"] == "valid"
    foreign = image("1.6.1", key=SigningKey.generate("ed25519"))
    refused = fleet.admin.post("/api/v1/artifacts", params={"name": "b.img"}, content=foreign)
    assert (refused.status_code, refused.json()["error"]) == (422, "KEY_MISMATCH")
    tampered = bytearray(data)
    tampered[500] ^= 1
    broken = fleet.admin.post(
        "/api/v1/artifacts", params={"name": "c.img"}, content=bytes(tampered)
    )
    assert (broken.status_code, broken.json()["error"]) == (422, "HASH_MISMATCH")

    deployment = fleet.deploy(first.json())
    assert fleet.admin.delete(f"/api/v1/artifacts/{first.json()['id']}").status_code == 409
    fleet.admin.post(f"/api/v1/deployments/{deployment['id']}/cancel")
    assert fleet.admin.delete(f"/api/v1/artifacts/{first.json()['id']}").status_code == 204
    assert fleet.admin.get(f"/api/v1/artifacts/{first.json()['id']}").status_code == 404


def test_cancelled_deployment_stops_offers(fleet: Fleet) -> None:
    deployment = fleet.deploy(fleet.upload(image("1.7.0")))
    serial, token = fleet.device()
    device = fleet.server.client(token)
    checkin = {"serial": serial, "version": "1.0.0"}
    assert device.post("/api/v1/device/checkin", json=checkin).status_code == 200
    cancelled = fleet.admin.post(f"/api/v1/deployments/{deployment['id']}/cancel").json()
    assert cancelled["active"] is False
    assert device.post("/api/v1/device/checkin", json=checkin).status_code == 204


@pytest.mark.parametrize("deployment_id", ["0", "-1", str(2**31), "-" + "9" * 38])
def test_a_deployment_id_no_row_can_have_is_refused_before_the_database(
    fleet: Fleet, deployment_id: str
) -> None:
    """Ids past the database's integer were a 500 (found by schemathesis): now a 422."""
    assert fleet.admin.get(f"/api/v1/deployments/{deployment_id}").status_code == 422
    assert fleet.admin.post(f"/api/v1/deployments/{deployment_id}/cancel").status_code == 422
    assert fleet.admin.get("/api/v1/deployments/2147483647").status_code == 404


def test_revoked_token_is_refused(server: Server) -> None:
    token = server.token("admin", "--label", "temporary")
    assert server.client(token).get("/api/v1/products").status_code == 200
    _prefix, token_id, secret = token.split("_", 2)  # the secret may itself contain "_"
    assert server.otakit("token", "revoke", token_id).returncode == 0
    assert server.client(token).get("/api/v1/products").status_code == 401
    listing = server.otakit("token", "list")
    assert token_id in listing.stdout
    assert secret not in listing.stdout  # never the secret


def test_deploy_command(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "fw.img"
    path.write_bytes(image("1.8.0"))
    argv = [
        str(BIN / "otakit"),
        "deploy",
        str(path),
        "1.8.0",
        fleet.product,
        fleet.group,
        "-d",
        "30",
        "--server",
        fleet.server.url,
        "--token",
        fleet.server.admin,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    deployment = fleet.admin.get(f"/api/v1/deployments/{done.stdout.strip()}").json()
    assert deployment["version"] == "1.8.0"
    assert (
        deployment["condition"]
        == f"tags.productType='{fleet.product}' AND tags.deviceGroup='{fleet.group}'"
    )
    assert deployment["priority"] == 0  # ordered by its version; --priority N overrides
    wrong = subprocess.run(
        [*argv[:3], "1.9.0", *argv[4:]], capture_output=True, text=True, timeout=60, check=False
    )
    assert wrong.returncode != 0
    assert "not 1.9.0" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_self_registration_when_the_product_allows_it(fleet: Fleet) -> None:
    anonymous = fleet.server.client()
    serial = f"self-{uuid.uuid4().hex[:8]}"
    identity = {"serial": serial, "product": fleet.product, "version": "1.0.0"}
    assert anonymous.post("/api/v1/device/checkin", json=identity).status_code == 401
    fleet.admin.put(
        f"/api/v1/products/{fleet.product}", json={"board": "BOARD_A", "self_register": True}
    )
    registered = anonymous.post("/api/v1/device/checkin", json=identity)
    assert registered.status_code == 200, registered.text
    token = registered.json()["device_token"]
    assert fleet.server.client(token).get("/api/v1/device/twin").json()["serial"] == serial
    assert (
        fleet.admin.get(f"/api/v1/devices/{serial}").json()["tags"]["productType"] == fleet.product
    )


# --- scale-out and TLS (own servers) -----------------------------------------------------------


def test_two_workers_on_postgres_behave_as_one(tmp_path: Path) -> None:
    """Enrollment, tokens and counts agree whichever worker answers (no process-local state)."""
    from concurrent.futures import ThreadPoolExecutor

    from .server_harness import postgres_database, start_server

    with postgres_database() as url:
        server = start_server(tmp_path / "data", database_url=url, workers=2)
        try:
            fleet = Fleet(server, server.admin_client(), "scale", "all")
            fleet.admin.post("/api/v1/keys", content=KEY.public_key.pem())
            fleet.admin.put("/api/v1/products/scale", json={"board": "BOARD_A"})
            deployment = fleet.deploy(fleet.upload(image("3.0.0")))
            enroll = server.token("enroll", "--product", "scale", "--group", "all")

            def lifecycle(n: int) -> int:
                with server.client(enroll) as enrolling:
                    first = enrolling.post(
                        "/api/v1/device/checkin", json={"serial": f"w{n}", "version": "1.0.0"}
                    )
                    assert first.status_code == 200, first.text
                # a new connection per call, so calls spread over both workers
                for state in ("downloading", "applying"):
                    with server.client(first.json()["device_token"]) as device:
                        sent = device.post(
                            "/api/v1/device/status",
                            json={"status": state, "deployment_id": deployment["id"]},
                        )
                        assert sent.status_code == 204, sent.text
                deployment_id: int = first.json()["job"]["deployment_id"]
                return deployment_id

            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(lifecycle, range(40))) == {deployment["id"]}
            counts = fleet.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
            assert counts["Applying"] == 40
            pids = {
                line.split("[")[1].split("]")[0]
                for line in server.log
                if "Started server process" in line
            }
            assert len(pids) == 2
        finally:
            server.stop()


def test_tls(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from .server_harness import start_server

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = start_server(
        tmp_path / "data",
        extra=("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")),
    )
    try:
        https = server.url.replace("http://", "https://")
        trusted = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        with httpx.Client(verify=trusted) as client:
            assert client.get(f"{https}/healthz").json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError), httpx.Client() as plain:
            plain.get(f"{https}/healthz")  # not trusted without the certificate
    finally:
        server.stop()


def test_direct_downloads_from_s3(tmp_path: Path) -> None:
    """With --direct-downloads, devices get pre-signed URLs straight to the bucket."""
    from .server_harness import S3_ENV, s3_bucket, start_server

    with s3_bucket() as blob_url:
        server = start_server(
            tmp_path / "data", blob_url=blob_url, env=S3_ENV, extra=("--direct-downloads",)
        )
        try:
            fleet = Fleet(server, server.admin_client(), "direct", "all")
            fleet.admin.post("/api/v1/keys", content=KEY.public_key.pem())
            fleet.admin.put("/api/v1/products/direct", json={"board": "BOARD_A"})
            data = image("4.0.0")
            fleet.deploy(fleet.upload(data))
            serial, token = fleet.device()
            job = (
                server.client(token)
                .post("/api/v1/device/checkin", json={"serial": serial, "version": "1.0.0"})
                .json()["job"]
            )
            endpoint = blob_url.split("endpoint=")[1].split("&")[0]
            assert job["url"].startswith(endpoint)  # the bucket, not the otakit server
            assert httpx.get(job["url"], timeout=30).content == data
            assert (
                httpx.get(job["url"], headers={"range": "bytes=10-19"}, timeout=30).content
                == data[10:20]
            )
        finally:
            server.stop()
