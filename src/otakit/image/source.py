"""Random-access byte sources an image can be read from without loading it whole.

A device verifies a slot it cannot hold in memory, so every reader in ``otakit.image`` takes a
:class:`ByteSource`: anything with a ``size`` and ``read_at(offset, length)``. Bytes, open binary
files and paths are adapted by :func:`open_source`; a flash slot implements the protocol itself.
A path ending in ``.hex`` is read as Intel HEX, as imgtool reads it (:mod:`otakit.image.hexfile`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from otakit.errors import InputFileError
from otakit.image.hexfile import is_hex_path, read_hex

CHUNK = 64 * 1024
SPOOL_IN_MEMORY = 1024 * 1024


@runtime_checkable
class ByteSource(Protocol):
    """Random-access, read-only bytes."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer only at the end of the source."""
        ...


class BytesSource:
    """A :class:`ByteSource` over bytes already in memory."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")

    @property
    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset : offset + max(length, 0)])


class FileSource:
    """A :class:`ByteSource` over a seekable binary file."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._size = file.seek(0, os.SEEK_END)

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(max(length, 0))


class SliceSource:
    """A window ``[offset, offset + size)`` of another :class:`ByteSource` (a package member)."""

    def __init__(self, source: ByteSource, offset: int, size: int) -> None:
        self._source = source
        self._offset = offset
        self._size = max(0, min(size, source.size - offset))

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self._size - offset)
        if offset < 0 or length <= 0:
            return b""
        return self._source.read_at(self._offset + offset, length)


SourceLike = ByteSource | bytes | bytearray | memoryview | BinaryIO | str | os.PathLike[str]


@contextlib.contextmanager
def open_source(source: SourceLike) -> Iterator[ByteSource]:
    """Adapt ``source`` to a :class:`ByteSource`; paths are opened (and closed) here.

    A ``.hex`` path is decoded whole into memory (the bytes from its lowest to its highest
    address, gaps erased); it raises :class:`~otakit.errors.HexFileError` when malformed.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        yield BytesSource(source)
    elif isinstance(source, str | os.PathLike) and is_hex_path(source):
        yield BytesSource(read_hex(source).data)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            file = path.open("rb")
        except OSError as exc:
            raise InputFileError(
                f"cannot open {path}: {exc.strerror or exc}", value=str(path)
            ) from None
        with file:
            yield FileSource(file)
    elif isinstance(source, ByteSource):
        yield source
    elif _seekable(source):
        yield FileSource(source)
    else:
        # A pipe or a download: copy it to a temporary file so it can be read at any offset,
        # holding at most SPOOL_IN_MEMORY bytes in memory.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            try:
                shutil.copyfileobj(source, spool, CHUNK)
            except OSError as exc:
                raise InputFileError(f"cannot read the image stream: {exc}") from None
            yield FileSource(spool)  # type: ignore[arg-type]


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def iter_range(source: ByteSource, start: int, end: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the bytes of ``[start, end)`` in chunks of at most ``chunk`` bytes."""
    pos = start
    while pos < end:
        data = source.read_at(pos, min(chunk, end - pos))
        if not data:
            return
        yield data
        pos += len(data)
