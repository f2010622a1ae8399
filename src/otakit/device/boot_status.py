"""MCUboot's swap bookkeeping: the boot status of an upgrade in progress and the image trailers.

This is a port of what ``bootutil_public.c``, ``bootutil_misc.c``/``bootutil_misc.h`` and
``swap_misc.c`` do with trailers, kept apart from the loader so that every mode shares it:

- :class:`BootStatus` is ``struct boot_status``: where an interrupted swap stopped
  (``idx``/``state``/``op``), its ``swap_type`` and ``swap_size``, and where the status was
  found (``source``).
- :class:`SwapState` is ``struct boot_swap_state``: magic, swap_type, image number, copy_done
  and image_ok as decoded from one trailer (``boot_read_swap_state``).
- :class:`TrailerStore` is the single way any code reads or writes a trailer field or a swap
  status entry. :class:`SlotTrailerStore` keeps them at the end of each area as upstream
  MCUboot does; the swap-status mode (Infineon) supplies a store that keeps them in its status
  partition instead. Areas are named by :class:`AreaRef` (primary, secondary or scratch of one
  image), never by offset, so a store is free to put the bytes anywhere.
- :func:`swap_type_from_states` is ``boot_swap_type_multi``'s decision table.

Numbers are MCUboot's own (``BOOT_MAGIC_GOOD`` = 1, ``BOOT_FLAG_SET`` = 1, ...), so the values
can be compared one to one with the C code and with what the harness logs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from otakit.device.slot import FlashArea
from otakit.image.trailer import BOOT_MAGIC_SIZE, align_up, boot_magic

# --- MCUboot constants -------------------------------------------------------------------------

BOOT_MAX_ALIGN = 8  # MCUBOOT_BOOT_MAX_ALIGN of the harness build
BOOT_MAGIC_SZ = BOOT_MAGIC_SIZE
BOOT_STATUS_IDX_0 = 1
BOOT_STATUS_STATE_0 = 1
BOOT_STATUS_STATE_1 = 2
BOOT_STATUS_STATE_2 = 3
BOOT_FLAG_SET_VALUE = 0x01  # what a set flag stores (BOOT_FLAG_SET is also 1)


class Magic(IntEnum):
    """``BOOT_MAGIC_*``: a decoded trailer magic (ANY and NOTGOOD only appear in tables)."""

    GOOD = 1
    BAD = 2
    UNSET = 3
    ANY = 4
    NOTGOOD = 5


class Flag(IntEnum):
    """``BOOT_FLAG_*``: a decoded trailer flag (ANY only appears in tables)."""

    SET = 1
    BAD = 2
    UNSET = 3
    ANY = 4


class BootSwapType(IntEnum):
    """``BOOT_SWAP_TYPE_*`` (values 1-4 equal :class:`otakit.image.trailer.SwapType`)."""

    NONE = 1
    TEST = 2
    PERM = 3
    REVERT = 4
    FAIL = 5
    PANIC = 0xFF


def is_upgrade(swap_type: int) -> bool:
    """``BOOT_IS_UPGRADE``."""
    return swap_type in (BootSwapType.TEST, BootSwapType.REVERT, BootSwapType.PERM)


class StatusSource(IntEnum):
    """``BOOT_STATUS_SOURCE_*``: where :meth:`SwapMode.read_status` found a swap status."""

    NONE = 0
    SCRATCH = 1
    PRIMARY_SLOT = 2


class StatusOp(IntEnum):
    """``BOOT_STATUS_OP_*`` as swap-move numbers them (MOVE = 1, SWAP = 2). swap-offset has only
    a SWAP op, numbered 1 there: a mode says which value ``boot_status_reset`` stores through
    :attr:`otakit.device.swap_mode.SwapMode.reset_op`."""

    MOVE = 1
    SWAP = 2


class AreaKind(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"
    SCRATCH = "scratch"


@dataclass(frozen=True)
class AreaRef:
    """One flash area as MCUboot's flash_area ids name it: the primary or secondary slot of an
    image, or the scratch area (``image`` is then the image being swapped, which matters only
    to stores that keep per-image records)."""

    kind: AreaKind
    image: int = 0

    @classmethod
    def primary(cls, image: int = 0) -> AreaRef:
        return cls(AreaKind.PRIMARY, image)

    @classmethod
    def secondary(cls, image: int = 0) -> AreaRef:
        return cls(AreaKind.SECONDARY, image)

    @classmethod
    def scratch(cls, image: int = 0) -> AreaRef:
        return cls(AreaKind.SCRATCH, image)

    @property
    def is_scratch(self) -> bool:
        return self.kind is AreaKind.SCRATCH


@dataclass
class BootStatus:
    """``struct boot_status`` (without the encryption keys).

    ``idx`` counts swap operations from :data:`BOOT_STATUS_IDX_0` (1), ``state`` the step
    inside one (1..3 for swap-scratch, see :data:`BOOT_STATUS_STATE_0`), ``op`` is swap-move's
    and swap-offset's phase. ``use_scratch`` is swap-scratch's in-memory flag (never stored):
    status entries currently go to the scratch trailer.
    """

    idx: int = BOOT_STATUS_IDX_0
    state: int = BOOT_STATUS_STATE_0
    op: int = StatusOp.MOVE
    swap_type: int = BootSwapType.NONE
    swap_size: int = 0
    source: int = StatusSource.NONE
    use_scratch: bool = False
    extra: dict[str, int] = field(default_factory=dict)  # room for a mode's own fields

    def reset(self, op: int = StatusOp.MOVE) -> None:
        """``boot_status_reset``; ``op`` is the mode's reset op (:attr:`SwapMode.reset_op`)."""
        self.use_scratch = False
        self.swap_size = 0
        self.source = StatusSource.NONE
        self.op = op
        self.idx = BOOT_STATUS_IDX_0
        self.state = BOOT_STATUS_STATE_0
        self.swap_type = BootSwapType.NONE
        self.extra.clear()

    def is_reset(self, op: int = StatusOp.MOVE) -> bool:
        """``boot_status_is_reset``."""
        return self.op == op and self.idx == BOOT_STATUS_IDX_0 and self.state == BOOT_STATUS_STATE_0


