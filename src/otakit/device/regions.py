"""Which parts of a slot an upgrade moves, and copying them sector by sector.

A slot is moved in *regions* (the scratch size for swap-scratch, one sector for overwrite-only).
Only regions that hold image bytes (below ``copy_size``) are moved, plus the regions holding the
trailer, so that the old trailers are always erased by the move. Within a trailer region only the
part below the trailer is copied: trailers are never copied, they are written afresh.
"""

from __future__ import annotations

from otakit.device.slot import FlashArea


def upgrade_regions(
    slot_size: int, region_size: int, copy_size: int, trailer_size: int
) -> list[tuple[int, int]]:
    """``[start, end)`` of each region to move, in order."""
    data_end = slot_size - trailer_size
    regions = []
    for start in range(0, slot_size, region_size):
        end = min(start + region_size, slot_size)
        if start < copy_size or end > data_end:
            regions.append((start, end))
    return regions


def copy_area(src: FlashArea, src_off: int, dst: FlashArea, dst_off: int, length: int) -> None:
    """Copy ``length`` bytes; one write per sector, all-erased sectors skipped (already erased)."""
    sector = dst.sector_size
    erased = bytes([dst.flash.erased_value]) * sector
    pos = 0
    while pos < length:
        step = min(sector - (dst_off + pos) % sector, length - pos)
        data = src.read_at(src_off + pos, step)
        if data != erased[:step]:
            dst.write(dst_off + pos, data)
        pos += step
