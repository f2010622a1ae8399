"""Intel HEX files, read and written as imgtool does (``imgtool/image.py`` ``load``, ``save``,
``verify``).

- A file is Intel HEX when its name ends in ``.hex`` (any case); anything else is binary.
- Reading: the bytes from the lowest to the highest address in the file, gaps filled with erased
  bytes (0xFF); the lowest address is where those bytes start (imgtool's ``base_addr``).
- Writing: chunks of bytes at absolute addresses, gaps left as gaps.

The ``intelhex`` package parses and writes the records; its errors become
:class:`~otakit.errors.HexFileError`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass

from intelhex import IntelHex, IntelHexError

from otakit.errors import HexFileError
from otakit.files import read_input

HEX_SUFFIX = ".hex"
GAP_FILL = 0xFF  # IntelHex's padding, imgtool's fill for gaps
# A few records far apart would otherwise make a huge image out of a small file.
MAX_HEX_SPAN = 256 * 1024 * 1024


def is_hex_path(path: str | os.PathLike[str]) -> bool:
    """imgtool's rule: the ``.hex`` extension, in any case, means Intel HEX."""
    return os.path.splitext(os.fspath(path))[1].lower() == HEX_SUFFIX


@dataclass(frozen=True)
class HexImage:
    """The contents of a ``.hex`` file: ``data`` starts at address ``address``."""

    address: int
    data: bytes


def parse_hex(text: bytes, *, name: str = ".hex file") -> HexImage:
    """Decode Intel HEX ``text``; raise :class:`HexFileError` when it is not valid or empty."""
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HexFileError(
            f"{name} is not Intel HEX: byte {exc.start} is not ASCII", value=exc.start
        ) from None
    hexfile = IntelHex()
    try:
        hexfile.loadhex(io.StringIO(decoded))
    except IntelHexError as exc:
        raise HexFileError(f"{name} is not valid Intel HEX: {exc}", value=str(exc)) from None
    low, high = hexfile.minaddr(), hexfile.maxaddr()
    if low is None or high is None:
        raise HexFileError(f"{name} holds no data records")
    span = high - low + 1
    if span > MAX_HEX_SPAN:
        raise HexFileError(
            f"{name} spans {span} bytes (0x{low:x} to 0x{high:x}), more than the "
            f"{MAX_HEX_SPAN // (1024 * 1024)} MiB otakit reads from a .hex file",
            value=span,
        )
    return HexImage(low, hexfile.tobinarray().tobytes())


def read_hex(path: str | os.PathLike[str]) -> HexImage:
    """Read a ``.hex`` file; raise InputFileError (unreadable) or HexFileError (malformed)."""
    return parse_hex(read_input(path, what="hex file"), name=os.fspath(path))


def format_hex(chunks: Iterable[tuple[int, bytes]]) -> bytes:
    """Intel HEX text holding each ``(address, data)`` chunk, as imgtool writes it (16 bytes per
    record, extended linear address records as needed, no start address)."""
    hexfile = IntelHex()
    for address, data in chunks:
        if address < 0:
            raise HexFileError(f"address {address} is negative", value=address)
        hexfile.puts(address, data)
    high = hexfile.maxaddr()
    if high is not None and high >= 1 << 32:
        raise HexFileError(
            f"data ends at 0x{high + 1:x}, past the 4 GiB Intel HEX address space",
            value=high + 1,
        )
    text = io.StringIO()
    hexfile.write_hex_file(text)
    return text.getvalue().encode("ascii")