@dataclass(frozen=True)
class SwapState:
    """``struct boot_swap_state``: one trailer decoded by ``boot_read_swap_state``."""

    magic: Magic
    swap_type: int  # BootSwapType value; NONE when erased or > REVERT
    image_num: int
    copy_done: Flag
    image_ok: Flag


# --- the swap decision table (bootutil_public.c boot_swap_tables) ------------------------------


@dataclass(frozen=True)
class _SwapRow:
    magic_primary: Magic
    magic_secondary: Magic
    image_ok_primary: Flag
    image_ok_secondary: Flag
    copy_done_primary: Flag
    copy_done_secondary: Flag
    swap_type: BootSwapType


_A, _G = Magic.ANY, Magic.GOOD
_FA, _FS, _FU = Flag.ANY, Flag.SET, Flag.UNSET
_ROWS_OFFSET = (_SwapRow(_A, _G, _FA, _FU, _FA, _FS, BootSwapType.REVERT),)
_ROWS = (
    _SwapRow(_A, _G, _FA, _FU, _FA, _FA, BootSwapType.TEST),
    _SwapRow(_A, _G, _FA, _FS, _FA, _FA, BootSwapType.PERM),
    _SwapRow(_G, _A, _FU, _FA, _FS, _FA, BootSwapType.REVERT),
)


def magic_compatible(table: Magic, value: Magic) -> bool:
    """``boot_magic_compatible_check``."""
    if table is Magic.ANY:
        return True
    if table is Magic.NOTGOOD:
        return value is not Magic.GOOD
    return table is value


def swap_type_from_states(
    primary: SwapState, secondary: SwapState, *, swap_offset: bool = False
) -> BootSwapType:
    """``boot_swap_type_multi`` on two decoded trailers (``swap_offset`` adds its first row
    and compares the secondary's copy_done)."""
    rows = _ROWS_OFFSET + _ROWS if swap_offset else _ROWS
    for row in rows:
        if (
            magic_compatible(row.magic_primary, primary.magic)
            and magic_compatible(row.magic_secondary, secondary.magic)
            and row.image_ok_primary in (Flag.ANY, primary.image_ok)
            and row.image_ok_secondary in (Flag.ANY, secondary.image_ok)
            and row.copy_done_primary in (Flag.ANY, primary.copy_done)
            and (not swap_offset or row.copy_done_secondary in (Flag.ANY, secondary.copy_done))
        ):
            return row.swap_type
    return BootSwapType.NONE


