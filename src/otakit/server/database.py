"""Database engines, sessions and migrations.

The default is SQLite in WAL mode in the data folder; ``postgresql://`` URLs use asyncpg. The
schema is managed by Alembic (``otakit/server/migrations``); :func:`migrate` brings any database
to the latest revision and is safe to run from several hosts at once on PostgreSQL (an advisory
lock serialises them).

:func:`server_engine` is the engine a server process runs with: a bounded pool (``pool_size``
connections, waiting at most ``pool_timeout`` seconds for one), connections checked before use,
and on PostgreSQL a ``statement_timeout``. :func:`unavailable` tells a database that does not
answer (refused or lost connections, a pool with no free connection, a statement cancelled by
the timeout, SQLite locked) from a bug: the HTTP adapters answer the first with 503 and
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from otakit.errors import UnavailableError, UsageError

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x07A_C17  # pg_advisory_xact_lock key
# how SQLAlchemy's SQLite dialect writes a DateTime (models.UtcDateTime, always UTC)
_SQLITE_DATETIME: Any = sqlite.DATETIME().bind_processor(sqlite.dialect())  # type: ignore[no-untyped-call]


def database_url(url: str | None, data_dir: Path) -> str:
    """The async SQLAlchemy URL: ``url`` normalised, or SQLite in ``data_dir``."""
    if not url:
        return f"sqlite+aiosqlite:///{(data_dir / 'otakit.db').resolve()}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(f"invalid database URL {url!r}", value=url) from None
    driver = parsed.drivername
    if driver in ("postgresql", "postgres", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    if driver in ("sqlite", "sqlite+aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    raise UsageError(
        f"unsupported database {driver!r}: use sqlite:///PATH or postgresql://...", value=driver
    )


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def server_engine(
    url: str,
    *,
    pool_size: int = 10,
    pool_timeout: float = 10.0,
    statement_timeout: float = 0.0,
) -> AsyncEngine:
    """The engine of a server process: at most ``pool_size`` connections (plus as many again
    for bursts), waiting ``pool_timeout`` seconds for a free one, each checked with a ping
    before use (a restarted database costs one failed request at most, not one per pooled
    connection); on PostgreSQL every statement is cancelled after ``statement_timeout``
    seconds (0: no limit)."""
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": pool_size,
        "max_overflow": pool_size,
        "pool_timeout": pool_timeout,
    }
    if make_url(url).get_backend_name() == "postgresql":
        settings = {"statement_timeout": str(round(statement_timeout * 1000))}
        # asyncpg: a connection attempt that hangs fails like a refused one
        kwargs["connect_args"] = {"server_settings": settings, "timeout": pool_timeout}
    return create_engine(url, **kwargs)


# SQLSTATE classes of a database that is there but cannot answer now: 08 connection exception,
# 53 insufficient resources (too many connections), 57 operator intervention (shut down,
# starting, statement timeout); 55000 "database is not currently accepting connections".
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_UNAVAILABLE_STATES = frozenset({"55000", "55006"})


def unavailable(exc: BaseException) -> UnavailableError | None:
    """The UnavailableError that ``exc`` means, or None when it is not about reaching the
    database (a constraint violation, a bug)."""
    if isinstance(exc, PoolTimeoutError):
        return UnavailableError(
            "the database has no free connection; try again", retry_after=1, value="pool timeout"
        )
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        state = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
        if (
            exc.connection_invalidated
            or isinstance(exc, (OperationalError, InterfaceError))
            or state.startswith(_UNAVAILABLE_CLASSES)
            or state in _UNAVAILABLE_STATES
            or (orig is not None and _network(orig))
        ):
            return _unavailable(orig if orig is not None else exc)
        return None
    if _network(exc):
        return _unavailable(exc)  # asyncpg's own, raised while connecting
    state = str(getattr(exc, "sqlstate", "") or "")
    if type(exc).__module__.startswith("asyncpg") and (
        state.startswith(_UNAVAILABLE_CLASSES) or state in _UNAVAILABLE_STATES or not state
    ):
        return _unavailable(exc)
    return None


_NETWORK_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
)


def _network(exc: BaseException) -> bool:
    """A connection that could not be made or was lost (not a full disk, not a missing file)."""
    return isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or (
        isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS
    )


def _unavailable(cause: BaseException) -> UnavailableError:
    """The answer for clients says what, not why (the driver's text may name hosts and
    databases); ``value`` keeps the driver's reason for the log."""
    detail = " ".join(str(cause).split())[:200] or type(cause).__name__
    return UnavailableError("the database is unavailable; try again", retry_after=5, value=detail)


