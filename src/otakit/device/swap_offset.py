"""Swap using offset: MCUboot's ``MCUBOOT_SWAP_USING_OFFSET`` mode (``swap_offset.c``),
operation for operation.

The secondary slot has one sector more than the primary and an update image is stored one
sector into it (:attr:`SwapOffsetMode.secondary_offset`). An upgrade of sectors 0..last walks
up the slots, two steps per sector, each recorded in the primary trailer once done:

- state 1: erase secondary sector ``i`` and copy primary sector ``i`` into it;
- state 2: erase primary sector ``i`` and copy secondary sector ``i + 1`` into it.

Sectors past the end of an image are not copied (the step is only recorded). Afterwards the
old image sits at the start of the secondary slot. A revert walks down the same way in the
other direction (primary ``i`` -> secondary ``i + 1``, secondary ``i`` -> primary ``i``), then
erases the secondary's first sector and its trailer.

The trailer has one field more than the other modes: the sizes of the unprotected TLV areas
of both images (``boot_write_unprotected_tlv_sizes``), read before the swap since they cannot be
found again once the images are half moved. The decision table has an extra row: a secondary
with a good magic, copy_done set and image_ok unset asks for a revert (what
:meth:`SwapOffsetMode.fixup_revert` leaves behind).
"""

from __future__ import annotations

from typing import ClassVar

from otakit.device.boot_status import (
    BOOT_STATUS_IDX_0,
    BOOT_STATUS_STATE_0,
    BOOT_STATUS_STATE_1,
    BOOT_STATUS_STATE_2,
    AreaRef,
    BootStatus,
    BootSwapType,
    Magic,
    StatusSource,
    swap_type_from_states,
)
from otakit.device.swap_mode import (
    BOOT_SLOT_PRIMARY,
    BOOT_SLOT_SECONDARY,
    BootContext,
    PrimaryStatusMode,
    RawHeader,
    copy_region,
    erase_region,
    read_header,
    scramble_region,
)
from otakit.image.header import IMAGE_MAGIC
from otakit.image.trailer import align_up

BOOT_STATUS_SWAP_STATE_COUNT = 2
# swap-offset has a single phase; MCUboot numbers it BOOT_STATUS_OP_SWAP = 1 in this mode.
BOOT_STATUS_OP_SWAP = 1
_U32 = 0xFFFFFFFF


