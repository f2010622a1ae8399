"""The per-mode half of MCUboot's boot flow, and the flash helpers every mode shares.

MCUboot's ``loader.c`` is the same for every upgrade mode; what differs lives in one file per
mode (``swap_scratch.c``, ``swap_move.c``, ``swap_offset.c``; overwrite-only uses parts of
``swap_scratch.c`` and ``loader.c``'s ``boot_copy_image``) behind ``swap_priv.h``.
:class:`SwapMode` is that interface: :class:`otakit.device.bootloader.Bootloader` is the port of
``loader.c`` and calls a mode object exactly where ``loader.c`` calls those functions. One mode
object serves one image of one boot (it is created per image, like MCUboot's per-image state),
through a :class:`BootContext`.

Implementations (picked by the flash map's strategy, see :func:`mode_class`):

==============  ===========================================  ===================================
strategy        class                                        port of
==============  ===========================================  ===================================
overwrite       ``otakit.device.overwrite.OverwriteMode``    swap_scratch.c (OVERWRITE_ONLY) +
                                                             loader.c ``boot_copy_image``
swap-scratch    ``otakit.device.swap_scratch.SwapScratchMode``  swap_scratch.c + swap_misc.c
swap-move       ``otakit.device.swap_move.SwapMoveMode``     swap_move.c + swap_misc.c
swap-offset     ``otakit.device.swap_offset.SwapOffsetMode``  swap_offset.c + swap_misc.c
swap-status     ``otakit.device.swap_status.SwapStatusMode``  Infineon cypress branch
==============  ===========================================  ===================================

Rules for every implementation:

- Every flash operation goes through ``ctx`` areas (:class:`~otakit.device.slot.FlashArea`) and
  the helpers below (:func:`erase_region`, :func:`scramble_region`, :func:`copy_region`, ...),
  which do the same calls as the C functions, one :class:`~otakit.device.flash.Flash`
  operation per MCUboot flash operation.
- Every trailer field and swap status entry is read and written through ``ctx.store`` (a
  :class:`~otakit.device.boot_status.TrailerStore`), never by offset: the swap-status mode
  keeps them in its status partition.
- Offsets are relative to the area, as in MCUboot (``flash_area_*`` calls).
- A power cut is :class:`~otakit.device.flash.PowerCut` raised by the flash: let it propagate.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from otakit.device.boot_status import (
    BOOT_MAX_ALIGN,
    BOOT_STATUS_IDX_0,
    BOOT_STATUS_STATE_0,
    AreaKind,
    AreaRef,
    BootStatus,
    BootSwapType,
    Flag,
    Magic,
    SlotTrailerStore,
    StatusOp,
    StatusSource,
    SwapState,
    TrailerGeometry,
    TrailerStore,
    swap_type_from_states,
)
from otakit.device.flash import Flash
from otakit.device.flashmap import FlashMap
from otakit.device.slot import FlashArea
from otakit.image.header import HEADER_STRUCT, IMAGE_MAGIC

BOOT_SLOT_PRIMARY = 0
BOOT_SLOT_SECONDARY = 1
BOOT_NUM_SLOTS = 2  # also the "slot" number of the scratch area in boot_read_image_header
BUF_SZ = 1024  # boot_copy_region's buffer (loader.c BUF_SZ with BOOT_MAX_ALIGN <= 1024)
BOOT_TMPBUF_SZ = 256
IMAGE_F_NON_BOOTABLE = 0x00000010
IMAGE_F_ENCRYPTED_AES128 = 0x00000004
IMAGE_F_ENCRYPTED_AES256 = 0x00000008
IMAGE_F_COMPRESSED_LZMA1 = 0x00000200
IMAGE_F_COMPRESSED_LZMA2 = 0x00000400
IMAGE_TLV_INFO_MAGIC = 0x6907
IMAGE_TLV_PROT_INFO_MAGIC = 0x6908
HEADER_SIZE = HEADER_STRUCT.size  # 32


class McubootError(Exception):
    """A MCUboot function returned an error code (``BOOT_EFLASH``, ``BOOT_EBADIMAGE``...)."""

    def __init__(self, message: str, code: str = "BOOT_EBADIMAGE") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RawHeader:
    """``struct image_header`` exactly as read from flash, valid or not (``boot_img_hdr``)."""

    raw: bytes
    magic: int
    load_addr: int
    hdr_size: int
    protect_tlv_size: int
    img_size: int
    flags: int
    version: tuple[int, int, int, int]

    @classmethod
    def parse(cls, raw: bytes) -> RawHeader:
        fields = HEADER_STRUCT.unpack(raw[:HEADER_SIZE])
        magic, load, hdr_size, prot, img_size, flags, major, minor, rev, build, _pad = fields
        return cls(raw[:HEADER_SIZE], magic, load, hdr_size, prot, img_size, flags,
                   (major, minor, rev, build))  # fmt: skip

    @property
    def tlv_off(self) -> int:
        """``BOOT_TLV_OFF``."""
        return self.hdr_size + self.img_size


@dataclass(frozen=True)
class Sector:
    off: int  # from the start of the area
    size: int


def area_sectors(area: FlashArea) -> list[Sector]:
    """``flash_area_get_sectors`` for an otakit area (uniform sectors)."""
    size = area.sector_size
    return [Sector(off, size) for off in range(0, area.size, size)]


def get_sector(area: FlashArea, off: int) -> Sector | None:
    """``flash_area_get_sector``: the sector holding ``off``; None when outside the area."""
    if off < 0 or off >= area.size:
        return None
    size = area.sector_size
    return Sector(off // size * size, size)


@dataclass
class BootContext:
    """What one mode object works on: the state MCUboot keeps for the current image.

    ``headers`` is ``boot_img_hdr(state, slot)`` for slot 0 and 1, filled and refreshed by the
    loader (``boot_read_image_headers``); ``sectors`` the sector lists ``boot_read_sectors``
    made (``BOOT_IMG(state, slot).sectors`` and ``state->scratch.sectors``).
    ``status`` is the swap-status partition (None for upstream modes).
    """

    flash: Flash
    map: FlashMap
    image: int
    primary: FlashArea
    secondary: FlashArea
    scratch: FlashArea | None
    geometry: TrailerGeometry
    status: FlashArea | None = None
    store: TrailerStore = field(init=False)
    headers: list[RawHeader | None] = field(default_factory=lambda: [None, None])
    sectors: dict[AreaKind, list[Sector]] = field(default_factory=dict)
    image_count: int = 1  # images in the map: the scratch status check depends on it

    @property
    def write_sz(self) -> int:
        """``BOOT_WRITE_SZ``: the larger write alignment of the primary slot and the scratch."""
        return self.geometry.write_sz

    def area(self, ref: AreaRef | AreaKind) -> FlashArea:
        kind = ref.kind if isinstance(ref, AreaRef) else ref
        if kind is AreaKind.PRIMARY:
            return self.primary
        if kind is AreaKind.SECONDARY:
            return self.secondary
        if self.scratch is None:
            raise McubootError("this layout has no scratch area", "BOOT_EFLASH")
        return self.scratch

    def slot_area(self, slot: int) -> FlashArea:
        """``BOOT_IMG_AREA(state, slot)``; slot BOOT_NUM_SLOTS is the scratch area."""
        if slot == BOOT_SLOT_PRIMARY:
            return self.primary
        if slot == BOOT_SLOT_SECONDARY:
            return self.secondary
        return self.area(AreaKind.SCRATCH)

    def ref(self, kind: AreaKind) -> AreaRef:
        return AreaRef(kind, self.image)

    @property
    def primary_ref(self) -> AreaRef:
        return AreaRef.primary(self.image)

    @property
    def secondary_ref(self) -> AreaRef:
        return AreaRef.secondary(self.image)

    @property
    def scratch_ref(self) -> AreaRef:
        return AreaRef.scratch(self.image)

    def slot_ref(self, slot: int) -> AreaRef:
        return self.primary_ref if slot == BOOT_SLOT_PRIMARY else self.secondary_ref

    # sector helpers (bootutil_priv.h)
    def num_sectors(self, slot: int) -> int:
        """``boot_img_num_sectors``."""
        return len(self.sectors[_slot_kind(slot)])

    def sector_size(self, slot: int, sector: int) -> int:
        """``boot_img_sector_size``."""
        return self.sectors[_slot_kind(slot)][sector].size

    def sector_off(self, slot: int, sector: int) -> int:
        """``boot_img_sector_off`` (from the start of the slot)."""
        return self.sectors[_slot_kind(slot)][sector].off

    def header(self, slot: int) -> RawHeader:
        hdr = self.headers[slot]
        if hdr is None:
            raise McubootError(f"image header of slot {slot} not read", "BOOT_EFLASH")
        return hdr

    def header_erased(self, slot: int) -> bool:
        """``boot_check_header_erased``: the header's magic field reads erased."""
        hdr = self.header(slot)
        return hdr.raw[:4] == bytes([self.flash.erased_value]) * 4


