"""Reading inputs and writing outputs so that a crash never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from otakit.errors import InputFileError


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
        raise InputFileError(
            f"cannot write {directory / name}: {exc.strerror or exc}", value=str(directory / name)
        ) from None
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
        raise InputFileError(
            f"cannot write {target}: {exc.strerror or exc}", value=str(target)
        ) from None
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
