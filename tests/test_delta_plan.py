"""Deltas planned and made by the server (issue 20), against a real ``otakit serve`` on loopback.

Uploading an image keeps its identity (``image_sha256``: the image proper). Deploying v2 queues
a delta from v1 (the product's earlier image), which the server's background worker makes: it
becomes ready, smaller than the image, stored as a blob named by its SHA-256 that turns v1 into
v2; ``otakit artifact show`` lists it; removing v2 removes the patch blob. An unrelated image
gives a patch not worth sending (not-smaller); a missing base blob or an image over
``--delta-max-image`` fails with a one-line error; with ``--delta-workers 0`` nothing is made
(the queued row is made by the next server that has a worker). Migration 0013 upgrades a 0012
database (images without identity get it when deployed). Pure parts and the claim (one of two
workers wins a queued row; a stale claim is queued again) are tested in-process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import select, text

from otakit.cli import main
from otakit.errors import BlobStoreError, UsageError
from otakit.image.delta import apply_delta, image_digest, read_delta_header
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.server.blobs import FilesystemBlobStore
from otakit.server.cli import check_delta_options
from otakit.server.database import (
    alembic_config,
    create_engine,
    database_url,
    migrate,
    sessionmaker,
)
from otakit.server.models import Artifact, ArtifactDelta
from otakit.server.service import deltas

from .server_harness import Server, postgres_database, start_server

KEY = SigningKey.generate("ecdsa-p256")
PAYLOAD = 200_000


def firmware(seed: str, size: int = PAYLOAD) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


def signed(payload: bytes | bytearray, version: str) -> bytes:
    return sign_image(
        bytes(payload), KEY, SignOptions(ImageVersion.parse(version), pad_header=True)
    )


def pair(seed: str) -> tuple[bytes, bytes]:
    """v1 and v2 of one firmware: v2 changes a few hundred bytes (and the version)."""
    payload = firmware(seed)
    v1 = signed(payload, "1.0.0")
    payload[5000:5300] = random.Random(seed + "patch").randbytes(300)
    payload[150_000:150_010] = b"0123456789"
    return v1, signed(payload, "2.0.0")


class Buffer:
    """A DeltaTarget in memory."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, offset: int, data: bytes) -> None:
        assert offset == len(self.data)
        self.data += data


# --- a real server -------------------------------------------------------------------------------


def trust(srv: Server, *products: str) -> None:
    with srv.admin_client() as admin:
        trusted = admin.post(
            "/api/v1/keys",
            content=KEY.public_key.pem(),
            headers={"content-type": "application/x-pem-file"},
        )
        assert trusted.status_code == 201, trusted.text
        for product in products:
            made = admin.put(f"/api/v1/products/{product}", json={})
            assert made.status_code == 200, made.text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("deltas"))
    try:
        trust(srv, "ready", "unrelated", "gone")
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.admin_client() as client:
        yield client


def upload(admin: httpx.Client, data: bytes, product: str) -> Any:
    answer = admin.post(
        "/api/v1/artifacts", params={"name": "app.img", "product": product}, content=data
    )
    assert answer.status_code == 201, answer.text
    return answer.json()