# --- trailer geometry (bootutil_area.c, bootutil_misc.h) ---------------------------------------


@dataclass(frozen=True)
class TrailerGeometry:
    """Sizes of the trailer for one build: ``write_sz`` is BOOT_WRITE_SZ (the flash write
    alignment), ``max_sectors`` MCUBOOT_MAX_IMG_SECTORS, ``state_count``
    BOOT_STATUS_STATE_COUNT (3 scratch/move, 2 offset, 0 for overwrite-only trailers that
    still reserve the entries: overwrite uses 3 as swap-scratch does), ``tlv_sizes`` whether
    the trailer has swap-offset's unprotected-TLV-sizes field."""

    write_sz: int
    max_sectors: int
    state_count: int = 3
    tlv_sizes: bool = False
    max_align: int = BOOT_MAX_ALIGN

    @property
    def magic_align_size(self) -> int:
        """BOOT_MAGIC_ALIGN_SIZE."""
        return align_up(BOOT_MAGIC_SZ, self.max_align)

    @property
    def info_sz(self) -> int:
        """``boot_trailer_info_sz``."""
        extra = self.max_align if self.tlv_sizes else 0
        return self.max_align * 4 + extra + self.magic_align_size

    def entry_sz(self, write_sz: int | None = None) -> int:
        """``boot_status_entry_sz``."""
        return self.state_count * (self.write_sz if write_sz is None else write_sz)

    def status_sz(self, write_sz: int | None = None) -> int:
        """``boot_status_sz``."""
        return self.max_sectors * self.entry_sz(write_sz)

    def trailer_sz(self, write_sz: int | None = None) -> int:
        """``boot_trailer_sz``."""
        return self.status_sz(write_sz) + self.info_sz

    def scratch_trailer_sz(self, write_sz: int | None = None) -> int:
        """``boot_scratch_trailer_sz``."""
        return self.entry_sz(write_sz) + self.info_sz

    # offsets of the fields in an area of ``size`` bytes (bootutil_misc.h)
    def magic_off(self, size: int) -> int:
        return size - BOOT_MAGIC_SZ

    def image_ok_off(self, size: int) -> int:
        ma = self.max_align
        return (self.magic_off(size) - ma) // ma * ma

    def copy_done_off(self, size: int) -> int:
        return self.image_ok_off(size) - self.max_align

    def swap_info_off(self, size: int) -> int:
        return self.copy_done_off(size) - self.max_align

    def unprotected_tlv_sizes_off(self, size: int) -> int:
        return self.swap_info_off(size) - self.max_align

    def swap_size_off(self, size: int) -> int:
        if self.tlv_sizes:
            return self.unprotected_tlv_sizes_off(size) - self.max_align
        return self.swap_info_off(size) - self.max_align


# --- the trailer store -------------------------------------------------------------------------


