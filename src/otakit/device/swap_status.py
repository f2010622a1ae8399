"""The swap status record: how far an upgrade got, kept in a status area that is never swapped.

One status area per image (the PSoC 6 layout's "status" partition). Layout, with ``A`` the flash
write alignment and ``F = max(8, A)``::

    0                      progress entries: entry k at k*A, a flag byte (0x01) + erased padding
    ...
    size - F - M - F       info: u8 swap_type, 3 pad, u32 copy_size (LE), padded to F
    size - F - M           STATUS_MAGIC (16 bytes; M = 16 rounded up to A)
    size - F               done flag

An upgrade writes, in this order: erase the area; info; magic; one entry per completed step;
the done flag. The record is *in progress* only when the magic is intact and the done flag is
not set. Every field is written once onto erased flash, so a torn write of a flag either set it
or did not. Magic and done sit at the end of the area, done last: erasing the area (which
proceeds from its start) destroys the magic before the done flag, so an interrupted erase can
never make a finished record look in progress.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from otakit.device.slot import FlashArea
from otakit.errors import FlashMapError
from otakit.image.trailer import FLAG_SET, SwapType

STATUS_MAGIC = bytes.fromhex("6f74616b69742d737761702d73746174")  # "otakit-swap-stat"
_INFO = struct.Struct("<BxxxI")


@dataclass(frozen=True)
class SwapProgress:
    swap_type: SwapType
    copy_size: int
    done_steps: int  # entries written: steps completed


class SwapStatus:
    """The status record of one image, in its status area."""

    def __init__(self, area: FlashArea) -> None:
        self.area = area
        align = area.flash.write_align
        self._align = align
        field = max(8, align)
        magic_len = -(-len(STATUS_MAGIC) // align) * align
        self._done_off = area.size - field
        self._magic_off = self._done_off - magic_len
        self._info_off = self._magic_off - field
        self._field = field
        self.capacity = self._info_off // align  # progress entries that fit

    def require_capacity(self, steps: int) -> None:
        if steps > self.capacity:
            raise FlashMapError(
                f"the {self.area.area.name} area ({self.area.size} bytes) holds "
                f"{self.capacity} progress entries, the upgrade needs {steps}; make it larger",
                value=self.area.size,
            )

    def read(self) -> SwapProgress | None:
        """The upgrade in progress, or None."""
        size = self.area.size - self._info_off
        tail = self.area.read_at(self._info_off, size)
        magic = tail[self._magic_off - self._info_off : self._done_off - self._info_off]
        if magic[: len(STATUS_MAGIC)] != STATUS_MAGIC or tail[-self._field] == FLAG_SET:
            return None
        raw_type, copy_size = _INFO.unpack_from(tail, 0)
        try:
            swap_type = SwapType(raw_type)
        except ValueError:
            return None  # cannot happen: info is written before the magic
        entries = self.area.read_at(0, self.capacity * self._align)[:: self._align]
        done = next((i for i, b in enumerate(entries) if b != FLAG_SET), len(entries))
        return SwapProgress(swap_type, copy_size, done)

    def start(self, swap_type: SwapType, copy_size: int) -> None:
        # Erase, first sector to last, the sectors that are not erased already (an upgrade
        # fills only the start of a large status area): same order, less wear.
        sector = self.area.sector_size
        for offset in range(0, self.area.size, sector):
            if not self.area.flash.is_erased(self.area.area.offset + offset, sector):
                self.area.erase(offset, sector)
        erased = bytes([self.area.flash.erased_value])
        info = _INFO.pack(int(swap_type), copy_size)
        self.area.write(self._info_off, info + erased * (self._field - len(info)))
        magic = STATUS_MAGIC + erased * (self._done_off - self._magic_off - len(STATUS_MAGIC))
        self.area.write(self._magic_off, magic)

    def step_done(self, step: int) -> None:
        self.area.write(step * self._align, self.area.flag())

    def finish(self) -> None:
        self.area.write(
            self._done_off,
            self.area.flag() + bytes([self.area.flash.erased_value]) * (self._field - self._align),
        )
