"""Names that end up in the original device's job document fit its buffers (issue 14, point 7).

The device copies each job-document string into a fixed buffer, terminator included
(protocols.md §1: SerialNumber 32, Product 64, Manufacturer 64, ManufacturerId 16, Board 48,
Version 16, File 256), so a value holds at most one byte less. The server refuses, where a value
is set, what would not fit, with a 422 naming the field and the limit; before, a 60-character
serial was accepted and every job request of that device failed with 409. Against a real
``otakit serve`` (SQLite, PostgreSQL, S3 blobs) and the real ``otakit token`` command.
"""

from __future__ import annotations

import random
import uuid

import httpx
import pytest

from otakit.device.core.job import check_job
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.jobdoc import (
    FIELD_LIMITS,
    MAX_DOCUMENT_BYTES,
    UPDATE_AVAILABLE,
    parse_job_document,
)

from .server_harness import Server

KEY = SigningKey.generate("ecdsa-p256")
ORIGINAL = {"user-agent": "ota-http-client"}


def image(version: str) -> bytes:
    payload = random.Random(version).randbytes(3000)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


def unique(length: int, prefix: str = "") -> str:
    """A fresh name of exactly ``length`` characters."""
    head = prefix + uuid.uuid4().hex
    return (head + "x" * length)[:length]


