"""The blob store: the same behaviour from the data folder and from S3 (moto's real server)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from otakit.errors import BlobStoreError, InputFileError
from otakit.server.blobs import (
    BlobNotFoundError,
    BlobStore,
    FilesystemBlobStore,
    S3BlobStore,
    check_key,
    open_blob_store,
)

MIB = 1024 * 1024
SECRET = "fake-secret-key-never-shown"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server, in this process, on a loopback port the OS picked."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3:
    endpoint: str
    bucket: str
    client: Any  # a boto3 S3 client that goes behind the store's back

    def url(self, prefix: str = "") -> str:
        path = f"/{prefix}" if prefix else ""
        return f"s3://{self.bucket}{path}?endpoint={self.endpoint}&region=us-east-1"


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3:
    """Fake credentials, no shared AWS files, and a fresh bucket."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"otakit-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return S3(moto_endpoint, bucket, client)


@dataclass
class Backend:
    kind: str
    store: BlobStore
    data_dir: Path
    stored: Callable[[], list[str]]  # every name in the store (files, temporaries included)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    data_dir = tmp_path / "data"
    if request.param == "file":
        store = open_blob_store(None, data_dir)
        root = data_dir / "blobs"

        def files() -> list[str]:
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

        return Backend("file", store, data_dir, files)

    s3: S3 = request.getfixturevalue("s3")
    store = open_blob_store(s3.url("fw/builds"), data_dir)

    def objects() -> list[str]:
        listing = s3.client.list_objects_v2(Bucket=s3.bucket)
        return sorted(o["Key"] for o in listing.get("Contents", []))

    return Backend("s3", store, data_dir, objects)


@pytest.fixture
def s3_store(s3: S3, tmp_path: Path) -> S3BlobStore:
    store = open_blob_store(s3.url(), tmp_path / "data")
    assert isinstance(store, S3BlobStore)
    return store


def blob_file(directory: Path, data: bytes, name: str = "upload.bin") -> tuple[Path, str]:
    path = directory / name
    path.write_bytes(data)
    return path, sha(data)


def put(store: BlobStore, path: Path, key: str) -> str:
    return anyio.run(store.put_file, path, key)


def local_bytes(store: BlobStore, key: str) -> bytes:
    return anyio.run(store.local_path, key).read_bytes()


# --- both stores -------------------------------------------------------------------------------