def artifact(admin: httpx.Client, artifact_id: str) -> Any:
    answer = admin.get(f"/api/v1/artifacts/{artifact_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def deploy(admin: httpx.Client, artifact_id: str, product: str) -> Any:
    made = admin.post("/api/v1/deployments", json={"artifact_id": artifact_id, "product": product})
    assert made.status_code in (200, 201), made.text
    return made.json()


def wait_deltas(admin: httpx.Client, artifact_id: str, done: set[str], timeout: float = 20) -> Any:
    """The artifact's deltas once every one is in a state of ``done``. The deadline moves on
    whenever a state or progress changes: a slow machine waits, a stuck worker fails."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[str, int]] = []
    while True:
        found = artifact(admin, artifact_id)["deltas"]
        assert found, "no delta was queued"
        if all(d["state"] in done for d in found):
            return found
        now = [(d["state"], d["progress"]) for d in found]
        if now != seen:
            seen, deadline = now, time.monotonic() + timeout
        assert time.monotonic() < deadline, f"the deltas stayed {seen}"
        time.sleep(0.05)


def rows(data: Path, artifact_id: str) -> list[dict[str, Any]]:
    with sqlite3.connect(data / "otakit.db", timeout=10) as db:
        db.row_factory = sqlite3.Row
        found = db.execute(
            "SELECT * FROM artifact_deltas WHERE artifact_id = ? ORDER BY id", (artifact_id,)
        )
        return [dict(r) for r in found]


def blob(data: Path, key: str) -> Path:
    return data / "blobs" / key[:2] / key


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("OTAKIT_SERVER", server.url)
    monkeypatch.setenv("OTAKIT_TOKEN", server.admin)
    monkeypatch.setenv("COLUMNS", "80")

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.mark.integration
def test_deploying_v2_makes_a_delta_from_v1(server: Server, admin: httpx.Client, cli: Cli) -> None:
    v1, v2 = pair("ready")
    old, new = upload(admin, v1, "ready"), upload(admin, v2, "ready")
    assert new["image_sha256"] == image_digest(v2).sha256.hex()
    assert new["image_size"] == image_digest(v2).size
    assert artifact(admin, new["id"])["deltas"] == []  # nothing until it is deployed
    assert admin.get("/api/v1/artifacts").json()[0]["deltas"] is None  # lists stay cheap

    deployment = deploy(admin, new["id"], "ready")
    queued = artifact(admin, new["id"])["deltas"]
    assert len(queued) == 1
    assert queued[0]["base_sha256"] == old["image_sha256"]
    assert queued[0]["base_artifact_id"] == old["id"]
    assert queued[0]["compression"] == "lzma"
    assert queued[0]["state"] in ("queued", "making", "ready")

    [made] = wait_deltas(admin, new["id"], {"ready", "not-smaller", "failed"})
    assert made["state"] == "ready", made
    assert made["progress"] == 100
    assert made["size"] * 20 < len(v2)
    assert made["ratio"] == round(new["image_size"] / made["size"], 2)
    [row] = rows(server.data, new["id"])
    patch = blob(server.data, row["blob_key"]).read_bytes()
    assert hashlib.sha256(patch).hexdigest() == row["blob_key"]
    assert len(patch) == made["size"]
    header = read_delta_header(patch)
    assert (header.base_sha256.hex(), header.new_sha256.hex()) == (
        old["image_sha256"],
        new["image_sha256"],
    )
    out = Buffer()
    apply_delta(v1, patch, out)
    assert bytes(out.data) == v2

    # deploying again (the same deployment back) queues nothing more
    assert deploy(admin, new["id"], "ready")["id"] == deployment["id"]
    assert len(rows(server.data, new["id"])) == 1

    code, shown, err = cli("artifact", "show", new["id"][:12])
    assert code == 0, err
    line = next(x for x in shown.splitlines() if old["id"][:12] in x)
    assert max(len(x) for x in shown.splitlines()) <= 80
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells == [old["id"][:12], "lzma", "ready", str(made["size"]), f"{made['ratio']:g}x"]
    code, shown, err = cli("artifact", "show", new["id"], "--json")
    assert code == 0, err
    assert json.loads(shown)["deltas"][0]["state"] == "ready"

    # removing the artifact removes its delta's blob (the row goes with it)
    cancelled = admin.post(f"/api/v1/deployments/{deployment['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert admin.delete(f"/api/v1/artifacts/{new['id']}").status_code == 204
    assert rows(server.data, new["id"]) == []
    assert not blob(server.data, row["blob_key"]).exists()
    assert blob(server.data, old["id"]).exists()


@pytest.mark.integration
def test_an_unrelated_image_gives_a_delta_not_worth_sending(
    server: Server, admin: httpx.Client
) -> None:
    upload(admin, signed(firmware("one"), "1.0.0"), "unrelated")
    new = upload(admin, signed(firmware("other"), "2.0.0"), "unrelated")
    deploy(admin, new["id"], "unrelated")
    [made] = wait_deltas(admin, new["id"], {"ready", "not-smaller", "failed"})
    assert made["state"] == "not-smaller", made
    assert made["size"] * 2.0 > new["image_size"]  # the server's default --delta-min-ratio
    assert made["ratio"] < 2.0
    [row] = rows(server.data, new["id"])
    assert row["blob_key"] is None


@pytest.mark.integration
def test_a_missing_base_blob_fails_the_delta_with_one_line(
    server: Server, admin: httpx.Client
) -> None:
    v1, v2 = pair("gone")
    old, new = upload(admin, v1, "gone"), upload(admin, v2, "gone")
    blob(server.data, old["id"]).unlink()
    made = deploy(admin, new["id"], "gone")  # the deployment itself does not wait or fail
    assert made["artifact_id"] == new["id"]
    [failed] = wait_deltas(admin, new["id"], {"ready", "not-smaller", "failed"})
    assert failed["state"] == "failed", failed
    assert "\n" not in failed["error"]
    assert len(failed["error"]) <= 200
    assert "missing" in failed["error"]
    assert old["id"][:12] in failed["error"]
    assert failed["size"] is None
    assert failed["ratio"] is None


@pytest.mark.integration
def test_no_workers_leave_it_queued_for_the_next_server(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra=("--delta-workers", "0"))
    token = srv.admin  # printed on the first start only
    try:
        trust(srv, "idle")
        with srv.admin_client() as admin:
            v1, v2 = pair("idle")
            upload(admin, v1, "idle")
            new = upload(admin, v2, "idle")
            deploy(admin, new["id"], "idle")
            [queued] = artifact(admin, new["id"])["deltas"]
            assert (queued["state"], queued["progress"]) == ("queued", 0)
    finally:
        srv.stop()
    [row] = rows(tmp_path, new["id"])
    assert (row["state"], row["claimed_at"]) == ("queued", None)

    srv = start_server(tmp_path, extra=("--delta-max-image", "1024"))
    try:
        with srv.client(token) as admin:
            [failed] = wait_deltas(admin, new["id"], {"ready", "not-smaller", "failed"})
    finally:
        srv.stop()
    assert failed["state"] == "failed", failed
    assert "larger than delta_max_image (1024 bytes)" in failed["error"]
    assert "\n" not in failed["error"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--delta-compression", "zstd", "--delta-compression must be one of lzma, heatshrink"),
        ("--delta-min-ratio", "0.5", "--delta-min-ratio must be 1 to 1000"),
        ("--delta-workers", "-1", "--delta-workers must be 0 (no deltas made) to 16"),
        ("--delta-max-image", "10", "--delta-max-image must be 1024 bytes to 1 GiB"),
    ],
)
def test_serve_refuses_bad_delta_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    code = main(["serve", "--data", str(tmp_path), "--port", "0", option, value])
    err = capsys.readouterr().err
    assert code != 0
    assert message in " ".join(err.split()), err
    assert not (tmp_path / "otakit.db").exists()


# --- migration 0013 ------------------------------------------------------------------------------


async def _seed_0012(url: str, images: list[tuple[bytes, str]], product: str) -> None:
    engine = create_engine(url)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as db:
            await db.execute(
                text(
                    "INSERT INTO products (name, board, allow_raw, anonymous, self_register, "
                    "created_at) VALUES (:name, NULL, false, false, false, :now)"
                ),
                {"name": product, "now": now},
            )
            for n, (data, version) in enumerate(images):
                await db.execute(
                    text(
                        "INSERT INTO artifacts (id, sha1, md5, name, container, kind, version, "
                        "size, board, product, signature, details, created_at) VALUES (:id, "
                        ":sha1, :md5, 'app.img', 'ota', 'image', :version, :size, NULL, "
                        ":product, 'valid', '{}', :at)"
                    ),
                    {
                        "id": hashlib.sha256(data).hexdigest(),
                        "sha1": hashlib.sha1(data).hexdigest(),
                        "md5": hashlib.md5(data).hexdigest(),
                        "version": version,
                        "size": len(data),
                        "product": product,
                        "at": now + timedelta(seconds=n),
                    },
                )
    finally:
        await engine.dispose()


def _database_of_0012_is_upgraded(data: Path, database: str | None) -> None:
    v1, v2 = pair("before 0013")
    for image in (v1, v2):
        key = hashlib.sha256(image).hexdigest()
        blob(data, key).parent.mkdir(parents=True, exist_ok=True)
        blob(data, key).write_bytes(image)
    url = database_url(database, data)
    command.upgrade(alembic_config(url), "0012")
    asyncio.run(_seed_0012(url, [(v1, "1.0.0"), (v2, "2.0.0")], "old"))

    srv = start_server(data, database_url=database)  # migrates, as on every start
    try:
        with srv.admin_client() as admin:
            old_id, new_id = (hashlib.sha256(i).hexdigest() for i in (v1, v2))
            shown = artifact(admin, new_id)
            assert (shown["image_sha256"], shown["image_size"], shown["deltas"]) == (None, None, [])
            deploy(admin, new_id, "old")
            assert artifact(admin, new_id)["image_sha256"] == image_digest(v2).sha256.hex()
            assert artifact(admin, old_id)["image_sha256"] == image_digest(v1).sha256.hex()
            [made] = wait_deltas(admin, new_id, {"ready", "not-smaller", "failed"})
            assert (made["state"], made["base_artifact_id"]) == ("ready", old_id), made
    finally:
        srv.stop()


@pytest.mark.integration
def test_migration_0013_on_a_sqlite_database_of_0012(tmp_path: Path) -> None:
    _database_of_0012_is_upgraded(tmp_path, None)


@pytest.mark.integration
def test_migration_0013_on_a_postgres_database_of_0012(tmp_path: Path) -> None:
    with postgres_database() as url:
        _database_of_0012_is_upgraded(tmp_path, url)


# --- pure parts and the claim, in-process ---------------------------------------------------------


def test_worth_it_and_ratio() -> None:
    assert deltas.worth_it(500, 1000, 2.0)
    assert not deltas.worth_it(501, 1000, 2.0)
    assert deltas.worth_it(999, 1000, 1.0)
    assert deltas.ratio(250, 1000) == 4.0
    assert deltas.ratio(300, 1000) == 3.33
    assert deltas.ratio(None, 1000) is None
    assert deltas.ratio(100, None) is None


def test_one_line_and_digests() -> None:
    assert deltas.one_line("a\n  b\tc") == "a b c"
    long = deltas.one_line("x" * 500)
    assert len(long) == deltas.MAX_ERROR
    assert long.endswith("...")
    assert deltas.is_digest("ab" * 32)
    assert not deltas.is_digest("AB" * 32)
    assert not deltas.is_digest("ab" * 31)


def test_record_gives_a_ratio_only_once_made() -> None:
    row = ArtifactDelta(
        base_sha256="a" * 64,
        base_artifact_id=None,
        compression="lzma",
        state="making",
        progress=10,
        size=None,
    )
    assert deltas.record(row, 1000).ratio is None
    row.state, row.size, row.progress = "ready", 100, 100
    shown = deltas.record(row, 1000).as_dict()
    assert (shown["state"], shown["size"], shown["ratio"]) == ("ready", 100, 10.0)


def test_delta_options_are_checked() -> None:
    check_delta_options("heatshrink", 1.0, 0, 1024)
    for bad in (
        ("zstd", 2.0, 1, 1 << 20),
        ("lzma", float("nan"), 1, 1 << 20),
        ("lzma", 2.0, 17, 1 << 20),
        ("lzma", 2.0, 1, 2 << 30),
    ):
        with pytest.raises(UsageError):
            check_delta_options(*bad)


def _image_artifact(image: bytes, n: int, now: datetime) -> Artifact:
    """Image ``image`` as version ``n + 1``.0.0 of product p, uploaded ``n`` seconds after
    ``now`` (the newest is the last)."""
    found = image_digest(image)
    return Artifact(
        id=hashlib.sha256(image).hexdigest(),
        name="app.img",
        kind="image",
        version=f"{n + 1}.0.0",
        size=len(image),
        product="p",
        signature="valid",
        image_sha256=found.sha256.hex(),
        image_size=found.size,
        created_at=now + timedelta(seconds=n),
    )


async def _claims(tmp_path: Path, database: str | None) -> None:
    url = database_url(database, tmp_path)
    await asyncio.to_thread(migrate, url)
    engine = create_engine(url)
    sessions = sessionmaker(engine)
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    v1, v2 = pair("claims")
    now = datetime.now(UTC)
    try:
        async with sessions() as db:
            for n, image in enumerate((v1, v2)):
                db.add(_image_artifact(image, n, now))
            await db.commit()
            new = await db.get(Artifact, hashlib.sha256(v2).hexdigest())
            assert new is not None
            planned = await deltas.plan(db, new, now, compression="lzma")
            again = await deltas.queue(
                db, new, image_digest(v1).sha256.hex(), now, compression="lzma"
            )
            assert len(planned) == 1
            assert again is not None
            assert again.id == planned[0].id
            assert (
                await deltas.queue(db, new, new.image_sha256 or "", now, compression="lzma") is None
            )
            assert await deltas.queue(db, new, "c" * 64, now, compression="lzma") is None
            await db.commit()

        one, two = (deltas.DeltaWorker(sessions, blobs, tmp_dir=tmp_path / "tmp") for _ in range(2))
        claims = await asyncio.gather(one.claim(), two.claim())
        assert sorted(c is not None for c in claims) == [False, True]

        # a claim older than CLAIM_TIMEOUT is queued again, then made by whoever claims it
        later = now + deltas.CLAIM_TIMEOUT + timedelta(minutes=1)
        assert await one.requeue_stale(now) == 0
        assert await one.requeue_stale(later) == 1
        claim = await two.claim()
        assert claim is not None
        assert await one.claim() is None
        assert await two.make(*claim) == deltas.FAILED  # no blobs were stored: one line
        async with sessions() as db:
            row = await db.scalar(select(ArtifactDelta))
            assert row is not None
            assert row.state == "failed"
            assert row.error is not None
            assert "blob" in row.error
            assert "missing" in row.error
            assert await deltas.usable(db, row.artifact_id, row.base_sha256, ["lzma"]) is None
    finally:
        await engine.dispose()


def test_one_of_two_workers_claims_a_queued_delta(tmp_path: Path) -> None:
    asyncio.run(_claims(tmp_path, None))


@pytest.mark.integration
def test_one_of_two_workers_claims_a_queued_delta_on_postgres(tmp_path: Path) -> None:
    with postgres_database() as url:
        asyncio.run(_claims(tmp_path, url))


async def _stopped_while_making(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = database_url(None, tmp_path)
    await asyncio.to_thread(migrate, url)
    engine = create_engine(url)
    sessions = sessionmaker(engine)
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    release = threading.Event()
    started = threading.Event()

    def stuck(*_args: object, **_kwargs: object) -> bytes:
        started.set()
        release.wait(30)
        return b""

    monkeypatch.setattr(deltas, "create_delta", stuck)
    v1, v2 = pair("stopped")
    now = datetime.now(UTC)
    try:
        async with sessions() as db:
            for n, image in enumerate((v1, v2)):
                key = hashlib.sha256(image).hexdigest()
                source = tmp_path / f"v{n}.img"
                source.write_bytes(image)
                await blobs.put_file(source, key)
                db.add(_image_artifact(image, n, now))
            await db.commit()
            new = await db.get(Artifact, hashlib.sha256(v2).hexdigest())
            assert new is not None
            worker = deltas.DeltaWorker(sessions, blobs, tmp_dir=tmp_path / "tmp")
            worker.start()
            assert len(await deltas.plan(db, new, now, compression="heatshrink")) == 1
            await db.commit()  # wakes the worker
        assert await asyncio.to_thread(started.wait, 20), "the worker made nothing"
        async with sessions() as db:
            row = await db.scalar(select(ArtifactDelta))
            assert row is not None
            assert (row.state, row.progress) == ("making", 10)
        begun = time.monotonic()
        await worker.stop()
        assert time.monotonic() - begun < deltas.STOP_TIMEOUT
        async with sessions() as db:
            row = await db.scalar(select(ArtifactDelta))
            assert row is not None
            assert (row.state, row.progress, row.claimed_at) == ("queued", 0, None)
    finally:
        release.set()
        await engine.dispose()


def test_a_worker_stopped_while_making_hands_the_delta_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(_stopped_while_making(tmp_path, monkeypatch))


async def _daemon_thread() -> None:
    assert await deltas.in_daemon_thread(lambda: 42) == 42

    def fails() -> int:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await deltas.in_daemon_thread(fails)


def test_in_daemon_thread_returns_and_raises() -> None:
    asyncio.run(_daemon_thread())


class Unreachable(FilesystemBlobStore):
    """A store that cannot be read now (S3 down)."""

    async def local_path(self, key: str) -> Path:
        raise BlobStoreError("the bucket cannot be reached")


async def _store_down(tmp_path: Path) -> None:
    url = database_url(None, tmp_path)
    await asyncio.to_thread(migrate, url)
    engine = create_engine(url)
    sessions = sessionmaker(engine)
    v1, v2 = pair("down")
    now = datetime.now(UTC)
    try:
        async with sessions() as db:
            for n, image in enumerate((v1, v2)):
                db.add(_image_artifact(image, n, now))
            await db.commit()
            new = await db.get(Artifact, hashlib.sha256(v2).hexdigest())
            assert new is not None
            assert len(await deltas.plan(db, new, now, compression="lzma")) == 1
            await db.commit()
        worker = deltas.DeltaWorker(sessions, Unreachable(tmp_path / "blobs"), tmp_dir=tmp_path)
        assert await worker.step() is False  # claimed, then handed back: the store, not the delta
        async with sessions() as db:
            row = await db.scalar(select(ArtifactDelta))
            assert row is not None
            assert (row.state, row.claimed_at, row.error) == ("queued", None, None)
    finally:
        await engine.dispose()


def test_a_blob_store_that_is_down_queues_the_delta_again(tmp_path: Path) -> None:
    asyncio.run(_store_down(tmp_path))
