"""Serving artifact bytes with HTTP ranges, fast.

Devices fetch images in ranges (4 KiB on the original middleware, up to MiBs on Linux-class
devices), so the cost per range dominates. A single range is read with one ``pread`` (inline
for small ranges, in one worker thread for large ones) and sent as one body; a whole file is
streamed in 1 MiB reads. Semantics follow RFC 9110:

- ``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n`` → 206 with ``Content-Range: bytes a-b/SIZE``;
  an end past the file is clamped; a start past the end → 416 with ``Content-Range: bytes */SIZE``;
- a malformed Range header is ignored (200, the whole file); several ranges are served as
  ``multipart/byteranges`` by Starlette's FileResponse (rare: no device asks for them);
- ``If-Range`` that does not match the ETag (the SHA-256) → the whole file;
- ``HEAD`` answers the same headers without reading anything.

Job documents are answered the same way (:func:`send_document`): the original device sends
``Range: bytes=0-`` with every GET, the job's too.

Blobs are content-addressed and never change, so where a blob lives and how big it is are
remembered per process; that is a cache of immutable facts, not state. Whether the artifact
still exists is not: a signed download asks the database (one primary-key lookup) every time,
so an artifact deleted through any server stops being served by all of them at once, and a
server that finds it gone drops its own cached copy. When the database does not answer, a
signed URL is still served (nothing can be deleted then).

A blob store that cannot be reached (S3 down with no cached copy) is 503 with Retry-After, not
404: the artifact exists, it cannot be fetched now.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
from fastapi import Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from otakit.errors import (
    BlobNotFoundError,
    BlobStoreError,
    ForbiddenError,
    NotFoundError,
    OtakitError,
    UnavailableError,
)
from otakit.server.blobs import BlobStore
from otakit.server.context import http_answer
from otakit.server.database import unavailable
from otakit.server.service import artifacts
from otakit.server.urls import check_signature

log = logging.getLogger("otakit.server")

INLINE_READ = 2 * 1024 * 1024  # ranges up to this size are read without leaving the event loop
STREAM_CHUNK = 1024 * 1024
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_HUGE = 18  # digits: a position with more is past the end of any file


@dataclass(frozen=True)
class Blob:
    key: str
    path: Path
    size: int

    @property
    def etag(self) -> str:
        return f'"{self.key}"'


_known: dict[str, Blob] = {}


async def blob(store: BlobStore, key: str) -> Blob:
    """Where the blob ``key`` is on local disk, and its size (remembered per process)."""
    known = _known.get(key)
    if known is not None:
        return known
    try:
        path = await store.local_path(key)
        size = (await anyio.Path(path).stat()).st_size
    except BlobNotFoundError:
        raise NotFoundError("no such file") from None
    except BlobStoreError as exc:  # S3 unreachable, cache folder unwritable
        raise UnavailableError(f"the blob store is unavailable: {exc.message}") from None
    except OSError:  # removed between the two calls
        raise NotFoundError("no such file") from None
    found = _known[key] = Blob(key, path, size)
    return found


def forget(key: str) -> None:
    _known.pop(key, None)


class _Unsatisfiable(Exception):
    pass


def _single_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive, or None for the whole file; raise _Unsatisfiable."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None  # malformed (or several ranges, handled by the caller): ignore it
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        length = _position(last_text)
        if length == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - length), size - 1
    first = _position(first_text)
    last = _position(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # an invalid range-spec: ignore the header
    if first >= size:
        raise _Unsatisfiable
    return first, min(last, size - 1)


def _position(digits: str) -> int:
    """A byte position; any number too long to be one is read as past every end (RFC 9110:
    such a first position is unsatisfiable, such a last one is clamped)."""
    return int(digits) if len(digits.lstrip("0")) <= _HUGE else 10**_HUGE


def _read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


async def _stream(path: Path, size: int) -> AsyncIterator[bytes]:
    offset = 0
    while offset < size:
        chunk = await anyio.to_thread.run_sync(
            _read, path, offset, min(STREAM_CHUNK, size - offset)
        )
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


@dataclass(frozen=True)
class Reply:
    """What to answer: status, headers, and a body (or a stream of the whole file)."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: Blob | None = None


def reply(method: str, found: Blob, range_header: str | None, if_range: str | None) -> Reply:
    """The answer to GET or HEAD of a blob, honouring Range and If-Range (single ranges)."""
    headers = {
        "etag": found.etag,
        "accept-ranges": "bytes",
        "cache-control": "private, max-age=3600",
        "content-type": "application/octet-stream",
    }
    if if_range is not None and if_range != found.etag:
        range_header = None
    try:
        span = _single_range(range_header, found.size)
    except _Unsatisfiable:
        return Reply(416, {"content-range": f"bytes */{found.size}"})
    head = method == "HEAD"
    if span is None:
        headers["content-length"] = str(found.size)
        return Reply(200, headers, stream=None if head else found)
    first, last = span
    length = last - first + 1
    headers["content-range"] = f"bytes {first}-{last}/{found.size}"
    headers["content-length"] = str(length)
    if head:
        return Reply(206, headers)
    try:
        return Reply(206, headers, _read(found.path, first, length))
    except OSError:
        forget(found.key)  # deleted since we looked: another worker removed the artifact
        raise NotFoundError("no such file") from None