class SwapOffsetMode(PrimaryStatusMode):
    """``swap_offset.c`` behind the :class:`~otakit.device.swap_mode.SwapMode` interface.

    Per-boot state MCUboot keeps in ``struct boot_loader_state``: :attr:`secondary_offset`
    (``state->secondary_offset``, where in the secondary slot the image being looked at
    starts) and :attr:`unprotected_tlv` (``BOOT_IMG_UNPROTECTED_TLV_SIZE`` of both slots).
    """

    strategy: ClassVar[str] = "swap-offset"
    state_count: ClassVar[int] = BOOT_STATUS_SWAP_STATE_COUNT
    reset_op: ClassVar[int] = BOOT_STATUS_OP_SWAP
    swap_offset: ClassVar[bool] = True
    tlv_sizes: ClassVar[bool] = True

    def __init__(self, ctx: BootContext) -> None:
        super().__init__(ctx)
        self.secondary_offset = 0
        self.unprotected_tlv = [0, 0]

    # --- helpers -------------------------------------------------------------------------------

    def find_last_idx(self, swap_size: int) -> int:
        """``find_last_idx`` (swap-offset's): index of the last sector holding ``swap_size``
        bytes (0 for one sector)."""
        sector_sz = self.sector_sz()
        size = 0
        last_idx = 0
        while True:
            size += sector_sz
            if size >= swap_size:
                return last_idx
            last_idx += 1

    def swap_type_multi(self) -> int:
        """``boot_swap_type_multi`` with swap-offset's decision table."""
        primary = self.store.read_swap_state(self.ctx.primary_ref)
        secondary = self.store.read_swap_state(self.ctx.secondary_ref)
        return swap_type_from_states(primary, secondary, swap_offset=True)

    def _reverting(self, bs: BootStatus) -> bool:
        return bs.swap_type == BootSwapType.REVERT or self.swap_type_multi() == BootSwapType.REVERT

    # --- slot geometry -------------------------------------------------------------------------

    def slots_compatible(self) -> bool:
        """``boot_slots_compatible``: the secondary has as many sectors as the primary or one
        more, the primary at most MAX_IMG_SECTORS, and the shared sectors have equal sizes."""
        ctx = self.ctx
        num_pri = ctx.num_sectors(BOOT_SLOT_PRIMARY)
        num_sec = ctx.num_sectors(BOOT_SLOT_SECONDARY)
        if num_pri != num_sec and num_pri + 1 != num_sec:
            return False
        if num_pri > ctx.geometry.max_sectors:
            return False
        for i in range(num_sec - 1):
            if ctx.sector_size(BOOT_SLOT_PRIMARY, i) != ctx.sector_size(BOOT_SLOT_SECONDARY, i):
                return False
        # (MCUboot's last check, for a primary larger than the secondary, cannot trigger once
        # the sector counts above passed.)
        return True

    def app_max_size(self) -> int:
        """``app_max_size``: the primary less its sector-aligned trailer, or the secondary less
        its trailer and the offset sector, whichever is smaller."""
        ctx = self.ctx
        sector_sz = self.sector_sz()
        trailer_sz = align_up(ctx.geometry.trailer_sz(ctx.write_sz), sector_sz)
        pri = ctx.num_sectors(BOOT_SLOT_PRIMARY) * sector_sz - trailer_sz
        sec = ctx.num_sectors(BOOT_SLOT_SECONDARY) * sector_sz - trailer_sz - sector_sz
        return min(pri, sec)

    def image_offset(self, slot: int) -> int:
        """``boot_get_state_secondary_offset``."""
        return self.secondary_offset if slot == BOOT_SLOT_SECONDARY else 0

    def read_image_header(self, slot: int, bs: BootStatus | None) -> RawHeader:
        """``boot_read_image_header``: an update's header is one sector into the secondary (at
        its start after an upgrade, i.e. for a revert); mid-swap it is where the last step
        left it. Sets :attr:`secondary_offset` when a header is found in the secondary."""
        ctx = self.ctx
        off = 0
        check_other_sector = True
        if bs is None:
            if slot == BOOT_SLOT_SECONDARY and self.swap_type_multi() != BootSwapType.REVERT:
                off = ctx.sector_size(BOOT_SLOT_SECONDARY, 0)
        elif not bs.is_reset(self.reset_op):
            check_other_sector = False
            swap_size = self.store.read_swap_size(self.find_status())
            last_idx = self.find_last_idx(swap_size)
            sz = self.sector_sz()
            done = bs.idx - BOOT_STATUS_IDX_0
            if self._reverting(bs):
                if slot == BOOT_SLOT_PRIMARY:
                    if done > last_idx or (done == last_idx and bs.state == BOOT_STATUS_STATE_1):
                        slot, off = BOOT_SLOT_SECONDARY, sz
                    else:
                        slot, off = BOOT_SLOT_PRIMARY, 0
                elif slot == BOOT_SLOT_SECONDARY:
                    if done > last_idx or (done == last_idx and bs.state == BOOT_STATUS_STATE_2):
                        slot, off = BOOT_SLOT_PRIMARY, 0
                    else:
                        slot, off = BOOT_SLOT_SECONDARY, 0
            elif slot == BOOT_SLOT_PRIMARY:
                started = bs.idx > BOOT_STATUS_IDX_0 or (
                    bs.idx == BOOT_STATUS_IDX_0 and bs.state == BOOT_STATUS_STATE_1
                )
                if started and bs.idx <= last_idx:
                    slot, off = BOOT_SLOT_SECONDARY, 0
                else:
                    slot, off = BOOT_SLOT_PRIMARY, 0
            elif slot == BOOT_SLOT_SECONDARY:
                if bs.idx > BOOT_STATUS_IDX_0:
                    slot, off = BOOT_SLOT_PRIMARY, 0
                else:
                    slot, off = BOOT_SLOT_SECONDARY, sz
        elif self._reverting(bs):
            off = 0
        elif slot == BOOT_SLOT_SECONDARY:
            off = ctx.sector_size(BOOT_SLOT_SECONDARY, 0)

        area = ctx.slot_area(slot)
        hdr = read_header(area, off)
        if check_other_sector and hdr.magic != IMAGE_MAGIC and slot == BOOT_SLOT_SECONDARY:
            if self.swap_type_multi() != BootSwapType.REVERT:
                off = 0
            else:
                off = ctx.sector_size(BOOT_SLOT_SECONDARY, 0)
            hdr = read_header(area, off)
        if hdr.magic == IMAGE_MAGIC and bs is not None and slot == BOOT_SLOT_SECONDARY:
            self.secondary_offset = off
        return hdr

    def read_image_size(self, slot: int) -> int:
        """``boot_read_image_size`` (swap-offset's): as the generic one (from
        :attr:`secondary_offset` in the secondary), and it remembers the unprotected TLV size."""
        protected_end, unprotected = self.image_tlv_sizes(slot)
        self.unprotected_tlv[slot] = unprotected
        return protected_end + unprotected

    def unprotected_tlv_sizes(self) -> tuple[int, int]:
        """``BOOT_IMG_UNPROTECTED_TLV_SIZE`` of the primary and the secondary slot."""
        return self.unprotected_tlv[BOOT_SLOT_PRIMARY], self.unprotected_tlv[BOOT_SLOT_SECONDARY]

    # --- swap status ---------------------------------------------------------------------------

    def read_status_bytes(self, area: AreaRef, bs: BootStatus) -> None:
        """``swap_read_status_bytes``: the last written entry tells the next step."""
        found_idx = self.last_status_entry(area)
        if found_idx == 0:
            return
        bs.op = BOOT_STATUS_OP_SWAP
        bs.idx = found_idx // BOOT_STATUS_SWAP_STATE_COUNT + BOOT_STATUS_IDX_0
        bs.state = found_idx % BOOT_STATUS_SWAP_STATE_COUNT + BOOT_STATUS_STATE_0

    # status_internal_off: the interface's default is swap-offset's formula.

    # --- doing it ------------------------------------------------------------------------------

    def _swap_sectors(
        self, idx: int, sz: int, bs: BootStatus, skip_primary: bool, skip_secondary: bool
    ) -> None:
        """``boot_swap_sectors``: primary ``idx`` -> secondary ``idx``, then secondary
        ``idx + 1`` -> primary ``idx``."""
        ctx = self.ctx
        self._two_steps(
            ctx.sector_off(BOOT_SLOT_PRIMARY, idx),
            ctx.sector_off(BOOT_SLOT_SECONDARY, idx),
            (idx + 1) * ctx.sector_size(BOOT_SLOT_PRIMARY, 0),
            sz, bs, skip_primary, skip_secondary,
        )  # fmt: skip

    def _swap_sectors_revert(
        self, idx: int, sz: int, bs: BootStatus, skip_primary: bool, skip_secondary: bool
    ) -> None:
        """``boot_swap_sectors_revert``: primary ``idx`` -> secondary ``idx + 1``, then
        secondary ``idx`` -> primary ``idx``."""
        ctx = self.ctx
        self._two_steps(
            ctx.sector_off(BOOT_SLOT_PRIMARY, idx),
            ctx.sector_off(BOOT_SLOT_SECONDARY, idx + 1),
            ctx.sector_off(BOOT_SLOT_PRIMARY, idx),
            sz, bs, skip_primary, skip_secondary,
        )  # fmt: skip

    def _two_steps(
        self,
        pri_off: int,
        sec_dst_off: int,
        sec_src_off: int,
        sz: int,
        bs: BootStatus,
        skip_primary: bool,
        skip_secondary: bool,
    ) -> None:
        """The two recorded steps both directions share: state 1 copies the primary's sector at
        ``pri_off`` to the secondary at ``sec_dst_off``, state 2 the secondary's sector at
        ``sec_src_off`` back to ``pri_off`` (a skipped copy is still recorded)."""
        ctx = self.ctx
        if bs.state == BOOT_STATUS_STATE_0:
            if not skip_primary:
                erase_region(ctx.secondary, sec_dst_off, sz, False)
                copy_region(ctx.primary, ctx.secondary, pri_off, sec_dst_off, sz)
            self.write_status(bs)
            bs.state = BOOT_STATUS_STATE_1
        if bs.state == BOOT_STATUS_STATE_1:
            if not skip_secondary:
                erase_region(ctx.primary, pri_off, sz, False)
                copy_region(ctx.secondary, ctx.primary, sec_src_off, pri_off, sz)
            self.write_status(bs)
            bs.idx += 1
            bs.state = BOOT_STATUS_STATE_0

    def fixup_revert(self, bs: BootStatus) -> None:
        """``fixup_revert``: before a revert re-initialises the primary's status, write a
        revert request into the secondary trailer (copy_done, then a full status init)."""
        if bs.swap_type != BootSwapType.REVERT or bs.idx != BOOT_STATUS_IDX_0:
            return
        sec = self.ctx.secondary_ref
        if self.store.read_swap_state(sec).magic is Magic.UNSET:
            self.scramble_trailer_sectors(sec)
            self.store.write_copy_done(sec)
            self.status_init(sec, bs)

    def _used_sectors(self, slot: int, tlv_size: int, sector_sz: int) -> int:
        hdr = self.ctx.header(slot)
        total = (hdr.hdr_size + tlv_size + hdr.protect_tlv_size + hdr.img_size) & _U32
        return ((total + sector_sz - 1) & _U32) // sector_sz

    def run(self, bs: BootStatus, copy_size: int) -> None:
        """``swap_run``: check room for a new swap, initialise the status, then swap (or
        revert) from where ``bs`` is."""
        ctx = self.ctx
        last_idx = self.find_last_idx(copy_size)
        sector_sz = self.sector_sz()
        if bs.is_reset(self.reset_op) and not self.swap_fits(last_idx):
            bs.swap_type = BootSwapType.NONE
            return

        self.fixup_revert(bs)

        if bs.idx == BOOT_STATUS_IDX_0:
            if bs.source != StatusSource.PRIMARY_SLOT:
                self.scramble_trailer_sectors(ctx.primary_ref)
                self.status_init(ctx.primary_ref, bs)
            self.scramble_trailer_sectors(ctx.secondary_ref)

        tlv_pri, tlv_sec = self.store.read_unprotected_tlv_sizes(ctx.primary_ref)
        bs.op = BOOT_STATUS_OP_SWAP
        used_pri = self._used_sectors(BOOT_SLOT_PRIMARY, tlv_pri, sector_sz)
        used_sec = self._used_sectors(BOOT_SLOT_SECONDARY, tlv_sec, sector_sz)

        if self._reverting(bs):
            for idx in range(last_idx + 1):
                if idx >= bs.idx - BOOT_STATUS_IDX_0:
                    mirror = last_idx - idx
                    self._swap_sectors_revert(
                        mirror, sector_sz, bs, mirror > used_pri, mirror > used_sec
                    )
            scramble_region(ctx.secondary, ctx.sector_off(BOOT_SLOT_SECONDARY, 0), sector_sz, False)
            self.scramble_trailer_sectors(ctx.secondary_ref)
        else:
            for idx in range(last_idx + 1):
                if idx >= bs.idx - BOOT_STATUS_IDX_0:
                    self._swap_sectors(idx, sector_sz, bs, idx > used_pri, idx > used_sec)
