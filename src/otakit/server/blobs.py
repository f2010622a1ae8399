"""Where the update server keeps artifact bytes: a content-addressed blob store.

The key of a blob is the lowercase SHA-256 hex digest of its bytes, so a key names one content
forever: storing the same bytes twice keeps one copy, and any copy can be checked against its
key. Two stores sit behind one small :class:`BlobStore` protocol:

- :class:`FilesystemBlobStore` (one machine): ``root/ab/abcdef...`` (the first two hex digits
  as a folder, then the full digest as the file name). Blobs appear by an atomic rename of a
  synced temporary file, so a crash never leaves a partial blob under a key.
- :class:`S3BlobStore` (several server processes): objects ``<prefix>/<sha256>`` in an S3 (or
  S3-compatible) bucket. Devices may fetch them directly through pre-signed URLs; when the
  server must serve the bytes itself, :meth:`S3BlobStore.local_path` keeps a verified copy in a
  local cache folder laid out like the filesystem store.

:func:`open_blob_store` turns the server's ``blob_store`` setting (a URL) into a store.

The public methods are ``async``: file and network I/O run in worker threads, so the server's
event loop never waits on a disk or on S3. Keys are checked (64 lowercase hex digits) before
they reach a path or an object name. Every failure is a :class:`~otakit.errors.BlobStoreError`
(or :class:`BlobNotFoundError`) with a one-line message, except an unreadable input file given
to ``put_file``, which is an :class:`~otakit.errors.InputFileError`, and a full disk, quota or
file size limit while writing a local file, which is a :class:`~otakit.errors.StorageFullError`
(the server answers 507).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import anyio
import anyio.to_thread
import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from otakit.errors import BlobNotFoundError, BlobStoreError, InputFileError, StorageFullError
from otakit.files import FULL_ERRNOS, fsync_dir, write_temp

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "MAX_PRESIGN_EXPIRY",
    "BlobNotFoundError",
    "BlobStore",
    "FilesystemBlobStore",
    "S3BlobStore",
    "check_key",
    "open_blob_store",
]

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # read/write/hash granularity
MULTIPART_THRESHOLD = 8 * 1024 * 1024  # S3 uploads at least this large go in parts...
MULTIPART_CHUNK = 8 * 1024 * 1024  # ...of this size
MAX_PRESIGN_EXPIRY = 7 * 24 * 3600  # the longest a SigV4 pre-signed URL may live

_KEY = re.compile(r"[0-9a-f]{64}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
_USERINFO = re.compile(r"//[^/?#@]*@")  # user:password@ after any "//", here or in endpoint=


def check_key(key: str) -> str:
    """Return ``key`` if it is a blob key (64 lowercase hex digits).

    Raises :class:`~otakit.errors.BlobStoreError` otherwise: a key that is not a plain digest
    (``../x``, uppercase, wrong length) never reaches a path or an object name.
    """
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise BlobStoreError(
            f"{key!r} is not a blob key (64 lowercase hex digits of a SHA-256)", value=key
        )
    return key


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed storage for artifact bytes; the key of a blob is its SHA-256 hex."""

    name: str
    """``"file"`` or ``"s3"``, for logs and health reports."""

    async def put_file(self, path: Path, sha256: str) -> str:
        """Store the complete local file ``path`` whose SHA-256 is ``sha256``; return the key.

        Idempotent: storing the same content twice keeps one copy. Never leaves a partial
        blob visible under the key. The caller still owns ``path`` afterwards and removes it;
        it must not change during the call.

        Raises :class:`~otakit.errors.BlobStoreError` if ``sha256`` is not a key, if the
        file's content does not match it (nothing is stored then), or if the store cannot be
        written; :class:`~otakit.errors.InputFileError` if ``path`` cannot be read.
        """
        ...

    async def local_path(self, key: str) -> Path:
        """A local file with the blob's bytes, for serving with sendfile/FileResponse.

        Raises :class:`BlobNotFoundError` for an unknown key and
        :class:`~otakit.errors.BlobStoreError` for a bad key or a store that cannot be read.
        """
        ...

    async def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``.

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key or an unreachable store.
        """
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob (and any cached copy); a missing blob is not an error.

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key or a failed removal.
        """
        ...

    async def evict(self, key: str) -> None:
        """Remove this server's local copy of the blob, if the store keeps one (S3's cache);
        the blob itself stays. Raises :class:`~otakit.errors.BlobStoreError` for a bad key or
        a copy that cannot be removed."""
        ...

    def cached_keys(self) -> list[str]:
        """The keys this server holds a local copy of apart from the store itself (none for a
        filesystem store)."""
        ...

    async def check(self) -> None:
        """Raise :class:`~otakit.errors.BlobStoreError` when the store cannot be used now
        (folder missing and not creatable, not writable; bucket unreachable or refused), in a
        few seconds at most. For health reports."""
        ...

    def presigned_url(self, key: str, expires_in: int, filename: str | None = None) -> str | None:
        """A URL that lets anyone GET the blob for ``expires_in`` seconds, or ``None``.

        ``None`` means the store has no such URLs and the server serves :meth:`local_path`.
        ``filename`` (if given) is what a browser saves the download as.

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key or expiry.
        """
        ...


