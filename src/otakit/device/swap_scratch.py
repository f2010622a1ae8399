"""swap-scratch: MCUboot's ``swap_scratch.c`` (MCUBOOT_SWAP_USING_SCRATCH), ported.

The slots are exchanged from their last sectors to their first, one scratch-sized group of
sectors at a time, three steps per group, each recorded by a status entry::

    state 0  erase scratch, copy secondary[g] -> scratch
    state 1  erase secondary[g], copy primary[g] -> secondary[g]
    state 2  erase primary[g], copy scratch -> primary[g]

The first group holds the trailers. Before it is moved the trailer (swap_info, image_ok,
swap_size, magic) is written to the scratch area and, when the group also holds image data,
the status entries of that group stay in the scratch trailer (``use_scratch``) until state 2
copies them into the new primary trailer. :func:`status_source` finds the status after a reset
with MCUboot's table. The same file provides the overwrite-only geometry checks
(:func:`slots_compatible`, :func:`app_max_size` with ``overwrite=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from otakit.device.boot_status import (
    BOOT_STATUS_IDX_0,
    BOOT_STATUS_STATE_0,
    BOOT_STATUS_STATE_1,
    BOOT_STATUS_STATE_2,
    AreaRef,
    BootStatus,
    BootSwapType,
    Flag,
    Magic,
    StatusSource,
    magic_compatible,
)
from otakit.device.swap_mode import (
    BOOT_NUM_SLOTS,
    BOOT_SLOT_PRIMARY,
    BOOT_SLOT_SECONDARY,
    BootContext,
    McubootError,
    RawHeader,
    SwapMode,
    copy_region,
    erase_region,
    read_header,
    scramble_region,
)

# boot_status_tables: (primary magic, scratch magic, primary copy_done) -> source
_STATUS_TABLE = (
    (Magic.GOOD, Magic.NOTGOOD, Flag.SET, StatusSource.NONE),
    (Magic.GOOD, Magic.NOTGOOD, Flag.UNSET, StatusSource.PRIMARY_SLOT),
    (Magic.ANY, Magic.GOOD, Flag.ANY, StatusSource.SCRATCH),
    (Magic.UNSET, Magic.ANY, Flag.UNSET, StatusSource.PRIMARY_SLOT),
)


@dataclass(frozen=True)
class _SectorWalk:
    """What the sector walk of ``boot_slots_compatible`` and ``app_max_size`` ends with."""

    ok: bool  # False where the C functions give up (sizes that never line up, or too big)
    primary_sectors: int  # i: primary sectors walked
    secondary_sectors: int  # j
    swapped: int  # primary_sz (== secondary_sz): bytes of the scratch-sized groups
    last_primary: int  # sz0 / sz1 at the end: the overwrite-only sizes
    last_secondary: int


def _walk_sectors(ctx: BootContext, overwrite: bool) -> _SectorWalk:
    """The loop ``boot_slots_compatible`` and ``app_max_size`` of swap_scratch.c share: walk
    both slots' sectors in step, grouping them where their sizes line up; without
    ``overwrite`` each group must fit the scratch area."""
    n0, n1 = ctx.num_sectors(BOOT_SLOT_PRIMARY), ctx.num_sectors(BOOT_SLOT_SECONDARY)
    scratch_sz = 0 if overwrite else ctx.area(ctx.scratch_ref).size
    i = j = sz0 = sz1 = swapped = 0
    smaller = 0
    while i < n0 or j < n1:
        if sz0 == sz1:
            sz0 += _sector_size(ctx, BOOT_SLOT_PRIMARY, i)
            sz1 += _sector_size(ctx, BOOT_SLOT_SECONDARY, j)
            i += 1
            j += 1
        elif sz0 < sz1:
            sz0 += _sector_size(ctx, BOOT_SLOT_PRIMARY, i)
            if smaller == 2:
                return _SectorWalk(False, i, j, swapped, sz0, sz1)
            smaller = 1
            i += 1
        else:
            sz1 += _sector_size(ctx, BOOT_SLOT_SECONDARY, j)
            if smaller == 1:
                return _SectorWalk(False, i, j, swapped, sz0, sz1)
            smaller = 2
            j += 1
        if not overwrite and sz0 == sz1:
            swapped += sz0
            if sz0 > scratch_sz or sz1 > scratch_sz:
                return _SectorWalk(False, i, j, swapped, sz0, sz1)
            smaller = sz0 = sz1 = 0
    return _SectorWalk(True, i, j, swapped, sz0, sz1)


def slots_compatible(ctx: BootContext, *, overwrite: bool) -> bool:
    """``boot_slots_compatible`` of swap_scratch.c (``overwrite``: MCUBOOT_OVERWRITE_ONLY,
    which skips the scratch-size checks)."""
    n0, n1 = ctx.num_sectors(BOOT_SLOT_PRIMARY), ctx.num_sectors(BOOT_SLOT_SECONDARY)
    max_sectors = ctx.geometry.max_sectors
    if n0 > max_sectors or n1 > max_sectors:
        return False
    walk = _walk_sectors(ctx, overwrite)
    # primary_sz and secondary_sz only ever grow together, so their equality always holds
    return walk.ok and walk.primary_sectors == n0 and walk.secondary_sectors == n1


def _sector_size(ctx: BootContext, slot: int, sector: int) -> int:
    """A sector size, 0 past the end (where MCUboot would read an unused array entry)."""
    if sector >= ctx.num_sectors(slot):
        return 0
    return ctx.sector_size(slot, sector)


def app_max_size(ctx: BootContext, *, overwrite: bool) -> int:
    """``app_max_size`` of swap_scratch.c."""
    walk = _walk_sectors(ctx, overwrite)
    if not walk.ok:
        return 0
    if overwrite:
        return min(walk.last_primary, walk.last_secondary)
    return _adjust_to_trailer(ctx, walk.swapped)


def first_trailer_sector(ctx: BootContext, slot: int, trailer_sz: int) -> int:
    """``boot_get_first_trailer_sector``."""
    sector = ctx.num_sectors(slot) - 1
    total = ctx.sector_size(slot, sector)
    while total < trailer_sz:
        sector -= 1
        total += ctx.sector_size(slot, sector)
    return sector


def _first_trailer_sector_end_off(ctx: BootContext, slot: int, trailer_sz: int) -> int:
    sector = first_trailer_sector(ctx, slot, trailer_sz)
    return ctx.sector_off(slot, sector) + ctx.sector_size(slot, sector)


def _adjust_to_trailer(ctx: BootContext, slot_size: int) -> int:
    """``app_max_size_adjust_to_trailer``."""
    g = ctx.geometry
    trailer_sz = g.trailer_sz(ctx.write_sz)
    trailer_off = slot_size - trailer_sz
    end = max(
        _first_trailer_sector_end_off(ctx, BOOT_SLOT_PRIMARY, trailer_sz),
        _first_trailer_sector_end_off(ctx, BOOT_SLOT_SECONDARY, trailer_sz),
    )
    in_first_sector = end - trailer_off
    scratch_trailer_sz = g.scratch_trailer_sz(ctx.write_sz)
    padding = max(0, scratch_trailer_sz - in_first_sector)
    return trailer_off - padding


def read_status_bytes(mode: SwapMode, area: AreaRef, bs: BootStatus) -> None:
    """``swap_read_status_bytes`` of swap_scratch.c (also used by overwrite builds)."""
    store = mode.store
    max_entries = store.status_entries(area)
    found = False
    found_idx = 0
    i = 0
    while i < max_entries:
        if store.status_entry_erased(area, i):
            if found and not found_idx:
                found_idx = i
        elif not found:
            found = True
        elif found_idx:
            break  # inconsistent status: MCUboot logs it and validates the primary later
        i += 1
    if found:
        if not found_idx:
            found_idx = i
        bs.idx = found_idx // mode.state_count + 1
        bs.state = found_idx % mode.state_count + 1


class SwapScratchMode(SwapMode):
    strategy = "swap-scratch"
    state_count: ClassVar[int] = 3
    needs_scratch: ClassVar[bool] = True

    # --- geometry ------------------------------------------------------------------------------

    def slots_compatible(self) -> bool:
        if self.ctx.scratch is None:
            return False
        return slots_compatible(self.ctx, overwrite=False)

    def app_max_size(self) -> int:
        return app_max_size(self.ctx, overwrite=False)

    def scratch_status_off(self) -> int:
        """``boot_status_off(fap_scratch)``."""
        scratch = self.ctx.area(self.ctx.scratch_ref)
        return scratch.size - self.ctx.geometry.scratch_trailer_sz(scratch.flash.write_align)

    def _copy_sz(self, last_sector_idx: int) -> tuple[int, int]:
        """``boot_copy_sz``: (bytes, first sector index) of the group ending at ``last``."""
        scratch_sz = self.ctx.area(self.ctx.scratch_ref).size
        size = 0
        i = last_sector_idx
        while i >= 0:
            new_sz = size + self.ctx.sector_size(BOOT_SLOT_PRIMARY, i)
            if new_sz > scratch_sz:
                break
            size = new_sz
            i -= 1
        return size, i + 1

    def _find_last_sector_idx(self, copy_size: int) -> int:
        """``find_last_sector_idx``."""
        primary_sz = secondary_sz = 0
        last_primary = last_secondary = 0
        while True:
            if primary_sz < copy_size or primary_sz < secondary_sz:
                primary_sz += self._checked_sector(BOOT_SLOT_PRIMARY, last_primary)
                last_primary += 1
            if secondary_sz < copy_size or secondary_sz < primary_sz:
                secondary_sz += self._checked_sector(BOOT_SLOT_SECONDARY, last_secondary)
                last_secondary += 1
            if primary_sz >= copy_size and secondary_sz >= copy_size and primary_sz == secondary_sz:
                break
        return last_primary - 1

    def _checked_sector(self, slot: int, sector: int) -> int:
        if sector >= self.ctx.num_sectors(slot):
            raise McubootError(
                "swap size larger than the slot (MCUboot would read past its sector table)",
                "BOOT_EBADSTATUS",
            )
        return self.ctx.sector_size(slot, sector)

    def find_swap_count(self, copy_size: int) -> int:
        """``find_swap_count``."""
        last = self._find_last_sector_idx(copy_size)
        count = 0
        while last >= 0:
            _, first = self._copy_sz(last)
            last = first - 1
            count += 1
        return count

    def read_image_header(self, slot: int, bs: BootStatus | None) -> RawHeader:
        hdr_slot = slot
        if bs is not None and not bs.is_reset(self.reset_op):
            swap_size = self.store.read_swap_size(self.find_status())
            swap_count = self.find_swap_count(swap_size)
            done = bs.idx - BOOT_STATUS_IDX_0
            if done >= swap_count:
                hdr_slot = BOOT_SLOT_SECONDARY if slot == BOOT_SLOT_PRIMARY else BOOT_SLOT_PRIMARY
            elif done == swap_count - 1:
                if slot == BOOT_SLOT_SECONDARY and bs.state >= BOOT_STATUS_STATE_1:
                    hdr_slot = BOOT_NUM_SLOTS
                elif slot == BOOT_SLOT_PRIMARY and bs.state >= BOOT_STATUS_STATE_2:
                    hdr_slot = BOOT_SLOT_SECONDARY
        return read_header(self.ctx.slot_area(hdr_slot))

    # --- status --------------------------------------------------------------------------------

    def status_source(self) -> StatusSource:
        primary = self.store.read_swap_state(self.ctx.primary_ref)
        scratch = self.store.read_swap_state(self.ctx.scratch_ref)
        for magic_p, magic_s, copy_done_p, source in _STATUS_TABLE:
            if (
                magic_compatible(magic_p, primary.magic)
                and magic_compatible(magic_s, scratch.magic)
                and copy_done_p in (Flag.ANY, primary.copy_done)
            ):
                if (
                    self.ctx.image_count > 1
                    and source is StatusSource.SCRATCH
                    and scratch.image_num != self.ctx.image
                ):
                    return StatusSource.NONE
                return source
        return StatusSource.NONE

    def read_status_bytes(self, area: AreaRef, bs: BootStatus) -> None:
        read_status_bytes(self, area, bs)

    # --- the swap ------------------------------------------------------------------------------

    def run(self, bs: BootStatus, copy_size: int) -> None:
        last = self._find_last_sector_idx(copy_size)
        swap_idx = 0
        while last >= 0:
            size, first = self._copy_sz(last)
            if swap_idx >= bs.idx - BOOT_STATUS_IDX_0:
                self.swap_sectors(first, size, bs)
            last = first - 1
            swap_idx += 1

    def swap_sectors(self, idx: int, sz: int, bs: BootStatus) -> None:
        """``boot_swap_sectors``."""
        ctx = self.ctx
        primary, secondary = ctx.primary, ctx.secondary
        scratch = ctx.area(ctx.scratch_ref)
        img_off = ctx.sector_off(BOOT_SLOT_PRIMARY, idx)
        copy_sz = sz
        trailer_sz = ctx.geometry.trailer_sz(ctx.write_sz)
        first_trailer_primary = first_trailer_sector(ctx, BOOT_SLOT_PRIMARY, trailer_sz)
        if img_off + sz > ctx.sector_off(BOOT_SLOT_PRIMARY, first_trailer_primary):
            copy_sz = primary.size - img_off - trailer_sz
            scratch_trailer_off = self.scratch_status_off()
            copy_sz = min(copy_sz, scratch_trailer_off)
        bs.use_scratch = bs.idx == BOOT_STATUS_IDX_0 and copy_sz != sz

        if bs.state == BOOT_STATUS_STATE_0:
            erase_region(scratch, 0, scratch.size, False)
            if bs.idx == BOOT_STATUS_IDX_0:
                self.status_init(ctx.scratch_ref, bs)
                if not bs.use_scratch:
                    self.scramble_trailer_sectors(ctx.primary_ref)
                    self.status_init(ctx.primary_ref, bs)
                    erase_region(scratch, 0, scratch.size, False)
            copy_region(secondary, scratch, img_off, 0, copy_sz)
            self.write_status(bs)
            bs.state = BOOT_STATUS_STATE_1

        if bs.state == BOOT_STATUS_STATE_1:
            erase_sz = sz
            if bs.idx == BOOT_STATUS_IDX_0:
                self.scramble_trailer_sectors(ctx.secondary_ref)
                if bs.use_scratch:
                    sector = first_trailer_sector(ctx, BOOT_SLOT_SECONDARY, trailer_sz)
                    erase_sz = ctx.sector_off(BOOT_SLOT_SECONDARY, sector) - img_off
            if erase_sz > 0:
                erase_region(secondary, img_off, erase_sz, False)
            copy_region(primary, secondary, img_off, img_off, copy_sz)
            self.write_status(bs)
            bs.state = BOOT_STATUS_STATE_2

        if bs.state == BOOT_STATUS_STATE_2:
            erase_sz = sz
            if bs.use_scratch:
                self.scramble_trailer_sectors(ctx.primary_ref)
                erase_sz = ctx.sector_off(BOOT_SLOT_PRIMARY, first_trailer_primary) - img_off
            if erase_sz > 0:
                erase_region(primary, img_off, erase_sz, False)
            copy_region(scratch, primary, 0, img_off, copy_sz)
            if bs.use_scratch:
                self.carry_scratch_trailer(img_off + copy_sz, bs)
            erase_scratch = bs.use_scratch
            bs.use_scratch = False
            self.write_status(bs)
            bs.idx += 1
            bs.state = BOOT_STATUS_STATE_0
            if erase_scratch:
                scramble_region(scratch, 0, scratch.size, True)

    def carry_scratch_trailer(self, status_dst: int, bs: BootStatus) -> None:
        """State 2 of the trailer group: copy the status entries kept in the scratch trailer to
        the primary slot at ``status_dst``, then rewrite image_ok, swap_info, swap_size and the
        magic in the primary trailer from the scratch trailer."""
        ctx = self.ctx
        scratch = ctx.area(ctx.scratch_ref)
        copy_region(
            scratch,
            ctx.primary,
            self.scratch_status_off(),
            status_dst,
            (self.state_count - 1) * ctx.write_sz,
        )
        state = self.store.read_swap_state(ctx.scratch_ref)
        if state.image_ok is Flag.SET:
            self.store.write_image_ok(ctx.primary_ref)
        if state.swap_type != BootSwapType.NONE:
            self.store.write_swap_info(ctx.primary_ref, state.swap_type, ctx.image)
        self.store.write_swap_size(ctx.primary_ref, bs.swap_size)
        self.store.write_magic(ctx.primary_ref)


__all__ = [
    "BOOT_STATUS_STATE_0",
    "SwapScratchMode",
    "app_max_size",
    "first_trailer_sector",
    "read_status_bytes",
    "slots_compatible",
]