def _slot_kind(slot: int) -> AreaKind:
    if slot == BOOT_SLOT_PRIMARY:
        return AreaKind.PRIMARY
    if slot == BOOT_SLOT_SECONDARY:
        return AreaKind.SECONDARY
    return AreaKind.SCRATCH


# --- bootutil_area.c and loader.c helpers ------------------------------------------------------


def erase_region(area: FlashArea, off: int, size: int, backwards: bool = False) -> bool:
    """``boot_erase_region``: erase the sectors covering ``[off, off + size)`` one erase call
    per sector, first to last (or last to first with ``backwards``). Returns False (and does
    nothing) for a range outside the area, as the C function returns -1."""
    if off >= area.size or area.size - off < size:
        return False
    if backwards:
        first = get_sector(area, off)
        if first is None:
            return False
        end_offset = first.off
        off += size - 1
    else:
        last = get_sector(area, off + size - 1)
        if last is None:
            return False
        end_offset = last.off
    while True:
        sector = get_sector(area, off)
        if sector is None:
            return False
        off, csize = sector.off, sector.size
        area.erase(off, csize)
        if backwards:
            if end_offset >= off:
                break
            off -= 1
        else:
            off += csize
            if off > end_offset:
                break
            off += 1
    return True


def scramble_region(area: FlashArea, off: int, size: int, backwards: bool = False) -> bool:
    """``boot_scramble_region`` on a device that requires erase: :func:`erase_region`, nothing
    for ``size`` 0."""
    if size == 0:
        return True
    return erase_region(area, off, size, backwards)


