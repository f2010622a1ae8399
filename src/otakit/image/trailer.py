"""The MCUboot image trailer at the end of a slot.

Every field is written at a multiple of ``max_align`` (MCUboot's ``BOOT_MAX_ALIGN``, imgtool
``--max-align``; by default the larger of 8 and the write alignment ``--align``), counted back
from the end of the slot (``bootutil_misc.h``; imgtool ``Image.pad_to``)::

    end - 16                              boot magic (16 bytes)
    end - M                               start of the magic's area, M = align_up(16, max_align)
    end - M - max_align                   image_ok   (1 byte used, padded to max_align)
    end - M - 2 * max_align               copy_done
    end - M - 3 * max_align               swap_info  ((image_index << 4) | swap_type)
    end - M - 4 * max_align               swap_size  (u32, used while swapping)
    before that                           encryption keys (encrypted images only), then the
                                          swap status: max_sectors * 3 * write_align bytes
                                          (not for overwrite-only)

With ``max_align`` = 8 (MCUboot's default) that is magic at end - 16, image_ok at end - 24,
copy_done at end - 32, swap_info at end - 40. The magic itself depends on ``max_align``
(``bootutil_public.c`` ``boot_img_magic``): for 8 it is :data:`BOOT_MAGIC`; otherwise it is
``max_align`` as a little-endian u16 followed by the 14 bytes of :data:`BOOT_MAGIC_ALIGNED_TAIL`,
so a reader learns ``max_align`` from the magic (as imgtool ``dumpinfo`` does).

A flag byte is set when it reads 0x01; erased flash reads the flash's erased value (0xFF on
most NOR parts, 0x00 on PSoC 6 internal flash), and MCUboot pads every field with that value.

How much room the trailer takes depends on the upgrade strategy (``boot_trailer_sz()`` in
``bootutil_area.c``): the swap status holds ``max_sectors`` entries of ``N * write_align``
bytes, N = 3 for overwrite, swap-scratch and swap-move, 2 for swap-offset (which also keeps one
more ``max_align`` field, the unprotected TLV sizes). swap-status (Infineon's ``cypress``
branch) keeps all of it in a separate status partition, whose size is
:func:`swap_status_area_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from otakit.image.source import ByteSource

BOOT_MAGIC = bytes.fromhex("77c295f360d2ef7f3552500f2cb67980")
BOOT_MAGIC_SIZE = len(BOOT_MAGIC)
# The magic after the u16 max_align when max_align is not 8.
BOOT_MAGIC_ALIGNED_TAIL = bytes.fromhex("2de15d29410b8d77679c110f1f8a")
MAX_ALIGN = 8  # MCUboot's default BOOT_MAX_ALIGN
DEFAULT_MAX_SECTORS = 128
FLAG_SET = 0x01
ERASED = 0xFF

VALID_WRITE_ALIGNS = (1, 2, 4, 8, 16, 32)  # imgtool --align choices
# imgtool --max-align choices; MCUboot's swap modes accept 8 to 32 (bootutil_public.h).
VALID_MAX_ALIGNS = (8, 16, 32)
# Flash write sizes a flash map may have: powers of two up to a PSoC 6 row.
FLASH_WRITE_ALIGNS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# Strategy names (the values of otakit.device.flashmap.Strategy, which is a StrEnum).
OVERWRITE = "overwrite"
SWAP_SCRATCH = "swap-scratch"
SWAP_MOVE = "swap-move"
SWAP_OFFSET = "swap-offset"
SWAP_STATUS = "swap-status"
STRATEGIES = (OVERWRITE, SWAP_SCRATCH, SWAP_MOVE, SWAP_OFFSET, SWAP_STATUS)

# swap-status (cypress branch swap_status.h) as MCUBootApp builds it for PSoC 6: MEMORY_ALIGN.
SWAP_STATUS_ROW_SIZE = 0x200
SWAP_STATUS_RECORD_OVERHEAD = 12  # per row: record magic, counter and CRC, 4 bytes each
SWAP_STATUS_TRAILER_BYTES = 64  # BOOT_SWAP_STATUS_TRAILER_SIZE
SWAP_STATUS_COPIES = 2  # BOOT_SWAP_STATUS_MULT
SWAP_STATUS_MAX_SECTORS = 64  # BOOT_MAX_SWAP_STATUS_SECTORS: sectors of the status partition


def align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def default_max_align(write_align: int) -> int:
    """imgtool's ``max_align`` when ``--max-align`` is not given: ``max(8, --align)``."""
    return max(MAX_ALIGN, write_align)


def boot_magic(max_align: int = MAX_ALIGN) -> bytes:
    """The 16-byte trailer magic a bootloader built with ``BOOT_MAX_ALIGN = max_align`` expects."""
    if max_align == MAX_ALIGN:
        return BOOT_MAGIC
    return max_align.to_bytes(2, "little") + BOOT_MAGIC_ALIGNED_TAIL


