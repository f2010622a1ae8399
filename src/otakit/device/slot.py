"""A flash area seen on its own (offsets from its start): a slot, the scratch area, a status
partition.

:class:`FlashArea` is a :class:`~otakit.image.source.ByteSource`, so an image is verified
straight from flash, chunk by chunk. Trailers are read and written only through the bootloader
mode's trailer store (:mod:`otakit.device.boot_status`): where they live depends on the mode
(the end of the slot, or swap-status's partition).
"""

from __future__ import annotations

from otakit.device.flash import Flash
from otakit.device.flashmap import Area
from otakit.errors import FlashError


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


class Slot(FlashArea):
    """A primary or secondary slot."""
