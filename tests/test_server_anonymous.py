"""Devices that send no token (the original middleware on an anonymous product), on SQLite,
PostgreSQL and S3: each gets only its own product's image, and each leaves a trace.

The device is driven as the original does (protocols.md §2): a job request with
``Range: bytes=0-``, 4096-byte ranges with the total from Content-Range, an empty result POST.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from otakit.protocol.jobdoc import UPDATE_AVAILABLE, parse_job_document

from .server_harness import start_server
from .test_server import ORIGINAL, Fleet, download_like_original, fleet, image

__all__ = ["fleet"]  # the fixture, shared with test_server.py

JOB_HEADERS = {"range": "bytes=0-"}  # the User-Agent is the client's


@pytest.fixture
def two_products(fleet: Fleet) -> Iterator[tuple[Fleet, Fleet]]:
    """``fleet``'s product and a second one, both open to anonymous devices, each with its own
    board and deployment; anonymous access is closed again afterwards (the server is shared)."""
    other = Fleet(fleet.server, fleet.admin, f"psoc-{uuid.uuid4().hex[:8]}", "group-1")
    policies = {fleet.product: "BOARD_A", other.product: "BOARD_P"}
    try:
        for name, board in policies.items():
            response = fleet.admin.put(
                f"/api/v1/products/{name}", json={"board": board, "anonymous": True}
            )
            assert response.status_code == 200, response.text
        yield fleet, other
    finally:
        for name, board in policies.items():
            fleet.admin.put(f"/api/v1/products/{name}", json={"board": board, "anonymous": False})


def job(client: httpx.Client, path: str) -> httpx.Response:
    return client.get(path, headers=JOB_HEADERS)


def test_anonymous_devices_get_only_their_products_image(two_products: tuple[Fleet, Fleet]) -> None:
    sensor, psoc = two_products
    sensor_image, psoc_image = image("3.1.0", 9000), image("3.2.0", 7000)
    sensor_artifact = sensor.upload(sensor_image, board="BOARD_A")
    psoc_artifact = psoc.upload(psoc_image, name="psoc.img", board="BOARD_P")
    sensor.deploy(sensor_artifact, priority=1_000_000)
    psoc.deploy(psoc_artifact, priority=1_000_000)
    device = httpx.Client(base_url=sensor.server.url, headers=ORIGINAL)

    # with two anonymous products the top-level paths cannot know which one is asking
    for path in ("/ota_update.json", "/ota-update.bin"):
        refused = device.get(path, headers=JOB_HEADERS)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "AMBIGUOUS"
        assert "/products/NAME/" in refused.json()["message"]

    answer = job(device, f"/products/{sensor.product}/ota_update.json")
    assert answer.status_code == 206, answer.text  # the original asks for its job with a range
    doc = parse_job_document(answer.content)
    assert (doc.message, doc.board, doc.version) == (UPDATE_AVAILABLE, "BOARD_A", "3.1.0")
    assert doc.file.startswith(f"/products/{sensor.product}/files/{sensor_artifact['id']}/")
    assert download_like_original(device, doc.file) == sensor_image
    assert download_like_original(device, f"/products/{psoc.product}/ota-update.bin") == psoc_image

    # another product's file is not served through this product's paths
    crossed = f"/products/{sensor.product}/files/{psoc_artifact['id']}/psoc.img"
    assert device.get(crossed, headers=ORIGINAL).status_code == 403
    assert device.get(f"/products/{psoc.product}/ota-update.bin").content != sensor_image

    # a product that does not allow anonymous devices answers nothing
    closed = f"closed-{uuid.uuid4().hex[:8]}"
    assert sensor.admin.put(f"/api/v1/products/{closed}", json={}).status_code == 200
    assert job(device, f"/products/{closed}/ota_update.json").status_code == 401
    assert device.get(f"/products/{closed}/ota-update.bin").status_code == 401


def test_anonymous_devices_leave_a_trace(two_products: tuple[Fleet, Fleet]) -> None:
    sensor, _psoc = two_products
    data = image("3.3.0", 9000)
    deployment = sensor.deploy(sensor.upload(data, board="BOARD_A"), priority=1_000_001)
    first = httpx.Client(base_url=sensor.server.url, headers={"user-agent": "ota-http-client"})
    second = httpx.Client(base_url=sensor.server.url, headers={"user-agent": "ota-http-client/2"})

    doc = parse_job_document(job(first, f"/products/{sensor.product}/ota_update.json").content)
    assert download_like_original(first, doc.file) == data
    assert first.post(doc.file).status_code == 200  # empty body: outcome unknown
    job(second, f"/products/{sensor.product}/ota_update.json")  # fetched its job only

    shown = sensor.admin.get(f"/api/v1/deployments/{deployment['id']}").json()
    assert shown["anonymous"] == {"Offered": 1, "Unknown": 1}
    assert shown["counts"]["Unknown"] == 0  # identified devices only
    listed = sensor.admin.get(
        "/api/v1/anonymous-devices", params={"deployment": deployment["id"]}
    ).json()
    assert sorted((d["user_agent"], d["status"]) for d in listed) == [
        ("ota-http-client", "unknown"),
        ("ota-http-client/2", None),
    ]
    assert {d["product"] for d in listed} == {sensor.product}
    assert all(d["address"] == "127.0.0.1" for d in listed)

    # a result that says Success counts as applying
    assert first.post(doc.file, json={"Message": "Success", "File": doc.file}).status_code == 200
    shown = sensor.admin.get(f"/api/v1/deployments/{deployment['id']}").json()
    assert shown["anonymous"] == {"Offered": 1, "Applying": 1}


def test_anonymous_trace_is_capped(tmp_path: Path) -> None:
    """One row per address and User-Agent, never more than --anonymous-history of them: the
    least recently seen go first."""
    server = start_server(tmp_path / "data", extra=("--anonymous-history", "5"))
    try:
        admin = server.admin_client()
        assert admin.put("/api/v1/products/solo", json={"anonymous": True}).is_success
        for n in range(8):
            with httpx.Client(base_url=server.url, headers={"user-agent": f"agent-{n}"}) as client:
                # nothing deployed: No Update Available, still a trace
                assert job(client, "/ota_update.json").status_code == 206
        listed = admin.get("/api/v1/anonymous-devices", params={"product": "solo"}).json()
        assert [d["user_agent"] for d in listed] == [f"agent-{n}" for n in range(7, 2, -1)]
    finally:
        server.stop()