# --- local files -------------------------------------------------------------------------------


class _ReadFailed(Exception):
    """Reading the source failed while :func:`write_temp` was writing (told apart from writes)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _why(exc: OSError) -> str:
    return str(exc.strerror or exc)


def _read_error(path: Path, exc: OSError) -> InputFileError:
    return InputFileError(f"cannot read {path}: {_why(exc)}", value=str(path))


def _hash_file(path: Path) -> str:
    """SHA-256 hex of a local file; raises InputFileError if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise _read_error(path, exc) from None
    return digest.hexdigest()


def _write_hashed(directory: Path, name: str, read: Callable[[int], bytes]) -> tuple[Path, str]:
    """Copy everything ``read`` returns into a synced temporary file in ``directory``.

    Returns the temporary file and the SHA-256 hex of what was written. An ``OSError`` from
    ``read`` comes out as :class:`_ReadFailed`; a failed write as :class:`BlobStoreError`;
    any other exception from ``read`` as itself. The temporary file is gone on every error.
    """
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        while True:
            try:
                chunk = read(CHUNK)
            except OSError as exc:
                raise _ReadFailed(exc) from exc
            if not chunk:
                return
            digest.update(chunk)
            yield chunk

    try:
        tmp = write_temp(directory, name, chunks())
    except InputFileError as exc:  # write_temp's own failures are writes into the store
        cause = exc.__context__
        if isinstance(cause, OSError):
            _full_check(directory, cause)
        raise BlobStoreError(exc.message, value=exc.value) from None
    return tmp, digest.hexdigest()


def _full_check(where: Path, exc: OSError) -> None:
    """Raise StorageFullError if ``exc`` says the disk, a quota or a file size limit is full."""
    if exc.errno in FULL_ERRNOS:
        raise StorageFullError(
            f"the blob store is full: cannot write in {where} ({_why(exc)})", value=str(where)
        ) from None


def _ensure_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) durably; raises BlobStoreError if it cannot."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _full_check(directory, exc)
        raise BlobStoreError(
            f"cannot create folder {directory}: {_why(exc)}", value=str(directory)
        ) from None
    fsync_dir(directory.parent)


def _install(tmp: Path, target: Path) -> None:
    """Rename a complete temporary file onto ``target`` and make the rename durable."""
    try:
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _full_check(target.parent, exc)
        raise BlobStoreError(f"cannot write {target}: {_why(exc)}", value=str(target)) from None
    fsync_dir(target.parent)


