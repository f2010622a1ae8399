"""hawkBit DDI acceptance with a real client: Debian's SWUpdate (suricatta) and ``otakit serve``.

SWUpdate runs headless on loopback (tests/swupdate_harness.py), polling every second
(``otakit serve --ddi-poll 1``), with a signed ``.swu`` built here (the first test shows SWUpdate
installs it and refuses it altered or signed by another key):

- through the project's fault proxy (tests/faultproxy.py, which records every request it
  forwards), it enrolls with a GatewayToken on its first poll, sends its attributes (configData:
  they become its tags), downloads the ``.swu`` uploaded as a raw artifact, is cut mid-download
  and resumes with ``Range``, installs the image to a file and, started again as after a reboot
  into the new version (``-c 2``), reports the action closed with success: the deployment counts
  it Applied;
- with its own TargetToken, in the first phase of a rollout, its download is held half-way
  (harness.SlowLink) while the rollout is aborted, then crawls on: SWUpdate's check during the
  download sees cancelAction, it stops and confirms, and the server records the cancel and
  offers nothing more.

Without ``/usr/bin/swupdate`` the tests are skipped, except under CI=true (a failure).
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest

from .faultproxy import Fault, FaultProxy, Request
from .server_harness import Server, start_server
from .swupdate_harness import (
    Signer,
    SlowLink,
    Suricatta,
    build_swu,
    install_swu,
    swupdate_or_skip,
)

pytestmark = pytest.mark.integration

TENANT = "DEFAULT"
ATTRIBUTES = {"hwRevision": "1.0", "site": "plant-7"}  # SWUpdate's identify section
IMAGE_SIZE = 256 * 1024
# Every connection SWUpdate opens through the proxy is dropped after CUT response bytes: only the
# artifact's gets that far (polls and feedback answers are a few hundred bytes each), once, in
# the middle of the .swu; the resumed download is shorter than CUT.
CUT = 160_000
EVERY_CONNECTION = 1000
# The rollout test's link holds the download after HOLD_AT bytes until the rollout is aborted,
# then crawls at CRAWL bytes/s: SWUpdate looks for a cancel on the first data after a second.
HOLD_AT = 64 * 1024
CRAWL = 32 * 1024
FAILED = ("Error processing update chunk", "Channel get operation failed")  # give up at once
T = TypeVar("T")


@pytest.fixture(scope="module")
def ddi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    swupdate_or_skip()
    server = start_server(tmp_path_factory.mktemp("ddi-swupdate"), extra=("--ddi-poll", "1"))
    yield server
    server.stop()


@pytest.fixture
def admin(ddi: Server) -> Iterator[httpx.Client]:
    with ddi.admin_client() as client:
        yield client


def call(admin: httpx.Client, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
    response = admin.request(method, f"/api/v1{path}", **kwargs)
    assert response.status_code == expect, f"{method} {path}: {response.text}"
    return response.json() if response.content else None


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30) -> T:
    """``probe()`` once it is truthy: the server's state, read again until it shows ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s (last: {value!r})"
        time.sleep(0.05)


def product_with_swu(
    admin: httpx.Client, image: bytes, target: Path, version: str, signer: Signer
) -> tuple[str, dict[str, Any]]:
    """A new product allowing raw artifacts, and its .swu (installing ``image`` to ``target``)."""
    product = f"gw-{uuid.uuid4().hex[:8]}"
    call(admin, "PUT", f"/products/{product}", json={"allow_raw": True})
    artifact = call(
        admin,
        "POST",
        "/artifacts",
        201,
        params={"name": "update.swu", "version": version, "product": product},
        content=build_swu(image, target, version, signer),
    )
    return product, artifact


def port_of(server: Server) -> int:
    port = urlsplit(server.url).port
    assert port is not None
    return port


def artifact_gets(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.method == "GET" and r.path.endswith("/update.swu")]


def polls(requests: list[Request], base: str) -> list[Request]:
    return [r for r in requests if r.method == "GET" and r.path == base]


