"""Loaded by a server process whose PYTHONPATH starts with this folder (tests/test_device_flows.py):
every SQL statement any SQLAlchemy engine of the process sends, and every one it sends without
SQLAlchemy (database.RawReader: the idle check-in, signed downloads), is appended, one line
each, to the file ``OTAKIT_SQL_LOG`` names, so a test can count the statements a request costs
in a real ``otakit serve`` process."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

_PATH = os.environ.get("OTAKIT_SQL_LOG")

if _PATH:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def _write(statement: str) -> None:
        assert _PATH is not None
        with open(_PATH, "a", encoding="utf-8") as out:
            out.write(" ".join(statement.split())[:300] + "\n")

    def _log(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        _write(statement)

    event.listen(Engine, "before_cursor_execute", _log)

    try:
        from otakit.server.database import RawReader
    except ImportError:  # a server without it (an earlier checkout)
        pass
    else:
        _fetchone = RawReader.fetchone

        async def _traced(self: RawReader, query: str, *args: Any) -> tuple[Any, ...] | None:
            _write(query)
            return await _fetchone(self, query, *args)

        RawReader.fetchone = _traced  # type: ignore[method-assign]

        _maybe_write: Callable[..., Awaitable[int]] | None = getattr(RawReader, "write", None)
        if _maybe_write is not None:
            _rawwrite = _maybe_write  # narrowed, for the function below

            async def _traced_write(self: RawReader, query: str, *args: Any) -> int:
                _write(query)
                result: int = await _rawwrite(self, query, *args)
                return result

            RawReader.write = _traced_write  # type: ignore[method-assign]