async def send(request: Request, found: Blob) -> Response:
    """A Starlette response for GET or HEAD of a blob (several ranges: multipart)."""
    range_header = request.headers.get("range")
    if range_header and "," in range_header:
        return FileResponse(
            found.path, media_type="application/octet-stream", headers={"etag": found.etag}
        )
    answer = reply(request.method, found, range_header, request.headers.get("if-range"))
    if answer.stream is not None:
        return StreamingResponse(
            _stream(answer.stream.path, answer.stream.size), headers=answer.headers
        )
    return Response(answer.body, status_code=answer.status, headers=answer.headers)


def send_document(request: Request, body: bytes, media_type: str) -> Response:
    """A small generated body (a job document) answered like a file: a satisfiable single
    ``Range`` gets 206 with ``Content-Range`` (the original device asks for its job with
    ``Range: bytes=0-`` and takes the total size from that answer), an unsatisfiable one 416."""
    headers = {"accept-ranges": "bytes", "cache-control": "no-store"}
    range_header = request.headers.get("range")
    try:
        span = (
            None if range_header and "," in range_header else _single_range(range_header, len(body))
        )
    except _Unsatisfiable:
        return Response(
            status_code=416, headers={**headers, "content-range": f"bytes */{len(body)}"}
        )
    if span is None:
        return Response(body, media_type=media_type, headers=headers)
    first, last = span
    headers["content-range"] = f"bytes {first}-{last}/{len(body)}"
    return Response(body[first : last + 1], 206, headers=headers, media_type=media_type)


# --- signed URLs, served before the web framework --------------------------------------------

SIGNED_PREFIX = "/dl/"


class SignedDownloads:
    """ASGI layer that answers ``GET|HEAD /dl/{id}/{name}?expires=..&sig=..`` itself.

    The signature covers the path (the content address and the name), so no routing,
    authentication is needed: each range costs one ``pread`` and one primary-key read (the
    artifact must still exist). Everything else goes to ``app``. ``state`` returns the server
    state and ``presence`` the artifact checker once the app has started.
    """

    def __init__(
        self, app: ASGIApp, state: Callable[[], Any], presence: Callable[[], artifacts.Presence]
    ) -> None:
        self.app = app
        self.state = state
        self.presence = presence

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not path.startswith(SIGNED_PREFIX)
            or scope.get("method") not in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return
        try:
            answer = await self._answer(scope, path)
        except _Multipart as several:
            # several ranges: rare; Starlette builds the multipart/byteranges answer
            await FileResponse(several.blob.path, headers={"etag": several.blob.etag})(
                scope, receive, send
            )
            return
        except OtakitError as exc:
            status, error, headers = http_answer(exc)
            if status >= 500:  # one line (S3 down); 4xx are the client's business
                log.warning("%s %s: %s %s", scope["method"], path, status, exc.message)
            body = json.dumps(error).encode()
            answer = Reply(status, {"content-type": "application/json", **headers}, body)
            answer.headers["content-length"] = str(len(body))
        if answer.status == 416:
            answer.headers["content-length"] = "0"
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [(k.encode(), v.encode()) for k, v in answer.headers.items()],
            }
        )
        if answer.stream is None:
            await send({"type": "http.response.body", "body": answer.body})
            return
        async for chunk in _stream(answer.stream.path, answer.stream.size):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _answer(self, scope: Scope, path: str) -> Reply:
        st = self.state()
        parts = path.split("/")
        if len(parts) != 4 or not parts[2] or not parts[3]:
            raise NotFoundError("no such file")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        problem = check_signature(
            st.signing_key,
            path,
            (query.get("expires") or [None])[0],
            (query.get("sig") or [None])[0],
        )
        if problem is not None:
            raise ForbiddenError(problem)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if not await _still_there(self.presence(), st.blobs, parts[2]):
            raise NotFoundError("no such file")
        found = await blob(st.blobs, parts[2])
        range_header = headers.get("range")
        if range_header and "," in range_header:
            raise _Multipart(found)
        return reply(scope["method"], found, range_header, headers.get("if-range"))


async def _still_there(presence: artifacts.Presence, store: BlobStore, key: str) -> bool:
    """Whether the artifact ``key`` exists; if not, forget it and drop the cached copy."""
    try:
        if await presence.exists(key):
            return True
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        return True  # no database: serve what the signature allows
    forget(key)
    # not a blob key (the 404 says enough), or a copy the next sweep removes
    with contextlib.suppress(BlobStoreError):
        await store.evict(key)
    return False


class _Multipart(Exception):
    def __init__(self, found: Blob) -> None:
        super().__init__("several ranges")
        self.blob = found


def signed_openapi(error_schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI path item of the signed download URLs (served by SignedDownloads)."""
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    error = {"application/json": {"schema": error_schema}}
    operation = {
        "tags": ["original devices"],
        "summary": "Download behind an expiring signed URL",
        "description": "403 when the URL has expired or its signature is not valid.",
        "parameters": [
            {"name": "artifact_id", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "expires", "in": "query", "required": True, "schema": {"type": "string"}},
            {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {"description": "The whole file", "content": binary},
            "206": {"description": "A range of the file", "content": binary},
            "403": {"description": "Expired or forged URL", "content": error},
            "404": {"description": "No such file", "content": error},
            "416": {"description": "Range not satisfiable"},
        },
    }
    return {
        "get": {**operation, "operationId": "signed_download"},
        "head": {**operation, "operationId": "signed_download_head"},
    }
