"""Reading inputs and writing outputs so that a crash never leaves a half-written file."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from otakit.errors import InputFileError, StorageFullError, causes

# ENOSPC: no space left; EDQUOT: the user's quota; EFBIG: a file size limit (RLIMIT_FSIZE, or
# the file system's largest file)
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full(exc: BaseException, where: object = None) -> StorageFullError | None:
    """The :class:`StorageFullError` that ``exc`` (or an OSError it was raised from) means when
    a write found the disk, a quota or a file size limit full; None for anything else."""
    for current in causes(exc):
        if isinstance(current, StorageFullError):
            return current
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            what = f"cannot write {where}" if where is not None else "cannot write"
            return StorageFullError(
                f"{what}: {current.strerror or current} (free some space, then try again)",
                value=None if where is None else str(where),
            )
    return None


def _cannot_write(where: object, exc: OSError) -> InputFileError | StorageFullError:
    full = disk_full(exc, where)
    if full is not None:
        return full
    return InputFileError(f"cannot write {where}: {exc.strerror or exc}", value=str(where))


def read_input(path: str | os.PathLike[str], *, what: str = "file") -> bytes:
    """Read a whole input file; a missing or unreadable file is an :class:`InputFileError`."""
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise InputFileError(f"{what} {path} is a directory", value=str(path)) from None
    except OSError as exc:
        raise InputFileError(
            f"cannot read {what} {path}: {exc.strerror or exc}", value=str(path)
        ) from None


def write_temp(directory: Path, name: str, chunks: Iterable[bytes], *, mode: int = 0o644) -> Path:
    """Write ``chunks`` to a synced temporary file in ``directory``; return its path.

    The caller renames it into place (or removes it). If writing fails, or ``chunks`` raises,
    the temporary file is removed before the exception propagates.
    """
    try:
        fd, name_tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as exc:
        full = disk_full(exc, directory)
        if full is not None:
            raise full from None
        raise InputFileError(
            f"cannot write in {directory}: {exc.strerror or exc}", value=str(directory)
        ) from None
    tmp = Path(name_tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(directory / name, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and a rename.

    Readers see either the old file or the complete new one, even after a power cut.
    """
    target = Path(path)
    directory = target.parent
    tmp = write_temp(directory, target.name, [data], mode=mode)
    try:
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(target, exc) from None
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