def resumed_from(request: Request) -> int | None:
    """The offset of an open ``Range: bytes=N-`` (how libcurl resumes); None without one."""
    match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
    return int(match[1]) if match else None


def assert_all_answers_taken(device: Suricatta) -> None:
    """Every answer was one SWUpdate takes: it logs any other status code (feedback too)."""
    refused = [line for line in device.log if "HTTP error code" in line]
    assert not refused, "".join(refused)


def counts(admin: httpx.Client, deployment: int) -> dict[str, int]:
    return dict(call(admin, "GET", f"/deployments/{deployment}")["counts"])


def test_swupdate_installs_the_bundle_and_refuses_it_altered(tmp_path: Path) -> None:
    """The .swu built here is one SWUpdate installs (signature, hardware, SHA-256), and it
    really checks: one byte changed in the image, or another signer, and it installs nothing."""
    signer = Signer.generate()
    image = random.Random(18).randbytes(4096)
    target = tmp_path / "rootfs.img"
    bundle = tmp_path / "update.swu"
    swu = build_swu(image, target, "1.0.1", signer)
    at = swu.index(image) + 100
    bundle.write_bytes(swu[:at] + bytes([swu[at] ^ 1]) + swu[at + 1 :])
    assert "HASH mismatch" in install_swu(bundle, signer)
    assert not target.exists()
    bundle.write_bytes(swu)
    assert "Authentication of all signatures failed" in install_swu(bundle, Signer.generate())
    assert not target.exists()
    log = install_swu(bundle, signer)
    assert "Verified OK" in log
    assert target.read_bytes() == image, log


def test_swupdate_resumes_a_cut_download_installs_and_is_applied(
    ddi: Server, admin: httpx.Client, tmp_path: Path
) -> None:
    """Enrolled by a GatewayToken, cut mid-download, resumed with Range, installed, and
    Applied once it reports success after its "reboot"."""
    signer = Signer.generate()
    image = random.Random(19).randbytes(IMAGE_SIZE)
    target = tmp_path / "rootfs.img"
    product, artifact = product_with_swu(admin, image, target, "1.1.0", signer)
    assert artifact["size"] > CUT > artifact["size"] // 2 + 8192
    gateway = call(admin, "POST", "/tokens", 201, json={"role": "enroll", "product": product})
    deployment = call(
        admin, "POST", "/deployments", 201, json={"artifact_id": artifact["id"], "product": product}
    )["id"]
    serial = f"swu-{uuid.uuid4().hex[:8]}"
    base = f"/{TENANT}/controller/v1/{serial}"

    with FaultProxy(("127.0.0.1", port_of(ddi))) as proxy:
        proxy.force(Fault.DROP, count=EVERY_CONNECTION, at=CUT)
        device = Suricatta(proxy.url, serial, gateway["token"], signer, ATTRIBUTES, gateway=True)
        with device:
            device.wait_log("Update successful, executing post-update actions", fail=FAILED)
        requests = proxy.requests()
        gets = artifact_gets(requests)
        assert proxy.stats.faults[Fault.DROP] >= 1

    assert target.read_bytes() == image
    assert_all_answers_taken(device)
    # it polled, sent its attributes, and resumed the cut download where it stopped
    assert polls(requests, base)
    assert any(r.method == "PUT" and r.path == f"{base}/configData" for r in requests)
    assert resumed_from(gets[0]) is None
    offsets = [resumed_from(r) for r in gets[1:]]
    assert offsets, f"no resumed download: {[r.headers.get('range') for r in gets]}"
    assert all(offset is not None and 0 < offset < artifact["size"] for offset in offsets)
    # enrolled into the gateway token's product on its first poll; the attributes are tags
    shown = call(admin, "GET", f"/devices/{serial}")
    assert shown["product"] == product
    assert shown["tags"].items() >= ATTRIBUTES.items()
    # installed but not yet confirmed: SWUpdate reports only "proceeding" in this run
    assert counts(admin, deployment).get("Applied", 0) == 0

    # the reboot into 1.1.0: SWUpdate started with the update state "testing" reports success
    rebooted = Suricatta(
        ddi.url, serial, gateway["token"], signer, ATTRIBUTES, gateway=True, confirm="2"
    )
    with rebooted:
        wait_for("Applied", lambda: counts(admin, deployment).get("Applied") == 1)
    assert_all_answers_taken(rebooted)
    assert call(admin, "GET", f"/devices/{serial}")["version"] == "1.1.0"
    # a closed action is not offered again; it is the installed one now
    poll = httpx.get(
        f"{ddi.url}{base}", headers={"authorization": f"GatewayToken {gateway['token']}"}
    )
    assert poll.status_code == 200, poll.text
    assert "deploymentBase" not in poll.json()["_links"]
    assert poll.json()["_links"]["installedBase"]["href"].endswith(f"/installedBase/{deployment}")


