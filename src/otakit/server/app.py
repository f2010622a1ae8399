"""The update server application (FastAPI) and its one-time initialisation.

:func:`initialise` runs once before any worker starts: it creates the data folder, brings the
schema to the latest Alembic revision, creates the URL signing key (kept in the database, so all
workers and hosts share it) and, on the very first start, an admin token that is returned to be
printed once. :func:`create_app` builds the FastAPI app: the device and management APIs, the
dashboard at ``/`` (server/dashboard) and Prometheus metrics at ``/metrics`` (server/metrics.py).
:func:`serving_app` puts the layers a worker runs in front of it: metrics counting, one log line
per failed request, idle check-ins (api/idle.py), then signed downloads.

A database that does not answer is 503 with ``Retry-After`` and the usual JSON error body
(database.unavailable decides what counts as "does not answer"; context.http_answer makes the
answer); any other failure is 500 with a JSON body. Either way the server logs one line for
the request, never a traceback. ``/livez`` answers as long as the process serves HTTP;
``/healthz`` also asks the database and the blob store, and is 503 when one does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otakit import __version__
from otakit.errors import (
    BlobStoreError,
    OtakitError,
    StorageFullError,
    UnavailableError,
    UsageError,
)
from otakit.server import dashboard, downloads, metrics
from otakit.server.api import audit, ddi, device, management, original
from otakit.server.api.idle import IdleCheckins
from otakit.server.blobs import BlobStore, open_blob_store
from otakit.server.body_limits import BodyLimits
from otakit.server.context import ServerState, http_answer
from otakit.server.database import (
    RawReader,
    create_engine,
    migrate,
    server_engine,
    sessionmaker,
    unavailable,
)
from otakit.server.downloads import SignedDownloads, signed_openapi
from otakit.server.models import Setting, Token
from otakit.server.service import artifacts, deltas
from otakit.server.settings import ServerSettings
from otakit.server.storage import storage_full
from otakit.server.tokens import Role, add_token
from otakit.server.urls import new_signing_key

SIGNING_KEY = "url_signing_key"
FIRST_ADMIN = "first_admin_token"  # the id of the token printed on the first start
CACHE_SWEEP = 60.0  # seconds between looks for cached blobs of deleted artifacts
HEALTH_TIMEOUT = 5.0  # seconds /healthz waits for the database or the blob store

log = logging.getLogger("otakit.server")


@dataclass(frozen=True)
class Initialised:
    admin_token: str | None  # set only on the first start


async def _signing_key(db: AsyncSession) -> str:
    row = await db.get(Setting, SIGNING_KEY)
    if row is not None:
        return row.value
    db.add(Setting(key=SIGNING_KEY, value=new_signing_key()))
    try:
        await db.commit()
    except IntegrityError:  # another process created it first
        await db.rollback()
    row = await db.get(Setting, SIGNING_KEY)
    assert row is not None
    return row.value


def _private_folder(folder: Path) -> None:
    """Create ``folder`` readable by its owner only (it holds the database, with the URL
    signing key, and the blobs), and take group and other access away if it had them."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        folder.chmod(0o700)