def refused(response: httpx.Response, field: str, key: str) -> str:
    """The message of a 422 that names the field, the job document key and the limit."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] in ("BADARG", "INVALID_VALUE")  # pydantic's check or the job limit
    message: str = body["message"]
    assert field in message
    assert key in message
    assert f"more than the {FIELD_LIMITS[key] - 1}" in message
    return message


@pytest.fixture
def admin(server: Server) -> httpx.Client:
    client = server.admin_client()
    trusted = client.post(
        "/api/v1/keys",
        content=KEY.public_key.pem(),
        headers={"content-type": "application/x-pem-file"},
    )
    assert trusted.status_code == 201, trusted.text
    return client


def test_the_longest_names_register_and_their_job_document_builds(
    server: Server, admin: httpx.Client
) -> None:
    # a serial as long as the device's 32-byte buffer leaves no room for its NUL: refused
    for length in (60, 32):
        serial = unique(length, "s")
        answer = admin.put(f"/api/v1/devices/{serial}", json={"version": "1.0.0"})
        message = refused(answer, "serial", "SerialNumber")
        assert f"SerialNumber is {length} bytes" in message
        assert admin.get(f"/api/v1/devices/{serial}").status_code == 404

    # every name at its longest: accepted, and the device's job document builds and fits
    product, board, manufacturer = unique(63, "p"), "B" * 47, "M" * 63
    assert admin.put(f"/api/v1/products/{product}", json={"board": board}).status_code == 200
    # /products/PRODUCT/files/SHA256/NAME, the File of the product's anonymous job: 255 bytes
    name = "a" * 106 + ".img"
    artifact = admin.post(
        "/api/v1/artifacts", params={"name": name, "product": product}, content=image("1.2.0")
    )
    assert artifact.status_code == 201, artifact.text
    deployed = admin.post(
        "/api/v1/deployments", json={"artifact_id": artifact.json()["id"], "product": product}
    )
    assert deployed.status_code == 201, deployed.text
    serial = unique(31, "s")
    registered = admin.put(
        f"/api/v1/devices/{serial}",
        json={
            "product": product,
            "board": board,
            "manufacturer": manufacturer,
            "version": "1.0.0",
        },
    )
    assert registered.status_code == 200, registered.text
    device = server.client(server.token("device", "--device", serial))
    job = device.get(f"/devices/{serial}/ota_update.json", headers=ORIGINAL)
    assert job.status_code == 200, job.text
    assert len(job.content) <= MAX_DOCUMENT_BYTES
    doc = parse_job_document(job.content)
    assert doc.message == UPDATE_AVAILABLE
    assert (doc.serial_number, doc.product, doc.manufacturer) == (serial, product, manufacturer)
    check_job(doc, board=board, current_version="1.0.0")
    assert len(doc.file.encode()) < FIELD_LIMITS["File"]
    assert doc.file.endswith(name)

    # the same product's devices without a token get a job naming the longest File
    assert admin.put(
        f"/api/v1/products/{product}", json={"board": board, "anonymous": True}
    ).is_success
    try:
        job = server.client().get(f"/products/{product}/ota_update.json", headers=ORIGINAL)
        assert job.status_code == 200, job.text
        doc = parse_job_document(job.content)
        assert len(doc.file.encode()) == FIELD_LIMITS["File"] - 1
        check_job(doc, board=board, current_version="1.0.0")
    finally:  # the shared server's plain /ota_update.json wants one anonymous product
        admin.put(f"/api/v1/products/{product}", json={"board": board})


def test_an_artifact_name_too_long_for_a_jobs_file_is_refused(admin: httpx.Client) -> None:
    product, short = unique(63, "p"), unique(8, "p")
    for name in (product, short):
        assert admin.put(f"/api/v1/products/{name}", json={"board": "BOARD_A"}).is_success
    name = "a" * 107 + ".img"  # one byte too many in /products/PRODUCT/files/SHA256/NAME
    data = image("1.4.0")
    upload = admin.post(
        "/api/v1/artifacts", params={"name": name, "product": product}, content=data
    )
    message = refused(upload, "name", "File")
    assert f"/products/{product}/files/" in message
    artifact = admin.post("/api/v1/artifacts", params={"name": name}, content=data)
    assert artifact.status_code == 201, artifact.text
    artifact_id = artifact.json()["id"]
    refused(
        admin.post("/api/v1/deployments", json={"artifact_id": artifact_id, "product": product}),
        "name",
        "File",
    )
    fits = admin.post("/api/v1/deployments", json={"artifact_id": artifact_id, "product": short})
    assert fits.status_code == 201, fits.text
    too_long = admin.post(
        "/api/v1/artifacts", params={"name": "n" * 129 + ".img"}, content=image("1.4.1")
    )
    assert too_long.status_code == 422


def test_products_boards_and_manufacturers_are_refused_when_they_do_not_fit(
    admin: httpx.Client,
) -> None:
    long_product = unique(64, "p")
    refused(admin.put(f"/api/v1/products/{long_product}", json={}), "name", "Product")
    product = unique(20, "p")
    refused(admin.put(f"/api/v1/products/{product}", json={"board": "B" * 48}), "board", "Board")
    quoted = admin.put(f"/api/v1/products/{product}", json={"board": 'B"A'})
    assert quoted.status_code == 422
    assert "board" in quoted.json()["message"]
    assert admin.put(f"/api/v1/products/{product}", json={"board": "BOARD_A"}).status_code == 200

    serial = unique(20, "s")
    for field, key, value in (
        ("product", "Product", unique(64, "p")),
        ("board", "Board", "B" * 48),
        ("manufacturer", "Manufacturer", "M" * 64),
    ):
        answer = admin.put(f"/api/v1/devices/{serial}", json={field: value})
        refused(answer, field, key)
    assert admin.get(f"/api/v1/devices/{serial}").status_code == 404

    upload = admin.post(
        "/api/v1/artifacts",
        params={"name": "app.img", "board": "B" * 48},
        content=image("1.3.0"),
    )
    refused(upload, "board", "Board")


def test_an_artifact_version_that_no_job_can_name_is_refused(admin: httpx.Client) -> None:
    product = unique(20, "p")
    assert admin.put(f"/api/v1/products/{product}", json={"allow_raw": True}).status_code == 200
    raw = random.Random(3).randbytes(500)
    upload = admin.post(
        "/api/v1/artifacts",
        params={"name": "mcu.bin", "version": "1234567890.123456.0", "product": product},
        content=raw,
    )
    message = refused(upload, "version", "Version")
    assert "Version is 19 bytes" in message
    fits = admin.post(
        "/api/v1/artifacts",
        params={"name": "mcu.bin", "version": "123456.1234.123", "product": product},
        content=raw,
    )
    assert fits.status_code == 201, fits.text


def test_enrollment_and_check_ins_are_held_to_the_same_limits(
    server: Server, admin: httpx.Client
) -> None:
    product = unique(20, "p")
    assert admin.put(f"/api/v1/products/{product}", json={"self_register": True}).status_code == 200
    anonymous = server.client()
    long_serial = unique(60, "s")
    answer = anonymous.post(
        "/api/v1/device/checkin", json={"serial": long_serial, "product": product}
    )
    refused(answer, "serial", "SerialNumber")
    enroll = server.client(server.token("enroll", "--product", product, "--group", "g"))
    refused(
        enroll.post("/api/v1/device/checkin", json={"serial": unique(32, "s")}),
        "serial",
        "SerialNumber",
    )
    assert admin.get(f"/api/v1/devices/{long_serial}").status_code == 404

    serial = unique(31, "s")
    joined = enroll.post("/api/v1/device/checkin", json={"serial": serial, "version": "1.0.0"})
    assert joined.status_code == 200, joined.text
    device = server.client(joined.json()["device_token"])
    for field, key, value in (
        ("board", "Board", "B" * 48),
        ("manufacturer", "Manufacturer", "é" * 32),  # 64 bytes
        ("manufacturer_id", "ManufacturerId", "I" * 16),
    ):
        answer = device.post("/api/v1/device/checkin", json={"serial": serial, field: value})
        refused(answer, field, key)
    # within the limits a device keeps its own spelling, non-ASCII included
    fine = device.post(
        "/api/v1/device/checkin",
        json={"serial": serial, "board": "B" * 47, "manufacturer": "Müller"},
    )
    assert fine.status_code in (200, 204), fine.text
    assert admin.get(f"/api/v1/devices/{serial}").json()["manufacturer"] == "Müller"


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)  # a local command
def test_token_command_refuses_names_that_do_not_fit(server: Server) -> None:
    too_long = server.otakit("token", "create", "--role", "device", "--device", unique(32, "s"))
    assert too_long.returncode == 2
    assert "--device" in too_long.stderr
    assert "SerialNumber is 32 bytes, more than the 31" in too_long.stderr
    assert "Traceback" not in too_long.stderr
    enroll = server.otakit("token", "create", "--role", "enroll", "--product", unique(64, "p"))
    assert enroll.returncode == 2
    assert "--product" in enroll.stderr
    assert "Product is 64 bytes, more than the 63" in enroll.stderr
    fits = server.otakit("token", "create", "--role", "device", "--device", unique(31, "s"))
    assert fits.returncode == 0, fits.stderr
