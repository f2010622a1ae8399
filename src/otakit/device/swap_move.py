"""Swap using move: MCUboot's ``MCUBOOT_SWAP_USING_MOVE`` mode (``swap_move.c``), operation for
operation.

The primary slot has one sector more than the secondary. An upgrade of ``n`` sectors (enough to
hold the larger of the two images) runs in two phases, every step recorded in the primary
slot's trailer (one write-size entry each) as soon as it is done:

1. *move*: the first ``n`` sectors of the primary move up by one sector, last first
   (sector ``i - 1`` -> ``i``, each an erase of sector ``i`` then a copy). Before the first
   move the primary trailer is re-initialised (swap_info, image_ok, swap_size, magic) and the
   secondary trailer is erased. One status entry per sector, ``MAX_IMG_SECTORS`` entries.
2. *swap*: for ``i`` = 1..n: erase primary sector ``i - 1`` and copy secondary sector
   ``i - 1`` into it (state 1), then erase secondary sector ``i - 1`` and copy the moved-up
   primary sector ``i`` into it (state 2). Two entries per sector, after the move entries.

After a power cut the last non-erased status entry says which step comes next; while a swap
is under way each image header is read from where that step left it
(:meth:`SwapMoveMode.read_image_header`). A revert whose status area was just re-initialised
is made to look like a permanent upgrade first (:meth:`SwapMoveMode.fixup_revert`), so that a
cut at that point does not lose it.
"""

from __future__ import annotations

from typing import ClassVar

from otakit.device.boot_status import (
    BOOT_STATUS_IDX_0,
    BOOT_STATUS_STATE_0,
    BOOT_STATUS_STATE_1,
    AreaRef,
    BootStatus,
    BootSwapType,
    Magic,
    StatusOp,
    StatusSource,
)
from otakit.device.swap_mode import (
    BOOT_SLOT_PRIMARY,
    BOOT_SLOT_SECONDARY,
    PrimaryStatusMode,
    RawHeader,
    copy_region,
    erase_region,
    read_header,
)
from otakit.image.trailer import align_up

BOOT_STATUS_MOVE_STATE_COUNT = 1
BOOT_STATUS_SWAP_STATE_COUNT = 2