def scramble_slot(area: FlashArea) -> bool:
    """``boot_scramble_slot`` (without MCUBOOT_MINIMAL_SCRAMBLE): the whole area, forward."""
    return scramble_region(area, 0, area.size, False)


def trailer_scramble_offset(area: FlashArea, trailer_sz: int) -> int:
    """``boot_trailer_scramble_offset`` on a device that requires erase: the start of the
    sector holding ``area.size - trailer_sz`` (``trailer_sz`` is ``boot_trailer_sz`` of the
    alignment asked for, at least the area's write alignment)."""
    sector = get_sector(area, area.size - trailer_sz)
    if sector is None:
        raise McubootError("trailer larger than the area", "BOOT_EFLASH")
    return sector.off


def copy_region(src: FlashArea, dst: FlashArea, off_src: int, off_dst: int, size: int) -> None:
    """``boot_copy_region`` (no encryption): read and write ``BUF_SZ`` bytes at a time, every
    chunk written whatever it holds (one write operation per chunk)."""
    copied = 0
    while copied < size:
        chunk = min(BUF_SZ, size - copied)
        data = src.read_at(off_src + copied, chunk)
        dst.write(off_dst + copied, data)
        copied += chunk


def read_header(area: FlashArea, off: int = 0) -> RawHeader:
    """``flash_area_read(fap, off, hdr, sizeof *hdr)``."""
    return RawHeader.parse(area.read_at(off, HEADER_SIZE))


# --- the interface -----------------------------------------------------------------------------


