"""Database engines, sessions and migrations.

The default is SQLite in WAL mode in the data folder; ``postgresql://`` URLs use asyncpg. The
schema is managed by Alembic (``otakit/server/migrations``); :func:`migrate` brings any database
to the latest revision and is safe to run from several hosts at once on PostgreSQL (an advisory
lock serialises them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from otakit.errors import UsageError

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x07A_C17  # pg_advisory_xact_lock key


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