def test_an_aborted_rollout_cancels_the_download_in_flight(
    ddi: Server, admin: httpx.Client, tmp_path: Path
) -> None:
    """The rollout is aborted while the device's download is held half-way: SWUpdate sees
    cancelAction during the download, stops and confirms; nothing is installed or offered."""
    signer = Signer.generate()
    image = random.Random(20).randbytes(IMAGE_SIZE)
    target = tmp_path / "rootfs.img"
    product, artifact = product_with_swu(admin, image, target, "2.0.0", signer)
    serial = f"swu-{uuid.uuid4().hex[:8]}"
    call(admin, "PUT", f"/devices/{serial}", json={"product": product, "group": "canary"})
    token = call(admin, "POST", "/tokens", 201, json={"role": "device", "device": serial})["token"]
    rollout = call(
        admin,
        "POST",
        "/rollouts",
        201,
        json={
            "deployment": {"artifact_id": artifact["id"], "product": product},
            "phases": [{"group": "canary"}, {"percent": 100}],
        },
    )
    deployment = rollout["deployment_id"]
    assert rollout["state"] == "running"
    base = f"/{TENANT}/controller/v1/{serial}"
    cancel = f"{base}/cancelAction/"
    assert (artifact["size"] - HOLD_AT) / CRAWL > 3  # the rest takes longer than 3 checks

    with SlowLink(("127.0.0.1", port_of(ddi)), hold_at=HOLD_AT, rate=CRAWL) as link:
        with Suricatta(link.url, serial, token, signer, ATTRIBUTES) as device:
            assert link.held.wait(30), f"the download never got half-way:\n{device.tail()}"
            wait_for("Downloading", lambda: counts(admin, deployment).get("Downloading") == 1)
            aborted = call(
                admin, "POST", f"/rollouts/{rollout['id']}/abort", json={"reason": "bad build"}
            )
            assert aborted["state"] == "aborted"
            link.release()
            # while it downloads, SWUpdate asks the server again once a second: cancelAction
            device.wait_log("Acknowledging cancelled update", fail=("Update successful",))
            wait_for("the cancel confirmed", lambda: counts(admin, deployment).get("Interrupted"))
            confirmed = len(link.requests())
            wait_for("two more polls", lambda: polls(link.requests()[confirmed:], base)[1:])
        requests = link.requests()

    assert_all_answers_taken(device)
    assert any(r.method == "GET" and r.path.startswith(cancel) for r in requests)
    answers = [r.path for r in requests if r.method == "POST" and r.path.startswith(cancel)]
    assert len(answers) == 1
    assert answers[0].endswith("/feedback")
    assert len(artifact_gets(requests)) == 1  # stopped, and not started again
    assert not target.exists() or target.read_bytes() != image
    history = call(admin, "GET", f"/devices/{serial}/history")
    assert (history[0]["status"], history[0]["error"]) == ("interrupted", "cancelled")
    assert counts(admin, deployment).get("Applied", 0) == 0
    poll = httpx.get(f"{ddi.url}{base}", headers={"authorization": f"TargetToken {token}"})
    assert poll.status_code == 200, poll.text
    assert not {"cancelAction", "deploymentBase"} & poll.json()["_links"].keys()