class SwapMode(ABC):
    """One MCUboot upgrade mode for one image (see the module docstring).

    Class attributes say how the mode is built: :attr:`state_count` is
    BOOT_STATUS_STATE_COUNT, :attr:`reset_op` the op ``boot_status_reset`` sets,
    :attr:`needs_scratch` whether MCUBOOT_SWAP_USING_SCRATCH is set (the scratch area is opened
    and BOOT_WRITE_SZ includes its alignment), :attr:`overwrite_only` selects
    ``boot_copy_image`` instead of ``boot_swap_image``, :attr:`swap_offset` turns on the
    swap-offset branches of ``loader.c`` and the extra decision-table row, :attr:`swap_move`
    the swap-move branch of ``boot_validate_slot``, :attr:`tlv_sizes` the trailer field.
    """

    strategy: ClassVar[str]
    state_count: ClassVar[int] = 3
    reset_op: ClassVar[int] = StatusOp.MOVE
    needs_scratch: ClassVar[bool] = False
    overwrite_only: ClassVar[bool] = False
    swap_offset: ClassVar[bool] = False
    swap_move: ClassVar[bool] = False
    tlv_sizes: ClassVar[bool] = False

    def __init__(self, ctx: BootContext) -> None:
        self.ctx = ctx

    # --- build-time facts ----------------------------------------------------------------------

    @classmethod
    def geometry(cls, flashmap: FlashMap) -> TrailerGeometry:
        """The trailer sizes of this mode for ``flashmap``: BOOT_WRITE_SZ = write_align,
        BOOT_MAX_ALIGN = max(8, write_align) (the harness is built with 8)."""
        return TrailerGeometry(
            write_sz=flashmap.write_align,
            max_sectors=flashmap.max_sectors,
            state_count=cls.state_count,
            tlv_sizes=cls.tlv_sizes,
            max_align=max(BOOT_MAX_ALIGN, flashmap.write_align),
        )

    def make_store(self, read_only: bool = False) -> TrailerStore:
        """The trailer store of this mode (called once by the loader and put in ``ctx.store``).
        Upstream modes keep trailers in the areas, where reading never writes; swap-status
        overrides this (``read_only``: a store whose reads have none of MCUboot's side
        effects, for a status report)."""
        areas = {AreaKind.PRIMARY: self.ctx.primary, AreaKind.SECONDARY: self.ctx.secondary}
        if self.ctx.scratch is not None:
            areas[AreaKind.SCRATCH] = self.ctx.scratch
        return SlotTrailerStore(areas, self.ctx.geometry, self.ctx.image)

    @property
    def store(self) -> TrailerStore:
        return self.ctx.store

    # --- slot geometry -------------------------------------------------------------------------

    @abstractmethod
    def slots_compatible(self) -> bool:
        """``boot_slots_compatible``: whether an upgrade is possible with these sectors; when
        False the loader boots the primary slot as it is (no flash operation)."""

    @abstractmethod
    def app_max_size(self) -> int:
        """``app_max_size``: the largest image the mode can move (header + payload + TLVs)."""

    def max_image_size(self, slot: int) -> int:
        """``bootutil_max_image_size(state, fap)`` for the area of ``slot``: the limit
        ``bootutil_img_validate`` puts on an image's TLV end. Swap modes: :meth:`app_max_size`;
        overwrite-only overrides it (``boot_swap_info_off`` of the area)."""
        return self.app_max_size()

    def image_offset(self, slot: int) -> int:
        """Where in the area of ``slot`` the image starts when validating it (swap-offset's
        ``boot_get_state_secondary_offset``; 0 otherwise)."""
        return 0

    def read_image_header(self, slot: int, bs: BootStatus | None) -> RawHeader:
        """``boot_read_image_header``: the header of the image of ``slot``, read from where it
        is while a swap is under way (``bs`` given and not reset), else from the slot."""
        return read_header(self.ctx.slot_area(slot), self.image_offset(slot))

    def header_ok(self, hdr: RawHeader, bs: BootStatus | None) -> bool:
        """Whether ``boot_read_image_header`` returned success after reading ``hdr`` with
        ``bs``. Reads never fail on a simulated flash, so by default it always does; swap-move
        and swap-offset return an error (-1) for a header without IMAGE_MAGIC read with a boot
        status (the loader then gives up on the image for this boot)."""
        return True

    def read_image_size(self, slot: int) -> int:
        """``boot_read_image_size``: header + payload + protected and unprotected TLVs of the
        image in ``slot``, read from its TLV info headers; McubootError(BOOT_EBADIMAGE) when they
        are inconsistent (MCUboot asserts on it)."""
        protected_end, unprotected = self.image_tlv_sizes(slot)
        return protected_end + unprotected

    def image_tlv_sizes(self, slot: int) -> tuple[int, int]:
        """What ``boot_read_image_size`` reads: (header + payload + protected TLVs, size of the
        unprotected TLV area) of the image in ``slot``."""
        hdr = self.ctx.header(slot)
        area = self.ctx.slot_area(slot)
        base = self.image_offset(slot)
        off = hdr.tlv_off
        magic, total = _tlv_info(area, base + off)
        if magic == IMAGE_TLV_PROT_INFO_MAGIC:
            if hdr.protect_tlv_size != total:
                raise McubootError("protected TLV size mismatch")
            magic, total = _tlv_info(area, base + off + total)
        elif hdr.protect_tlv_size != 0:
            raise McubootError("protected TLV area missing")
        if magic != IMAGE_TLV_INFO_MAGIC:
            raise McubootError("bad TLV info magic")
        return off + hdr.protect_tlv_size, total

    def decide_swap_type(self, primary: SwapState, secondary: SwapState) -> int:
        """``boot_swap_type_multi``'s table on two decoded trailers (swap-offset adds its first
        row; the Infineon table of swap-status differs)."""
        return swap_type_from_states(primary, secondary, swap_offset=self.swap_offset)

    # --- swap status ---------------------------------------------------------------------------

    def status_source(self) -> StatusSource:
        """``swap_status_source``: where an interrupted swap's status is (table per mode)."""
        raise NotImplementedError

    def find_status(self) -> AreaRef:
        """``boot_find_status``: the first area (scratch if the mode has one, then primary)
        whose trailer magic is good; the last area tried when none is."""
        refs = []
        if self.needs_scratch:
            refs.append(self.ctx.scratch_ref)
        refs.append(self.ctx.primary_ref)
        for ref in refs:
            if self.store.magic_good(ref):
                return ref
        return refs[-1]

    def read_status(self, bs: BootStatus) -> None:
        """``swap_read_status``: fill ``bs`` (source, idx/state from the status entries,
        swap_type from the swap_info field) for an interrupted swap; leave it reset if none."""
        bs.source = self.status_source()
        if bs.source == StatusSource.NONE:
            return
        ref = self.ctx.scratch_ref if bs.source == StatusSource.SCRATCH else self.ctx.primary_ref
        self.read_status_bytes(ref, bs)
        info = self.store.read_swap_info_raw(ref)
        if info is None:
            info = BootSwapType.NONE
        bs.swap_type = info & 0x0F

    @abstractmethod
    def read_status_bytes(self, area: AreaRef, bs: BootStatus) -> None:
        """``swap_read_status_bytes``: scan the status entries of ``area`` (through the store)
        and set ``bs.idx``/``bs.state`` (and ``bs.op``) where the swap stopped."""

    def status_internal_off(self, bs: BootStatus) -> int:
        """``boot_status_internal_off``: where ``bs``'s entry is inside the status area."""
        elem = self.ctx.write_sz
        idx_sz = elem * self.state_count
        return (bs.idx - BOOT_STATUS_IDX_0) * idx_sz + (bs.state - BOOT_STATUS_STATE_0) * elem

    def write_status(self, bs: BootStatus) -> None:
        """``boot_write_status``: record ``bs.state`` in the scratch trailer when
        ``bs.use_scratch`` (swap-scratch), else in the primary slot's."""
        ref = self.ctx.scratch_ref if bs.use_scratch else self.ctx.primary_ref
        self.store.write_status(ref, self.status_internal_off(bs), bs.state)

    def status_init(self, area: AreaRef, bs: BootStatus) -> None:
        """``swap_status_init``: in ``area``'s trailer write swap_info (unless NONE), image_ok
        (if the secondary's is set), swap_size, (swap-offset: TLV sizes), then the magic."""
        secondary = self.store.read_swap_state(self.ctx.secondary_ref)
        if bs.swap_type != BootSwapType.NONE:
            self.store.write_swap_info(area, bs.swap_type, self.ctx.image)
        if secondary.image_ok is Flag.SET:
            self.store.write_image_ok(area)
        self.store.write_swap_size(area, bs.swap_size)
        if self.tlv_sizes:
            primary_tlv, secondary_tlv = self.unprotected_tlv_sizes()
            self.store.write_unprotected_tlv_sizes(area, primary_tlv, secondary_tlv)
        self.store.write_magic(area)

    def unprotected_tlv_sizes(self) -> tuple[int, int]:
        """``BOOT_IMG_UNPROTECTED_TLV_SIZE`` of both slots (swap-offset only)."""
        raise NotImplementedError

    def erase_trailer_sectors(self, area: AreaRef) -> None:
        """``swap_erase_trailer_sectors``: erase the area's last sectors, last first, one
        ``boot_erase_region`` per sector, until they cover ``boot_trailer_sz``."""
        fa = self.ctx.area(area)
        slot = BOOT_SLOT_SECONDARY if area.kind is AreaKind.SECONDARY else BOOT_SLOT_PRIMARY
        sector = self.ctx.num_sectors(slot) - 1
        trailer_sz = self.ctx.geometry.trailer_sz(self.ctx.write_sz)
        total = 0
        while True:
            size = self.ctx.sector_size(slot, sector)
            erase_region(fa, self.ctx.sector_off(slot, sector), size, False)
            sector -= 1
            total += size
            if total >= trailer_sz:
                break

    def scramble_trailer_sectors(self, area: AreaRef) -> None:
        """``swap_scramble_trailer_sectors``: erase, backwards, from the sector holding the
        start of ``boot_trailer_sz(BOOT_WRITE_SZ)`` to the end of the area."""
        fa = self.ctx.area(area)
        align = max(self.ctx.write_sz, fa.flash.write_align)
        off = trailer_scramble_offset(fa, self.ctx.geometry.trailer_sz(align))
        scramble_region(fa, off, fa.size - off, True)

    def set_copy_done(self) -> None:
        """``swap_set_copy_done``: copy_done in the primary trailer."""
        self.store.write_copy_done(self.ctx.primary_ref)

    def set_image_ok(self) -> None:
        """``swap_set_image_ok``: image_ok in the primary trailer unless it reads set/bad."""
        state = self.store.read_swap_state(self.ctx.primary_ref)
        if state.image_ok is Flag.UNSET:
            self.store.write_image_ok(self.ctx.primary_ref)

    # --- doing it ------------------------------------------------------------------------------

    @abstractmethod
    def run(self, bs: BootStatus, copy_size: int) -> None:
        """``swap_run``: start, or resume where ``bs`` says, the swap of ``copy_size`` bytes."""

    def swap_image(self, bs: BootStatus) -> None:
        """``boot_swap_image`` (loader.c): size the swap (largest of the two images when new,
        else the swap_size of the trailer :meth:`find_status` finds) and :meth:`run` it."""
        if bs.is_reset(self.reset_op):
            copy_size = size = 0
            if self.ctx.header(BOOT_SLOT_PRIMARY).magic == IMAGE_MAGIC:
                copy_size = self.read_image_size(BOOT_SLOT_PRIMARY)
            if self.ctx.header(BOOT_SLOT_SECONDARY).magic == IMAGE_MAGIC:
                size = self.read_image_size(BOOT_SLOT_SECONDARY)
            copy_size = max(copy_size, size)
            bs.swap_size = copy_size
        else:
            bs.swap_size = self.store.read_swap_size(self.find_status())
            copy_size = bs.swap_size
        self.run(bs, copy_size)

    def copy_image(self, bs: BootStatus) -> None:
        """``boot_copy_image`` (overwrite-only)."""
        raise NotImplementedError(f"{self.strategy} does not copy images")

    def magic_state(self, area: AreaRef) -> Magic:
        return self.store.read_swap_state(area).magic


