"""The flash map: which areas of a device's flash hold the bootloader, the slots and the rest,
and which MCUboot upgrade strategy runs on it.

An MCUboot device splits its flash into named areas. Per image there is a *primary* slot (the
image that runs) and a *secondary* slot (where an update is downloaded). A *scratch* area,
shared by all images, holds one sector at a time while swap-scratch and swap-status exchange
the slots. swap-status (Infineon's MCUBootApp) keeps its progress and trailers in a separate
*status* partition, given as the ``status`` area of image 0. The *bootloader* area is MCUboot
itself.

The strategy (:class:`Strategy`) is the MCUboot upgrade mode the device's bootloader was built
with. The map is checked as that MCUboot build checks its geometry: a map MCUboot would refuse
(or on which it could never upgrade) is a :class:`FlashMapError`:

- every slot (and the scratch area where it is used) has at most ``max_sectors`` sectors
  (``MCUBOOT_MAX_IMG_SECTORS``: ``boot_read_sectors`` fails otherwise);
- the write size is at most ``BOOT_MAX_ALIGN`` (upstream modes: ``max(8, write_align)``, at most
  32) or, for swap-status, at most a status row (0x200);
- overwrite, swap-scratch, swap-status: equal primary and secondary slots
  (``boot_slots_compatible``); swap-move: the primary has as many sectors as the secondary or
  one more; swap-offset: the secondary has as many as the primary or one more;
- swap-scratch and swap-status need a scratch area of at least one sector (swap-scratch: and
  at least the scratch trailer, ``boot_scratch_trailer_sz``);
- swap-status needs the status partition (``swap_status.h``: ``(2 * images + 1)`` records of
  ``2 * rows * 0x200`` bytes, at most 64 sectors); the other strategies keep their progress in
  the slot trailers and a ``status`` area in their map is refused (it would only be flash
  nobody uses; drop it or choose swap-status). A scratch area is allowed with every strategy
  and simply unused by overwrite, swap-move and swap-offset.

Offsets inside otakit count from the first flash byte (0-based, what :class:`~otakit.device.flash.Flash`
takes); the JSON form uses absolute addresses (``base + offset``), as datasheets and linker
scripts do::

    {"name": "psoc6-2m-swap", "strategy": "swap-status",
     "flash": {"base": "0x10000000", "size": "0x200000", "sector_size": "0x200",
               "write_align": "0x200", "max_sectors": 1840,
               "erased_value": "0x00", "write_mode": "replace"},
     "areas": [{"name": "bootloader", "address": "0x10000000", "size": "0x28000"},
               {"name": "primary", "image": 0, "address": "0x10028000", "size": "0xe6000"},
               ...]}

``strategy``, ``flash.max_sectors``, ``flash.erased_value`` and ``flash.write_mode`` are
optional: a map without them (as older otakit wrote) is swap-scratch when it has a scratch area
and overwrite otherwise, with 128 sectors, erased value 0xff and NOR ("and") writes.

Numbers in the JSON form are integers or strings holding a decimal or ``0x`` hexadecimal number.
Every problem with a map, from bad JSON to overlapping areas, is a :class:`FlashMapError` whose
message names the area and the value at fault.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from otakit.device.flash import ERASED_VALUES, WRITE_MODES, Backing, Flash
from otakit.errors import FlashMapError
from otakit.files import read_input, write_atomic
from otakit.image.trailer import (
    DEFAULT_MAX_SECTORS,
    FLASH_WRITE_ALIGNS,
    MAX_ALIGN,
    SWAP_STATUS_MAX_SECTORS,
    SWAP_STATUS_ROW_SIZE,
    VALID_MAX_ALIGNS,
    align_up,
    boot_trailer_sz,
    scratch_trailer_size,
    swap_status_area_size,
    trailer_size,
)


class Strategy(StrEnum):
    """The MCUboot upgrade mode a device's bootloader is built with."""

    OVERWRITE = "overwrite"  # MCUBOOT_OVERWRITE_ONLY
    SWAP_SCRATCH = "swap-scratch"  # MCUBOOT_SWAP_USING_SCRATCH
    SWAP_MOVE = "swap-move"  # MCUBOOT_SWAP_USING_MOVE
    SWAP_OFFSET = "swap-offset"  # MCUBOOT_SWAP_USING_OFFSET
    SWAP_STATUS = "swap-status"  # cypress branch: scratch + MCUBOOT_SWAP_USING_STATUS


AREA_KINDS = ("bootloader", "primary", "secondary", "scratch", "status")
IMAGE_KINDS = ("primary", "secondary", "status")  # areas that belong to one image

_NUMBER_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")


def _hex(value: int) -> str:
    return f"0x{value:x}" if value >= 0 else f"-0x{-value:x}"