def _remove(path: Path) -> None:
    """Remove a file durably; a missing one is fine. Raises BlobStoreError if it cannot."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise BlobStoreError(f"cannot delete {path}: {_why(exc)}", value=str(path)) from None
    fsync_dir(path.parent)


def _check_writable(root: Path) -> None:
    folder = root
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise BlobStoreError(f"blob folder {root} is not a writable folder", value=str(root))


def _cached_keys(root: Path) -> list[str]:
    try:
        return [p.name for p in root.glob("??/*") if _KEY.fullmatch(p.name) and p.is_file()]
    except OSError:
        return []


def _mismatch(source: str, actual: str, expected: str, what: str) -> BlobStoreError:
    return BlobStoreError(f"{source} has SHA-256 {actual}, not {expected}; {what}", value=expected)


# --- filesystem --------------------------------------------------------------------------------


class FilesystemBlobStore:
    """Blobs as files ``root/ab/abcdef...`` in a local folder, created on first store."""

    name: str = "file"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FilesystemBlobStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """Where the blob ``key`` lives (whether or not it exists); raises BlobStoreError for a bad key."""
        check_key(key)
        return self.root / key[:2] / key

    async def put_file(self, path: Path, sha256: str) -> str:
        """Copy ``path`` into the store under ``sha256`` (see :meth:`BlobStore.put_file`).

        The bytes are hashed while they are copied into a synced temporary file next to the
        target, and renamed onto it only if they match; if the blob is already there, the file
        is only hashed. ``path`` is left in place.

        Raises :class:`~otakit.errors.BlobStoreError` (bad key, digest mismatch, unwritable
        store) or :class:`~otakit.errors.InputFileError` (unreadable ``path``).
        """
        target = self.path_for(sha256)
        await anyio.to_thread.run_sync(self._put, Path(path), sha256, target)
        return sha256

    def _put(self, source: Path, sha256: str, target: Path) -> None:
        if target.is_file():
            actual = _hash_file(source)
            if actual != sha256:
                raise _mismatch(str(source), actual, sha256, "not stored")
            return
        _ensure_dir(target.parent)
        try:
            f = source.open("rb")
        except OSError as exc:
            raise _read_error(source, exc) from None
        with f:
            try:
                tmp, actual = _write_hashed(target.parent, sha256, f.read)
            except _ReadFailed as exc:
                raise _read_error(source, exc.error) from None
        if actual != sha256:
            tmp.unlink(missing_ok=True)
            raise _mismatch(str(source), actual, sha256, "not stored")
        _install(tmp, target)

    async def local_path(self, key: str) -> Path:
        """The blob's own file.

        Raises :class:`BlobNotFoundError` for an unknown key and
        :class:`~otakit.errors.BlobStoreError` for a bad key.
        """
        path = self.path_for(key)
        if not await anyio.to_thread.run_sync(path.is_file):
            raise BlobNotFoundError(f"no blob {key} in {self.root}", value=key)
        return path

    async def exists(self, key: str) -> bool:
        """Whether the blob's file exists; raises BlobStoreError for a bad key."""
        return await anyio.to_thread.run_sync(self.path_for(key).is_file)

    async def delete(self, key: str) -> None:
        """Remove the blob's file; a missing one is not an error.

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key or a failed removal.
        """
        await anyio.to_thread.run_sync(_remove, self.path_for(key))

    async def evict(self, key: str) -> None:
        """Nothing to do: the blob's file is the only copy. Raises BlobStoreError for a bad key."""
        check_key(key)

    def cached_keys(self) -> list[str]:
        """Always empty: no copies besides the blobs."""
        return []

    async def check(self) -> None:
        """Raise BlobStoreError unless the folder (or the nearest existing parent, where it
        will be created) is a writable folder."""
        await anyio.to_thread.run_sync(_check_writable, self.root)

    def presigned_url(self, key: str, expires_in: int, filename: str | None = None) -> str | None:
        """Always ``None``: the server serves the file itself. Raises BlobStoreError for a bad key."""
        check_key(key)
        return None


# --- S3 ----------------------------------------------------------------------------------------


