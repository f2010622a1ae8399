"""SHA-1 and MD5 of artifacts next to the SHA-256 that names them (issue 19: hawkBit DDI
clients check them), against a real ``otakit serve`` on loopback.

An upload computes all three while its body streams; an artifact uploaded before they were kept
(its hashes nulled in the server's SQLite file, or a row written under migration 0011's schema)
gets them from its blob when it is deployed, by ``POST /deployments`` or by a rollout created
with its deployment, or from the next upload of the same bytes; a blob that is not the
artifact's bytes is not deployed; on S3 the blob is read through the server's local copy.
``otakit artifact show`` prints them. Migration 0012 runs on
a database of the schema before it, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text

from otakit.cli import main
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.server.database import alembic_config, create_engine, database_url

from .server_harness import S3_ENV, Server, postgres_database, s3_bucket, start_server

pytestmark = pytest.mark.integration

KEY = SigningKey.generate("ecdsa-p256")
PRODUCT = "hashes"


def digests(data: bytes) -> dict[str, str]:
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "sha1": hashlib.sha1(data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
    }


def hashes_of(record: dict[str, Any]) -> dict[str, str]:
    return {name: record[name] for name in ("sha256", "sha1", "md5")}


def raw(seed: str, size: int = 300_000) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("hashes"))
    try:
        with srv.admin_client() as admin:
            trusted = admin.post(
                "/api/v1/keys",
                content=KEY.public_key.pem(),
                headers={"content-type": "application/x-pem-file"},
            )
            assert trusted.status_code == 201, trusted.text
            made = admin.put(f"/api/v1/products/{PRODUCT}", json={"allow_raw": True})
            assert made.status_code == 200, made.text
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.admin_client() as client:
        yield client


def upload(admin: httpx.Client, data: bytes, version: str, name: str = "fw.bin") -> Any:
    answer = admin.post(
        "/api/v1/artifacts",
        params={"name": name, "product": PRODUCT, "version": version},
        content=data,
    )
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def artifact(admin: httpx.Client, artifact_id: str) -> Any:
    answer = admin.get(f"/api/v1/artifacts/{artifact_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def forget_hashes(server: Server, artifact_id: str) -> None:
    """Make the artifact look uploaded before SHA-1 and MD5 were kept."""
    with sqlite3.connect(server.data / "otakit.db", timeout=10) as db:
        changed = db.execute(
            "UPDATE artifacts SET sha1 = NULL, md5 = NULL WHERE id = ?", (artifact_id,)
        )
        assert changed.rowcount == 1


def deployment_of(artifact_id: str, group: str) -> dict[str, Any]:
    return {"artifact_id": artifact_id, "product": PRODUCT, "group": group}


# --- uploads -------------------------------------------------------------------------------------


def test_an_upload_stores_the_sha1_and_md5_of_its_bytes(admin: httpx.Client) -> None:
    payload = random.Random("image").randbytes(200_000)
    image = sign_image(payload, KEY, SignOptions(ImageVersion.parse("1.0.0"), pad_header=True))
    gateway = raw("raw", 1_500_000)  # several chunks of the request body
    for data, version, name in ((image, "1.0.0", "app.img"), (gateway, "7", "gw.swu")):
        expected = digests(data)
        created = upload(admin, data, version, name)
        assert hashes_of(created) == expected
        assert created["id"] == expected["sha256"]
        assert hashes_of(artifact(admin, created["id"])) == expected
        listed = admin.get("/api/v1/artifacts", params={"name": name}).json()
        assert [hashes_of(a) for a in listed] == [expected]
    assert artifact(admin, digests(image)["sha256"])["kind"] == "image"


# --- artifacts uploaded before -------------------------------------------------------------------


def test_an_old_artifact_gets_its_hashes_when_it_is_deployed(
    server: Server, admin: httpx.Client
) -> None:
    direct, phased, again = raw("direct"), raw("phased"), raw("again")
    ids = {}
    for data, version in ((direct, "2.0.1"), (phased, "2.0.2"), (again, "2.0.3")):
        ids[version] = upload(admin, data, version)["id"]
        forget_hashes(server, ids[version])
        shown = artifact(admin, ids[version])
        assert (shown["sha1"], shown["md5"]) == (None, None)

    made = admin.post("/api/v1/deployments", json=deployment_of(ids["2.0.1"], "direct"))
    assert made.status_code == 201, made.text
    assert hashes_of(artifact(admin, ids["2.0.1"])) == digests(direct)

    rollout = {
        "deployment": deployment_of(ids["2.0.2"], "phased"),
        "phases": [{"percent": 50}, {"percent": 100}],
    }
    made = admin.post("/api/v1/rollouts", json=rollout)
    assert made.status_code == 201, made.text
    assert hashes_of(artifact(admin, ids["2.0.2"])) == digests(phased)

    # the same bytes uploaded again: the existing record, now with both
    answer = admin.post(
        "/api/v1/artifacts", params={"name": "fw.bin", "product": PRODUCT}, content=again
    )
    assert answer.status_code == 200, answer.text
    assert hashes_of(answer.json()) == digests(again)
    assert hashes_of(artifact(admin, ids["2.0.3"])) == digests(again)


def test_a_blob_that_is_not_the_artifacts_bytes_is_not_deployed(
    server: Server, admin: httpx.Client
) -> None:
    data = raw("swapped")
    artifact_id = upload(admin, data, "3.0.0")["id"]
    forget_hashes(server, artifact_id)
    blob = server.data / "blobs" / artifact_id[:2] / artifact_id
    blob.write_bytes(raw("something else"))

    refused = admin.post("/api/v1/deployments", json=deployment_of(artifact_id, "swapped"))
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == "BLOB_STORE"
    assert artifact_id[:12] in refused.json()["message"]
    listed = admin.get("/api/v1/deployments", params={"artifact": artifact_id}).json()
    assert listed == []
    shown = artifact(admin, artifact_id)
    assert (shown["sha1"], shown["md5"]) == (None, None)


def test_an_old_artifact_on_s3_gets_its_hashes_when_it_is_deployed(tmp_path: Path) -> None:
    with s3_bucket() as blob_url:
        srv = start_server(tmp_path, blob_url=blob_url, env=S3_ENV)
        try:
            with srv.admin_client() as admin:
                made = admin.put(f"/api/v1/products/{PRODUCT}", json={"allow_raw": True})
                assert made.status_code == 200, made.text
                data = raw("on s3")
                artifact_id = upload(admin, data, "5.0.0")["id"]
                assert hashes_of(artifact(admin, artifact_id)) == digests(data)
                forget_hashes(srv, artifact_id)
                assert not (tmp_path / "blob-cache" / artifact_id[:2] / artifact_id).exists()
                deployed = admin.post("/api/v1/deployments", json=deployment_of(artifact_id, "s3"))
                assert deployed.status_code == 201, deployed.text
                assert hashes_of(artifact(admin, artifact_id)) == digests(data)
        finally:
            srv.stop()


# --- otakit artifact show ------------------------------------------------------------------------


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``otakit ARGS...`` in this process, with $OTAKIT_SERVER/$OTAKIT_TOKEN set."""
    monkeypatch.setenv("OTAKIT_SERVER", server.url)
    monkeypatch.setenv("OTAKIT_TOKEN", server.admin)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def field_lines(table: str) -> dict[str, str]:
    """The rows of a ``show`` table: field -> value (single-line values)."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│ \n").split("│")]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_artifact_show_prints_sha1_and_md5(server: Server, admin: httpx.Client, cli: Cli) -> None:
    data = raw("shown")
    expected = digests(data)
    artifact_id = upload(admin, data, "4.0.0")["id"]

    code, out, err = cli("artifact", "show", artifact_id[:12])
    assert code == 0, err
    rows = field_lines(out)
    assert rows["sha256"] == expected["sha256"]
    assert rows["sha1"] == expected["sha1"]
    assert rows["md5"] == expected["md5"]
    assert max(len(line) for line in out.splitlines()) <= 80
    code, out, err = cli("artifact", "show", artifact_id, "--json")
    assert code == 0, err
    assert hashes_of(json.loads(out)) == expected

    forget_hashes(server, artifact_id)
    code, out, err = cli("artifact", "show", artifact_id)
    assert code == 0, err
    rows = field_lines(out)
    assert (rows["sha1"], rows["md5"]) == ("-", "-")


# --- migration 0012 ------------------------------------------------------------------------------


async def _seed_0011(url: str, artifact_id: str) -> None:
    """A product and a raw artifact as a server of migration 0011 wrote them."""
    engine = create_engine(url)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as db:
            await db.execute(
                text(
                    "INSERT INTO products (name, board, allow_raw, anonymous, self_register, "
                    "created_at) VALUES (:name, NULL, true, false, false, :now)"
                ),
                {"name": PRODUCT, "now": now},
            )
            await db.execute(
                text(
                    "INSERT INTO artifacts (id, name, container, kind, version, size, board, "
                    "product, signature, details, created_at) VALUES (:id, 'old.bin', 'ota', "
                    "'raw', '1.0.0', :size, NULL, :product, 'raw', '{}', :now)"
                ),
                {"id": artifact_id, "size": 300_000, "product": PRODUCT, "now": now},
            )
    finally:
        await engine.dispose()


def _database_of_0011_is_upgraded(data: Path, database: str | None) -> None:
    old = raw("before 0012")
    artifact_id = hashlib.sha256(old).hexdigest()
    blob = data / "blobs" / artifact_id[:2] / artifact_id  # the filesystem store's layout
    blob.parent.mkdir(parents=True)
    blob.write_bytes(old)
    url = database_url(database, data)
    command.upgrade(alembic_config(url), "0011")  # the schema before this change
    asyncio.run(_seed_0011(url, artifact_id))

    server = start_server(data, database_url=database)  # migrates, as on every start
    try:
        with server.admin_client() as admin:
            shown = artifact(admin, artifact_id)
            assert (shown["sha1"], shown["md5"]) == (None, None)
            made = admin.post("/api/v1/deployments", json=deployment_of(artifact_id, "old"))
            assert made.status_code == 201, made.text
            assert hashes_of(artifact(admin, artifact_id)) == digests(old)
            new = raw("after 0012")
            assert hashes_of(upload(admin, new, "1.0.1")) == digests(new)
    finally:
        server.stop()


def test_migration_0012_on_a_sqlite_database_of_0011(tmp_path: Path) -> None:
    _database_of_0011_is_upgraded(tmp_path, None)


def test_migration_0012_on_a_postgres_database_of_0011(tmp_path: Path) -> None:
    with postgres_database() as url:
        _database_of_0011_is_upgraded(tmp_path, url)