def test_put_then_local_path_gives_the_bytes(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    path, key = blob_file(tmp_path, data)
    assert put(backend.store, path, key) == key
    assert local_bytes(backend.store, key) == data
    assert anyio.run(backend.store.exists, key)
    assert backend.store.name == backend.kind
    assert isinstance(backend.store, BlobStore)


def test_an_empty_blob_round_trips(backend: Backend, tmp_path: Path) -> None:
    path, key = blob_file(tmp_path, b"")
    put(backend.store, path, key)
    assert local_bytes(backend.store, key) == b""


def test_put_is_idempotent(backend: Backend, tmp_path: Path) -> None:
    data = b"firmware 1.2.3" * 1000
    first, key = blob_file(tmp_path, data, "a.bin")
    second, _ = blob_file(tmp_path, data, "b.bin")
    put(backend.store, first, key)
    put(backend.store, second, key)
    put(backend.store, first, key)
    assert len(backend.stored()) == 1
    assert local_bytes(backend.store, key) == data


def test_a_digest_mismatch_is_refused_and_nothing_is_stored(
    backend: Backend, tmp_path: Path
) -> None:
    path, actual = blob_file(tmp_path, b"the real bytes")
    claimed = sha(b"what the uploader said")
    with pytest.raises(BlobStoreError, match=actual) as caught:
        put(backend.store, path, claimed)
    assert not isinstance(caught.value, BlobNotFoundError)
    assert backend.stored() == []
    assert not anyio.run(backend.store.exists, claimed)
    assert not anyio.run(backend.store.exists, actual)
    with pytest.raises(BlobNotFoundError):
        anyio.run(backend.store.local_path, claimed)


def test_a_mismatch_is_refused_even_when_the_key_is_stored(
    backend: Backend, tmp_path: Path
) -> None:
    good, key = blob_file(tmp_path, b"good", "good.bin")
    bad, _ = blob_file(tmp_path, b"evil", "bad.bin")
    put(backend.store, good, key)
    with pytest.raises(BlobStoreError):
        put(backend.store, bad, key)
    assert local_bytes(backend.store, key) == b"good"


def test_exists_and_delete(backend: Backend, tmp_path: Path) -> None:
    path, key = blob_file(tmp_path, b"to be deleted")
    keep, kept = blob_file(tmp_path, b"to be kept", "keep.bin")
    put(backend.store, path, key)
    put(backend.store, keep, kept)
    anyio.run(backend.store.local_path, key)  # also fills the S3 cache
    assert anyio.run(backend.store.exists, key)

    anyio.run(backend.store.delete, key)
    assert not anyio.run(backend.store.exists, key)
    with pytest.raises(BlobNotFoundError):
        anyio.run(backend.store.local_path, key)
    anyio.run(backend.store.delete, key)  # missing is not an error
    assert anyio.run(backend.store.exists, kept)
    assert len(backend.stored()) == 1


def test_an_unknown_key(backend: Backend) -> None:
    key = sha(b"never stored")
    assert not anyio.run(backend.store.exists, key)
    with pytest.raises(BlobNotFoundError) as caught:
        anyio.run(backend.store.local_path, key)
    assert caught.value.code == "BLOB_NOT_FOUND"
    assert isinstance(caught.value, BlobStoreError)
    assert caught.value.value == key
    anyio.run(backend.store.delete, key)


BAD_KEYS = [
    "../x",
    "../" + "a" * 61,
    "ab/" + "c" * 61,
    "A" * 64,
    sha(b"x").upper(),
    "a" * 63,
    "a" * 65,
    "g" * 64,
    sha(b"x") + "\n",
    " " + sha(b"x")[1:],
    "",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_everywhere(backend: Backend, tmp_path: Path, key: str) -> None:
    path, _ = blob_file(tmp_path, b"x")
    calls: list[Callable[[], object]] = [
        lambda: put(backend.store, path, key),
        lambda: anyio.run(backend.store.local_path, key),
        lambda: anyio.run(backend.store.exists, key),
        lambda: anyio.run(backend.store.delete, key),
        lambda: backend.store.presigned_url(key, 60),
    ]
    for call in calls:
        with pytest.raises(BlobStoreError, match="not a blob key") as caught:
            call()
        assert not isinstance(caught.value, BlobNotFoundError)
    assert backend.stored() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload.bin"]


def test_check_key_returns_a_good_key() -> None:
    key = sha(b"ok")
    assert check_key(key) == key


def test_an_unreadable_input_file_is_an_input_error(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="cannot read"):
        put(backend.store, tmp_path / "missing.bin", sha(b""))
    with pytest.raises(InputFileError):
        put(backend.store, tmp_path, sha(b""))  # a folder
    assert backend.stored() == []


def test_concurrent_first_uses_agree(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(3 * MIB)
    path, key = blob_file(tmp_path, data)
    put(backend.store, path, key)
    paths: list[Path] = []

    async def main() -> None:
        async def one() -> None:
            paths.append(await backend.store.local_path(key))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)

    anyio.run(main)
    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == data
    assert [p.name for p in paths[0].parent.iterdir()] == [key]  # no temporary left over


# --- filesystem --------------------------------------------------------------------------------


def test_filesystem_layout_and_root_created_on_first_use(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "blobs"
    store = FilesystemBlobStore(root)
    key = sha(b"layout")
    assert not anyio.run(store.exists, key)
    assert not root.exists()
    path, _ = blob_file(tmp_path, b"layout")
    put(store, path, key)
    assert anyio.run(store.local_path, key) == root / key[:2] / key
    assert (root / key[:2] / key).read_bytes() == b"layout"
    assert path.read_bytes() == b"layout"  # the caller's file is left alone
    assert store.presigned_url(key, 60) is None
    assert store.presigned_url(key, 60, "app.bin") is None


def test_filesystem_store_that_cannot_be_written(tmp_path: Path) -> None:
    root = tmp_path / "not-a-folder"
    root.write_bytes(b"")
    path, key = blob_file(tmp_path, b"x")
    with pytest.raises(BlobStoreError, match="cannot create folder"):
        put(FilesystemBlobStore(root), path, key)
    with pytest.raises(BlobNotFoundError):
        anyio.run(FilesystemBlobStore(root).local_path, key)


# --- S3 ----------------------------------------------------------------------------------------


def test_s3_objects_live_under_the_prefix(s3: S3, tmp_path: Path) -> None:
    store = open_blob_store(s3.url("fleet/a"), tmp_path)
    path, key = blob_file(tmp_path, b"prefixed")
    put(store, path, key)
    listing = s3.client.list_objects_v2(Bucket=s3.bucket)
    assert [o["Key"] for o in listing["Contents"]] == [f"fleet/a/{key}"]
    head = s3.client.head_object(Bucket=s3.bucket, Key=f"fleet/a/{key}")
    assert head["ContentType"] == "application/octet-stream"
    assert "immutable" in head["CacheControl"]
    assert not (tmp_path / "blob-cache").exists()  # nothing cached until asked


def test_s3_second_local_path_uses_the_cache(s3: S3, s3_store: S3BlobStore, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    path, key = blob_file(tmp_path, data)
    put(s3_store, path, key)
    first = anyio.run(s3_store.local_path, key)
    assert first == s3_store.cache_path(key)
    assert first.read_bytes() == data

    s3.client.delete_object(Bucket=s3.bucket, Key=key)  # behind the store's back
    assert anyio.run(s3_store.local_path, key) == first
    assert first.read_bytes() == data
    assert not anyio.run(s3_store.exists, key)  # the bucket, not the cache, says what exists


def test_s3_a_corrupt_cache_file_is_downloaded_again(
    s3: S3, s3_store: S3BlobStore, tmp_path: Path
) -> None:
    data = os.urandom(50_000)
    path, key = blob_file(tmp_path, data)
    put(s3_store, path, key)
    cached = anyio.run(s3_store.local_path, key)

    cached.write_bytes(data[:1000])  # truncated under a running server
    assert anyio.run(s3_store.local_path, key).read_bytes() == data

    # flipped bytes, same size, found by the next process that uses the cache folder
    cached.write_bytes(bytes(b ^ 0xFF for b in data[:100]) + data[100:])
    again = open_blob_store(s3.url(), tmp_path / "data")
    assert anyio.run(again.local_path, key) == cached
    assert cached.read_bytes() == data
    assert [p.name for p in cached.parent.iterdir()] == [key]


def test_s3_an_object_that_does_not_match_its_key_is_not_cached(
    s3: S3, s3_store: S3BlobStore
) -> None:
    key = sha(b"what was promised")
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"something else")
    with pytest.raises(BlobStoreError, match="not cached") as caught:
        anyio.run(s3_store.local_path, key)
    assert not isinstance(caught.value, BlobNotFoundError)
    assert not s3_store.cache_path(key).exists()
    assert list(s3_store.cache_path(key).parent.iterdir()) == []


def test_s3_delete_drops_the_cached_copy(s3_store: S3BlobStore, tmp_path: Path) -> None:
    path, key = blob_file(tmp_path, b"cached then deleted")
    put(s3_store, path, key)
    cached = anyio.run(s3_store.local_path, key)
    anyio.run(s3_store.delete, key)
    assert not cached.exists()


def test_s3_presigned_url_fetches_the_bytes(s3_store: S3BlobStore, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path, key = blob_file(tmp_path, data)
    put(s3_store, path, key)

    url = s3_store.presigned_url(key, 300)
    assert "X-Amz-Signature=" in url
    assert SECRET not in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data

    named = httpx.get(s3_store.presigned_url(key, 300, filename="builds/app v1.2.bin"))
    assert named.content == data
    assert named.headers["content-disposition"] == 'attachment; filename="app v1.2.bin"'

    odd = s3_store.presigned_url(key, 300, filename='café"1".bin')
    disposition = httpx.get(odd).headers["content-disposition"]
    assert 'filename="caf__1_.bin"' in disposition
    assert "filename*=UTF-8''caf%C3%A9%221%22.bin" in disposition


@pytest.mark.parametrize("expires_in", [0, -5, 7 * 24 * 3600 + 1])
def test_s3_presigned_url_expiry_is_checked(s3_store: S3BlobStore, expires_in: int) -> None:
    with pytest.raises(BlobStoreError, match="expire"):
        s3_store.presigned_url(sha(b"x"), expires_in)


def test_s3_a_large_file_goes_up_in_parts(s3: S3, s3_store: S3BlobStore, tmp_path: Path) -> None:
    data = os.urandom(20 * MIB)
    path, key = blob_file(tmp_path, data)
    put(s3_store, path, key)
    etag = s3.client.head_object(Bucket=s3.bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-3")  # three 8 MiB parts: a multipart upload
    assert sha(anyio.run(s3_store.local_path, key).read_bytes()) == key


def test_s3_errors_are_one_line_without_credentials(s3: S3, tmp_path: Path) -> None:
    store = open_blob_store(f"s3://no-such-bucket-here?endpoint={s3.endpoint}", tmp_path)
    path, key = blob_file(tmp_path, b"x")
    for call in (
        lambda: put(store, path, key),
        lambda: anyio.run(store.local_path, key),
        lambda: anyio.run(store.delete, key),
    ):
        with pytest.raises(BlobStoreError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message
        assert SECRET not in message
        assert "no-such-bucket-here" in message


# --- open_blob_store ---------------------------------------------------------------------------


def test_open_default_and_file_urls(tmp_path: Path) -> None:
    for url in (None, ""):
        store = open_blob_store(url, tmp_path / "data")
        assert isinstance(store, FilesystemBlobStore)
        assert store.root == tmp_path / "data" / "blobs"
    store = open_blob_store(f"file://{tmp_path}/my%20blobs", tmp_path / "data")
    assert isinstance(store, FilesystemBlobStore)
    assert store.root == tmp_path / "my blobs"
    store = open_blob_store(f"file://localhost{tmp_path}", tmp_path / "data")
    assert isinstance(store, FilesystemBlobStore)
    assert store.root == tmp_path
    assert list(tmp_path.iterdir()) == []  # nothing created at open time


def test_open_s3_urls(tmp_path: Path) -> None:
    store = open_blob_store("s3://my-bucket", tmp_path)
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == (
        "my-bucket",
        "",
        None,
        None,
    )
    assert store.cache_dir == tmp_path / "blob-cache"
    assert store.object_name("a" * 64) == "a" * 64

    store = open_blob_store(
        "s3://fw.example/fleet/blobs/?endpoint=http://127.0.0.1:9000&region=eu-west-1", tmp_path
    )
    assert isinstance(store, S3BlobStore)
    assert store.bucket == "fw.example"
    assert store.prefix == "fleet/blobs"
    assert store.endpoint_url == "http://127.0.0.1:9000"
    assert store.region == "eu-west-1"
    assert store.object_name("a" * 64) == "fleet/blobs/" + "a" * 64
    assert store.location == "s3://fw.example/fleet/blobs"
    assert list(tmp_path.iterdir()) == []  # nothing created at open time


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/blobs", "scheme 'ftp'"),
        ("http://host/blobs", "scheme 'http'"),
        ("/var/lib/otakit/blobs", "no scheme"),
        ("blobs", "no scheme"),
        ("file://server/share", "names host"),
        ("file:relative/path", "absolute"),
        ("file:///", "absolute"),
        ("file:///srv/blobs?x=1", "no query"),
        ("s3://", "bucket name"),
        ("s3://Bad_Bucket", "bucket name"),
        ("s3://ab", "bucket name"),
        ("s3://a..b", "bucket name"),
        ("s3://bucket?endpoint=http://x&foo=1", "unknown parameter 'foo'"),
        ("s3://bucket?region=a&region=b", "region once"),
        ("s3://bucket?region=", "region once"),
        ("s3://bucket?endpoint=ftp://host", "endpoint"),
        ("s3://bucket?endpoint=localhost:9000", "endpoint"),
        ("s3://bucket/a//b", "prefix"),
        ("s3://bucket/a/../b", "prefix"),
        ("s3://bucket#frag", "fragment"),
    ],
)
def test_open_refuses_bad_urls(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(BlobStoreError, match=message):
        open_blob_store(url, tmp_path)


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAKEY:topsecret@bucket/prefix",
        "s3://bucket?endpoint=http://user:topsecret@127.0.0.1:9000",
    ],
)
def test_open_refuses_credentials_in_urls_without_repeating_them(tmp_path: Path, url: str) -> None:
    with pytest.raises(BlobStoreError, match="credentials") as caught:
        open_blob_store(url, tmp_path)
    assert "topsecret" not in str(caught.value)
    assert "topsecret" not in repr(caught.value.value)


def test_s3_concurrent_first_uses_share_one_download(s3_store: S3BlobStore, tmp_path: Path) -> None:
    data = os.urandom(2 * MIB)
    path, key = blob_file(tmp_path, data)
    put(s3_store, path, key)
    downloads: list[str] = []
    s3_store._client().meta.events.register(
        "before-parameter-build.s3.GetObject", lambda **kw: downloads.append(kw["params"]["Key"])
    )

    async def main() -> list[Path]:
        results: list[Path] = []

        async def one() -> None:
            results.append(await s3_store.local_path(key))

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(one)
        return results

    assert set(anyio.run(main)) == {s3_store.cache_path(key)}
    assert anyio.run(s3_store.local_path, key).read_bytes() == data
    assert downloads == [key]