def _private_database(url: str) -> None:
    """Create a SQLite database file (and its WAL files, which SQLite makes with the same
    mode) readable and writable by its owner only."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)


def initialise(settings: ServerSettings) -> Initialised:
    """Prepare data folder and database; call from synchronous code before serving."""
    import asyncio

    try:
        _private_folder(settings.data_dir)
        _private_database(settings.database_url)
    except OSError as exc:
        raise UsageError(
            f"cannot create the data folder {settings.data_dir}: {exc.strerror}"
        ) from None
    metrics.clear(settings.data_dir)  # counters start from zero with the server
    migrate(settings.database_url)

    async def _setup() -> Initialised:
        engine = create_engine(settings.database_url)
        try:
            async with sessionmaker(engine)() as db:
                await _signing_key(db)
                return Initialised(await _first_admin(db))
        finally:
            await engine.dispose()

    return asyncio.run(_setup())


async def _first_admin(db: AsyncSession) -> str | None:
    """A new admin token if the database has none yet, else None.

    Hosts starting together on an empty database race here: each inserts its token together
    with one claim row (FIRST_ADMIN, a primary key), so exactly one transaction commits and one
    host prints a token; the others roll theirs back and print nothing.
    """
    for _attempt in range(10):
        admins = await db.scalar(
            select(func.count()).select_from(Token).where(Token.role == Role.ADMIN)
        )
        if admins or await db.get(Setting, FIRST_ADMIN) is not None:
            return None
        token = add_token(db, Role.ADMIN, label="first admin")
        db.add(Setting(key=FIRST_ADMIN, value=token.split("_")[1]))
        try:
            await db.commit()
        except (IntegrityError, OperationalError):  # another host's claim (or SQLite's lock) won
            await db.rollback()
            continue
        return token
    return None


def create_app(settings: ServerSettings) -> FastAPI:
    counters = metrics.Counters(settings.data_dir / metrics.FOLDER)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = server_engine(
            settings.database_url,
            pool_size=settings.pool_size,
            pool_timeout=settings.pool_timeout,
            statement_timeout=settings.statement_timeout,
        )
        sessions = sessionmaker(engine)
        async with sessions() as db:
            key = await _signing_key(db)
        blobs = open_blob_store(settings.blob_url, settings.data_dir)
        app.state.otakit = ServerState(settings, sessions, blobs, key)
        app.state.otakit_presence = presence = artifacts.Presence(settings.database_url)
        app.state.otakit_idle = idle = RawReader(settings.database_url)
        sweeping = asyncio.create_task(_sweep_cache(sessions, blobs))
        makers = [
            deltas.DeltaWorker(
                sessions,
                blobs,
                tmp_dir=settings.data_dir / "tmp",
                min_ratio=settings.delta_min_ratio,
                max_image=settings.delta_max_image,
            )
            for _ in range(settings.delta_workers)
        ]
        for maker in makers:
            maker.start()
        try:
            async with counters.flushing():
                yield
        finally:
            sweeping.cancel()
            await asyncio.gather(*(maker.stop() for maker in makers))
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping
            await presence.close()
            await idle.close()
            await engine.dispose()

    app = FastAPI(
        title="otakit update server",
        version=__version__,
        lifespan=lifespan,
        # the interactive pages load their scripts from a public CDN: off unless asked for
        docs_url="/docs" if settings.api_docs else None,
        redoc_url=None,
        description=(
            "Device API (original middleware job documents and ranged downloads; JSON check-in "
            "and status for agents and gateways; Eclipse hawkBit's DDI API for hawkBit clients) "
            "and management API (admin token)."
        ),
    )
    app.include_router(original.router)
    app.include_router(device.router)
    app.include_router(management.router)
    app.include_router(audit.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.include_router(ddi.router)
    app.add_middleware(BodyLimits)
    app.state.otakit_metrics = counters
    app.state.otakit_metrics_access = metrics.Access.from_env()

    @app.get("/livez", tags=["health"])
    async def livez() -> dict[str, str]:
        """The process serves HTTP (touches neither the database nor the blob store)."""
        return {"status": "ok", "version": __version__}

    @app.get(
        "/healthz",
        tags=["health"],
        responses={503: {"description": "The database or the blob store does not answer"}},
    )
    async def healthz(request: Request) -> JSONResponse:
        """The database and the blob store answer (each within a few seconds); 503 if not."""
        st: ServerState = request.app.state.otakit
        database, blobs = await asyncio.gather(_database_health(st), _blob_health(st.blobs))
        ok = database == "ok" and blobs == "ok"
        return JSONResponse(
            {
                "status": "ok" if ok else "unavailable",
                "version": __version__,
                "database": database,
                "blobs": blobs,
            },
            status_code=200 if ok else 503,
            headers={} if ok else {"retry-after": "5"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own errors (no such route, wrong method, unparsable body) in the
        same shape as every other error."""
        code = _HTTP_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
        return JSONResponse(
            {"error": code, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid input')}"
            if where
            else first.get("msg", "invalid input")
        )
        return JSONResponse({"error": "BADARG", "message": message}, status_code=422)

    @app.exception_handler(OtakitError)
    async def _otakit_error(request: Request, exc: OtakitError) -> JSONResponse:
        status, body, headers = http_answer(storage_full(exc) or exc)
        if status >= 500:
            _log_failure(request.method, request.url.path, status, exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(OSError)
    async def _storage_error(request: Request, exc: Exception) -> JSONResponse:
        """A full disk: 507; a database that does not answer: 503 (anything else goes on to
        _failed)."""
        answer = storage_full(exc) or unavailable(exc)
        if answer is None:
            raise exc
        return await _otakit_error(request, answer)

    @app.exception_handler(Exception)
    async def _failed(_request: Request, _exc: Exception) -> JSONResponse:
        """A bug: 500 in the usual shape (Guarded logs it, in one line)."""
        return JSONResponse({"error": "INTERNAL", "message": "internal server error"}, 500)

    return app


async def _database_health(st: ServerState) -> str:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT), st.sessions() as db:
            await db.execute(text("SELECT 1"))
    except TimeoutError:
        return f"no answer in {HEALTH_TIMEOUT:g} s"
    except Exception as exc:
        answer = unavailable(exc)
        if answer is None:
            raise
        return answer.message
    return "ok"


async def _blob_health(blobs: BlobStore) -> str:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await blobs.check()
    except TimeoutError:
        return f"no answer in {HEALTH_TIMEOUT:g} s"
    except BlobStoreError as exc:
        return exc.message
    return "ok"


async def _sweep_cache(sessions: async_sessionmaker[AsyncSession], blobs: BlobStore) -> None:
    """Remove local copies of blobs whose artifact was deleted (through any server): at start,
    then every CACHE_SWEEP seconds. Costs nothing for a store that keeps no copies."""
    while True:
        keys = blobs.cached_keys()
        if keys:
            try:
                async with sessions() as db:
                    stale = await artifacts.stale_copies(db, keys)
                for key in stale:
                    await blobs.evict(key)
                    downloads.forget(key)
                    log.info("removed the cached copy of deleted artifact %s", key)
            except Exception as exc:
                log.warning("cache sweep failed: %s", _one_line(exc))
        await asyncio.sleep(CACHE_SWEEP)


def _one_line(exc: BaseException) -> str:
    detail = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _log_failure(method: str, path: str, status: int, exc: BaseException) -> None:
    if isinstance(exc, UnavailableError | StorageFullError):
        why = f" ({exc.value})" if exc.value else ""
        log.warning("%s %s: %s %s%s", method, path, status, exc.message, why)
        return
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    log.error("%s %s: %s %s%s", method, path, status, _one_line(exc), where)


class Guarded:
    """ASGI layer that turns any exception into one log line: a 500 with a JSON body if no
    answer was started, else just the line (the client sees the connection end)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watching)
        except Exception as exc:
            answer = storage_full(exc) or unavailable(exc)
            reason: BaseException = answer if answer is not None else exc
            status, body, headers = (
                http_answer(answer)
                if answer is not None
                else (500, {"error": "INTERNAL", "message": "internal server error"}, {})
            )
            _log_failure(scope.get("method", ""), scope.get("path", ""), status, reason)
            if started:
                return
            await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


_HTTP_CODES = {
    400: "BADARG",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "TOO_LARGE",
}


def _with_signed_downloads(app: FastAPI) -> None:
    """Document the signed download path, which SignedDownloads serves before the framework."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            schema["paths"]["/dl/{artifact_id}/{name}"] = signed_openapi(
                {"$ref": "#/components/schemas/ErrorBody"}
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def serving_app(settings: ServerSettings) -> metrics.Metered:
    """The ASGI app a worker runs: metrics counting, idle check-ins, signed downloads, then the
    FastAPI app (its ``app`` attribute)."""
    app = create_app(settings)
    _with_signed_downloads(app)
    signed = SignedDownloads(app, lambda: app.state.otakit, lambda: app.state.otakit_presence)
    idle = IdleCheckins(signed, lambda: app.state)
    return metrics.Metered(Guarded(idle), app, app.state.otakit_metrics)


def app_from_env() -> metrics.Metered:
    """Factory for uvicorn workers: settings come from the environment (see ServerSettings)."""
    return serving_app(ServerSettings.from_env())