class TrailerStore(ABC):
    """Every read and write of a trailer field or a swap status entry goes through here.

    One method per MCUboot function; each must do exactly the flash operations the C function
    does (same offsets, same lengths, padding with the flash's erased value), so that the
    operation counts match MCUboot's. ``area`` names the area whose trailer is meant.
    """

    @abstractmethod
    def read_swap_state(self, area: AreaRef) -> SwapState:
        """``boot_read_swap_state``: decode magic (erased -> UNSET, MCUboot's magic -> GOOD,
        else BAD), swap_info (erased or type > REVERT -> NONE, image 0), copy_done and image_ok
        (erased -> UNSET, 0x01 -> SET, else BAD). Reads only."""

    @abstractmethod
    def magic_good(self, area: AreaRef) -> bool:
        """Whether the area's trailer holds a good magic (``boot_find_status``'s test)."""

    @abstractmethod
    def write_magic(self, area: AreaRef) -> None:
        """``boot_write_magic``: one write of BOOT_MAGIC_ALIGN_SIZE bytes (erased padding,
        then the magic) at ``ALIGN_DOWN(magic_off, BOOT_MAX_ALIGN)``."""

    @abstractmethod
    def write_image_ok(self, area: AreaRef) -> None:
        """``boot_write_image_ok``: ``boot_write_trailer_flag`` at image_ok_off."""

    @abstractmethod
    def write_copy_done(self, area: AreaRef) -> None:
        """``boot_write_copy_done``: ``boot_write_trailer_flag`` at copy_done_off."""

    @abstractmethod
    def write_swap_info(self, area: AreaRef, swap_type: int, image_num: int) -> None:
        """``boot_write_swap_info``: one byte ``(image_num << 4) | swap_type`` written with
        ``boot_write_trailer`` (padded with erased bytes to the write alignment)."""

    @abstractmethod
    def write_swap_size(self, area: AreaRef, swap_size: int) -> None:
        """``boot_write_swap_size``: the u32 (little-endian) written with ``boot_write_trailer``."""

    @abstractmethod
    def read_swap_size(self, area: AreaRef) -> int:
        """``boot_read_swap_size``: the u32 at swap_size_off (no erased check)."""

    @abstractmethod
    def read_swap_info_raw(self, area: AreaRef) -> int | None:
        """The swap_info byte as ``swap_read_status`` reads it; None when it is erased."""

    def write_unprotected_tlv_sizes(self, area: AreaRef, primary: int, secondary: int) -> None:
        """``boot_write_unprotected_tlv_sizes`` (swap-offset only)."""
        raise NotImplementedError("this trailer store has no unprotected TLV sizes field")

    def read_unprotected_tlv_sizes(self, area: AreaRef) -> tuple[int, int]:
        """``boot_read_unprotected_tlv_sizes`` (swap-offset only): (primary, secondary)."""
        raise NotImplementedError("this trailer store has no unprotected TLV sizes field")

    @abstractmethod
    def status_entries(self, area: AreaRef) -> int:
        """``boot_status_entries``: how many status entries the area holds."""

    @abstractmethod
    def status_entry_erased(self, area: AreaRef, index: int) -> bool:
        """Whether status entry ``index`` is erased (``swap_read_status_bytes`` reads one byte at
        ``boot_status_off + index * BOOT_WRITE_SZ``)."""

    @abstractmethod
    def write_status(self, area: AreaRef, internal_off: int, state: int) -> None:
        """``boot_write_status``: one write of the flash's write alignment at
        ``boot_status_off(area) + internal_off``: ``state`` then erased bytes."""