class SwapMoveMode(PrimaryStatusMode):
    """``swap_move.c`` behind the :class:`~otakit.device.swap_mode.SwapMode` interface."""

    strategy: ClassVar[str] = "swap-move"
    state_count: ClassVar[int] = BOOT_STATUS_MOVE_STATE_COUNT + BOOT_STATUS_SWAP_STATE_COUNT
    reset_op: ClassVar[int] = StatusOp.MOVE
    swap_move: ClassVar[bool] = True

    # --- helpers -------------------------------------------------------------------------------

    def find_last_idx(self, swap_size: int) -> int:
        """``find_last_idx``: how many sectors hold ``swap_size`` bytes (at least one)."""
        sector_sz = self.sector_sz()
        size = 0
        last_idx = 0
        while True:
            size += sector_sz
            last_idx += 1
            if size >= swap_size:
                return last_idx

    # --- slot geometry -------------------------------------------------------------------------

    def slots_compatible(self) -> bool:
        """``boot_slots_compatible``: primary has as many sectors as the secondary or one more,
        at most MAX_IMG_SECTORS, the shared sectors have the same sizes, and the extra primary
        sector the size of the last shared one."""
        ctx = self.ctx
        num_pri = ctx.num_sectors(BOOT_SLOT_PRIMARY)
        num_sec = ctx.num_sectors(BOOT_SLOT_SECONDARY)
        if num_pri != num_sec and num_pri != num_sec + 1:
            return False
        if num_pri > ctx.geometry.max_sectors:
            return False
        sector_sz_pri = 0
        for i in range(num_sec):
            sector_sz_pri = ctx.sector_size(BOOT_SLOT_PRIMARY, i)
            if sector_sz_pri != ctx.sector_size(BOOT_SLOT_SECONDARY, i):
                return False
        return not (
            num_pri > num_sec and sector_sz_pri != ctx.sector_size(BOOT_SLOT_PRIMARY, num_sec)
        )

    def app_max_size(self) -> int:
        """``app_max_size``: the primary less its sector-aligned trailer and the move padding
        sector, or the secondary less its trailer, whichever is smaller."""
        ctx = self.ctx
        sector_sz = self.sector_sz()
        trailer_sz = align_up(ctx.geometry.trailer_sz(ctx.write_sz), sector_sz)
        pri = ctx.num_sectors(BOOT_SLOT_PRIMARY) * sector_sz - trailer_sz - sector_sz
        sec = ctx.num_sectors(BOOT_SLOT_SECONDARY) * sector_sz - trailer_sz
        return min(pri, sec)

    def read_image_header(self, slot: int, bs: BootStatus | None) -> RawHeader:
        """``boot_read_image_header``: while a swap is under way the header of an image may
        sit one sector up in the primary (moved) or in the other slot (swapped)."""
        off = 0
        if bs is not None and not bs.is_reset(self.reset_op):
            swap_size = self.store.read_swap_size(self.find_status())
            last_idx = self.find_last_idx(swap_size)
            sz = self.sector_sz()
            if bs.op == StatusOp.MOVE and slot == BOOT_SLOT_PRIMARY and bs.idx > last_idx:
                off = sz
            elif bs.op == StatusOp.SWAP:
                if 1 < bs.idx <= last_idx:
                    slot = BOOT_SLOT_SECONDARY if slot == BOOT_SLOT_PRIMARY else BOOT_SLOT_PRIMARY
                elif bs.idx == 1:
                    if slot == BOOT_SLOT_PRIMARY:
                        off = sz
                    elif slot == BOOT_SLOT_SECONDARY and bs.state == BOOT_STATUS_STATE_1:
                        slot = BOOT_SLOT_PRIMARY
        return read_header(self.ctx.slot_area(slot), off)

    # --- swap status ---------------------------------------------------------------------------

    def read_status_bytes(self, area: AreaRef, bs: BootStatus) -> None:
        """``swap_read_status_bytes``: the last written entry tells the next step; the first
        MAX_IMG_SECTORS entries are moves, the rest swap states."""
        found_idx = self.last_status_entry(area)
        move_entries = self.ctx.geometry.max_sectors * BOOT_STATUS_MOVE_STATE_COUNT
        if found_idx == 0:
            return
        if found_idx < move_entries:
            bs.op = StatusOp.MOVE
            bs.idx = found_idx // BOOT_STATUS_MOVE_STATE_COUNT + BOOT_STATUS_IDX_0
            bs.state = found_idx % BOOT_STATUS_MOVE_STATE_COUNT + BOOT_STATUS_STATE_0
        else:
            rest = found_idx - move_entries
            bs.op = StatusOp.SWAP
            bs.idx = rest // BOOT_STATUS_SWAP_STATE_COUNT + BOOT_STATUS_IDX_0
            bs.state = rest % BOOT_STATUS_SWAP_STATE_COUNT + BOOT_STATUS_STATE_0

    def status_internal_off(self, bs: BootStatus) -> int:
        """``boot_status_internal_off``: move entries first, then two per swapped sector."""
        elem = self.ctx.write_sz
        if bs.op == StatusOp.MOVE:
            idx_sz = elem * BOOT_STATUS_MOVE_STATE_COUNT
            base = 0
        else:
            idx_sz = elem * BOOT_STATUS_SWAP_STATE_COUNT
            base = self.ctx.geometry.max_sectors * BOOT_STATUS_MOVE_STATE_COUNT * elem
        return (
            base + (bs.idx - BOOT_STATUS_IDX_0) * idx_sz + (bs.state - BOOT_STATUS_STATE_0) * elem
        )

    # --- doing it ------------------------------------------------------------------------------

    def _move_sector_up(self, idx: int, sz: int, bs: BootStatus) -> None:
        """``boot_move_sector_up``: primary sector ``idx - 1`` -> ``idx``."""
        ctx = self.ctx
        new_off = ctx.sector_off(BOOT_SLOT_PRIMARY, idx)
        old_off = ctx.sector_off(BOOT_SLOT_PRIMARY, idx - 1)
        if bs.idx == BOOT_STATUS_IDX_0:
            if bs.source != StatusSource.PRIMARY_SLOT:
                self.scramble_trailer_sectors(ctx.primary_ref)
                self.status_init(ctx.primary_ref, bs)
            self.scramble_trailer_sectors(ctx.secondary_ref)
        erase_region(ctx.primary, new_off, sz, False)
        copy_region(ctx.primary, ctx.primary, old_off, new_off, sz)
        self.write_status(bs)
        bs.idx += 1

    def _swap_sectors(self, idx: int, sz: int, bs: BootStatus) -> None:
        """``boot_swap_sectors``: secondary ``idx - 1`` -> primary ``idx - 1``, then moved-up
        primary ``idx`` -> secondary ``idx - 1``."""
        ctx = self.ctx
        pri_up_off = ctx.sector_off(BOOT_SLOT_PRIMARY, idx)
        pri_off = ctx.sector_off(BOOT_SLOT_PRIMARY, idx - 1)
        sec_off = ctx.sector_off(BOOT_SLOT_SECONDARY, idx - 1)
        if bs.state == BOOT_STATUS_STATE_0:
            erase_region(ctx.primary, pri_off, sz, False)
            copy_region(ctx.secondary, ctx.primary, sec_off, pri_off, sz)
            self.write_status(bs)
            bs.state = BOOT_STATUS_STATE_1
        if bs.state == BOOT_STATUS_STATE_1:
            erase_region(ctx.secondary, sec_off, sz, False)
            copy_region(ctx.primary, ctx.secondary, pri_up_off, sec_off, sz)
            self.write_status(bs)
            bs.idx += 1
            bs.state = BOOT_STATUS_STATE_0

    def fixup_revert(self, bs: BootStatus) -> None:
        """``fixup_revert``: before a revert re-initialises the primary's status, give the
        secondary a PERM request (image_ok, swap_size, magic), so a cut then still finishes."""
        if (
            bs.swap_type != BootSwapType.REVERT
            or bs.op != StatusOp.MOVE
            or bs.idx != BOOT_STATUS_IDX_0
        ):
            return
        sec = self.ctx.secondary_ref
        if self.store.read_swap_state(sec).magic is Magic.UNSET:
            self.scramble_trailer_sectors(sec)
            self.store.write_image_ok(sec)
            self.store.write_swap_size(sec, bs.swap_size)
            self.store.write_magic(sec)

    def run(self, bs: BootStatus, copy_size: int) -> None:
        """``swap_run``: check room for a new swap, then move and swap from where ``bs`` is."""
        last_idx = self.find_last_idx(copy_size)
        sector_sz = self.sector_sz()
        if bs.is_reset(self.reset_op) and not self.swap_fits(last_idx):
            bs.swap_type = BootSwapType.NONE
            return

        self.fixup_revert(bs)

        if bs.op == StatusOp.MOVE:
            idx = last_idx
            while idx > 0:
                if idx <= last_idx - bs.idx + 1:
                    self._move_sector_up(idx, sector_sz, bs)
                idx -= 1
            bs.idx = BOOT_STATUS_IDX_0

        bs.op = StatusOp.SWAP
        idx = 1
        while idx <= last_idx:
            if idx >= bs.idx:
                self._swap_sectors(idx, sector_sz, bs)
            idx += 1