def insert(session: AsyncSession, model: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT in the session's dialect, which takes ``ON CONFLICT`` clauses (upserts)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    return config


def migrate(url: str) -> None:
    """Create or upgrade the schema (call from synchronous code, not inside an event loop)."""
    command.upgrade(alembic_config(url), "head")


class RawReader:
    """Reads one row at a time without SQLAlchemy, for the requests so frequent that a session
    from the pool would cost more than the answer (the idle check-in): SQLite through a
    read-only connection of its own (a read in WAL mode never waits); PostgreSQL through one
    asyncpg connection of its own (a prepared statement, one round trip), opened again after
    a failure. Queries use ``?`` placeholders. Raises what the driver raises when the database
    cannot be reached (:func:`unavailable` tells those apart).

    :meth:`write` runs one statement that changes rows and commits it (the idle check-in's
    ``last_seen``): on PostgreSQL on the same connection (autocommit), on SQLite through a
    read-write connection of its own with the engine's settings (:func:`create_engine`: WAL,
    ``synchronous=NORMAL``, foreign keys) except that it never waits for the write lock
    (``busy_timeout=0``: the sqlite3 call would block the event loop); a database that is
    locked raises ``sqlite3.OperationalError`` at once and the caller hands the request to
    the route, whose session waits in its own thread. :meth:`timestamp` is a datetime as the
    ORM's UtcDateTime column binds it (SQLite: UTC text in SQLAlchemy's format)."""

    def __init__(self, url: str) -> None:
        self._url = make_url(url)
        self.sqlite = self._url.get_backend_name() == "sqlite"
        self._sqlite: sqlite3.Connection | None = None
        self._sqlite_writer: sqlite3.Connection | None = None
        self._connection: Any = None  # asyncpg.Connection (asyncpg has no type hints)
        self._lock = asyncio.Lock()
        self._numbered: dict[str, str] = {}

    async def fetchone(self, query: str, *args: Any) -> tuple[Any, ...] | None:
        if self.sqlite:
            if self._sqlite is None:
                path = Path(self._url.database or "").resolve()
                self._sqlite = sqlite3.connect(
                    f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False
                )
                self._sqlite.execute("PRAGMA busy_timeout=1000")
            row: tuple[Any, ...] | None = self._sqlite.execute(query, args).fetchone()
            return row
        found = await self._postgres(query, args, fetch=True)
        return tuple(found) if found is not None else None

    def timestamp(self, value: datetime) -> Any:
        """``value`` as UtcDateTime stores it: aware UTC (PostgreSQL), or SQLite's text."""
        utc = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
        if not self.sqlite:
            return utc
        return _SQLITE_DATETIME(utc)

    async def write(self, query: str, *args: Any) -> int:
        """Run one statement that changes rows, committed; the number of rows it changed."""
        if self.sqlite:
            if self._sqlite_writer is None:
                path = Path(self._url.database or "").resolve()
                writer = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                writer.execute("PRAGMA journal_mode=WAL")
                writer.execute("PRAGMA synchronous=NORMAL")
                writer.execute("PRAGMA busy_timeout=0")
                writer.execute("PRAGMA foreign_keys=ON")
                self._sqlite_writer = writer
            return self._sqlite_writer.execute(query, args).rowcount
        status = await self._postgres(query, args, fetch=False)
        count = str(status).rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def _postgres(self, query: str, args: tuple[Any, ...], *, fetch: bool) -> Any:
        """``query`` (``?`` placeholders, numbered once per text) on the one asyncpg connection,
        opened when there is none and dropped after a failure: its row (``fetch``), else its
        status line."""
        numbered = self._numbered.get(query)
        if numbered is None:
            parts = query.split("?")
            numbered = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))
            self._numbered[query] = numbered
        async with self._lock:
            if self._connection is None or self._connection.is_closed():
                dsn = self._url.set(drivername="postgresql").render_as_string(hide_password=False)
                self._connection = await asyncpg.connect(dsn, timeout=10)
            try:
                if fetch:
                    return await self._connection.fetchrow(numbered, *args)
                return await self._connection.execute(numbered, *args)
            except BaseException:
                broken, self._connection = self._connection, None
                broken.terminate()
                raise

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self._sqlite_writer is not None:
            self._sqlite_writer.close()
            self._sqlite_writer = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