class SlotTrailerStore(TrailerStore):
    """Upstream MCUboot: each area's trailer lives at its own end (``bootutil_misc.h``)."""

    def __init__(
        self, areas: dict[AreaKind, FlashArea], geometry: TrailerGeometry, image: int = 0
    ) -> None:
        self.areas = areas
        self.geometry = geometry
        self.image = image

    def area(self, ref: AreaRef) -> FlashArea:
        return self.areas[ref.kind]

    def _erased(self, fa: FlashArea) -> int:
        return fa.flash.erased_value

    def _read_flag(self, fa: FlashArea, off: int) -> Flag:
        byte = fa.read_at(off, 1)[0]
        if byte == self._erased(fa):
            return Flag.UNSET
        return Flag.SET if byte == BOOT_FLAG_SET_VALUE else Flag.BAD

    def read_swap_state(self, area: AreaRef) -> SwapState:
        fa = self.area(area)
        g, size = self.geometry, fa.size
        magic_bytes = fa.read_at(g.magic_off(size), BOOT_MAGIC_SZ)
        erased = self._erased(fa)
        if magic_bytes == bytes([erased]) * BOOT_MAGIC_SZ:
            magic = Magic.UNSET
        elif magic_bytes == boot_magic(g.max_align):
            magic = Magic.GOOD
        else:
            magic = Magic.BAD
        info = fa.read_at(g.swap_info_off(size), 1)[0]
        swap_type, image_num = info & 0x0F, info >> 4
        if info == erased or swap_type > BootSwapType.REVERT:
            swap_type, image_num = BootSwapType.NONE, 0
        copy_done = self._read_flag(fa, g.copy_done_off(size))
        image_ok = self._read_flag(fa, g.image_ok_off(size))
        return SwapState(magic, swap_type, image_num, copy_done, image_ok)

    def magic_good(self, area: AreaRef) -> bool:
        fa = self.area(area)
        off = self.geometry.magic_off(fa.size)
        return fa.read_at(off, BOOT_MAGIC_SZ) == boot_magic(self.geometry.max_align)

    def write_magic(self, area: AreaRef) -> None:
        fa = self.area(area)
        g = self.geometry
        off = g.magic_off(fa.size)
        pad_off = off // g.max_align * g.max_align
        size = g.magic_align_size
        data = bytes([self._erased(fa)]) * (size - BOOT_MAGIC_SZ) + boot_magic(g.max_align)
        fa.write(pad_off, data)

    def _write_trailer(self, fa: FlashArea, off: int, data: bytes) -> None:
        """``boot_write_trailer``."""
        length = align_up(len(data), fa.flash.write_align)
        fa.write(off, data + bytes([self._erased(fa)]) * (length - len(data)))

    def write_image_ok(self, area: AreaRef) -> None:
        fa = self.area(area)
        self._write_trailer(fa, self.geometry.image_ok_off(fa.size), bytes([BOOT_FLAG_SET_VALUE]))

    def write_copy_done(self, area: AreaRef) -> None:
        fa = self.area(area)
        off = self.geometry.copy_done_off(fa.size)
        self._write_trailer(fa, off, bytes([BOOT_FLAG_SET_VALUE]))

    def write_swap_info(self, area: AreaRef, swap_type: int, image_num: int) -> None:
        fa = self.area(area)
        info = ((image_num & 0x0F) << 4) | (swap_type & 0x0F)
        self._write_trailer(fa, self.geometry.swap_info_off(fa.size), bytes([info]))

    def write_swap_size(self, area: AreaRef, swap_size: int) -> None:
        fa = self.area(area)
        off = self.geometry.swap_size_off(fa.size)
        self._write_trailer(fa, off, (swap_size & 0xFFFFFFFF).to_bytes(4, "little"))

    def read_swap_size(self, area: AreaRef) -> int:
        fa = self.area(area)
        return int.from_bytes(fa.read_at(self.geometry.swap_size_off(fa.size), 4), "little")

    def read_swap_info_raw(self, area: AreaRef) -> int | None:
        fa = self.area(area)
        info = fa.read_at(self.geometry.swap_info_off(fa.size), 1)[0]
        return None if info == self._erased(fa) else info

    def write_unprotected_tlv_sizes(self, area: AreaRef, primary: int, secondary: int) -> None:
        if not self.geometry.tlv_sizes:
            super().write_unprotected_tlv_sizes(area, primary, secondary)
        fa = self.area(area)
        value = ((secondary & 0xFFFF) << 16) | (primary & 0xFFFF)
        off = self.geometry.unprotected_tlv_sizes_off(fa.size)
        self._write_trailer(fa, off, value.to_bytes(4, "little"))

    def read_unprotected_tlv_sizes(self, area: AreaRef) -> tuple[int, int]:
        if not self.geometry.tlv_sizes:
            return super().read_unprotected_tlv_sizes(area)
        fa = self.area(area)
        off = self.geometry.unprotected_tlv_sizes_off(fa.size)
        value = int.from_bytes(fa.read_at(off, 4), "little")
        return value & 0xFFFF, value >> 16

    def status_off(self, area: AreaRef) -> int:
        """``boot_status_off``: where the area's status entries start."""
        fa = self.area(area)
        g = self.geometry
        align = fa.flash.write_align
        tail = g.scratch_trailer_sz(align) if area.is_scratch else g.trailer_sz(align)
        return fa.size - tail

    def status_entries(self, area: AreaRef) -> int:
        g = self.geometry
        return g.state_count if area.is_scratch else g.state_count * g.max_sectors

    def status_entry_erased(self, area: AreaRef, index: int) -> bool:
        fa = self.area(area)
        byte = fa.read_at(self.status_off(area) + index * self.geometry.write_sz, 1)[0]
        return byte == self._erased(fa)

    def write_status(self, area: AreaRef, internal_off: int, state: int) -> None:
        fa = self.area(area)
        align = fa.flash.write_align
        data = bytes([state]) + bytes([self._erased(fa)]) * (align - 1)
        fa.write(self.status_off(area) + internal_off, data)
