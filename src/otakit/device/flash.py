"""A flash model with wear counters and power-cut injection, the same model as the MCUboot host
harness (``mcuboot-host/host/src/host_flash.c``) so both count and tear alike.

Behaviour of the modelled part:

- Erased bytes read ``erased_value``: 0xFF (most NOR flash) or 0x00 (PSoC 6 internal flash).
  Erase works on whole sectors, one operation per sector. With ``widen_erases`` an erase that
  does not start or end on a sector boundary erases every sector it touches (the Infineon
  internal-flash driver, and the harness's swap-status build); otherwise it is an error.
- A write must start and end on ``write_align`` boundaries and is one operation.
  ``write_mode="and"`` (NOR): programming only moves bits away from the erased value, so a
  write over data stores ``old & new`` when the erased value is 0xFF and ``old | new`` when it
  is 0x00. ``write_mode="replace"``: the cells take the new data (flash whose row write erases
  first, as PSoC 6 rows do).
- :meth:`Flash.cut_after` arms a power cut: that many operations complete, the next one is
  interrupted and :class:`PowerCut` is raised; from then on every access raises
  :class:`PowerCut` until :meth:`Flash.power_on`. An interrupted operation changes nothing,
  or with ``tear=True`` a random part of it happened (a write stores a prefix of its bytes, an
  erase erases a prefix of its sector), or with ``tear_half=True`` exactly the harness's
  ``--torn``: the first half (rounded down) of a write's bytes, the first half of the sector of
  an erase. The interrupted operation is not counted in :attr:`Flash.operations`.

Backings: :class:`MemoryBacking` (sectors allocated on first write, so a large idle flash costs
nothing) and :class:`FileBacking` (a file holding the flash contents byte for byte, persistent
between runs).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from otakit.errors import FlashError, InputFileError

ERASED = 0xFF
ERASED_VALUES = (0xFF, 0x00)
WRITE_MODES = ("and", "replace")


class PowerCut(Exception):
    """The simulated power went off during (or before) a flash operation."""


class Backing(Protocol):
    """Where the flash contents live."""

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class MemoryBacking:
    """Contents in memory; a sector is allocated when it is first written."""

    def __init__(self, size: int, sector_size: int, erased_value: int = ERASED) -> None:
        self._size = size
        self._sector = sector_size
        self._erased = bytes([erased_value]) * sector_size
        self._sectors: dict[int, bytearray] = {}

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, self._sector)
            step = min(end - offset, self._sector - inner)
            sector = self._sectors.get(index)
            out += (sector if sector is not None else self._erased)[inner : inner + step]
            offset += step
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            index, inner = divmod(offset + pos, self._sector)
            step = min(len(data) - pos, self._sector - inner)
            sector = self._sectors.get(index)
            if sector is None:
                if data[pos : pos + step] == self._erased[:step]:
                    pos += step
                    continue
                sector = self._sectors[index] = bytearray(self._erased)
            sector[inner : inner + step] = data[pos : pos + step]
            pos += step

    @property
    def allocated_bytes(self) -> int:
        return len(self._sectors) * self._sector

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileBacking:
    """Contents in a file of exactly the flash size; created erased when missing."""

    def __init__(self, path: str | os.PathLike[str], size: int, erased_value: int = ERASED) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputFileError(
                f"cannot open flash file {self.path}: {exc.strerror}", value=str(self.path)
            ) from None
        current = os.fstat(self._fd).st_size
        if current == 0:
            chunk = bytes([erased_value]) * (1024 * 1024)
            for start in range(0, size, len(chunk)):
                os.pwrite(self._fd, chunk[: min(len(chunk), size - start)], start)
            os.fsync(self._fd)
        elif current != size:
            os.close(self._fd)
            raise FlashError(
                f"flash file {self.path} is {current} bytes but the flash is {size} bytes",
                value=current,
            )

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class SectorWear:
    reads: int = 0
    writes: int = 0
    erases: int = 0


@dataclass
class FlashStats:
    """Operation counters, per sector and in total."""

    sectors: dict[int, SectorWear] = field(default_factory=dict)
    bytes_written: int = 0
    bytes_read: int = 0

    def sector(self, index: int) -> SectorWear:
        return self.sectors.setdefault(index, SectorWear())

    @property
    def writes(self) -> int:
        return sum(s.writes for s in self.sectors.values())

    @property
    def erases(self) -> int:
        return sum(s.erases for s in self.sectors.values())

    @property
    def max_erases(self) -> int:
        """Erases of the most-erased sector: what wears a part out first."""
        return max((s.erases for s in self.sectors.values()), default=0)


def _check_erased_value(value: int) -> None:
    if value not in ERASED_VALUES:
        raise FlashError(f"erased value 0x{value:02x} must be 0xff or 0x00", value=value)


class Flash:
    """A flash of ``size`` bytes made of ``sector_size`` sectors (see the module docstring).

    A ``backing`` given by the caller must hold erased bytes of ``erased_value`` where nothing
    was written (:class:`MemoryBacking` and :class:`FileBacking` take the value).
    """

    def __init__(
        self,
        size: int,
        sector_size: int,
        *,
        write_align: int = 8,
        erased_value: int = ERASED,
        write_mode: str = "and",
        widen_erases: bool = False,
        backing: Backing | None = None,
    ) -> None:
        if size <= 0 or sector_size <= 0 or size % sector_size:
            raise FlashError(
                f"flash size {size} is not a positive multiple of the sector size {sector_size}",
                value=size,
            )
        if write_align <= 0 or sector_size % write_align:
            raise FlashError(
                f"write alignment {write_align} must divide the sector size {sector_size}",
                value=write_align,
            )
        _check_erased_value(erased_value)
        if write_mode not in WRITE_MODES:
            raise FlashError(
                f"write mode {write_mode!r} must be one of {', '.join(WRITE_MODES)}",
                value=write_mode,
            )
        self.size = size
        self.sector_size = sector_size
        self.write_align = write_align
        self.erased_value = erased_value
        self.write_mode = write_mode
        self.widen_erases = widen_erases
        self._erased_sector = bytes([erased_value]) * sector_size
        self._backing = (
            backing if backing is not None else MemoryBacking(size, sector_size, erased_value)
        )
        self.stats = FlashStats()
        self.operations = 0  # writes and erases done since creation
        self._cut_at: int | None = None
        self._tear = False
        self._tear_half = False
        self._rng = random.Random(0)
        self._dead = False

    @classmethod
    def open_file(
        cls,
        path: str | os.PathLike[str],
        size: int,
        sector_size: int,
        *,
        write_align: int = 8,
        erased_value: int = ERASED,
        write_mode: str = "and",
        widen_erases: bool = False,
    ) -> Flash:
        """A flash kept in the file ``path`` (created erased with ``erased_value`` if missing)."""
        _check_erased_value(erased_value)
        return cls(
            size,
            sector_size,
            write_align=write_align,
            erased_value=erased_value,
            write_mode=write_mode,
            widen_erases=widen_erases,
            backing=FileBacking(path, size, erased_value),
        )

    # --- power ---------------------------------------------------------------------------------

    def cut_after(
        self, operations: int, *, tear: bool = False, seed: int = 0, tear_half: bool = False
    ) -> None:
        """Let ``operations`` more writes/erases complete, then cut the power in the next one.

        ``tear``: the interrupted operation happens in part (a random prefix, from ``seed``);
        ``tear_half``: it happens half, exactly as the MCUboot host harness's ``--torn``.
        """
        if operations < 0:
            raise FlashError(f"cannot cut after {operations} operations", value=operations)
        self._cut_at = self.operations + operations
        self._tear = tear
        self._tear_half = tear_half
        self._rng = random.Random(seed)

    def power_on(self) -> None:
        """Restore power after a cut (the contents stay as the cut left them); disarm cuts."""
        self._dead = False
        self._cut_at = None

    @property
    def powered(self) -> bool:
        return not self._dead

    def _check_power(self) -> None:
        if self._dead:
            raise PowerCut("flash accessed while the power is off")

    def _begin_operation(self) -> bool:
        """Account one operation; return True when this one is the interrupted one."""
        self._check_power()
        if self._cut_at is not None and self.operations >= self._cut_at:
            self._dead = True
            return True
        self.operations += 1
        return False

    # --- access --------------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FlashError(
                f"{what} of {length} bytes at 0x{offset:x} is outside the {self.size}-byte flash",
                value=offset,
            )

    def _sectors_of(self, offset: int, length: int) -> range:
        if length == 0:
            return range(0)
        return range(offset // self.sector_size, (offset + length - 1) // self.sector_size + 1)

    def read(self, offset: int, length: int) -> bytes:
        self._check_power()
        self._check_range(offset, length, "read")
        for index in self._sectors_of(offset, length):
            self.stats.sector(index).reads += 1
        self.stats.bytes_read += length
        return self._backing.read(offset, length)

    def _program(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` as the write mode does."""
        if self.write_mode == "and":
            old = self._backing.read(offset, len(data))
            if old.count(self.erased_value) != len(old):  # bits only move away from erased
                size = len(data)
                a, b = int.from_bytes(old, "little"), int.from_bytes(data, "little")
                data = (a & b if self.erased_value == 0xFF else a | b).to_bytes(size, "little")
        self._backing.write(offset, bytes(data))

    def write(self, offset: int, data: bytes) -> None:
        """Program ``data`` at ``offset`` (aligned); one operation."""
        self._check_range(offset, len(data), "write")
        if not data:
            self._check_power()
            return
        if offset % self.write_align or len(data) % self.write_align:
            raise FlashError(
                f"write of {len(data)} bytes at 0x{offset:x} is not aligned to "
                f"{self.write_align} bytes",
                value=offset,
            )
        interrupted = self._begin_operation()
        if interrupted:
            if self._tear_half:
                data = data[: len(data) // 2]
            elif self._tear and len(data) >= 2:
                data = data[: self._rng.randrange(1, len(data))]
            else:
                data = b""
            if not data:
                raise PowerCut(f"power cut before the write at 0x{offset:x}")
        self._program(offset, data)
        for index in self._sectors_of(offset, len(data)):
            self.stats.sector(index).writes += 1
        self.stats.bytes_written += len(data)
        if interrupted:
            raise PowerCut(f"power cut during the write at 0x{offset:x} ({len(data)} bytes done)")

    def erase(self, offset: int, length: int) -> None:
        """Erase whole sectors, one operation per sector.

        With ``widen_erases`` a range that does not start or end on a sector boundary erases
        every sector it touches; otherwise such a range is a FlashError.
        """
        self._check_range(offset, length, "erase")
        if offset % self.sector_size or length % self.sector_size:
            if not self.widen_erases or length == 0:
                raise FlashError(
                    f"erase of {length} bytes at 0x{offset:x} is not on {self.sector_size}-byte "
                    "sector boundaries",
                    value=offset,
                )
            end = offset + length
            offset -= offset % self.sector_size
            length = -(-end // self.sector_size) * self.sector_size - offset
        self._check_power()
        units = self.sector_size // self.write_align
        for index in self._sectors_of(offset, length):
            start = index * self.sector_size
            interrupted = self._begin_operation()
            size = self.sector_size
            if interrupted:
                if self._tear_half:
                    size = self.sector_size // 2
                elif self._tear and units >= 2:
                    size = self._rng.randrange(1, units) * self.write_align
                else:
                    size = 0
                if not size:
                    raise PowerCut(f"power cut before the erase of sector {index}")
            self._backing.write(start, self._erased_sector[:size])
            self.stats.sector(index).erases += 1
            if interrupted:
                raise PowerCut(f"power cut during the erase of sector {index}")

    def is_erased(self, offset: int, length: int) -> bool:
        return self.read(offset, length).count(self.erased_value) == length

    def flush(self) -> None:
        self._backing.flush()

    def close(self) -> None:
        self._backing.close()
