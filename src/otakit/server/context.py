"""What every request handler needs: settings, a database session, the blob store, the caller.

Authentication is a bearer token (``Authorization: Bearer otk_...``, see tokens.py). Handlers
declare what they need with the dependencies below; a missing or unknown token is 401, a token
of the wrong role or for another device is 403.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from otakit.errors import OtakitError
from otakit.server.blobs import BlobStore
from otakit.server.models import Token, utcnow
from otakit.server.tokens import Role, secret_matches, split_token, usable

SETTINGS_ENV = "OTAKIT_SERVER_SETTINGS"
DEFAULT_URL_DAYS = 1


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    database_url: str  # async SQLAlchemy URL
    blob_url: str | None = None
    max_upload: int = 512 * 1024 * 1024
    url_days: float = DEFAULT_URL_DAYS  # lifetime of signed download URLs in job documents
    direct_downloads: bool = False  # hand out S3 pre-signed URLs instead of the server's own
    rollout_interval: float = 5.0  # seconds between background rollout evaluations; 0: off
    history_per_device: int = 200  # status reports kept per device (the newest)
    history_days: float = 90  # status reports older than this are deleted
    anonymous_history: int = 1000  # reports kept from devices that do not identify themselves
    api_docs: bool = False  # serve the interactive API pages at /docs (scripts from a CDN)

    def to_env(self) -> str:
        data = asdict(self)
        data["data_dir"] = str(self.data_dir)
        return json.dumps(data)

    @classmethod
    def from_env(cls) -> ServerSettings:
        data: dict[str, Any] = json.loads(os.environ[SETTINGS_ENV])
        data["data_dir"] = Path(data["data_dir"])
        return cls(**data)


class ErrorBody(BaseModel):
    """Every error response: a stable code and one human sentence."""

    error: str
    message: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the error responses a router can give."""
    return {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses
    }


_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing or unknown token",
    403: "Not allowed for this token",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Too large",
    422: "Invalid input",
}


class HttpError(OtakitError):
    """An error with an HTTP status, raised by handlers; ``http_code`` is the code in the
    response body."""

    code = "HTTP"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.http_code = code


@dataclass
class ServerState:
    settings: ServerSettings
    sessions: async_sessionmaker[AsyncSession]
    blobs: BlobStore
    signing_key: str


def state(request: Request) -> ServerState:
    result: ServerState = request.app.state.otakit
    return result


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    async with state(request).sessions() as db:
        yield db


Db = Annotated[AsyncSession, Depends(session)]
State = Annotated[ServerState, Depends(state)]


async def caller(request: Request, db: Db) -> Token | None:
    """The token that made the request, or None when there is no Authorization header."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    parts = split_token(value) if scheme.lower() == "bearer" else None
    if parts is None:
        raise HttpError(401, "UNAUTHORIZED", "expected 'Authorization: Bearer otk_...'")
    token = await db.get(Token, parts[0])
    if token is None or not secret_matches(parts[1], token.secret_hash):
        raise HttpError(401, "UNAUTHORIZED", "unknown or revoked token")
    if not usable(token, utcnow()):
        why = "revoked" if token.revoked_at is not None else "expired"
        raise HttpError(401, "UNAUTHORIZED", f"this token has {why}")
    return token


Caller = Annotated[Token | None, Depends(caller)]


async def admin(token: Caller) -> Token:
    if token is None:
        raise HttpError(401, "UNAUTHORIZED", "this call needs an admin token")
    if token.role != Role.ADMIN:
        raise HttpError(403, "FORBIDDEN", "this call needs an admin token")
    return token


Admin = Annotated[Token, Depends(admin)]
