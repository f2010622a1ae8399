"""The flash map: which areas of a device's flash hold the bootloader, the slots and the rest.

An MCUboot device splits its flash into named areas. Per image there is a *primary* slot (the
image that runs), a *secondary* slot (where an update is downloaded) and, on parts such as the
PSoC 6, a *status* area where the bootloader keeps its swap progress. A *scratch* area, shared by
all images, holds one sector at a time while swap-scratch exchanges the slots. The *bootloader*
area is MCUboot itself.

Offsets inside otakit count from the first flash byte (0-based, what :class:`~otakit.device.flash.Flash`
takes); the JSON form uses absolute addresses (``base + offset``), as datasheets and linker
scripts do::

    {"name": "psoc6-2m-swap",
     "flash": {"base": "0x10000000", "size": "0x200000", "sector_size": "0x200",
               "write_align": 8, "max_sectors": 128},
     "areas": [{"name": "bootloader", "address": "0x10000000", "size": "0x18000"},
               {"name": "primary", "image": 0, "address": "0x10028000", "size": "0xe6000"},
               ...]}

Numbers in the JSON form are integers or strings holding a decimal or ``0x`` hexadecimal number.
Every problem with a map, from bad JSON to overlapping areas, is a :class:`FlashMapError` whose
message names the area and the value at fault.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otakit.errors import FlashMapError
from otakit.files import read_input, write_atomic
from otakit.image.trailer import DEFAULT_MAX_SECTORS, VALID_WRITE_ALIGNS, trailer_size

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
    """The areas of one device's flash, checked for consistency when built.

    ``write_align`` is the flash's program unit (imgtool ``--align``) and ``max_sectors`` the
    number of sectors a slot's swap status accounts for (imgtool ``-M``); together they size the
    trailer at the end of each slot. ``base_address`` is the address of the first flash byte;
    :attr:`Area.offset` counts from it.

    Raises:
        FlashMapError: an area is misaligned to ``sector_size``, outside the flash or overlaps
            another; the bootloader or scratch area is given twice; images are not numbered
            0..n-1 or lack exactly one primary and one secondary slot (and at most one status
            area); a secondary slot is smaller than its primary; a primary slot cannot hold the
            trailer; ``write_align`` is not one of ``VALID_WRITE_ALIGNS`` or does not divide
            ``sector_size``.
    """

    name: str
    flash_size: int
    sector_size: int
    write_align: int
    areas: tuple[Area, ...]
    base_address: int = 0
    max_sectors: int = DEFAULT_MAX_SECTORS

    def __post_init__(self) -> None:
        object.__setattr__(self, "areas", tuple(self.areas))
        self._check_geometry()
        for area in self.areas:
            self._check_area(area)
        self._check_kinds()
        self._check_overlaps()
        self._check_images()

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
        if self.write_align not in VALID_WRITE_ALIGNS:
            raise FlashMapError(
                f"flash map {self.name}: write alignment {self.write_align} is not one of "
                f"{', '.join(map(str, VALID_WRITE_ALIGNS))}",
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
        limit = trailer_size(self.write_align, self.max_sectors)
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
            primary = self.primary(index)
            secondary = self.secondary(index)
            if secondary.size < primary.size:
                raise FlashMapError(
                    f"flash map {self.name}: secondary (image {index}) slot of "
                    f"{_hex(secondary.size)} bytes is smaller than its primary slot of "
                    f"{_hex(primary.size)} bytes",
                    value=secondary.size,
                )
            if primary.size <= limit:
                raise FlashMapError(
                    f"flash map {self.name}: primary (image {index}) slot of {_hex(primary.size)} "
                    f"bytes cannot hold the {limit}-byte trailer (write alignment "
                    f"{self.write_align}, max_sectors {self.max_sectors}) and an image",
                    value=primary.size,
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
        """The status area of ``image``, or None; raise FlashMapError for an unknown image."""
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
    def trailer_size(self) -> int:
        """Bytes imgtool reserves for the trailer at the end of each slot."""
        return trailer_size(self.write_align, self.max_sectors)

    def max_image_size(self, image: int = 0) -> int:
        """The largest image (header, payload and TLVs) the primary slot of ``image`` holds."""
        return self.primary(image).size - self.trailer_size

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
            "flash": {
                "base": _hex(self.base_address),
                "size": _hex(self.flash_size),
                "sector_size": _hex(self.sector_size),
                "write_align": self.write_align,
                "max_sectors": self.max_sectors,
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
        top = _object(data, "flash map", required=("name", "flash", "areas"), optional=())
        name = top["name"]
        if not isinstance(name, str):
            raise FlashMapError(f"flash map name must be a string, not {name!r}", value=name)
        flash = _object(
            top["flash"],
            "flash map field flash",
            required=("size", "sector_size", "write_align"),
            optional=("base", "max_sectors"),
        )
        base = _number(flash.get("base", 0), "flash.base")
        max_sectors = _number(flash.get("max_sectors", DEFAULT_MAX_SECTORS), "flash.max_sectors")
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


def _psoc6_2m_swap() -> FlashMap:
    """PSoC 6, 2 MiB internal flash, swap mode with a status partition (protocols.md §5)."""
    base = 0x10000000
    return FlashMap(
        name="psoc6-2m-swap",
        flash_size=2 * _MIB,
        sector_size=0x200,  # a PSoC 6 flash row
        write_align=8,
        base_address=base,
        areas=(
            Area("bootloader", 0x10000000 - base, 0x18000),
            Area("primary", 0x10028000 - base, 0xE6000, image=0),
            Area("secondary", 0x1010E000 - base, 0xE6000, image=0),
            Area("status", 0x101F4000 - base, 0x3C00, image=0),
            Area("scratch", 0x101F7C00 - base, 0x1000),
        ),
    )


def _two_image() -> FlashMap:
    """An application (image 0) and a secure image (image 1) on 2 MiB of 4 KiB sectors."""
    sector = 4 * _KIB
    return FlashMap(
        name="two-image",
        flash_size=2 * _MIB,
        sector_size=sector,
        write_align=8,
        areas=(
            Area("bootloader", 0x000000, 64 * _KIB),
            Area("primary", 0x010000, 0x60000, image=0),
            Area("secondary", 0x070000, 0x60000, image=0),
            Area("primary", 0x0D0000, 0x20000, image=1),
            Area("secondary", 0x0F0000, 0x20000, image=1),
            Area("scratch", 0x110000, sector),
            Area("status", 0x111000, 2 * sector, image=0),
            Area("status", 0x113000, 2 * sector, image=1),
        ),
    )


def _external_flash() -> FlashMap:
    """Slots on a large external NOR (16 MiB, 4 KiB sectors).

    On a real board the bootloader sits in the MCU's internal flash and the slots on an external
    part behind a different address window; otakit models both as one address space, offsets
    from 0, which is what matters for where each area starts and how large it is.
    """
    sector = 4 * _KIB
    return FlashMap(
        name="external-flash",
        flash_size=16 * _MIB,
        sector_size=sector,
        write_align=8,
        areas=(
            Area("bootloader", 0x000000, 64 * _KIB),
            Area("primary", 0x010000, 1 * _MIB, image=0),
            Area("secondary", 0x110000, 1 * _MIB, image=0),
            Area("status", 0x210000, 2 * sector, image=0),
            Area("scratch", 0x212000, sector),
        ),
    )


def _sim_small() -> FlashMap:
    """A tiny 64 KiB layout for tests and demos: 20 KiB slots of 4 KiB sectors."""
    sector = 4 * _KIB
    return FlashMap(
        name="sim-small",
        flash_size=64 * _KIB,
        sector_size=sector,
        write_align=8,
        areas=(
            Area("bootloader", 0 * sector, sector),
            Area("primary", 1 * sector, 5 * sector, image=0),
            Area("secondary", 6 * sector, 5 * sector, image=0),
            Area("scratch", 11 * sector, sector),
            Area("status", 12 * sector, sector, image=0),
        ),
    )


PRESETS: dict[str, FlashMap] = {
    m.name: m for m in (_psoc6_2m_swap(), _two_image(), _external_flash(), _sim_small())
}


def preset(name: str) -> FlashMap:
    """The built-in flash map called ``name``; raise FlashMapError naming the choices."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise FlashMapError(
            f"unknown flash map preset {name!r}; choose one of {', '.join(PRESETS)}", value=name
        ) from None