def _check_int(value: object, what: str, *, minimum: int | None = None) -> int:
    """Return ``value`` when it is an int (not a bool) >= ``minimum``; else raise FlashMapError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise FlashMapError(f"{what} must be an integer, not {value!r}", value=value)
    if minimum is not None and value < minimum:
        raise FlashMapError(f"{what} is {value} but must be at least {minimum}", value=value)
    return value


@dataclass(frozen=True)
class Area:
    """One named area: ``size`` bytes at ``offset`` from the start of the flash.

    ``image`` is the image index of a primary, secondary or status area, and None for the
    bootloader and scratch areas, which no single image owns.

    Raises:
        FlashMapError: unknown ``name``, negative ``offset``, ``size`` not positive, or an
            image index missing where one is needed (or given where none belongs).
    """

    name: str
    offset: int
    size: int
    image: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in AREA_KINDS:
            raise FlashMapError(
                f"unknown area name {self.name!r}; expected one of {', '.join(AREA_KINDS)}",
                value=self.name,
            )
        _check_int(self.offset, f"offset of area {self.label}", minimum=0)
        _check_int(self.size, f"size of area {self.label}", minimum=1)
        if self.name in IMAGE_KINDS:
            if self.image is None:
                raise FlashMapError(
                    f"{self.name} area at offset {_hex(self.offset)} has no image index",
                    value=self.name,
                )
            _check_int(self.image, f"image index of {self.name} area", minimum=0)
        elif self.image is not None:
            raise FlashMapError(
                f"{self.name} area is shared by all images and takes no image index "
                f"(got {self.image!r})",
                value=self.image,
            )

    @property
    def end(self) -> int:
        """Offset one past the last byte of the area."""
        return self.offset + self.size

    @property
    def label(self) -> str:
        """How messages name the area: ``bootloader``, ``primary (image 0)``..."""
        if self.image is None:
            return self.name
        return f"{self.name} (image {self.image})"


@dataclass(frozen=True)
class FlashMap:
    """The areas of one device's flash and the MCUboot build that runs on it, checked when built.

    ``write_align`` is the flash's write size (``flash_area_align()``, imgtool ``--align``),
    ``max_sectors`` the bootloader's ``MCUBOOT_MAX_IMG_SECTORS`` (imgtool ``-M``),
    ``erased_value`` what erased bytes read (0xff or 0x00), ``write_mode`` how a write changes
    the cells ("and": NOR, "replace": row writes as on PSoC 6). ``strategy`` defaults to
    swap-scratch when the map has a scratch area and to overwrite otherwise.
    ``base_address`` is the address of the first flash byte; :attr:`Area.offset` counts from it.

    Raises:
        FlashMapError: an area is misaligned to ``sector_size``, outside the flash or overlaps
            another; the bootloader or scratch area is given twice; images are not numbered
            0..n-1 or lack exactly one primary and one secondary slot; the geometry is one the
            strategy's MCUboot refuses (see the module docstring).
    """

    name: str
    flash_size: int
    sector_size: int
    write_align: int
    areas: tuple[Area, ...]
    base_address: int = 0
    max_sectors: int = DEFAULT_MAX_SECTORS
    strategy: Strategy = None  # type: ignore[assignment]  # None: chosen from the areas
    erased_value: int = 0xFF
    write_mode: str = "and"

    def __post_init__(self) -> None:
        object.__setattr__(self, "areas", tuple(self.areas))
        if self.strategy is None:
            has_scratch = any(isinstance(a, Area) and a.name == "scratch" for a in self.areas)
            default = Strategy.SWAP_SCRATCH if has_scratch else Strategy.OVERWRITE
            object.__setattr__(self, "strategy", default)
        else:
            try:
                object.__setattr__(self, "strategy", Strategy(self.strategy))
            except ValueError:
                raise FlashMapError(
                    f"flash map {self.name}: unknown strategy {self.strategy!r}; expected one "
                    f"of {', '.join(s.value for s in Strategy)}",
                    value=self.strategy,
                ) from None
        self._check_geometry()
        for area in self.areas:
            self._check_area(area)
        self._check_kinds()
        self._check_overlaps()
        self._check_images()
        self._check_strategy()

    # --- validation ----------------------------------------------------------------------------

    def _check_geometry(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise FlashMapError(
                f"flash map name must be a non-empty string, not {self.name!r}", value=self.name
            )
        _check_int(self.base_address, f"flash map {self.name}: base address", minimum=0)
        _check_int(self.max_sectors, f"flash map {self.name}: max_sectors", minimum=1)
        _check_int(self.sector_size, f"flash map {self.name}: sector size", minimum=1)
        _check_int(self.flash_size, f"flash map {self.name}: flash size", minimum=1)
        _check_int(self.write_align, f"flash map {self.name}: write alignment")
        _check_int(self.erased_value, f"flash map {self.name}: erased value")
        if self.erased_value not in ERASED_VALUES:
            raise FlashMapError(
                f"flash map {self.name}: erased value {_hex(self.erased_value)} must be 0xff "
                "or 0x00",
                value=self.erased_value,
            )
        if self.write_mode not in WRITE_MODES:
            raise FlashMapError(
                f"flash map {self.name}: write mode {self.write_mode!r} must be one of "
                f"{', '.join(WRITE_MODES)}",
                value=self.write_mode,
            )
        if self.write_align not in FLASH_WRITE_ALIGNS:
            raise FlashMapError(
                f"flash map {self.name}: write alignment {self.write_align} is not one of "
                f"{', '.join(map(str, FLASH_WRITE_ALIGNS))}",
                value=self.write_align,
            )
        if self.sector_size % self.write_align:
            raise FlashMapError(
                f"flash map {self.name}: write alignment {self.write_align} does not divide "
                f"the sector size {_hex(self.sector_size)}",
                value=self.write_align,
            )
        if self.flash_size % self.sector_size:
            raise FlashMapError(
                f"flash map {self.name}: flash size {_hex(self.flash_size)} is not a multiple "
                f"of the sector size {_hex(self.sector_size)}",
                value=self.flash_size,
            )

    def _check_area(self, area: object) -> None:
        if not isinstance(area, Area):
            raise FlashMapError(f"flash map {self.name}: {area!r} is not an Area", value=area)
        where = f"flash map {self.name}: {area.label} area at {_hex(self.address(area))}"
        if area.offset % self.sector_size:
            raise FlashMapError(
                f"{where} does not start on a {_hex(self.sector_size)}-byte sector boundary",
                value=self.address(area),
            )
        if area.size % self.sector_size:
            raise FlashMapError(
                f"{where} has size {_hex(area.size)}, not a multiple of the "
                f"{_hex(self.sector_size)}-byte sector size",
                value=area.size,
            )
        if area.end > self.flash_size:
            raise FlashMapError(
                f"{where} with size {_hex(area.size)} ends at {_hex(self.base_address + area.end)}, "
                f"past the end of the flash at {_hex(self.base_address + self.flash_size)}",
                value=area.size,
            )

    def _check_kinds(self) -> None:
        for kind in ("bootloader", "scratch"):
            found = [a for a in self.areas if a.name == kind]
            if len(found) > 1:
                raise FlashMapError(
                    f"flash map {self.name} has {len(found)} {kind} areas "
                    f"(at {', '.join(_hex(self.address(a)) for a in found)}); at most one is allowed",
                    value=kind,
                )

    def _check_overlaps(self) -> None:
        ordered = sorted(self.areas, key=lambda a: (a.offset, a.end))
        for i, first in enumerate(ordered):
            for second in ordered[i + 1 :]:
                if second.offset >= first.end:
                    break
                raise FlashMapError(
                    f"flash map {self.name}: {first.label} area "
                    f"{_hex(self.address(first))}-{_hex(self.base_address + first.end)} overlaps "
                    f"{second.label} area "
                    f"{_hex(self.address(second))}-{_hex(self.base_address + second.end)}",
                    value=(first.label, second.label),
                )

    def _check_images(self) -> None:
        indices = sorted({a.image for a in self.areas if a.image is not None})
        if not indices:
            raise FlashMapError(
                f"flash map {self.name} has no image slots; it needs a primary and a secondary "
                "slot for image 0",
                value=self.name,
            )
        for expected, index in enumerate(indices):
            if index != expected:
                raise FlashMapError(
                    f"flash map {self.name}: images must be numbered 0 to {len(indices) - 1} "
                    f"without gaps, but image {expected} is missing (found "
                    f"{', '.join(map(str, indices))})",
                    value=index,
                )
        for index in indices:
            for kind in IMAGE_KINDS:
                found = [a for a in self.areas if a.name == kind and a.image == index]
                if len(found) > 1:
                    allowed = "at most one" if kind == "status" else "exactly one"
                    raise FlashMapError(
                        f"flash map {self.name}: image {index} has {len(found)} {kind} areas "
                        f"(at {', '.join(_hex(self.address(a)) for a in found)}); "
                        f"{allowed} is allowed",
                        value=index,
                    )
                if not found and kind != "status":
                    raise FlashMapError(
                        f"flash map {self.name}: image {index} has no {kind} slot",
                        value=index,
                    )

    def _fail(self, message: str, value: object) -> None:
        raise FlashMapError(f"flash map {self.name} ({self.strategy}): {message}", value=value)

    def _check_strategy(self) -> None:
        """Refuse what the strategy's MCUboot build refuses (see the module docstring)."""
        strategy = self.strategy
        sector = self.sector_size
        if strategy == Strategy.SWAP_STATUS:
            if self.write_align > SWAP_STATUS_ROW_SIZE:
                self._fail(
                    f"write alignment {self.write_align} is larger than a swap status row "
                    f"({SWAP_STATUS_ROW_SIZE})",
                    self.write_align,
                )
        elif self.write_align > VALID_MAX_ALIGNS[-1]:
            self._fail(
                f"write alignment {self.write_align} is larger than {VALID_MAX_ALIGNS[-1]}, the "
                "largest BOOT_MAX_ALIGN MCUboot supports: trailer fields and status entries "
                "are written from BOOT_MAX_ALIGN-byte buffers",
                self.write_align,
            )
        statuses = [a for a in self.areas if a.name == "status"]
        if strategy != Strategy.SWAP_STATUS:
            if statuses:
                self._fail(
                    f"{statuses[0].label} area: only swap-status keeps its progress in a status "
                    "partition; this strategy keeps it in the slot trailers (remove the area "
                    "or use strategy swap-status)",
                    statuses[0].label,
                )
        elif len(statuses) != 1 or statuses[0].image != 0:
            self._fail(
                "swap-status needs exactly one status area, the swap status partition shared "
                "by all images, given as image 0's",
                len(statuses),
            )
        if strategy in (Strategy.SWAP_SCRATCH, Strategy.SWAP_STATUS) and self.scratch is None:
            self._fail("the strategy needs a scratch area", None)
        for index in self.images:
            primary, secondary = self.primary(index), self.secondary(index)
            for slot in (primary, secondary):
                if slot.size // sector > self.max_sectors:
                    self._fail(
                        f"{slot.label} slot has {slot.size // sector} sectors of "
                        f"{_hex(sector)} bytes, more than max_sectors {self.max_sectors} "
                        "(MCUBOOT_MAX_IMG_SECTORS): MCUboot cannot read its sectors",
                        slot.size,
                    )
            p_sectors, s_sectors = primary.size // sector, secondary.size // sector
            if strategy == Strategy.SWAP_MOVE:
                if p_sectors not in (s_sectors, s_sectors + 1):
                    self._fail(
                        f"image {index}: swap-move needs the primary slot to have as many "
                        f"sectors as the secondary or one more, not {p_sectors} and {s_sectors}",
                        primary.size,
                    )
            elif strategy == Strategy.SWAP_OFFSET:
                if s_sectors not in (p_sectors, p_sectors + 1):
                    self._fail(
                        f"image {index}: swap-offset needs the secondary slot to have as many "
                        f"sectors as the primary or one more, not {s_sectors} and {p_sectors}",
                        secondary.size,
                    )
            elif p_sectors != s_sectors:
                self._fail(
                    f"image {index}: the primary slot ({_hex(primary.size)} bytes) and the "
                    f"secondary slot ({_hex(secondary.size)} bytes) must have the same size",
                    secondary.size,
                )
            if self.max_image_size(index) <= 0:
                self._fail(
                    f"image {index}: the slots leave no room for an image next to the "
                    f"{self.trailer_size}-byte trailer (write alignment {self.write_align}, "
                    f"max_sectors {self.max_sectors})",
                    primary.size,
                )
        scratch = self.scratch
        if scratch is not None and strategy in (Strategy.SWAP_SCRATCH, Strategy.SWAP_STATUS):
            if scratch.size < sector:
                self._fail(
                    f"scratch area of {_hex(scratch.size)} bytes is smaller than a sector",
                    scratch.size,
                )
            if scratch.size // sector > self.max_sectors:
                self._fail(
                    f"scratch area has {scratch.size // sector} sectors, more than "
                    f"max_sectors {self.max_sectors}: MCUboot cannot read its sectors",
                    scratch.size,
                )
            if strategy == Strategy.SWAP_SCRATCH:
                needed = scratch_trailer_size(self.write_align, max_align=self.max_align)
                if scratch.size < needed:
                    self._fail(
                        f"scratch area of {_hex(scratch.size)} bytes cannot hold the "
                        f"{needed}-byte scratch trailer",
                        scratch.size,
                    )
        if strategy != Strategy.SWAP_STATUS:
            return
        status = statuses[0]
        needed = self.status_partition_size
        if status.size < needed:
            self._fail(
                f"status area of {_hex(status.size)} bytes is smaller than the "
                f"{_hex(needed)} bytes swap_status.h needs for {len(self.images)} image(s) "
                f"and max_sectors {self.max_sectors}",
                status.size,
            )
        limit = min(SWAP_STATUS_MAX_SECTORS, self.max_sectors)
        if status.size // sector > limit:
            self._fail(
                f"status area has {status.size // sector} sectors, more than the {limit} "
                "MCUboot reads (BOOT_MAX_SWAP_STATUS_SECTORS 64 and max_sectors)",
                status.size,
            )

    # --- queries -------------------------------------------------------------------------------

    @property
    def images(self) -> list[int]:
        """The image indices, 0..n-1."""
        return sorted({a.image for a in self.areas if a.image is not None})

    def _find(self, kind: str, image: int) -> Area | None:
        if image not in self.images:
            raise FlashMapError(
                f"flash map {self.name} has no image {image!r}; it has images "
                f"{', '.join(map(str, self.images))}",
                value=image,
            )
        return next((a for a in self.areas if a.name == kind and a.image == image), None)

    def primary(self, image: int = 0) -> Area:
        """The primary slot of ``image``; raise FlashMapError when there is no such image."""
        area = self._find("primary", image)
        assert area is not None  # validated in __post_init__
        return area

    def secondary(self, image: int = 0) -> Area:
        """The secondary slot of ``image``; raise FlashMapError when there is no such image."""
        area = self._find("secondary", image)
        assert area is not None  # validated in __post_init__
        return area

    def status(self, image: int = 0) -> Area | None:
        """The status area of ``image`` (swap-status: image 0's is the swap status partition
        of all images), or None; raise FlashMapError for an unknown image."""
        return self._find("status", image)

    @property
    def scratch(self) -> Area | None:
        """The scratch area shared by all images, or None."""
        return next((a for a in self.areas if a.name == "scratch"), None)

    @property
    def bootloader(self) -> Area | None:
        """The bootloader's own area, or None when the map does not describe it."""
        return next((a for a in self.areas if a.name == "bootloader"), None)

    @property
    def max_align(self) -> int:
        """``BOOT_MAX_ALIGN`` of the MCUboot build: the trailer fields' size. imgtool's default
        ``max(8, write_align)`` for the upstream modes; 8 for swap-status (as built by the
        harness and MCUBootApp, the status partition holds the fields)."""
        if self.strategy == Strategy.SWAP_STATUS:
            return MAX_ALIGN
        return max(MAX_ALIGN, self.write_align)

    @property
    def trailer_size(self) -> int:
        """MCUboot's ``boot_trailer_sz()`` for the strategy: bytes at the end of each slot that
        hold the trailer; 0 for swap-status (its trailers live in the status partition)."""
        return trailer_size(
            self.write_align, self.max_sectors, strategy=self.strategy, max_align=self.max_align
        )

    @property
    def status_partition_size(self) -> int:
        """swap-status: the smallest status partition MCUboot works with; 0 otherwise."""
        if self.strategy != Strategy.SWAP_STATUS:
            return 0
        return swap_status_area_size(self.max_sectors, len(self.images))

    def max_image_size(self, image: int = 0) -> int:
        """The largest image (header, payload and TLVs) MCUboot accepts for ``image`` with this
        strategy and geometry; a larger one is refused (or, swap-status, erased).

        - overwrite: up to the swap_info field (``bootutil_max_image_size``:
          ``boot_swap_info_off``);
        - swap-scratch: the slot minus the trailer, less the padding needed so the scratch
          trailer fits next to the image's last bytes in the scratch area
          (``app_max_size_adjust_to_trailer``);
        - swap-move / swap-offset: ``app_max_size``: the trailer rounded up to whole sectors and
          one sector for the move, taken from the primary (move) or secondary (offset) slot;
        - swap-status: the cypress loader erases an image larger than
          ``write_align * sectors - write_align`` (the last row holds the trailer).
        """
        primary, secondary = self.primary(image), self.secondary(image)
        sector = self.sector_size
        p_sectors, s_sectors = primary.size // sector, secondary.size // sector
        strategy = self.strategy
        if strategy == Strategy.OVERWRITE:
            layout_fields = align_up(16, self.max_align) + 3 * self.max_align
            return min(primary.size, secondary.size) - layout_fields
        if strategy == Strategy.SWAP_STATUS:
            return self.write_align * min(p_sectors, s_sectors) - self.write_align
        trailer = boot_trailer_sz(
            self.write_align, self.max_sectors, strategy=strategy, max_align=self.max_align
        )
        if strategy in (Strategy.SWAP_MOVE, Strategy.SWAP_OFFSET):
            rounded = align_up(trailer, sector)
            if strategy == Strategy.SWAP_MOVE:
                return min(p_sectors * sector - rounded - sector, s_sectors * sector - rounded)
            return min(p_sectors * sector - rounded, s_sectors * sector - rounded - sector)
        # swap-scratch, uniform sectors
        slot_size = p_sectors * sector
        trailer_off = slot_size - trailer
        trailer_sectors = -(-trailer // sector)
        first_trailer_sector_end = (p_sectors - trailer_sectors + 1) * sector
        in_first_sector = first_trailer_sector_end - trailer_off
        padding = max(
            0, scratch_trailer_size(self.write_align, max_align=self.max_align) - in_first_sector
        )
        return trailer_off - padding

    def image_offset(self, image: int = 0) -> int:
        """Where in the secondary slot an update image starts: one sector in for swap-offset,
        else at the start."""
        self.secondary(image)  # the image must exist
        return self.sector_size if self.strategy == Strategy.SWAP_OFFSET else 0

    def with_strategy(self, strategy: Strategy | str) -> FlashMap:
        """This map for another strategy, checked again (FlashMapError if MCUboot in that mode
        refuses the geometry)."""
        return replace(self, strategy=Strategy(strategy))

    def new_flash(self, backing: Backing | None = None) -> Flash:
        """A flash with this map's size, sectors, write size, erased value and write mode
        (in memory unless ``backing`` is given)."""
        return Flash(
            self.flash_size,
            self.sector_size,
            write_align=self.write_align,
            erased_value=self.erased_value,
            write_mode=self.write_mode,
            widen_erases=self.strategy == Strategy.SWAP_STATUS,
            backing=backing,
        )

    def open_flash(self, path: str | os.PathLike[str]) -> Flash:
        """The flash kept in the file ``path`` (created erased when missing)."""
        return Flash.open_file(
            path,
            self.flash_size,
            self.sector_size,
            write_align=self.write_align,
            erased_value=self.erased_value,
            write_mode=self.write_mode,
            widen_erases=self.strategy == Strategy.SWAP_STATUS,
        )

    def address(self, area: Area) -> int:
        """The absolute address of ``area`` (``base_address + offset``)."""
        return self.base_address + area.offset

    # --- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: addresses and sizes as ``0x`` strings, addresses absolute."""
        areas: list[dict[str, Any]] = []
        for area in self.areas:
            entry: dict[str, Any] = {"name": area.name}
            if area.image is not None:
                entry["image"] = area.image
            entry["address"] = _hex(self.address(area))
            entry["size"] = _hex(area.size)
            areas.append(entry)
        return {
            "name": self.name,
            "strategy": self.strategy.value,
            "flash": {
                "base": _hex(self.base_address),
                "size": _hex(self.flash_size),
                "sector_size": _hex(self.sector_size),
                "write_align": self.write_align,
                "max_sectors": self.max_sectors,
                "erased_value": f"0x{self.erased_value:02x}",
                "write_mode": self.write_mode,
            },
            "areas": areas,
        }

    @classmethod
    def from_dict(cls, data: object) -> FlashMap:
        """Build a map from its JSON form (see the module docstring).

        Raises:
            FlashMapError: ``data`` is not an object, a key is missing or unknown, a value has
                the wrong type or is not a non-negative number, an area lies below the flash
                base, or the map fails validation.
        """
        top = _object(
            data, "flash map", required=("name", "flash", "areas"), optional=("strategy",)
        )
        name = top["name"]
        if not isinstance(name, str):
            raise FlashMapError(f"flash map name must be a string, not {name!r}", value=name)
        strategy: Strategy | None = None
        if "strategy" in top:
            raw_strategy = top["strategy"]
            if not isinstance(raw_strategy, str) or raw_strategy not in set(Strategy):
                raise FlashMapError(
                    f"flash map field strategy is {raw_strategy!r}; expected one of "
                    f"{', '.join(s.value for s in Strategy)}",
                    value=raw_strategy,
                )
            strategy = Strategy(raw_strategy)
        flash = _object(
            top["flash"],
            "flash map field flash",
            required=("size", "sector_size", "write_align"),
            optional=("base", "max_sectors", "erased_value", "write_mode"),
        )
        base = _number(flash.get("base", 0), "flash.base")
        max_sectors = _number(flash.get("max_sectors", DEFAULT_MAX_SECTORS), "flash.max_sectors")
        erased_value = _number(flash.get("erased_value", 0xFF), "flash.erased_value")
        write_mode = flash.get("write_mode", "and")
        if not isinstance(write_mode, str):
            raise FlashMapError(
                f"flash map field flash.write_mode must be a string, not {write_mode!r}",
                value=write_mode,
            )
        raw_areas = top["areas"]
        if not isinstance(raw_areas, list):
            raise FlashMapError(
                f"flash map field areas must be a list, not {type(raw_areas).__name__}",
                value=raw_areas,
            )
        areas = []
        for i, raw in enumerate(raw_areas):
            where = f"areas[{i}]"
            entry = _object(
                raw,
                f"flash map field {where}",
                required=("name", "address", "size"),
                optional=("image",),
            )
            kind = entry["name"]
            if not isinstance(kind, str):
                raise FlashMapError(
                    f"flash map field {where}.name must be a string, not {kind!r}", value=kind
                )
            address = _number(entry["address"], f"{where}.address")
            if address < base:
                raise FlashMapError(
                    f"flash map field {where} ({kind}) has address {_hex(address)}, below the "
                    f"flash base {_hex(base)}",
                    value=address,
                )
            raw_image = entry.get("image")
            image = None if raw_image is None else _number(raw_image, f"{where}.image")
            size = _number(entry["size"], f"{where}.size")
            try:
                areas.append(Area(kind, address - base, size, image))
            except FlashMapError as exc:
                raise FlashMapError(
                    f"flash map field {where}: {exc.message}", value=exc.value
                ) from None
        return cls(
            name=name,
            flash_size=_number(flash["size"], "flash.size"),
            sector_size=_number(flash["sector_size"], "flash.sector_size"),
            write_align=_number(flash["write_align"], "flash.write_align"),
            areas=tuple(areas),
            base_address=base,
            max_sectors=max_sectors,
            strategy=strategy,  # type: ignore[arg-type]  # None: chosen from the areas
            erased_value=erased_value,
            write_mode=write_mode,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FlashMap:
        """Read a flash map from a JSON file.

        Raises:
            InputFileError: the file is missing or unreadable.
            FlashMapError: the file is not UTF-8 JSON or not a valid flash map.
        """
        raw = read_input(path, what="flash map")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise FlashMapError(
                f"flash map {path} is not UTF-8 text: {exc.reason} at byte {exc.start}",
                value=str(path),
            ) from None
        except json.JSONDecodeError as exc:
            raise FlashMapError(
                f"flash map {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                f"column {exc.colno}",
                value=str(path),
            ) from None
        except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
            raise FlashMapError(
                f"flash map {path} is not usable JSON: {exc}", value=str(path)
            ) from None
        try:
            return cls.from_dict(data)
        except FlashMapError as exc:
            raise FlashMapError(f"{path}: {exc.message}", value=exc.value) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the map as indented JSON, atomically; raise InputFileError if that fails."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_atomic(path, text.encode("utf-8"))


def _object(
    data: object, what: str, *, required: tuple[str, ...], optional: tuple[str, ...]
) -> Mapping[str, object]:
    """Check that ``data`` is a JSON object with the ``required`` keys and no unknown ones."""
    if not isinstance(data, Mapping):
        raise FlashMapError(f"{what} must be a JSON object, not {type(data).__name__}", value=data)
    for key in required:
        if key not in data:
            raise FlashMapError(f"{what} has no {key!r} key", value=key)
    known = set(required) | set(optional)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise FlashMapError(
            f"{what} has unknown key(s) {', '.join(map(repr, unknown))}; expected "
            f"{', '.join(map(repr, required + optional))}",
            value=unknown[0],
        )
    return data


def _number(value: object, field: str) -> int:
    """A non-negative integer from an int or a decimal / ``0x`` hexadecimal string."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FlashMapError(
            f"flash map field {field} must be an integer or a number string, not {value!r}",
            value=value,
        )
    if isinstance(value, str):
        if not _NUMBER_RE.fullmatch(value):
            raise FlashMapError(
                f"flash map field {field} is {value!r}, not a non-negative decimal or 0x "
                "hexadecimal number",
                value=value,
            )
        try:
            number = int(value, 16) if value[:2].lower() == "0x" else int(value, 10)
        except ValueError:  # more decimal digits than Python converts
            raise FlashMapError(
                f"flash map field {field} is a {len(value)}-digit number, too long to use",
                value=value[:20],
            ) from None
    else:
        number = value
    if number < 0:
        raise FlashMapError(
            f"flash map field {field} is {number}, but it must not be negative", value=number
        )
    return number


# --- presets -----------------------------------------------------------------------------------

_KIB = 1024
_MIB = 1024 * _KIB


def _psoc6_rows(
    name: str, *, flash_size: int, max_sectors: int, areas: tuple[Area, ...]
) -> FlashMap:
    """A swap-status map on PSoC 6 internal flash as MCUBootApp builds for it: 0x200-byte rows
    as sectors and write size (PLATFORM_MEMORY_ALIGN), erased 0x00, replacing row writes."""
    return FlashMap(
        name=name,
        flash_size=flash_size,
        sector_size=0x200,
        write_align=0x200,
        base_address=0x10000000,
        max_sectors=max_sectors,
        strategy=Strategy.SWAP_STATUS,
        erased_value=0x00,
        write_mode="replace",
        areas=areas,
    )


def _psoc6_2m_swap() -> FlashMap:
    """PSoC 6 with 2 MiB internal flash, MCUboot in swap-status mode as Infineon's MCUBootApp
    builds it (``cypress`` branch: MCUBOOT_SWAP_USING_SCRATCH + MCUBOOT_SWAP_USING_STATUS,
    platforms/PSOC6.mk): 0x200-byte rows as sectors, write size 0x200 (PLATFORM_MEMORY_ALIGN),
    erased value 0x00 with replacing row writes, MCUBOOT_MAX_IMG_SECTORS 1840 (0xe6000 / 0x200,
    what MCUBootApp's memorymap.py derives from the slot size).

    The bootloader area is MCUBootApp's 0x28000 bytes and the slots start at 0x10028000 as in
    its psoc6_swap_single.json; the slots are the 0xe6000 bytes the 2 MiB part leaves, followed
    by the swap status partition (0x3c00 bytes: swap_status.h for 1840 sectors) and the scratch
    area. The largest image is 0xe5e00 bytes (the last row holds the trailer).
    """
    base = 0x10000000
    return _psoc6_rows(
        "psoc6-2m-swap",
        flash_size=2 * _MIB,
        max_sectors=0xE6000 // 0x200,
        areas=(
            Area("bootloader", 0x10000000 - base, 0x28000),
            Area("primary", 0x10028000 - base, 0xE6000, image=0),
            Area("secondary", 0x1010E000 - base, 0xE6000, image=0),
            Area("status", 0x101F4000 - base, 0x3C00, image=0),
            Area("scratch", 0x101F7C00 - base, 0x1000),
        ),
    )


def _psoc6_swap_single() -> FlashMap:
    """MCUBootApp's default PSoC 6 single-image swap layout (``psoc6_swap_single.json``):
    swap-status, 0x200-byte rows, write size 0x200, erased 0x00, replacing writes,
    MCUBOOT_MAX_IMG_SECTORS 128 (0x10000 / 0x200); 64 KiB slots, a 0x1800-byte status partition
    and a 0x2000-byte scratch area, addresses as in that file."""
    base = 0x10000000
    return _psoc6_rows(
        "psoc6-swap-single",
        flash_size=2 * _MIB,
        max_sectors=0x10000 // 0x200,
        areas=(
            Area("bootloader", 0x10000000 - base, 0x28000),
            Area("primary", 0x10028000 - base, 0x10000, image=0),
            Area("secondary", 0x10038000 - base, 0x10000, image=0),
            Area("status", 0x10048000 - base, 0x1800, image=0),
            Area("scratch", 0x10050000 - base, 0x2000),
        ),
    )


def _external_flash() -> FlashMap:
    """PSoC 6 with the secondary slot on external QSPI NOR, as MCUBootApp's
    ``psoc62_swap_single_smif.json`` (swap-status; primary 0x40200 bytes at 0x10018000 in
    internal flash, secondary 0x40200 bytes at 0x18000000 on the external part, status
    partition 0x2400 bytes at 0x10058200; MCUBOOT_MAX_IMG_SECTORS 513 = 0x40200 / 0x200).

    Simplified where otakit's single-flash model cannot follow: the external part is modelled
    right after the 2 MiB internal flash (offset 0x200000, address 0x10200000 instead of
    0x18000000) and with the internal flash's properties (0x200-byte sectors, write size 0x200,
    erased 0x00, replacing writes), while the real part erases in large sectors to 0xff. For the
    same reason the scratch area is 0x1000 bytes in the external part instead of 0x80000: with
    0x200-byte sectors 0x80000 bytes would be more sectors than MCUboot reads.
    """
    base = 0x10000000
    external = 0x10200000
    return _psoc6_rows(
        "external-flash",
        flash_size=3 * _MIB,
        max_sectors=0x40200 // 0x200,
        areas=(
            Area("bootloader", 0x10000000 - base, 0x18000),
            Area("primary", 0x10018000 - base, 0x40200, image=0),
            Area("status", 0x10058200 - base, 0x2400, image=0),
            Area("secondary", external - base, 0x40200, image=0),
            Area("scratch", external + 0x40200 - base, 0x1000),
        ),
    )


def _nrf52840_swap_move() -> FlashMap:
    """A Zephyr-style nRF52840 layout for MCUboot's swap-move (MCUBOOT_SWAP_USING_MOVE, the
    default of Zephyr's MCUboot): 1 MiB internal NOR, 4 KiB pages, write size 4 (NVMC word),
    BOOT_MAX_ALIGN 8, erased 0xff with NOR writes, MCUBOOT_MAX_IMG_SECTORS 128 (Zephyr's
    CONFIG_BOOT_MAX_IMG_SECTORS default). 48 KiB bootloader; the primary slot has one page more
    than the secondary (118 and 117 pages), the room swap-move needs; the rest is storage.
    """
    page = 4 * _KIB
    return FlashMap(
        name="nrf52840-swap-move",
        flash_size=1 * _MIB,
        sector_size=page,
        write_align=4,
        max_sectors=128,
        strategy=Strategy.SWAP_MOVE,
        areas=(
            Area("bootloader", 0x00000, 0xC000),
            Area("primary", 0x0C000, 118 * page, image=0),
            Area("secondary", 0x0C000 + 118 * page, 117 * page, image=0),
        ),
    )


def _two_image() -> FlashMap:
    """An application (image 0) and a secure image (image 1) on 2 MiB of 4 KiB sectors, for
    upstream MCUboot swap-scratch with MCUBOOT_IMAGE_NUMBER 2: write size 8, erased 0xff, NOR
    writes, MCUBOOT_MAX_IMG_SECTORS 128, one scratch sector shared by both images."""
    sector = 4 * _KIB
    return FlashMap(
        name="two-image",
        flash_size=2 * _MIB,
        sector_size=sector,
        write_align=8,
        max_sectors=128,
        strategy=Strategy.SWAP_SCRATCH,
        areas=(
            Area("bootloader", 0x000000, 64 * _KIB),
            Area("primary", 0x010000, 0x60000, image=0),
            Area("secondary", 0x070000, 0x60000, image=0),
            Area("primary", 0x0D0000, 0x20000, image=1),
            Area("secondary", 0x0F0000, 0x20000, image=1),
            Area("scratch", 0x110000, sector),
        ),
    )


def _sim_small() -> FlashMap:
    """A tiny 64 KiB layout for tests and demos, for upstream MCUboot swap-scratch: 20 KiB slots
    of 4 KiB sectors, one scratch sector, write size 8, erased 0xff, NOR writes,
    MCUBOOT_MAX_IMG_SECTORS 128 (trailer 3120 bytes). Valid for overwrite, swap-move and
    swap-offset too (:meth:`FlashMap.with_strategy`), with equal slots."""
    sector = 4 * _KIB
    return FlashMap(
        name="sim-small",
        flash_size=64 * _KIB,
        sector_size=sector,
        write_align=8,
        max_sectors=128,
        strategy=Strategy.SWAP_SCRATCH,
        areas=(
            Area("bootloader", 0 * sector, sector),
            Area("primary", 1 * sector, 5 * sector, image=0),
            Area("secondary", 6 * sector, 5 * sector, image=0),
            Area("scratch", 11 * sector, sector),
        ),
    )


def _sim_small_status() -> FlashMap:
    """A small swap-status layout for tests, with PSoC 6 rows (MCUBootApp configuration as in
    ``psoc6-2m-swap``: sectors and write size 0x200, erased 0x00, replacing writes): 20 KiB slots
    (40 rows), MCUBOOT_MAX_IMG_SECTORS 40, a 0x1800-byte status partition and 4 KiB scratch."""
    row = 0x200
    return FlashMap(
        name="sim-small-status",
        flash_size=64 * _KIB,
        sector_size=row,
        write_align=row,
        max_sectors=40,
        strategy=Strategy.SWAP_STATUS,
        erased_value=0x00,
        write_mode="replace",
        areas=(
            Area("bootloader", 0x0000, 0x1000),
            Area("primary", 0x1000, 0x5000, image=0),
            Area("secondary", 0x6000, 0x5000, image=0),
            Area("status", 0xB000, 0x1800, image=0),
            Area("scratch", 0xC800, 0x1000),
        ),
    )


PRESETS: dict[str, FlashMap] = {
    m.name: m
    for m in (
        _psoc6_2m_swap(),
        _psoc6_swap_single(),
        _external_flash(),
        _nrf52840_swap_move(),
        _two_image(),
        _sim_small(),
        _sim_small_status(),
    )
}


def preset(name: str) -> FlashMap:
    """The built-in flash map called ``name``; raise FlashMapError naming the choices."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise FlashMapError(
            f"unknown flash map preset {name!r}; choose one of {', '.join(PRESETS)}", value=name
        ) from None


def load_layout(value: str) -> FlashMap:
    """A preset's name, or the path of a flash map JSON file (``--layout`` options)."""
    path = Path(value)
    if value not in PRESETS and (path.suffix == ".json" or path.exists()):
        return FlashMap.load(path)
    return preset(value)