def _s3_error(action: str, where: str, exc: Exception) -> BlobStoreError:
    """A one-line BlobStoreError for a failed S3 call (botocore never puts secrets in these)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        detail = f"{error.get('Code', '?')} {error.get('Message', '')}"
    else:
        detail = str(exc) or type(exc).__name__
    detail = " ".join(detail.split())
    return BlobStoreError(f"cannot {action} {where}: {detail}", value=where)


def _is_not_found(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND


def _content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` and, if needed, an RFC 6266 ``filename*``."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if not base:
        raise BlobStoreError(f"download name {filename!r} has no file name", value=filename)
    ascii_name = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\;%' else "_" for c in base
    )
    value = f'attachment; filename="{ascii_name}"'
    if ascii_name != base:
        value += f"; filename*=UTF-8''{quote(base, safe='')}"
    return value


class S3BlobStore:
    """Blobs as objects ``<prefix>/<sha256>`` in an S3 or S3-compatible bucket.

    ``local_path`` copies a blob into ``cache_dir/ab/abcdef...`` on first use (download to a
    temporary file, check its SHA-256, rename), so concurrent first uses, in this process or
    another sharing the folder, never see a partial or wrong file. A cached copy is hashed
    again whenever its size, modification time or inode differ from what this process last
    verified (so always once after a restart); a corrupt copy is removed and downloaded again.

    Credentials come from boto3's usual chain (environment, shared files, instance roles) and
    are never logged. Nothing is created or contacted until the first call.
    """

    name: str = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        cache_dir: Path,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.cache_dir = Path(cache_dir)
        self._client_lock = threading.Lock()
        self._s3: S3Client | None = None
        self._probe: S3Client | None = None  # one try, short timeouts: for check()
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=4,
        )
        # key -> (size, mtime_ns, inode, device) of the cached copy this process last verified
        self._verified: dict[str, tuple[int, int, int, int]] = {}
        # key -> set when this process's download of it ends (one download per key at a time)
        self._downloads: dict[str, anyio.Event] = {}

    def __repr__(self) -> str:
        return f"S3BlobStore({self.location!r})"

    @property
    def location(self) -> str:
        """``s3://bucket/prefix``, for messages."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def object_name(self, key: str) -> str:
        """The object name of blob ``key``; raises BlobStoreError for a bad key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def cache_path(self, key: str) -> Path:
        """Where :meth:`local_path` keeps its copy of ``key``; raises BlobStoreError for a bad key."""
        check_key(key)
        return self.cache_dir / key[:2] / key

    def _client(self) -> S3Client:
        with self._client_lock:
            if self._s3 is None:
                config = Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                    max_pool_connections=32,
                    # S3-compatible stores reject the CRC headers newer botocore adds by
                    # default; blobs are checked end to end against their SHA-256 anyway.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                try:
                    self._s3 = boto3.session.Session().client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        config=config,
                    )
                except (BotoCoreError, ValueError) as exc:
                    raise _s3_error("connect to", self.location, exc) from None
            return self._s3

    # put ------------------------------------------------------------------------------------

    async def put_file(self, path: Path, sha256: str) -> str:
        """Upload ``path`` as the object of ``sha256`` (see :meth:`BlobStore.put_file`).

        The file is hashed first and uploaded only if it matches and the object is not there
        yet. Files of 8 MiB or more go up as a multipart upload, which S3 makes visible only
        when it completes. ``path`` is left in place.

        Raises :class:`~otakit.errors.BlobStoreError` (bad key, digest mismatch, S3 failure)
        or :class:`~otakit.errors.InputFileError` (unreadable ``path``).
        """
        name = self.object_name(sha256)
        await anyio.to_thread.run_sync(self._put, Path(path), sha256, name)
        return sha256

    def _put(self, source: Path, sha256: str, name: str) -> None:
        actual = _hash_file(source)
        if actual != sha256:
            raise _mismatch(str(source), actual, sha256, "not stored")
        if self._head(name):
            return
        try:
            self._client().upload_file(
                str(source),
                self.bucket,
                name,
                ExtraArgs={
                    "ContentType": "application/octet-stream",
                    "CacheControl": "public, max-age=31536000, immutable",
                },
                Config=self._transfer,
            )
        except OSError as exc:
            raise _read_error(source, exc) from None
        except (Boto3Error, BotoCoreError, ClientError) as exc:
            raise _s3_error("upload to", f"{self.location}/{sha256}", exc) from None

    def _head(self, name: str) -> bool:
        try:
            self._client().head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _is_not_found(exc):
                return False
            raise _s3_error("look up", f"s3://{self.bucket}/{name}", exc) from None
        except BotoCoreError as exc:
            raise _s3_error("look up", f"s3://{self.bucket}/{name}", exc) from None
        return True

    # local copies ---------------------------------------------------------------------------

    async def local_path(self, key: str) -> Path:
        """A verified local copy of the blob, downloaded on first use.

        Concurrent calls for the same key in this process share one download.

        Raises :class:`BlobNotFoundError` if the bucket has no such object,
        :class:`~otakit.errors.BlobStoreError` for a bad key, an S3 failure, an object whose
        bytes do not match its key (nothing is cached then) or an unwritable cache folder.
        """
        name = self.object_name(key)
        target = self.cache_path(key)
        while True:
            if await anyio.to_thread.run_sync(self._cached, key, target):
                return target
            running = self._downloads.get(key)
            if running is None:
                break
            await running.wait()
        done = self._downloads[key] = anyio.Event()
        try:
            await anyio.to_thread.run_sync(self._download, key, name, target)
        finally:
            del self._downloads[key]
            done.set()
        return target

    def _cached(self, key: str, target: Path) -> bool:
        """Whether ``target`` holds the blob; a corrupt copy is removed."""
        try:
            stamp = _stamp(target)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise BlobStoreError(f"cannot read {target}: {_why(exc)}", value=str(target)) from None
        if self._verified.get(key) == stamp:
            return True
        try:
            actual = _hash_file(target)
        except InputFileError as exc:
            raise BlobStoreError(exc.message, value=exc.value) from None
        if actual == key:
            self._verified[key] = stamp
            return True
        log.warning("cached blob %s is corrupt (SHA-256 %s); downloading it again", target, actual)
        self._verified.pop(key, None)
        try:
            target.unlink(missing_ok=True)
        except OSError as exc:
            raise BlobStoreError(
                f"cannot remove corrupt cached blob {target}: {_why(exc)}", value=str(target)
            ) from None
        return False

    def _download(self, key: str, name: str, target: Path) -> None:
        where = f"s3://{self.bucket}/{name}"
        log.info("downloading blob %s into %s", where, target)
        _ensure_dir(target.parent)
        try:
            body = self._client().get_object(Bucket=self.bucket, Key=name)["Body"]
        except ClientError as exc:
            if _is_not_found(exc):
                raise BlobNotFoundError(f"no blob {key} in {self.location}", value=key) from None
            raise _s3_error("download", where, exc) from None
        except BotoCoreError as exc:
            raise _s3_error("download", where, exc) from None
        try:
            tmp, actual = _write_hashed(target.parent, key, body.read)
        except _ReadFailed as exc:
            raise _s3_error("download", where, exc.error) from None
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("download", where, exc) from None
        finally:
            body.close()
        if actual != key:
            tmp.unlink(missing_ok=True)
            raise _mismatch(where, actual, key, "not cached")
        try:
            stamp = _stamp(tmp)  # a rename keeps size, mtime and inode
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BlobStoreError(f"cannot read {tmp}: {_why(exc)}", value=str(tmp)) from None
        _install(tmp, target)
        self._verified[key] = stamp

    # existence and removal ------------------------------------------------------------------

    async def exists(self, key: str) -> bool:
        """Whether the bucket has the blob's object (the cache is not consulted).

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key or an S3 failure (a
        missing object the credentials may not list shows up as access denied).
        """
        return await anyio.to_thread.run_sync(self._head, self.object_name(key))

    async def delete(self, key: str) -> None:
        """Delete the object and the cached copy; a missing blob is not an error.

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key, an S3 failure (the cached
        copy is kept then) or a cached copy that cannot be removed.
        """
        name = self.object_name(key)
        await anyio.to_thread.run_sync(self._delete, key, name)

    def _delete(self, key: str, name: str) -> None:
        try:
            self._client().delete_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if not _is_not_found(exc):
                raise _s3_error("delete", f"s3://{self.bucket}/{name}", exc) from None
        except BotoCoreError as exc:
            raise _s3_error("delete", f"s3://{self.bucket}/{name}", exc) from None
        self._verified.pop(key, None)
        _remove(self.cache_path(key))

    async def evict(self, key: str) -> None:
        """Remove the cached copy of ``key`` (the object stays).

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key or a copy that cannot be
        removed.
        """
        path = self.cache_path(key)
        self._verified.pop(key, None)
        await anyio.to_thread.run_sync(_remove, path)

    def cached_keys(self) -> list[str]:
        """The keys with a copy in the cache folder."""
        return _cached_keys(self.cache_dir)

    async def check(self) -> None:
        """Raise BlobStoreError unless the bucket answers (HEAD, one try, a few seconds)."""
        await anyio.to_thread.run_sync(self._check)

    def _check(self) -> None:
        with self._client_lock:
            if self._probe is None:
                config = Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                    retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=2,
                    read_timeout=3,
                )
                try:
                    self._probe = boto3.session.Session().client(
                        "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
                    )
                except (BotoCoreError, ValueError) as exc:
                    raise _s3_error("connect to", self.location, exc) from None
            probe = self._probe
        try:
            probe.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("reach", self.location, exc) from None

    # direct downloads -----------------------------------------------------------------------

    def presigned_url(self, key: str, expires_in: int, filename: str | None = None) -> str:
        """A pre-signed GET URL for the blob's object, valid for ``expires_in`` seconds.

        ``filename`` makes S3 answer with ``Content-Disposition: attachment`` under that name.
        Signing is local (no request is made), but the first call may resolve credentials.

        Raises :class:`~otakit.errors.BlobStoreError` for a bad key, an expiry outside
        1..604800 seconds (the SigV4 limit), a file name with no name in it, or missing
        credentials.
        """
        name = self.object_name(key)
        if isinstance(expires_in, bool) or not 0 < expires_in <= MAX_PRESIGN_EXPIRY:
            raise BlobStoreError(
                f"a pre-signed URL must expire in 1 to {MAX_PRESIGN_EXPIRY} seconds, not {expires_in!r}",
                value=expires_in,
            )
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if filename:
            params["ResponseContentDisposition"] = _content_disposition(filename)
        try:
            return self._client().generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires_in
            )
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("sign a URL for", f"s3://{self.bucket}/{name}", exc) from None


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


# --- configuration -----------------------------------------------------------------------------


def open_blob_store(url: str | None, data_dir: Path) -> BlobStore:
    """The blob store a URL names. Nothing is created or contacted yet.

    - ``None`` or ``""``: a :class:`FilesystemBlobStore` in ``data_dir/blobs``;
    - ``file:///abs/path``: a :class:`FilesystemBlobStore` in that folder;
    - ``s3://bucket[/prefix][?endpoint=http://host:port][&region=us-east-1]``: an
      :class:`S3BlobStore` caching in ``data_dir/blob-cache``, path-style addressing when an
      endpoint is given (MinIO, moto...). Credentials come from the environment or boto3's other
      usual sources, never from the URL.

    Raises :class:`~otakit.errors.BlobStoreError` for any other scheme or a malformed URL;
    messages never repeat a password found in it.
    """
    data_dir = Path(data_dir)
    if not url:
        return FilesystemBlobStore(data_dir / "blobs")
    shown = _USERINFO.sub("//", url)  # what messages may repeat
    if shown != url:
        raise BlobStoreError(
            f"blob store URL {shown} must not carry credentials; set them in the environment (AWS_ACCESS_KEY_ID...)",
            value=shown,
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BlobStoreError(f"blob store URL {shown} is malformed: {exc}", value=shown) from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _open_file(parts.netloc, parts.path, parts.query, parts.fragment, shown)
    if scheme == "s3":
        return _open_s3(parts.netloc, parts.path, parts.query, parts.fragment, shown, data_dir)
    if not scheme:
        raise BlobStoreError(
            f"blob store URL {shown!r} has no scheme; use file:///path or s3://bucket", value=shown
        )
    raise BlobStoreError(
        f"blob store scheme {scheme!r} is not supported; use file:///path or s3://bucket",
        value=shown,
    )


def _open_file(netloc: str, path: str, query: str, fragment: str, shown: str) -> BlobStore:
    if netloc not in ("", "localhost"):
        raise BlobStoreError(
            f"blob store URL {shown} names host {netloc!r}; a file URL is file:///absolute/path",
            value=shown,
        )
    if query or fragment:
        raise BlobStoreError(f"blob store URL {shown} takes no query or fragment", value=shown)
    root = unquote(path)
    if not root.startswith("/") or root.strip("/") == "":
        raise BlobStoreError(
            f"blob store URL {shown} needs an absolute folder: file:///absolute/path", value=shown
        )
    return FilesystemBlobStore(Path(root))


def _open_s3(
    netloc: str, path: str, query: str, fragment: str, shown: str, data_dir: Path
) -> BlobStore:
    if _BUCKET.fullmatch(netloc) is None or ".." in netloc:
        raise BlobStoreError(
            f"blob store URL {shown} needs a valid bucket name (3-63 of a-z 0-9 . -) after s3://",
            value=shown,
        )
    if fragment:
        raise BlobStoreError(f"blob store URL {shown} takes no fragment", value=shown)
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BlobStoreError(f"blob store URL {shown} has a malformed query", value=shown) from None
    unknown = sorted(set(params) - {"endpoint", "region"})
    if unknown:
        raise BlobStoreError(
            f"blob store URL {shown} has unknown parameter {unknown[0]!r}; known: endpoint, region",
            value=shown,
        )
    for param, values in params.items():
        if len(values) != 1 or not values[0]:
            raise BlobStoreError(
                f"blob store URL {shown} must give {param} once, with a value", value=shown
            )
    endpoint = params["endpoint"][0] if "endpoint" in params else None
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname or ep.path.strip("/"):
            raise BlobStoreError(
                f"blob store endpoint {endpoint!r} must be an http(s)://host[:port] URL",
                value=shown,
            )
    prefix = unquote(path).strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise BlobStoreError(f"blob store URL {shown} has an odd prefix {prefix!r}", value=shown)
    return S3BlobStore(
        netloc,
        prefix=prefix,
        endpoint_url=endpoint,
        region=params["region"][0] if "region" in params else None,
        cache_dir=data_dir / "blob-cache",
    )
