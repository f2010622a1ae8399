"""The server's storage when it is full: a full disk, a quota or a file size limit.

Writing an upload, a blob or the database can fail because there is no room (``ENOSPC``), the
user's quota is used up (``EDQUOT``) or a file would pass the file size limit (``EFBIG``, e.g.
``ulimit -f``). :func:`storage_full` tells those apart from every other failure, so that the
server answers 507 ``STORAGE_FULL`` (context.HTTP_STATUS) and a caller can clean up what it
started (no blob without its record).
"""

from __future__ import annotations

from otakit.errors import StorageFullError, causes
from otakit.files import FULL_ERRNOS

_FULL_SQLSTATES = frozenset({"53100"})  # PostgreSQL's disk_full
# SQLite's SQLITE_FULL, and the C library's strerror of ENOSPC and EDQUOT in a driver's message
_FULL_TEXT = ("database or disk is full", "no space left on device", "disk quota exceeded")
_DRIVERS = ("sqlite3", "sqlalchemy", "asyncpg", "aiosqlite")
# SQLite's answers to a full disk: SQLITE_FULL, or, in WAL mode, no room to grow the shared
# memory file (-shm) that every connection maps first ("disk I/O error")
_SQLITE_FULL = frozenset({"SQLITE_FULL", "SQLITE_IOERR_SHMSIZE"})


def storage_full(exc: BaseException) -> StorageFullError | None:
    """The StorageFullError that ``exc`` means (a full disk, quota or file size limit while
    writing a blob, an upload or the database), or None. Looks through the exception's causes:
    database drivers and the blob store wrap the OSError."""
    for current in causes(exc, orig=True):
        if isinstance(current, StorageFullError):
            return current
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return full(current.strerror or str(current))
        state = str(getattr(current, "sqlstate", None) or getattr(current, "pgcode", None) or "")
        name = getattr(current, "sqlite_errorname", None)
        if state in _FULL_SQLSTATES or name in _SQLITE_FULL:
            return full("the database's disk is full")
        if type(current).__module__.split(".")[0] in _DRIVERS:
            text = str(current).lower()
            if any(t in text for t in _FULL_TEXT):
                return full("the database's disk is full")
    return None


def full(why: str) -> StorageFullError:
    """The error a full storage is answered with (``why``: the system's reason, for the log)."""
    return StorageFullError(
        "the server's storage is full; nothing was stored (free some space on the server, then try "
        "again)",
        value=why,
    )
