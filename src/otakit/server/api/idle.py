"""The idle check-in, answered before the web framework.

Most check-ins of a fleet are a device that runs what it should asking again: the answer is 204
and nothing is written. :class:`IdleCheckins` answers exactly that case of ``POST
/api/v1/device/checkin`` itself, with one SQL statement on a connection of its own
(database.RawReader: the device token, the device and the offers revision together) and the
process's cached offers (offers.cached); the decision is
service/checkin.nothing_but_the_visit's. A device that needs nothing else but whose visit is
due (checkin.seen_due: ``last_seen`` older than checkin.LAST_SEEN_RESOLUTION, the usual poll
of a real fleet) costs one more statement:
the conditional UPDATE of ``last_seen`` (:data:`SEEN`, RawReader.write), committed; if it
fails (SQLite locked by another writer, anything) the route answers instead. Everything
else -- no or another kind of token, a revoked or expired one, a body that does not validate,
something the device says that differs from what is stored (its ``image_sha256`` too), an
update under way, an offer that targets the device, offers not cached at the revision just
read, a database that does not answer -- goes on, unchanged (the body it read is handed on), to the FastAPI route
(api/device.py), which decides and answers as always.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otakit.server.api.device import CheckIn
from otakit.server.body_limits import limit_for, replay
from otakit.server.database import RawReader, unavailable
from otakit.server.models import Device, utcnow
from otakit.server.service import checkin, offers
from otakit.server.tokens import Role, live, secret_matches, split_token

PATH = "/api/v1/device/checkin"

# the token, the device it checks in for, the offers revision: one statement
QUERY = (
    "SELECT t.secret_hash, t.role, t.device_serial, t.revoked_at, t.expires_at, d.serial, "
    "d.product, d.tags, d.version, d.board, d.manufacturer, d.manufacturer_id, d.last_seen, "
    "d.status, d.image_sha256, (SELECT r.value FROM revisions r WHERE r.name = 'offers') "
    "FROM tokens t LEFT JOIN devices d ON d.serial = ? WHERE t.id = ?"
)
# the visit, when it is due (checkin.seen_due's rule, in SQL)
SEEN = "UPDATE devices SET last_seen = ? WHERE serial = ? AND (last_seen IS NULL OR last_seen < ?)"
_JSON = re.compile(r"application/json\s*(;.*)?", re.IGNORECASE)


def _when(value: Any) -> datetime | None:
    """A timestamp as the driver returns it (SQLite: text without a zone, UTC)."""
    if value is None:
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class IdleCheckins:
    """ASGI layer that answers idle device check-ins (204) and hands on every other request.
    ``state`` returns the FastAPI app's state once the app has started (its ``otakit``,
    ``otakit_rollouts`` and ``otakit_idle``, a RawReader)."""

    def __init__(self, app: ASGIApp, state: Callable[[], Any]) -> None:
        self.app = app
        self.state = state
        self._bind: Any = None  # the engine the process's offers are cached for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != PATH:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        parts = split_token(value) if scheme.lower() == "bearer" else None
        limit = limit_for("POST", PATH)
        declared = headers.get(b"content-length", b"")
        if (
            parts is None
            or not _JSON.fullmatch(headers.get(b"content-type", b"").decode("latin-1"))
            or limit is None
            or (declared.isdigit() and (len(declared) > 18 or int(declared) > limit))
        ):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:  # the route's layers answer 413
                await self.app(scope, replay(bytes(body), receive, more=more), send)
                return
        if await self._idle(bytes(body), *parts):
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, replay(bytes(body), receive), send)

    async def _idle(self, body: bytes, token_id: str, secret: str) -> bool:
        """Whether the check-in is idle: the route would answer 204 and write nothing, or only
        the visit (``last_seen``), which is then written here."""
        try:
            told = CheckIn.model_validate(json.loads(body))
        except (ValueError, ValidationError):
            return False
        state = self.state()
        reader: RawReader = state.otakit_idle
        try:
            row = await reader.fetchone(QUERY, told.serial, token_id)
        except Exception as exc:
            if unavailable(exc) is None:
                raise
            return False  # the route answers 503 the usual way
        if row is None:
            return False
        secret_hash, role, bound, revoked_at, expires_at, serial, *device, at = row
        if (
            serial is None
            or role != Role.DEVICE
            or bound != told.serial
            or not secret_matches(secret, secret_hash)
            or not live(_when(revoked_at), _when(expires_at), utcnow())
        ):
            return False
        now = state.otakit_rollouts.now()
        if self._bind is None:
            async with state.otakit.sessions() as db:
                self._bind = db.get_bind()
        known = offers.cached(self._bind, at or 0, now)
        if known is None:
            return False
        (
            product,
            tags,
            version,
            board,
            manufacturer,
            manufacturer_id,
            last_seen,
            status,
            image_sha256,
        ) = device
        stored = Device(
            serial=serial,
            product=product,
            tags=json.loads(tags) if isinstance(tags, str) else (tags or {}),
            version=version,
            board=board,
            manufacturer=manufacturer,
            manufacturer_id=manufacturer_id,
            last_seen=_when(last_seen),
            status=status,
            image_sha256=image_sha256,
        )
        said: dict[str, Any] = {
            "version": told.version,
            "board": told.board,
            "manufacturer": told.manufacturer,
            "manufacturer_id": told.manufacturer_id,
            "boots": told.boots,
            "image_sha256": told.image_sha256,
        }
        if not checkin.nothing_but_the_visit(stored, known, now, **said):
            return False
        if not checkin.seen_due(stored.last_seen, now):
            return True
        try:  # the visit, written as check_in would (checkin.seen); the route on any failure
            await reader.write(
                SEEN, reader.timestamp(now), serial, reader.timestamp(checkin.seen_cutoff(now))
            )
        except Exception:
            return False
        return True