@dataclass(frozen=True)
class TrailerLayout:
    """Where the fixed trailer fields sit for one ``max_align``: offsets counted back from the
    end of the slot (``slot_size - offset`` is the field's position)."""

    max_align: int = MAX_ALIGN

    def __post_init__(self) -> None:
        if self.max_align not in VALID_MAX_ALIGNS:
            raise ValueError(
                f"max_align {self.max_align} is not one of {', '.join(map(str, VALID_MAX_ALIGNS))}"
            )

    @classmethod
    def from_magic(cls, magic: bytes) -> TrailerLayout | None:
        """The layout whose magic ``magic`` (the last 16 bytes of a slot) is; None if none is."""
        if magic == BOOT_MAGIC:
            return cls(MAX_ALIGN)
        if len(magic) == BOOT_MAGIC_SIZE and magic[2:] == BOOT_MAGIC_ALIGNED_TAIL:
            align = int.from_bytes(magic[:2], "little")
            if align in VALID_MAX_ALIGNS and align != MAX_ALIGN:
                return cls(align)
        return None

    @property
    def magic(self) -> bytes:
        return boot_magic(self.max_align)

    @property
    def magic_area(self) -> int:
        """Bytes the magic occupies, padded to ``max_align`` (``BOOT_MAGIC_ALIGN_SIZE``)."""
        return align_up(BOOT_MAGIC_SIZE, self.max_align)

    @property
    def magic_off(self) -> int:
        return BOOT_MAGIC_SIZE

    @property
    def image_ok_off(self) -> int:
        return self.magic_area + self.max_align

    @property
    def copy_done_off(self) -> int:
        return self.image_ok_off + self.max_align

    @property
    def swap_info_off(self) -> int:
        return self.copy_done_off + self.max_align

    @property
    def swap_size_off(self) -> int:
        return self.swap_info_off + self.max_align

    @property
    def fixed_size(self) -> int:
        """The fixed part of the trailer: magic plus the four aligned fields."""
        return self.swap_size_off

    def flag(self, value: int = FLAG_SET, erased_value: int = ERASED) -> bytes:
        """A flag as imgtool and MCUboot write it: ``value`` then erased bytes up to
        ``max_align``."""
        return bytes([value]) + bytes([erased_value]) * (self.max_align - 1)


DEFAULT_LAYOUT = TrailerLayout(MAX_ALIGN)
# Offsets of each field counted back from the end of the slot for max_align = 8, the layout the
# device simulator's bootloader uses.
MAGIC_OFF = DEFAULT_LAYOUT.magic_off
IMAGE_OK_OFF = DEFAULT_LAYOUT.image_ok_off
COPY_DONE_OFF = DEFAULT_LAYOUT.copy_done_off
SWAP_INFO_OFF = DEFAULT_LAYOUT.swap_info_off
SWAP_SIZE_OFF = DEFAULT_LAYOUT.swap_size_off
TRAILER_FIXED_SIZE = DEFAULT_LAYOUT.fixed_size


class SwapType(IntEnum):
    """swap_info low nibble."""

    NONE = 1
    TEST = 2
    PERM = 3
    REVERT = 4


def status_entry_states(strategy: str = SWAP_SCRATCH) -> int:
    """Status writes per sector (``BOOT_STATUS_STATE_COUNT``): 2 for swap-offset, else 3."""
    _check_strategy(strategy)
    return 2 if strategy == SWAP_OFFSET else 3


def trailer_info_size(max_align: int = MAX_ALIGN, strategy: str = SWAP_SCRATCH) -> int:
    """The trailer without the swap status (``boot_trailer_info_sz()``, no encryption): swap_size,
    swap_info, copy_done, image_ok, (swap-offset: the unprotected TLV sizes) and the magic."""
    _check_strategy(strategy)
    fields = 5 if strategy == SWAP_OFFSET else 4
    return fields * max_align + align_up(BOOT_MAGIC_SIZE, max_align)


def boot_trailer_sz(
    write_align: int, max_sectors: int, *, strategy: str = SWAP_SCRATCH, max_align: int = MAX_ALIGN
) -> int:
    """MCUboot's ``boot_trailer_sz(write_align)`` for ``strategy`` built with
    ``MCUBOOT_MAX_IMG_SECTORS = max_sectors`` and ``BOOT_MAX_ALIGN = max_align``. For
    swap-status this is the size of the trailer record the status partition stores per slot."""
    status = max_sectors * status_entry_states(strategy) * write_align
    return status + trailer_info_size(max_align, strategy)


