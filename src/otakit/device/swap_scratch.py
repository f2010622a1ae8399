"""Swap using a scratch area: the image in the secondary slot and the one in the primary slot
change places, region by region, and the upgrade can be interrupted at any flash operation.

For each region, three steps, each recorded in the swap status when it is complete::

    step 0   erase scratch,            copy primary[r]   -> scratch
    step 1   erase primary[r],         copy secondary[r] -> primary[r]
    step 2   erase secondary[r],       copy scratch      -> secondary[r]

Each step is idempotent: its source is intact until the *next* step starts (primary[r] is erased
only in step 1, secondary[r] only in step 2, scratch only in the next region's step 0), so after
a power cut the first unrecorded step is simply done again. When all regions are moved, the
primary trailer is written (swap_info, image_ok for a permanent upgrade or a revert, copy_done,
magic) and the status is marked done; those writes are idempotent too.
"""

from __future__ import annotations

from otakit.device.regions import copy_area, upgrade_regions
from otakit.device.slot import FlashArea, Slot
from otakit.device.swap_status import SwapProgress, SwapStatus
from otakit.image.trailer import SwapType

STEPS_PER_REGION = 3


def swap_steps(slot_size: int, region_size: int, copy_size: int, trailer_size: int) -> int:
    return len(upgrade_regions(slot_size, region_size, copy_size, trailer_size)) * STEPS_PER_REGION


def run_swap(
    *,
    image: int,
    primary: Slot,
    secondary: Slot,
    scratch: FlashArea,
    status: SwapStatus,
    progress: SwapProgress,
    trailer_size: int,
) -> None:
    region_size = scratch.size
    regions = upgrade_regions(primary.size, region_size, progress.copy_size, trailer_size)
    data_end = primary.size - trailer_size
    for step in range(progress.done_steps, len(regions) * STEPS_PER_REGION):
        index, phase = divmod(step, STEPS_PER_REGION)
        start, end = regions[index]
        data = max(0, min(end, data_end) - start)
        if phase == 0:
            scratch.erase(*_span(scratch, end - start))
            copy_area(primary, start, scratch, 0, data)
        elif phase == 1:
            primary.erase(start, end - start)
            copy_area(secondary, start, primary, start, data)
        else:
            secondary.erase(start, end - start)
            copy_area(scratch, 0, secondary, start, data)
        status.step_done(step)
    primary.write_swap_info(image, progress.swap_type)
    if progress.swap_type in (SwapType.PERM, SwapType.REVERT):
        primary.write_image_ok()
    primary.write_copy_done()
    primary.write_magic()
    status.finish()


def _span(area: FlashArea, length: int) -> tuple[int, int]:
    start, end = area.sector_range(0, length)
    return start, end - start
