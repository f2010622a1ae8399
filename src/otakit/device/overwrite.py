"""overwrite-only: MCUboot built with MCUBOOT_OVERWRITE_ONLY, ported.

No swap status and no way back: ``boot_copy_image`` (loader.c) erases the whole primary slot,
sector by sector, copies the whole secondary slot over it (trailer included, in
``boot_copy_region`` chunks), then erases the secondary's first sector (its header) and its last
sector (its trailer) so the request is not seen again. A reset in the middle simply starts it
again at the next boot: the secondary is intact until the copy is complete. The slot geometry
checks are swap_scratch.c's with OVERWRITE_ONLY.
"""

from __future__ import annotations

from typing import ClassVar

from otakit.device.boot_status import AreaRef, BootStatus, StatusSource
from otakit.device.swap_mode import (
    BOOT_SLOT_PRIMARY,
    BOOT_SLOT_SECONDARY,
    SwapMode,
    copy_region,
    erase_region,
    scramble_region,
)
from otakit.device.swap_scratch import app_max_size, read_status_bytes, slots_compatible


class OverwriteMode(SwapMode):
    strategy = "overwrite"
    overwrite_only: ClassVar[bool] = True

    def slots_compatible(self) -> bool:
        return slots_compatible(self.ctx, overwrite=True)

    def app_max_size(self) -> int:
        return app_max_size(self.ctx, overwrite=True)

    def max_image_size(self, slot: int) -> int:
        """``bootutil_max_image_size`` for overwrite-only: ``boot_swap_info_off(fap)``."""
        area = self.ctx.slot_area(slot)
        return self.ctx.geometry.swap_info_off(area.size)

    def status_source(self) -> StatusSource:
        return StatusSource.NONE  # overwrite-only keeps no swap status

    def read_status_bytes(self, area: AreaRef, bs: BootStatus) -> None:
        read_status_bytes(self, area, bs)

    def run(self, bs: BootStatus, copy_size: int) -> None:
        self.copy_image(bs)

    def copy_image(self, bs: BootStatus) -> None:
        """``boot_copy_image`` (neither OVERWRITE_ONLY_FAST nor KEEP_BACKUP)."""
        ctx = self.ctx
        primary, secondary = ctx.primary, ctx.secondary
        size = 0
        for sector in range(ctx.num_sectors(BOOT_SLOT_PRIMARY)):
            this_size = ctx.sector_size(BOOT_SLOT_PRIMARY, sector)
            erase_region(primary, size, this_size, False)
            size += this_size
        copy_region(secondary, primary, 0, 0, size)
        scramble_region(
            secondary,
            ctx.sector_off(BOOT_SLOT_SECONDARY, 0),
            ctx.sector_size(BOOT_SLOT_SECONDARY, 0),
            False,
        )
        last = ctx.num_sectors(BOOT_SLOT_SECONDARY) - 1
        scramble_region(
            secondary,
            ctx.sector_off(BOOT_SLOT_SECONDARY, last),
            ctx.sector_size(BOOT_SLOT_SECONDARY, last),
            False,
        )