def scratch_trailer_size(write_align: int, *, max_align: int = MAX_ALIGN) -> int:
    """``boot_scratch_trailer_sz()``: the trailer swap-scratch keeps in the scratch area."""
    return status_entry_states(SWAP_SCRATCH) * write_align + trailer_info_size(max_align)


def trailer_size(
    write_align: int = 8,
    max_sectors: int = DEFAULT_MAX_SECTORS,
    *,
    strategy: str = SWAP_SCRATCH,
    overwrite_only: bool = False,
    max_align: int | None = None,
) -> int:
    """Bytes at the end of each slot that belong to the trailer, for an image that is not
    encrypted. ``max_align`` defaults to imgtool's ``max(8, write_align)``.

    With ``overwrite_only`` this is what imgtool ``--overwrite-only`` reserves (magic, image_ok
    and copy_done); otherwise MCUboot's ``boot_trailer_sz()`` for ``strategy`` (what imgtool
    reserves for the swap strategies too, except that imgtool does not know swap-offset's extra
    field), and 0 for swap-status, which keeps its trailers in the status partition.
    """
    _check_strategy(strategy)
    if strategy == SWAP_STATUS and not overwrite_only:
        return 0
    layout = TrailerLayout(default_max_align(write_align) if max_align is None else max_align)
    if overwrite_only:
        return layout.max_align * 2 + layout.magic_area
    return boot_trailer_sz(write_align, max_sectors, strategy=strategy, max_align=layout.max_align)


def swap_status_rows(max_sectors: int, row_size: int = SWAP_STATUS_ROW_SIZE) -> int:
    """Rows one copy of one slot's status record takes in the swap status partition
    (``BOOT_SWAP_STATUS_SECT_ROWS_NUM + BOOT_SWAP_STATUS_TRAIL_ROWS_NUM``)."""
    payload = row_size - SWAP_STATUS_RECORD_OVERHEAD
    return -(-max_sectors // payload) + -(-SWAP_STATUS_TRAILER_BYTES // payload)


def swap_status_slot_size(max_sectors: int, row_size: int = SWAP_STATUS_ROW_SIZE) -> int:
    """Bytes of the status partition per area (``BOOT_SWAP_STATUS_SIZE``: two copies)."""
    return SWAP_STATUS_COPIES * swap_status_rows(max_sectors, row_size) * row_size


def swap_status_area_size(
    max_sectors: int, images: int = 1, row_size: int = SWAP_STATUS_ROW_SIZE
) -> int:
    """The smallest swap status partition for ``images`` images: one record set per primary
    and secondary slot and one for the scratch area (``swap_status_init_offset``)."""
    return (2 * images + 1) * swap_status_slot_size(max_sectors, row_size)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


@dataclass(frozen=True)
class TrailerState:
    """What the fixed part of a trailer says."""

    magic: bool
    image_ok: bool
    copy_done: bool
    swap_info: int | None  # None when erased
    max_align: int = MAX_ALIGN  # the layout the fields were read with

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
    def read(
        cls, tail: bytes, max_align: int = MAX_ALIGN, erased_value: int = ERASED
    ) -> TrailerState:
        """Decode the last ``fixed_size`` (or more) bytes of a slot as a bootloader built with
        ``BOOT_MAX_ALIGN = max_align`` does: the magic must be that build's magic; a swap_info
        byte holding ``erased_value`` is unset."""
        layout = TrailerLayout(max_align)
        if len(tail) < layout.fixed_size:
            return cls(False, False, False, None, max_align)
        end = len(tail)
        swap_info = tail[end - layout.swap_info_off]
        return cls(
            magic=tail[end - layout.magic_off :] == layout.magic,
            image_ok=tail[end - layout.image_ok_off] == FLAG_SET,
            copy_done=tail[end - layout.copy_done_off] == FLAG_SET,
            swap_info=None if swap_info == erased_value else swap_info,
            max_align=max_align,
        )


def read_slot_trailer(source: ByteSource, *, image_end: int) -> TrailerState | None:
    """The trailer at the end of ``source`` (a padded image or a whole slot), with ``max_align``
    taken from its magic as imgtool ``dumpinfo`` does; a slot whose magic is not recognised is
    read with the default layout (and says ``magic=False``).

    Returns None when the bytes after ``image_end`` (where the image's TLVs end) cannot hold a
    trailer: the image is not padded to a slot.
    """
    size = source.size
    if size < image_end + BOOT_MAGIC_SIZE:
        return None
    layout = TrailerLayout.from_magic(source.read_at(size - BOOT_MAGIC_SIZE, BOOT_MAGIC_SIZE))
    if layout is None:
        layout = DEFAULT_LAYOUT
    if size < image_end + layout.fixed_size:
        return None
    return TrailerState.read(
        source.read_at(size - layout.fixed_size, layout.fixed_size), layout.max_align
    )
