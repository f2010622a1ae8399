"""Request bodies are read only within a limit, and not at all without the credentials a call
needs.

The web framework reads a JSON body whole before it checks who sent it, so this layer runs in
front of it:

- a management call (``/api/v1/...`` other than the device API) without an ``Authorization``
  header is answered 401 before a byte of its body is read;
- a body larger than its limit is answered 413 (from ``Content-Length`` before reading, or as
  soon as the bytes received pass the limit): :data:`DEVICE_BODY` for everything a device
  sends (check-in, status, results), :data:`API_BODY` for other calls. Artifact uploads are not
  held here: they stream to disk under ``ServerSettings.max_upload`` (management.py). A hawkBit
  DDI feedback that carries credentials may be :data:`API_BODY` (SWUpdate sends up to 48 log
  lines in one; its failure report, with the errors, must not be lost).

A body within its limit is held (at most :data:`API_BODY` bytes) and handed on unchanged.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEVICE_BODY = 8 * 1024
API_BODY = 64 * 1024
API_PREFIX = "/api/v1/"
DEVICE_PREFIX = "/api/v1/device/"
UPLOAD_PATH = "/api/v1/artifacts"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DDI_FEEDBACK = re.compile(
    r"/[^/]+/controller/v1/[^/]+/(deploymentBase|cancelAction)/[^/]+/feedback"
)


def limit_for(method: str, path: str, *, authorized: bool = False) -> int | None:
    """The largest body accepted for ``method path`` (``authorized``: the request carries an
    ``Authorization`` header); None: not held here (uploads)."""
    if method == "POST" and path == UPLOAD_PATH:
        return None
    if authorized and _DDI_FEEDBACK.fullmatch(path):
        return API_BODY
    if path.startswith(API_PREFIX) and not path.startswith(DEVICE_PREFIX):
        return API_BODY
    return DEVICE_BODY  # device API, results POSTed to file paths, anything else


def needs_credentials(path: str) -> bool:
    """Calls that always need a token (the device API may enroll without one)."""
    return path.startswith(API_PREFIX) and not path.startswith(DEVICE_PREFIX)


class BodyLimits:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "")
        if scope["type"] != "http" or method not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        headers = dict(scope.get("headers") or ())
        authorized = bool(headers.get(b"authorization"))
        if needs_credentials(path) and not authorized:
            await _answer(send, 401, "UNAUTHORIZED", "this call needs a token")
            return
        limit = limit_for(method, path, authorized=authorized)
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and len(declared) < 19 and int(declared) > limit:
            await _answer(send, 413, "TOO_LARGE", f"the request body is larger than {limit} bytes")
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _answer(
                    send, 413, "TOO_LARGE", f"the request body is larger than {limit} bytes"
                )
                return
        await self.app(scope, replay(bytes(body), receive), send)


def replay(body: bytes, receive: Receive, *, more: bool = False) -> Receive:
    """``receive`` of a request whose first ``body`` bytes were read already (``more``: the
    rest is still to be received from ``receive``)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()  # the rest of the body, then the disconnect

    return replay


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
