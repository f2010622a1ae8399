"""Reading inputs and writing outputs so that a crash never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
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


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and a rename.

    Readers see either the old file or the complete new one, even after a power cut.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputFileError(
            f"cannot write {target}: {exc.strerror or exc}", value=str(target)
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputFileError(
            f"cannot write {target}: {exc.strerror or exc}", value=str(target)
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