class PrimaryStatusMode(SwapMode):
    """What ``swap_move.c`` and ``swap_offset.c`` do alike: the swap status lives in the
    primary slot's trailer only, entries are scanned from the last one, a header read with a
    boot status must have IMAGE_MAGIC, and a new swap must leave the trailer's sectors alone.
    The moves themselves, the status entry layout and where headers are mid-swap differ and
    stay in each mode."""

    def sector_sz(self) -> int:
        """The sector size both slots use (these modes need uniform sectors)."""
        return self.ctx.sector_size(BOOT_SLOT_PRIMARY, 0)

    def header_ok(self, hdr: RawHeader, bs: BootStatus | None) -> bool:
        """``boot_read_image_header`` returns -1 for a header without IMAGE_MAGIC read with a
        boot status."""
        return bs is None or hdr.magic == IMAGE_MAGIC

    def status_source(self) -> StatusSource:
        """``swap_status_source``: the primary slot holds the status of an interrupted swap
        when its magic is good, its copy_done unset and the secondary's magic not good."""
        primary = self.store.read_swap_state(self.ctx.primary_ref)
        secondary = self.store.read_swap_state(self.ctx.secondary_ref)
        if (
            primary.magic is Magic.GOOD
            and primary.copy_done is Flag.UNSET
            and secondary.magic is not Magic.GOOD
        ):
            return StatusSource.PRIMARY_SLOT
        return StatusSource.NONE

    def last_status_entry(self, area: AreaRef) -> int:
        """The scan of ``swap_read_status_bytes``: how many entries of ``area`` are in use, i.e.
        the 1-based index of the last one that is not erased (0 when all are)."""
        for i in range(self.store.status_entries(area), 0, -1):
            if not self.store.status_entry_erased(area, i - 1):
                return i
        return 0

    def swap_fits(self, last_idx: int) -> bool:
        """``swap_run``'s check before a new swap: sectors 0..``last_idx`` must end before the
        first sector that holds the primary's trailer (else MCUboot sets swap type NONE)."""
        sector_sz = self.sector_sz()
        trailer_sz = self.ctx.geometry.trailer_sz(self.ctx.write_sz)
        first_trailer_idx = self.ctx.num_sectors(BOOT_SLOT_PRIMARY) - 1
        size = sector_sz
        while size < trailer_sz:
            size += sector_sz
            first_trailer_idx -= 1
        return last_idx < first_trailer_idx


