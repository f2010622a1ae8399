"""Which deployment a device is offered when several fit (issue 14, point 8).

Deployments are ordered by the operator's priority (0 unless given: an override), then by the
artifact's version, highest first, then by age. ``otakit deploy`` no longer makes the version a
priority: it used to give 2.0.0 priority 2 and 1.5.0 priority 17104896, so a device on 1.0.0
was offered 1.5.0 with 2.0.0 deployed. Checked against a real ``otakit serve`` (SQLite,
PostgreSQL, S3 blobs) with the real ``otakit deploy``, in the JSON check-in and in the original
device's job document; and the migration that resets the priorities the old rule derived.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text

from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.jobdoc import UPDATE_AVAILABLE, parse_job_document
from otakit.server.database import alembic_config, create_engine, database_url
from otakit.server.models import Artifact, Deployment, Device
from otakit.server.service.offers import Offer, select_for_products, select_offer
from otakit.server.targeting import product_group_condition

from .server_harness import BIN, Server, postgres_database, start_server

KEY = SigningKey.generate("ecdsa-p256")
BOARD = "BOARD_A"
ORIGINAL = {"user-agent": "ota-http-client"}


def image(version: str) -> bytes:
    payload = random.Random(version).randbytes(6000)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


def deploy_command(server: Server, path: Path, version: str, product: str, group: str) -> list[str]:
    where = ("--server", server.url, "--token", server.admin)
    return [str(BIN / "otakit"), "deploy", str(path), version, product, group, *where]


@dataclass
class Setup:
    """A product of its own on a shared server, with helpers that act as an operator would."""

    server: Server
    admin: httpx.Client
    product: str
    group: str
    folder: Path

    def deploy(self, version: str, *extra: str) -> dict[str, Any]:
        """``otakit deploy FILE VERSION PRODUCT GROUP``, as typed; the deployment it made."""
        path = self.folder / f"app-{version}.img"
        path.write_bytes(image(version))
        done = subprocess.run(
            [*deploy_command(self.server, path, version, self.product, self.group), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        found = self.admin.get(f"/api/v1/deployments/{done.stdout.strip()}")
        assert found.status_code == 200, found.text
        deployment: dict[str, Any] = found.json()
        return deployment

    def device(self, version: str) -> tuple[str, httpx.Client]:
        serial = f"ord-{uuid.uuid4().hex[:10]}"
        registered = self.admin.put(
            f"/api/v1/devices/{serial}",
            json={"product": self.product, "group": self.group, "board": BOARD, "version": version},
        )
        assert registered.status_code == 200, registered.text
        return serial, self.server.client(self.server.token("device", "--device", serial))

    def offered(self, serial: str, device: httpx.Client, version: str) -> tuple[str | None, str]:
        """The version the device is offered by the JSON check-in (None: nothing) and by its
        original-middleware job document ("" when it says No Update Available)."""
        checkin = device.post(
            "/api/v1/device/checkin", json={"serial": serial, "version": version, "board": BOARD}
        )
        assert checkin.status_code in (200, 204), checkin.text
        json_offer = checkin.json()["job"]["version"] if checkin.status_code == 200 else None
        job = device.get(f"/devices/{serial}/ota_update.json", headers=ORIGINAL)
        assert job.status_code == 200, job.text
        doc = parse_job_document(job.content)
        return json_offer, doc.version if doc.message == UPDATE_AVAILABLE else ""


@pytest.fixture
def setup(server: Server, tmp_path: Path) -> Setup:
    admin = server.admin_client()
    trusted = admin.post(
        "/api/v1/keys",
        content=KEY.public_key.pem(),
        headers={"content-type": "application/x-pem-file"},
    )
    assert trusted.status_code == 201, trusted.text
    product = f"ord-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
    return Setup(server, admin, product, "field", tmp_path)


@pytest.mark.parametrize("server", ["sqlite", "postgres"], indirect=True)
def test_the_highest_version_is_offered_whatever_the_deploy_order(setup: Setup) -> None:
    newest = setup.deploy("2.0.0")
    older = setup.deploy("1.5.0")  # deployed later, but an older version

    serial, device = setup.device("1.0.0")
    assert setup.offered(serial, device, "1.0.0") == ("2.0.0", "2.0.0")
    # one step at a time is never forced: a device on 1.5.0 goes straight to 2.0.0 too
    assert setup.offered(serial, device, "1.5.0") == ("2.0.0", "2.0.0")
    assert setup.offered(serial, device, "2.0.0") == (None, "")
    # otakit deploy leaves the priority alone: the version orders the deployments
    assert (newest["priority"], older["priority"]) == (0, 0)


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)  # the order is not stored
def test_an_explicit_priority_overrides_the_version_order(setup: Setup) -> None:
    setup.deploy("2.0.0")
    pinned = setup.deploy("1.6.0", "--priority", "5")
    assert pinned["priority"] == 5

    serial, device = setup.device("1.0.0")
    assert setup.offered(serial, device, "1.0.0") == ("1.6.0", "1.6.0")
    # the override only counts where its version is wanted: past it, the version order again
    assert setup.offered(serial, device, "1.6.0") == ("2.0.0", "2.0.0")

    # the API's priority field is the same override, and the higher one wins
    artifact = setup.admin.post(
        "/api/v1/artifacts", params={"name": "app.img"}, content=image("1.7.0")
    ).json()
    made = setup.admin.post(
        "/api/v1/deployments",
        json={
            "artifact_id": artifact["id"],
            "product": setup.product,
            "group": setup.group,
            "priority": 9,
        },
    )
    assert made.status_code == 201, made.text
    assert setup.offered(serial, device, "1.0.0") == ("1.7.0", "1.7.0")


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)  # the order is not stored
def test_equal_versions_go_to_the_newest_deployment(setup: Setup) -> None:
    first = setup.deploy("3.0.0")
    # the same image again, to another condition that also targets the device
    second = setup.admin.post(
        "/api/v1/deployments",
        json={
            "artifact_id": first["artifact_id"],
            "condition": f"tags.productType='{setup.product}'",
        },
    ).json()
    serial, device = setup.device("1.0.0")
    checkin = device.post("/api/v1/device/checkin", json={"serial": serial, "version": "1.0.0"})
    assert checkin.json()["job"]["deployment_id"] == second["id"]


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)  # the order is not stored
def test_deploy_refuses_a_priority_out_of_range(setup: Setup) -> None:
    path = setup.folder / "x.img"
    path.write_bytes(image("4.0.0"))
    done = subprocess.run(
        [
            *deploy_command(setup.server, path, "4.0.0", setup.product, setup.group),
            *("--priority", str(2**31)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--priority must be from" in done.stderr
    assert "Traceback" not in done.stderr


# --- the order itself, whatever order the offers come in ------------------------------------------


def _offer(id_: int, version: str, priority: int = 0) -> Offer:
    return Offer(
        Deployment(
            id=id_, condition=product_group_condition("p", "g"), priority=priority, downgrade=False
        ),
        Artifact(version=version, board=None),
    )


def _chosen(offer: Offer | None) -> tuple[int | None, str]:
    assert offer is not None
    return offer.deployment.id, offer.artifact.version


def test_select_offer_and_select_for_products_rank_the_offers_they_are_given() -> None:
    device = Device(serial="s", product="p", version="1.0.0", tags={"deviceGroup": "g"})
    offers = [_offer(3, "1.5.0"), _offer(1, "2.0.0"), _offer(2, "1.10.0")]
    for ordering in (offers, offers[::-1]):
        assert _chosen(select_offer(device, ordering)) == (1, "2.0.0")
        assert _chosen(select_for_products({"p"}, ordering)) == (1, "2.0.0")
    assert _chosen(select_offer(device, [*offers, _offer(4, "1.1.0", priority=1)])) == (4, "1.1.0")
    same = [_offer(5, "2.0.0"), _offer(6, "2.0.0"), _offer(4, "2.0.0")]
    assert _chosen(select_offer(device, same)) == (6, "2.0.0")


# --- existing databases --------------------------------------------------------------------------


OLD_DEPLOYMENTS = [
    # (version, priority as stored, what it must be after the migration)
    ("2.0.0", 2, 0),  # what `otakit deploy` derived
    ("1.5.0", (1 << 24) | (5 << 16), 0),  # derived
    ("1.5.3+7", (1 << 24) | (5 << 16) | 3, 0),  # derived (the build number never counted)
    ("1.4.0", 1_000_000, 1_000_000),  # an operator's choice
    ("1.3.0", 0, 0),  # the API's default
    ("1.2.0", 2, 2),  # an operator's choice, not the version's
]


async def _seed_old_database(url: str, product: str) -> None:
    """Rows as a server before the migration wrote them: products, artifacts, deployments."""
    engine = create_engine(url)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as db:
            await db.execute(
                text(
                    "INSERT INTO products (name, board, allow_raw, anonymous, self_register, "
                    "created_at) VALUES (:name, :board, false, false, false, :now)"
                ),
                {"name": product, "board": BOARD, "now": now},
            )
            for version, priority, _ in OLD_DEPLOYMENTS:
                artifact = f"{version.replace('+', '0').replace('.', '0'):0>64}"
                await db.execute(
                    text(
                        "INSERT INTO artifacts (id, name, container, kind, version, size, board, "
                        "product, signature, details, created_at) VALUES (:id, 'app.img', 'ota', "
                        "'image', :version, 1000, :board, :product, 'valid', '{}', :now)"
                    ),
                    {
                        "id": artifact,
                        "version": version,
                        "board": BOARD,
                        "product": product,
                        "now": now,
                    },
                )
                await db.execute(
                    text(
                        "INSERT INTO deployments (artifact_id, condition, priority, downgrade, "
                        "created_at, expires_at) VALUES (:artifact, :condition, :priority, false, "
                        ":now, :expires)"
                    ),
                    {
                        "artifact": artifact,
                        "condition": product_group_condition(product, "field"),
                        "priority": priority,
                        "now": now,
                        "expires": now + timedelta(days=30),
                    },
                )
    finally:
        await engine.dispose()


def _old_database_is_upgraded(data: Path, database: str | None) -> None:
    url = database_url(database, data)
    command.upgrade(alembic_config(url), "0003")  # the schema before this change
    asyncio.run(_seed_old_database(url, "legacy"))

    server = start_server(data, database_url=database)  # migrates, as on every start
    try:
        admin = server.admin_client()
        listed = {d["version"]: d["priority"] for d in admin.get("/api/v1/deployments").json()}
        assert listed == {version: after for version, _, after in OLD_DEPLOYMENTS}
        # the operator's 1_000_000 still outranks everything; past 1.4.0 the version decides
        serial = "legacy-1"
        registered = admin.put(
            f"/api/v1/devices/{serial}",
            json={"product": "legacy", "group": "field", "board": BOARD, "version": "1.4.0"},
        )
        assert registered.status_code == 200, registered.text
        device = server.client(server.token("device", "--device", serial))
        job = device.post("/api/v1/device/checkin", json={"serial": serial, "version": "1.4.0"})
        assert job.status_code == 200, job.text
        assert job.json()["job"]["version"] == "2.0.0"
    finally:
        server.stop()


def test_migration_resets_derived_priorities_on_sqlite(tmp_path: Path) -> None:
    _old_database_is_upgraded(tmp_path, None)


def test_migration_resets_derived_priorities_on_postgres(tmp_path: Path) -> None:
    with postgres_database() as url:
        _old_database_is_upgraded(tmp_path, url)
