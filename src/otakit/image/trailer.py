"""The MCUboot image trailer at the end of a slot.

Layout for a slot whose trailer uses ``max_align`` = 8 (MCUboot's default; imgtool ``--pad``),
counted back from the end of the slot::

    end - 16          boot magic (16 bytes)
    end - 24          image_ok   (1 byte used, padded to max_align)
    end - 32          copy_done
    end - 40          swap_info  ((image_index << 4) | swap_type)
    end - 48          swap_size  (u32, used while swapping)
    before that       swap status: max_sectors * 3 * write_align bytes (not for overwrite-only)

A flag byte is set when it reads 0x01; erased flash reads 0xFF.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

BOOT_MAGIC = bytes.fromhex("77c295f360d2ef7f3552500f2cb67980")
BOOT_MAGIC_SIZE = len(BOOT_MAGIC)
MAX_ALIGN = 8
DEFAULT_MAX_SECTORS = 128
FLAG_SET = 0x01
ERASED = 0xFF

# Offsets of each field counted back from the end of the slot (max_align = 8).
MAGIC_OFF = BOOT_MAGIC_SIZE
IMAGE_OK_OFF = MAGIC_OFF + MAX_ALIGN
COPY_DONE_OFF = IMAGE_OK_OFF + MAX_ALIGN
SWAP_INFO_OFF = COPY_DONE_OFF + MAX_ALIGN
SWAP_SIZE_OFF = SWAP_INFO_OFF + MAX_ALIGN
# The fixed part of the trailer: magic plus the four aligned fields.
TRAILER_FIXED_SIZE = SWAP_SIZE_OFF

VALID_WRITE_ALIGNS = (1, 2, 4, 8, 16, 32)


class SwapType(IntEnum):
    """swap_info low nibble."""

    NONE = 1
    TEST = 2
    PERM = 3
    REVERT = 4


def trailer_size(
    write_align: int = 8, max_sectors: int = DEFAULT_MAX_SECTORS, *, overwrite_only: bool = False
) -> int:
    """Bytes imgtool reserves for the trailer at the end of a slot (``_trailer_size``)."""
    if overwrite_only:
        return MAX_ALIGN * 2 + BOOT_MAGIC_SIZE
    return max_sectors * 3 * write_align + MAX_ALIGN * 4 + BOOT_MAGIC_SIZE


@dataclass(frozen=True)
class TrailerState:
    """What the fixed part of a trailer says."""

    magic: bool
    image_ok: bool
    copy_done: bool
    swap_info: int | None  # None when erased

    @property
    def swap_type(self) -> SwapType | None:
        if self.swap_info is None:
            return None
        try:
            return SwapType(self.swap_info & 0x0F)
        except ValueError:
            return None

    @property
    def request(self) -> str:
        """The update request an image with this trailer makes: none, test or permanent."""
        if not self.magic:
            return "none"
        return "permanent" if self.image_ok else "test"

    @classmethod
    def read(cls, tail: bytes) -> TrailerState:
        """Decode the last ``TRAILER_FIXED_SIZE`` (or more) bytes of a slot."""
        if len(tail) < TRAILER_FIXED_SIZE:
            return cls(magic=False, image_ok=False, copy_done=False, swap_info=None)
        end = len(tail)
        swap_info = tail[end - SWAP_INFO_OFF]
        return cls(
            magic=tail[end - MAGIC_OFF :] == BOOT_MAGIC,
            image_ok=tail[end - IMAGE_OK_OFF] == FLAG_SET,
            copy_done=tail[end - COPY_DONE_OFF] == FLAG_SET,
            swap_info=None if swap_info == ERASED else swap_info,
        )