def _tlv_info(area: FlashArea, off: int) -> tuple[int, int]:
    raw = area.read_at(off, 4)
    if len(raw) < 4:
        raise McubootError("TLV info outside the slot", "BOOT_EFLASH")
    return int.from_bytes(raw[:2], "little"), int.from_bytes(raw[2:], "little")


# --- which class implements which strategy ----------------------------------------------------

MODE_CLASSES: dict[str, str] = {
    "overwrite": "otakit.device.overwrite:OverwriteMode",
    "swap-scratch": "otakit.device.swap_scratch:SwapScratchMode",
    "swap-move": "otakit.device.swap_move:SwapMoveMode",
    "swap-offset": "otakit.device.swap_offset:SwapOffsetMode",
    "swap-status": "otakit.device.swap_status:SwapStatusMode",
}


def mode_class(strategy: str) -> type[SwapMode]:
    """The :class:`SwapMode` subclass for a strategy (imported on first use)."""
    try:
        target = MODE_CLASSES[str(strategy)]
    except KeyError:
        raise McubootError(
            f"no bootloader mode for strategy {strategy!r}", "BOOT_EBADARGS"
        ) from None
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, name)
    if not (isinstance(cls, type) and issubclass(cls, SwapMode)):
        raise McubootError(f"{target} is not a SwapMode", "BOOT_EBADARGS")
    return cls
