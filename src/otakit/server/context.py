"""What every request handler needs: settings, a database session, the blob store, the caller.

Authentication is a bearer token (``Authorization: Bearer otk_...``, see tokens.py). Handlers
declare what they need with the dependencies below; a missing or unknown token is 401, a token
of the wrong role or for another device is 403.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from otakit.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    OtakitError,
    StorageFullError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnprocessableError,
    UsageError,
)
from otakit.server.blobs import BlobStore
from otakit.server.models import Token, utcnow
from otakit.server.service.rollouts import RolloutEngine
from otakit.server.settings import ServerSettings
from otakit.server.storage import storage_full as storage_full  # where it used to be
from otakit.server.tokens import Role, secret_matches, split_token, usable


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
    507: "The server's storage is full",
}


# Domain errors (otakit.errors) as HTTP answers: the one place where a status is chosen. The most
# specific class listed wins; any other UsageError is 400, any other OtakitError 422.
HTTP_STATUS: dict[type[OtakitError], int] = {
    NotFoundError: 404,
    ConflictError: 409,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    TooLargeError: 413,
    UnprocessableError: 422,
    UnavailableError: 503,
    StorageFullError: 507,
    UsageError: 400,
}


def http_answer(exc: OtakitError) -> tuple[int, dict[str, str], dict[str, str]]:
    """The status, JSON body and extra headers that answer ``exc``."""
    status = next((HTTP_STATUS[c] for c in type(exc).__mro__ if c in HTTP_STATUS), 422)
    headers = {}
    if isinstance(exc, UnavailableError):
        headers["retry-after"] = str(exc.retry_after)
    return status, {"error": exc.code, "message": exc.message}, headers


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
        raise UnauthorizedError("expected 'Authorization: Bearer otk_...'")
    token = await db.get(Token, parts[0])
    if token is None or not secret_matches(parts[1], token.secret_hash):
        raise UnauthorizedError("unknown or revoked token")
    if not usable(token, utcnow()):
        why = "revoked" if token.revoked_at is not None else "expired"
        raise UnauthorizedError(f"this token has {why}")
    return token


Caller = Annotated[Token | None, Depends(caller)]


async def admin(token: Caller) -> Token:
    """An admin token: the only role that may change anything through the management API."""
    if token is None:
        raise UnauthorizedError("this call needs an admin token")
    if token.role == Role.VIEWER:
        raise ForbiddenError(
            "read-only token (viewer): this call changes the server and needs an admin token"
        )
    if token.role != Role.ADMIN:
        raise ForbiddenError(f"this call needs an admin token (this is a {token.role} token)")
    return token


Admin = Annotated[Token, Depends(admin)]

READERS = frozenset({Role.ADMIN, Role.VIEWER})


async def reader(token: Caller) -> Token:
    """An admin or viewer token: what every read (GET) of the management API, the dashboard's
    calls and /metrics need."""
    if token is None:
        raise UnauthorizedError("this call needs an admin or viewer token")
    if token.role not in READERS:
        raise ForbiddenError(
            f"this call needs an admin or viewer token (this is a {token.role} token)"
        )
    return token


Reader = Annotated[Token, Depends(reader)]


# --- the rollout engine, one per process ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def rollout_engine(app: FastAPI) -> AsyncIterator[None]:
    """Run one engine per server process (the management router brings this lifespan, inside
    the app's own, which has set up ``app.state.otakit``)."""
    state: ServerState = app.state.otakit
    engine = RolloutEngine(state.sessions, state.settings)
    app.state.otakit_rollouts = engine
    engine.start()
    try:
        yield
    finally:
        await engine.stop()


def engine_of(request: Request) -> RolloutEngine:
    engine: RolloutEngine = request.app.state.otakit_rollouts
    return engine


Rollouts = Annotated[RolloutEngine, Depends(engine_of)]
