"""Overwrite-only upgrade: the secondary image is copied over the primary one; no way back.

One step per region (erase primary[r], copy secondary[r] -> primary[r]), then a last step that
erases the secondary trailer so the request is not done again, each recorded in the swap status.
Every step is idempotent (the secondary is untouched until the last step), so after a power cut
the first unrecorded step is done again.
"""

from __future__ import annotations

from otakit.device.regions import copy_area, upgrade_regions
from otakit.device.slot import Slot
from otakit.device.swap_status import SwapProgress, SwapStatus


def overwrite_steps(slot_size: int, region_size: int, copy_size: int, trailer_size: int) -> int:
    return len(upgrade_regions(slot_size, region_size, copy_size, trailer_size)) + 1


def run_overwrite(
    *,
    primary: Slot,
    secondary: Slot,
    status: SwapStatus,
    progress: SwapProgress,
    trailer_size: int,
) -> None:
    regions = upgrade_regions(primary.size, primary.sector_size, progress.copy_size, trailer_size)
    data_end = primary.size - trailer_size
    for step in range(progress.done_steps, len(regions) + 1):
        if step < len(regions):
            start, end = regions[step]
            primary.erase(start, end - start)
            copy_area(secondary, start, primary, start, max(0, min(end, data_end) - start))
        else:
            secondary.erase_trailer(trailer_size)
        status.step_done(step)
    status.finish()
