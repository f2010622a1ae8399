"""A flash area seen on its own (offsets from its start), and the MCUboot trailer of a slot.

:class:`FlashArea` is a :class:`~otakit.image.source.ByteSource`, so an image is verified
straight from flash, chunk by chunk. :class:`Slot` adds the trailer fields of
:mod:`otakit.image.trailer`: boot magic, image_ok, copy_done and swap_info, written as a single
flag byte padded with erased bytes to the flash write alignment.
"""

from __future__ import annotations

from otakit.device.flash import Flash
from otakit.device.flashmap import Area
from otakit.errors import FlashError
from otakit.image.trailer import (
    BOOT_MAGIC,
    COPY_DONE_OFF,
    FLAG_SET,
    IMAGE_OK_OFF,
    MAGIC_OFF,
    SWAP_INFO_OFF,
    TRAILER_FIXED_SIZE,
    SwapType,
    TrailerState,
)


class FlashArea:
    """``size`` bytes of a flash starting at ``offset``."""

    def __init__(self, flash: Flash, area: Area) -> None:
        self.flash = flash
        self.area = area

    @property
    def size(self) -> int:
        return self.area.size

    @property
    def sector_size(self) -> int:
        return self.flash.sector_size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.area.size:
            raise FlashError(
                f"access of {length} bytes at 0x{offset:x} is outside the "
                f"{self.area.size}-byte {self.area.name} area",
                value=offset,
            )

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.area.size - offset))
        self._check(offset, length)
        return self.flash.read(self.area.offset + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.flash.write(self.area.offset + offset, data)

    def erase(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.flash.erase(self.area.offset + offset, length)

    def erase_all(self) -> None:
        self.erase(0, self.area.size)

    def sector_range(self, start: int, end: int) -> tuple[int, int]:
        """``[start, end)`` widened to whole sectors."""
        s = self.sector_size
        return start // s * s, min(self.area.size, -(-end // s) * s)

    def flag(self) -> bytes:
        """A set flag, padded to the write alignment."""
        return bytes([FLAG_SET]) + bytes([self.flash.erased_value]) * (self.flash.write_align - 1)


class Slot(FlashArea):
    """A primary or secondary slot with its trailer at the end."""

    def trailer(self) -> TrailerState:
        return TrailerState.read(self.read_at(self.size - TRAILER_FIXED_SIZE, TRAILER_FIXED_SIZE))

    def _write_flag_at(self, offset_from_end: int, value: int = FLAG_SET) -> None:
        data = bytearray(self.flag())
        data[0] = value
        self.write(self.size - offset_from_end, bytes(data))

    def write_magic(self) -> None:
        self.write(self.size - MAGIC_OFF, BOOT_MAGIC)

    def write_image_ok(self) -> None:
        self._write_flag_at(IMAGE_OK_OFF)

    def write_copy_done(self) -> None:
        self._write_flag_at(COPY_DONE_OFF)

    def write_swap_info(self, image: int, swap_type: SwapType) -> None:
        self._write_flag_at(SWAP_INFO_OFF, (image << 4) | int(swap_type))

    def erase_trailer(self, trailer_size: int) -> None:
        """Erase the sectors holding the trailer (and whatever image bytes share them)."""
        start, end = self.sector_range(self.size - trailer_size, self.size)
        self.erase(start, end - start)
