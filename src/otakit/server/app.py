"""The update server application (FastAPI) and its one-time initialisation.

:func:`initialise` runs once before any worker starts: it creates the data folder, brings the
schema to the latest Alembic revision, creates the URL signing key (kept in the database, so all
workers and hosts share it) and, on the very first start, an admin token that is returned to be
printed once. :func:`create_app` builds the FastAPI app: the device and management APIs, the
dashboard at ``/`` (server/dashboard) and Prometheus metrics at ``/metrics`` (server/metrics.py).
:func:`serving_app` puts the layers a worker runs in front of it: metrics counting, then signed
downloads.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException as StarletteHTTPException

from otakit import __version__
from otakit.errors import OtakitError, UsageError
from otakit.server import dashboard, metrics
from otakit.server.api import device, management, original
from otakit.server.blobs import open_blob_store
from otakit.server.body_limits import BodyLimits
from otakit.server.context import ServerState, http_answer
from otakit.server.database import create_engine, migrate, sessionmaker
from otakit.server.downloads import SignedDownloads, signed_openapi
from otakit.server.models import Setting, Token
from otakit.server.settings import ServerSettings
from otakit.server.tokens import Role, add_token
from otakit.server.urls import new_signing_key

SIGNING_KEY = "url_signing_key"


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
                admins = await db.scalar(
                    select(func.count()).select_from(Token).where(Token.role == Role.ADMIN)
                )
                if admins:
                    return Initialised(None)
                token = add_token(db, Role.ADMIN, label="first admin")
                await db.commit()
                return Initialised(token)
        finally:
            await engine.dispose()

    return asyncio.run(_setup())


def create_app(settings: ServerSettings) -> FastAPI:
    counters = metrics.Counters(settings.data_dir / metrics.FOLDER)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_pre_ping=True)
        sessions = sessionmaker(engine)
        async with sessions() as db:
            key = await _signing_key(db)
        blobs = open_blob_store(settings.blob_url, settings.data_dir)
        app.state.otakit = ServerState(settings, sessions, blobs, key)
        try:
            async with counters.flushing():
                yield
        finally:
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
            "and status for agents and gateways) and management API (admin token)."
        ),
    )
    app.include_router(original.router)
    app.include_router(device.router)
    app.include_router(management.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.add_middleware(BodyLimits)
    app.state.otakit_metrics = counters
    app.state.otakit_metrics_access = metrics.Access.from_env()

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

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
        message = f"{where}: {first.get('msg', 'invalid input')}" if where else "invalid input"
        return JSONResponse({"error": "BADARG", "message": message}, status_code=422)

    @app.exception_handler(OtakitError)
    async def _otakit_error(_request: Request, exc: OtakitError) -> JSONResponse:
        status, body, headers = http_answer(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    return app


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
    """The ASGI app a worker runs: metrics counting, signed downloads, then the FastAPI app
    (its ``app`` attribute)."""
    app = create_app(settings)
    _with_signed_downloads(app)
    downloads = SignedDownloads(app, lambda: app.state.otakit)
    return metrics.Metered(downloads, app, app.state.otakit_metrics)


def app_from_env() -> metrics.Metered:
    """Factory for uvicorn workers: settings come from the environment (see ServerSettings)."""
    return serving_app(ServerSettings.from_env())
