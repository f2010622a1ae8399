"""otakit end to end over MQTT: the server's deployment, served by ``otakit publisher``, reaches a
simulated device running ``otakit sim run --mqtt``; the device downloads, verifies, reboots,
confirms, and the server counts it as applied."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from otakit.sim.device import Identity, SimDevice

from .mqtt_harness import Broker
from .server_harness import Server

# The broker, server and publisher helpers of the publisher's tests (none of its tests run here).
from .test_publisher import (  # noqa: F401 - fixtures
    KEY,
    KIT,
    OTAKIT,
    broker,
    command,
    fresh_company,
    server,
    signed_image,
)


def sim_run(device: Path, port: int, company: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["sim", "run", str(device), "--mqtt", f"127.0.0.1:{port}", "--company", company]
    return subprocess.run(
        [str(OTAKIT), *args, "--once", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("flow", ["job", "direct"])
def test_deployment_over_mqtt_to_the_otakit_agent(
    broker: Broker,  # noqa: F811 - the imported fixture
    server: Server,  # noqa: F811 - the imported fixture
    tmp_path: Path,
    flow: str,
) -> None:
    admin = server.admin_client()
    product = f"p-{uuid.uuid4().hex[:8]}"
    anonymous = flow == "direct"  # the direct flow names no device: an anonymous product
    settings = {"board": KIT, "anonymous": anonymous}
    assert admin.put(f"/api/v1/products/{product}", json=settings).status_code == 200
    data = signed_image("1.1.0", 90_000)
    artifact = admin.post("/api/v1/artifacts", params={"name": "app.img"}, content=data).json()
    body = {"artifact_id": artifact["id"], "product": product, "group": "g", "priority": 5_000_000}
    deployment = admin.post("/api/v1/deployments", json=body).json()
    serial = f"S-{uuid.uuid4().hex[:8]}"
    device = SimDevice.create(
        tmp_path / "dev",
        signed_image("1.0.0", 20_000),
        [KEY.public_key],
        layout="psoc6-2m-swap",
        identity=Identity(board=KIT, product=product, serial=serial),
    )
    device.boot()
    registered = {"product": product, "group": "g", "board": KIT, "version": "1.0.0"}
    assert admin.put(f"/api/v1/devices/{serial}", json=registered).status_code == 200

    company = fresh_company()
    with command("--data", server.data, "-c", company, "--port", str(broker.port)):
        done = sim_run(device.dir, broker.port, company, "--flow", flow)
        assert done.returncode == 0, done.stderr
        assert "running 1.1.0+0, confirmed" in done.stderr
        again = sim_run(device.dir, broker.port, company)  # tells the publisher what runs now
        assert again.returncode == 0, again.stderr
        assert "no update" in again.stderr

    with device.bootloader() as boot:
        assert boot.primary().read_at(0, len(data)) == data
    if flow == "job":
        status = admin.get(f"/api/v1/devices/{serial}").json()
        assert (status["status"], status["version"]) == ("applied", "1.1.0")
        counts = admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
        assert counts["Applied"] == 1
