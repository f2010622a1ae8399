"""Flash maps: presets, the JSON form, and one named error for every way a map can be wrong."""

from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otakit.device.flash import FileBacking, PowerCut
from otakit.device.flashmap import AREA_KINDS, PRESETS, Area, FlashMap, Strategy, preset
from otakit.errors import FlashMapError, InputFileError
from otakit.image.trailer import (
    boot_trailer_sz,
    scratch_trailer_size,
    swap_status_area_size,
    swap_status_rows,
    trailer_size,
)

KIB = 1024
SECTOR = 4 * KIB


def make(*areas: Area, **kwargs: Any) -> FlashMap:
    """A 64 KiB, 4 KiB-sector map with the given areas."""
    options: dict[str, Any] = {
        "name": "test",
        "flash_size": 64 * KIB,
        "sector_size": SECTOR,
        "write_align": 8,
    }
    options.update(kwargs)
    return FlashMap(areas=areas, **options)


def slots(image: int = 0, at: int = SECTOR, size: int = 2 * SECTOR) -> tuple[Area, Area]:
    return (
        Area("primary", at, size, image=image),
        Area("secondary", at + size, size, image=image),
    )


def raises(match: str) -> pytest.RaisesExc[FlashMapError]:
    return pytest.raises(FlashMapError, match=match)


# --- presets -----------------------------------------------------------------------------------


PRESET_NAMES = {
    "psoc6-2m-swap",
    "psoc6-swap-single",
    "external-flash",
    "nrf52840-swap-move",
    "two-image",
    "sim-small",
    "sim-small-status",
}


def test_presets_are_the_documented_ones() -> None:
    assert set(PRESETS) == PRESET_NAMES
    for name, flash_map in PRESETS.items():
        assert flash_map.name == name
        assert preset(name) is flash_map


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_every_preset_documents_its_mcuboot_configuration(name: str) -> None:
    m = preset(name)
    builder = {
        "psoc6-2m-swap": "_psoc6_2m_swap",
        "psoc6-swap-single": "_psoc6_swap_single",
        "external-flash": "_external_flash",
        "nrf52840-swap-move": "_nrf52840_swap_move",
        "two-image": "_two_image",
        "sim-small": "_sim_small",
        "sim-small-status": "_sim_small_status",
    }[name]
    from otakit.device import flashmap

    doc = getattr(flashmap, builder).__doc__ or ""
    assert "MCUBOOT_MAX_IMG_SECTORS" in doc
    assert str(m.max_sectors) in doc
    assert ("0x00" in doc) == (m.erased_value == 0x00)
    for slot in (m.primary(), m.secondary()):
        assert slot.size // m.sector_size <= m.max_sectors


def test_psoc6_layout_is_mcubootapp_swap_status() -> None:
    m = preset("psoc6-2m-swap")
    assert (m.base_address, m.flash_size, m.sector_size, m.write_align) == (
        0x10000000,
        0x200000,
        0x200,
        0x200,
    )
    assert (m.strategy, m.erased_value, m.write_mode) == (Strategy.SWAP_STATUS, 0x00, "replace")
    assert m.max_sectors == 1840 == 0xE6000 // 0x200
    assert m.images == [0]
    got = {a.label: (m.address(a), a.size) for a in m.areas}
    assert got == {
        "bootloader": (0x10000000, 0x28000),
        "primary (image 0)": (0x10028000, 0xE6000),
        "secondary (image 0)": (0x1010E000, 0xE6000),
        "status (image 0)": (0x101F4000, 0x3C00),
        "scratch": (0x101F7C00, 0x1000),
    }
    assert m.primary().offset == 0x28000
    assert m.primary().end == 0x10E000 == m.secondary().offset
    status = m.status()
    assert status is not None
    # swap_status.h: rows = ceil(1840 / 500) + ceil(64 / 500) = 5; 3 areas x 2 copies x 5 rows
    assert swap_status_rows(1840) == 5
    assert status.size == m.status_partition_size == 3 * 2 * 5 * 0x200 == 0x3C00
    assert m.trailer_size == 0  # swap-status keeps nothing in the slots
    assert m.max_image_size() == 0xE6000 - 0x200  # the last row holds the trailer
    # the upstream modes cannot run on 0x200-byte writes (BOOT_MAX_ALIGN is at most 32)
    for other in (Strategy.SWAP_SCRATCH, Strategy.SWAP_MOVE, Strategy.OVERWRITE):
        with raises("write alignment 512 is larger than 32"):
            m.with_strategy(other)


def test_the_old_psoc6_max_sectors_is_refused() -> None:
    """The issue's bug: 1840 sectors per slot with max_sectors 128."""
    m = preset("psoc6-2m-swap")
    with raises(
        r"primary \(image 0\) slot has 1840 sectors of 0x200 bytes, more than max_sectors 128"
    ):
        FlashMap(**{**_fields(m), "max_sectors": 128})


def test_a_psoc6_2m_swap_scratch_trailer_is_44208_bytes() -> None:
    """The issue's numbers: upstream swap-scratch on 0xe6000-byte slots of 512-byte sectors
    with 8-byte writes needs max_sectors 1840 and then reserves 44208 bytes."""
    m = preset("psoc6-2m-swap")
    areas = tuple(a for a in m.areas if a.name != "status")
    scratch = FlashMap(
        **{**_fields(m), "areas": areas, "strategy": Strategy.SWAP_SCRATCH, "write_align": 8}
    )
    assert scratch.trailer_size == 1840 * 3 * 8 + 48 == 44208
    assert scratch.max_image_size() == 0xE6000 - 44208  # the trailer ends its last sector


def _fields(m: FlashMap) -> dict[str, Any]:
    fields = {
        k: getattr(m, k)
        for k in (
            "name",
            "flash_size",
            "sector_size",
            "write_align",
            "areas",
            "base_address",
            "max_sectors",
            "strategy",
            "erased_value",
            "write_mode",
        )
    }
    return fields


def test_psoc6_swap_single_is_mcubootapp_default() -> None:
    m = preset("psoc6-swap-single")
    got = {a.label: (m.address(a), a.size) for a in m.areas}
    assert got == {
        "bootloader": (0x10000000, 0x28000),
        "primary (image 0)": (0x10028000, 0x10000),
        "secondary (image 0)": (0x10038000, 0x10000),
        "status (image 0)": (0x10048000, 0x1800),
        "scratch": (0x10050000, 0x2000),
    }
    assert m.max_sectors == 128
    assert m.status_partition_size == 0x1800 == swap_status_area_size(128)
    assert m.max_image_size() == 0x10000 - 0x200


def test_two_image_preset() -> None:
    m = preset("two-image")
    assert m.strategy == Strategy.SWAP_SCRATCH
    assert m.images == [0, 1]
    assert (m.flash_size, m.sector_size) == (2 * 1024 * KIB, SECTOR)
    assert m.primary(0).size == m.secondary(0).size == 0x60000
    assert m.primary(1).size == m.secondary(1).size == 0x20000
    assert m.scratch is not None
    assert m.scratch.size == SECTOR
    assert m.status(0) is None
    assert m.status(1) is None
    assert m.bootloader == Area("bootloader", 0, 64 * KIB)
    assert m.trailer_size == 3120
    assert m.max_image_size(1) == 0x20000 - 3120


def test_external_flash_preset() -> None:
    m = preset("external-flash")
    assert m.strategy == Strategy.SWAP_STATUS
    assert m.flash_size == 3 * 1024 * KIB
    assert m.primary() == Area("primary", 0x18000, 0x40200, image=0)
    assert m.address(m.secondary()) == 0x10200000  # after the internal flash
    status = m.status()
    assert status is not None
    assert (m.address(status), status.size) == (0x10058200, 0x2400)
    assert m.max_sectors == 513
    assert m.status_partition_size == 0x2400  # rows = 2 + 1 for 513 sectors
    assert m.max_image_size() == 0x40200 - 0x200


def test_nrf52840_swap_move_preset() -> None:
    m = preset("nrf52840-swap-move")
    assert (m.strategy, m.sector_size, m.write_align, m.erased_value, m.write_mode) == (
        Strategy.SWAP_MOVE,
        SECTOR,
        4,
        0xFF,
        "and",
    )
    assert m.primary().size == m.secondary().size + SECTOR
    assert m.trailer_size == 128 * 3 * 4 + 48 == 1584
    # app_max_size: the trailer rounded to a sector, and one sector for the move
    assert m.max_image_size() == 117 * SECTOR - SECTOR


def test_sim_small_preset() -> None:
    m = preset("sim-small")
    assert m.strategy == Strategy.SWAP_SCRATCH
    assert (m.flash_size, m.sector_size, m.write_align) == (64 * KIB, SECTOR, 8)
    assert [(a.name, a.size // SECTOR) for a in m.areas] == [
        ("bootloader", 1),
        ("primary", 5),
        ("secondary", 5),
        ("scratch", 1),
    ]
    assert m.max_image_size() == 5 * SECTOR - 3120


def test_sim_small_status_preset() -> None:
    m = preset("sim-small-status")
    assert m.status_partition_size == 0x1800
    assert m.max_image_size() == 0x5000 - 0x200


def test_unknown_preset_lists_the_choices() -> None:
    with raises("unknown flash map preset 'nope'.*psoc6-2m-swap.*sim-small"):
        preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict_and_json(name: str) -> None:
    m = preset(name)
    data = m.to_dict()
    assert FlashMap.from_dict(data) == m
    assert FlashMap.from_dict(json.loads(json.dumps(data))) == m


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_files(name: str, tmp_path: Path) -> None:
    m = preset(name)
    path = tmp_path / f"{name}.json"
    m.save(path)
    assert FlashMap.load(path) == m
    text = path.read_text()
    assert text.endswith("\n")
    assert "\n  " in text
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_json_form_uses_absolute_hex_addresses() -> None:
    data = preset("psoc6-2m-swap").to_dict()
    assert data["flash"] == {
        "base": "0x10000000",
        "size": "0x200000",
        "sector_size": "0x200",
        "write_align": 512,
        "max_sectors": 1840,
        "erased_value": "0x00",
        "write_mode": "replace",
    }
    assert data["strategy"] == "swap-status"
    assert data["areas"][0] == {"name": "bootloader", "address": "0x10000000", "size": "0x28000"}
    assert data["areas"][1] == {
        "name": "primary",
        "image": 0,
        "address": "0x10028000",
        "size": "0xe6000",
    }


def test_from_dict_accepts_ints_and_decimal_strings() -> None:
    data: dict[str, Any] = {
        "name": "mixed",
        "flash": {"size": 65536, "sector_size": "4096", "write_align": "8"},
        "areas": [
            {"name": "primary", "image": "0", "address": "0x1000", "size": 8192},
            {"name": "secondary", "image": 0, "address": 12288, "size": "0X2000"},
        ],
    }
    m = FlashMap.from_dict(data)
    assert m.base_address == 0
    assert m.max_sectors == 128
    assert m.primary() == Area("primary", 0x1000, 0x2000, image=0)
    assert m.secondary() == Area("secondary", 0x3000, 0x2000, image=0)
    assert m.status() is None
    assert m.scratch is None
    assert m.bootloader is None
    assert (m.strategy, m.erased_value, m.write_mode) == (Strategy.OVERWRITE, 0xFF, "and")


def test_an_old_map_with_a_scratch_area_is_swap_scratch() -> None:
    data = copy.deepcopy(preset("sim-small").to_dict())
    del data["strategy"]
    for key in ("erased_value", "write_mode", "max_sectors"):
        del data["flash"][key]
    assert FlashMap.from_dict(data) == preset("sim-small")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"strategy": "swap"}, "field strategy is 'swap'; expected one of overwrite, swap-scratch"),
        ({"strategy": 3}, "field strategy is 3"),
        ({"flash.erased_value": "0x7f"}, "erased value 0x7f must be 0xff or 0x00"),
        ({"flash.erased_value": "ff"}, "flash.erased_value is 'ff', not a non-negative"),
        ({"flash.write_mode": "or"}, "write mode 'or' must be one of and, replace"),
        ({"flash.write_mode": 1}, "flash.write_mode must be a string, not 1"),
    ],
)
def test_new_json_fields_are_checked(change: dict[str, Any], match: str) -> None:
    data = copy.deepcopy(preset("sim-small").to_dict())
    for key, value in change.items():
        if key.startswith("flash."):
            data["flash"][key[6:]] = value
        else:
            data[key] = value
    with raises(match):
        FlashMap.from_dict(data)


# --- queries -----------------------------------------------------------------------------------


def test_queries_for_an_unknown_image_raise() -> None:
    m = preset("sim-small")
    for query in (m.primary, m.secondary, m.status, m.max_image_size):
        with raises("has no image 1; it has images 0"):
            query(1)


def test_area_end_and_label() -> None:
    area = Area("secondary", 0x2000, 0x3000, image=2)
    assert area.end == 0x5000
    assert area.label == "secondary (image 2)"
    assert Area("scratch", 0, 1).label == "scratch"


@pytest.mark.parametrize(
    ("strategy", "trailer"),
    [
        (Strategy.OVERWRITE, 512 * 3 * 4 + 48),
        (Strategy.SWAP_SCRATCH, 512 * 3 * 4 + 48),
        (Strategy.SWAP_MOVE, 512 * 3 * 4 + 48),
        (Strategy.SWAP_OFFSET, 512 * 2 * 4 + 56),
    ],
)
def test_max_sectors_and_strategy_size_the_trailer(strategy: Strategy, trailer: int) -> None:
    m = make(*slots(size=4 * SECTOR), scratch(), max_sectors=512, write_align=4)
    m = m.with_strategy(strategy)
    assert m.trailer_size == trailer == boot_trailer_sz(4, 512, strategy=strategy)
    expected = {
        # up to the swap_info field
        Strategy.OVERWRITE: 4 * SECTOR - 40,
        # the trailer (6192 bytes) ends the slot; 2096 bytes of it in its first sector
        Strategy.SWAP_SCRATCH: 4 * SECTOR - trailer,
        # trailer rounded up to 2 sectors, one more sector for the move
        Strategy.SWAP_MOVE: 4 * SECTOR - 3 * SECTOR,
        Strategy.SWAP_OFFSET: 4 * SECTOR - 2 * SECTOR - SECTOR,
    }[strategy]
    assert m.max_image_size() == expected


def scratch(at: int = 12 * SECTOR) -> Area:
    return Area("scratch", at, SECTOR)


def test_harness_readme_trailer_examples() -> None:
    assert trailer_size(8, 128) == 3120
    assert trailer_size(8, 128, strategy="swap-offset") == 2104
    assert trailer_size(8, 256) == 6192
    assert trailer_size(8, 1840) == 44208
    assert trailer_size(0x200, 1840, strategy="swap-status") == 0
    assert trailer_size(8, 128, overwrite_only=True) == 32  # imgtool --overwrite-only
    assert trailer_size(32, 128) == 128 * 3 * 32 + 4 * 32 + 32  # BOOT_MAX_ALIGN 32
    assert scratch_trailer_size(8) == 72
    assert swap_status_area_size(500) == 6144
    assert swap_status_area_size(501) == 9216
    assert swap_status_area_size(128, images=2) == 5 * 2 * 2 * 0x200
    with pytest.raises(ValueError, match="unknown strategy"):
        trailer_size(8, 128, strategy="swap")


def test_image_offset_is_one_sector_for_swap_offset_only() -> None:
    m = preset("sim-small")
    assert m.image_offset() == 0
    assert m.with_strategy("swap-offset").image_offset() == SECTOR
    with raises("has no image 1"):
        m.image_offset(1)


def test_with_strategy_keeps_everything_else() -> None:
    m = preset("sim-small")
    moved = m.with_strategy(Strategy.SWAP_MOVE)
    assert moved.strategy == Strategy.SWAP_MOVE
    assert moved.areas == m.areas
    assert moved.max_sectors == m.max_sectors
    assert moved.with_strategy("swap-scratch") == m
    with pytest.raises(ValueError, match="'nope' is not a valid Strategy"):
        m.with_strategy("nope")


@pytest.mark.parametrize("name", ["sim-small", "psoc6-2m-swap", "sim-small-status"])
def test_new_flash_has_the_map_geometry(name: str, tmp_path: Path) -> None:
    m = preset(name)
    for flash in (m.new_flash(), m.open_flash(tmp_path / "flash.bin")):
        assert (flash.size, flash.sector_size, flash.write_align) == (
            m.flash_size,
            m.sector_size,
            m.write_align,
        )
        assert (flash.erased_value, flash.write_mode) == (m.erased_value, m.write_mode)
        assert flash.widen_erases == (m.strategy == Strategy.SWAP_STATUS)
        assert flash.read(m.primary().offset, 4) == bytes([m.erased_value]) * 4
        flash.close()
    assert (tmp_path / "flash.bin").read_bytes() == bytes([m.erased_value]) * m.flash_size
    backing = FileBacking(tmp_path / "other.bin", m.flash_size, m.erased_value)
    flash = m.new_flash(backing)
    flash.cut_after(0, tear_half=True)
    with pytest.raises(PowerCut):
        flash.erase(0, m.sector_size)
    flash.close()
    half = m.sector_size // 2
    assert (tmp_path / "other.bin").read_bytes()[:half] == bytes([m.erased_value]) * half


# --- validation rules --------------------------------------------------------------------------


def test_a_valid_minimal_map() -> None:
    m = make(*slots())
    assert m.images == [0]


@pytest.mark.parametrize("align", [0, 3, 1024])
def test_write_align_must_be_a_valid_alignment(align: int) -> None:
    with raises(f"write alignment {align} is not one of 1, 2, 4, 8, 16, 32, 64, .*, 512"):
        make(*slots(), write_align=align)


@pytest.mark.parametrize("strategy", ["overwrite", "swap-scratch", "swap-move", "swap-offset"])
@pytest.mark.parametrize("align", [64, 512])
def test_upstream_modes_refuse_writes_larger_than_boot_max_align(strategy: str, align: int) -> None:
    with raises(f"write alignment {align} is larger than 32, the largest BOOT_MAX_ALIGN"):
        make(*slots(), scratch(), write_align=align, strategy=strategy)
    m = make(*slots(size=4 * SECTOR), scratch(), write_align=32, strategy=strategy, max_sectors=8)
    assert m.max_align == 32


def test_write_align_must_divide_the_sector_size() -> None:
    with raises("write alignment 32 does not divide the sector size 0x10"):
        make(*slots(at=16, size=0x2000), sector_size=16, write_align=32)


def test_flash_size_must_be_a_multiple_of_the_sector_size() -> None:
    with raises("flash size 0x10800 is not a multiple of the sector size 0x1000"):
        make(*slots(), flash_size=64 * KIB + 2 * KIB)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sector_size", 0, "sector size is 0 but must be at least 1"),
        ("flash_size", 0, "flash size is 0 but must be at least 1"),
        ("max_sectors", 0, "max_sectors is 0 but must be at least 1"),
        ("base_address", -1, "base address is -1 but must be at least 0"),
        ("flash_size", "65536", "flash size must be an integer, not '65536'"),
        ("write_align", True, "write alignment must be an integer, not True"),
    ],
)
def test_flash_parameters_are_checked(field: str, value: object, match: str) -> None:
    with raises(match):
        make(*slots(), **{field: value})


def test_name_must_be_a_non_empty_string() -> None:
    with raises("flash map name must be a non-empty string"):
        make(*slots(), name="")


def test_area_offset_must_be_on_a_sector_boundary() -> None:
    with raises(r"primary \(image 0\) area at 0x10001200 does not start on a 0x1000-byte sector"):
        make(*slots(at=SECTOR + 0x200), base_address=0x10000000)


def test_area_size_must_be_a_multiple_of_the_sector_size() -> None:
    areas = (*slots(), Area("scratch", 8 * SECTOR, SECTOR + 8))
    with raises("scratch area at 0x8000 has size 0x1008, not a multiple of the 0x1000-byte"):
        make(*areas)


def test_area_must_lie_inside_the_flash() -> None:
    areas = (*slots(), Area("status", 15 * SECTOR, 2 * SECTOR, image=0))
    with raises(r"status \(image 0\) area at 0xf000 .* ends at 0x11000, past the end of the flash"):
        make(*areas)


def test_area_size_must_be_positive() -> None:
    with raises("size of area scratch is 0 but must be at least 1"):
        Area("scratch", 0, 0)


def test_area_offset_must_not_be_negative() -> None:
    with raises("offset of area bootloader is -4096 but must be at least 0"):
        Area("bootloader", -SECTOR, SECTOR)


def test_unknown_area_name_is_rejected() -> None:
    with raises("unknown area name 'app'; expected one of bootloader, primary, secondary"):
        Area("app", 0, SECTOR, image=0)


def test_areas_must_be_area_objects() -> None:
    with raises("is not an Area"):
        make(*slots(), {"name": "scratch"})  # type: ignore[arg-type]


def test_overlapping_areas_are_named() -> None:
    areas = (*slots(), Area("scratch", 2 * SECTOR, SECTOR))
    with raises(
        r"primary \(image 0\) area 0x1000-0x3000 overlaps scratch area 0x2000-0x3000"
    ) as info:
        make(*areas)
    assert info.value.value == ("primary (image 0)", "scratch")


def test_an_area_inside_a_larger_one_overlaps() -> None:
    areas = (
        Area("bootloader", 0, 8 * SECTOR),
        *slots(at=8 * SECTOR),
        Area("scratch", SECTOR, SECTOR),
    )
    with raises("bootloader area 0x0-0x8000 overlaps scratch area 0x1000-0x2000"):
        make(*areas)


def test_adjacent_areas_do_not_overlap() -> None:
    areas = (Area("bootloader", 0, SECTOR), *slots(at=SECTOR), Area("scratch", 5 * SECTOR, SECTOR))
    assert len(make(*areas).areas) == 4


@pytest.mark.parametrize("kind", ["bootloader", "scratch"])
def test_at_most_one_bootloader_and_one_scratch(kind: str) -> None:
    areas = (*slots(), Area(kind, 8 * SECTOR, SECTOR), Area(kind, 9 * SECTOR, SECTOR))
    with raises(f"has 2 {kind} areas \\(at 0x8000, 0x9000\\); at most one is allowed"):
        make(*areas)


@pytest.mark.parametrize("kind", ["primary", "secondary", "status"])
def test_image_areas_need_an_image_index(kind: str) -> None:
    with raises(f"{kind} area at offset 0x1000 has no image index"):
        Area(kind, SECTOR, SECTOR)


@pytest.mark.parametrize("kind", ["bootloader", "scratch"])
def test_shared_areas_take_no_image_index(kind: str) -> None:
    with raises(f"{kind} area is shared by all images and takes no image index \\(got 0\\)"):
        Area(kind, 0, SECTOR, image=0)


def test_image_index_must_not_be_negative() -> None:
    with raises("image index of primary area is -1 but must be at least 0"):
        Area("primary", 0, SECTOR, image=-1)


def test_images_are_numbered_without_gaps() -> None:
    areas = (*slots(0, at=0), *slots(2, at=4 * SECTOR))
    with raises("images must be numbered 0 to 1 without gaps, but image 1 is missing"):
        make(*areas)


def test_images_start_at_zero() -> None:
    with raises("image 0 is missing"):
        make(*slots(1))


def test_a_map_needs_at_least_one_image() -> None:
    with raises("has no image slots"):
        make(Area("bootloader", 0, SECTOR))


@pytest.mark.parametrize("missing", ["primary", "secondary"])
def test_each_image_has_a_primary_and_a_secondary(missing: str) -> None:
    areas = [a for a in slots() if a.name != missing]
    with raises(f"image 0 has no {missing} slot"):
        make(*areas)


def test_a_status_area_alone_does_not_make_an_image() -> None:
    areas = (*slots(0), Area("status", 8 * SECTOR, SECTOR, image=1))
    with raises("image 1 has no primary slot"):
        make(*areas)


@pytest.mark.parametrize("kind", ["primary", "secondary"])
def test_each_image_has_exactly_one_of_each_slot(kind: str) -> None:
    areas = (*slots(), Area(kind, 8 * SECTOR, 2 * SECTOR, image=0))
    with raises(f"image 0 has 2 {kind} areas \\(at 0x[0-9a-f]+, 0x8000\\); exactly one is allowed"):
        make(*areas)


def test_each_image_has_at_most_one_status_area() -> None:
    areas = (
        *slots(),
        Area("status", 8 * SECTOR, SECTOR, image=0),
        Area("status", 9 * SECTOR, SECTOR, image=0),
    )
    with raises("image 0 has 2 status areas .*; at most one is allowed"):
        make(*areas)


def two_slots(primary: int, secondary: int) -> tuple[Area, Area]:
    return (
        Area("primary", SECTOR, primary * SECTOR, image=0),
        Area("secondary", (1 + primary) * SECTOR, secondary * SECTOR, image=0),
    )


@pytest.mark.parametrize("strategy", ["overwrite", "swap-scratch"])
@pytest.mark.parametrize(("primary", "secondary"), [(3, 2), (2, 3)])
def test_overwrite_and_swap_scratch_need_equal_slots(
    strategy: str, primary: int, secondary: int
) -> None:
    with raises(
        rf"\({strategy}\): image 0: the primary slot \(0x{primary * SECTOR:x} bytes\) and the "
        rf"secondary slot \(0x{secondary * SECTOR:x} bytes\) must have the same size"
    ):
        make(*two_slots(primary, secondary), scratch(), strategy=strategy)


@pytest.mark.parametrize(
    ("primary", "secondary", "ok"), [(3, 3, True), (4, 3, True), (5, 3, False), (3, 4, False)]
)
def test_swap_move_primary_has_the_same_sectors_or_one_more(
    primary: int, secondary: int, ok: bool
) -> None:
    areas = two_slots(primary, secondary)
    if ok:
        assert make(*areas, strategy="swap-move").strategy == Strategy.SWAP_MOVE
    else:
        with raises(
            f"swap-move needs the primary slot to have as many sectors as the secondary or one "
            f"more, not {primary} and {secondary}"
        ):
            make(*areas, strategy="swap-move")


@pytest.mark.parametrize(
    ("primary", "secondary", "ok"), [(3, 3, True), (3, 4, True), (3, 5, False), (4, 3, False)]
)
def test_swap_offset_secondary_has_the_same_sectors_or_one_more(
    primary: int, secondary: int, ok: bool
) -> None:
    areas = two_slots(primary, secondary)
    if ok:
        assert make(*areas, strategy="swap-offset").strategy == Strategy.SWAP_OFFSET
    else:
        with raises(
            f"swap-offset needs the secondary slot to have as many sectors as the primary or "
            f"one more, not {secondary} and {primary}"
        ):
            make(*areas, strategy="swap-offset")


def test_slots_must_leave_room_for_an_image() -> None:
    # 512-byte sectors: 6 sectors (3072 bytes) cannot hold the 3120-byte trailer, 7 can.
    small: dict[str, Any] = {"flash_size": 64 * KIB, "sector_size": 512}
    room = Area("scratch", 60 * KIB, 512)
    with raises(r"image 0: the slots leave no room for an image next to the 3120-byte trailer"):
        make(*slots(at=0, size=6 * 512), room, **small, strategy="swap-scratch")
    # 7 sectors: the trailer starts 464 bytes in, 48 bytes before the end of its first sector,
    # so 24 bytes of padding keep room for the 72-byte scratch trailer
    m = make(*slots(at=0, size=7 * 512), room, **small, strategy="swap-scratch")
    assert m.max_image_size() == 7 * 512 - 3120 - 24


@pytest.mark.parametrize("strategy", list(Strategy))
def test_more_sectors_than_max_sectors_is_refused(strategy: Strategy) -> None:
    areas: tuple[Area, ...] = (*slots(size=5 * SECTOR), scratch())
    if strategy == Strategy.SWAP_STATUS:
        areas = (*areas, Area("status", 13 * SECTOR, 2 * SECTOR, image=0))
        kwargs: dict[str, Any] = {"sector_size": SECTOR, "write_align": 8}
    else:
        kwargs = {}
    with raises(r"primary \(image 0\) slot has 5 sectors of 0x1000 bytes, more than max_sectors 4"):
        make(*areas, max_sectors=4, strategy=strategy, **kwargs)
    assert make(*areas, max_sectors=5, strategy=strategy, **kwargs).max_sectors == 5


@pytest.mark.parametrize("strategy", ["swap-scratch", "swap-status"])
def test_scratch_strategies_need_a_scratch_area(strategy: str) -> None:
    extra = (Area("status", 13 * SECTOR, 2 * SECTOR, image=0),) if strategy == "swap-status" else ()
    with raises(f"\\({strategy}\\): the strategy needs a scratch area"):
        make(*slots(), *extra, strategy=strategy)


def test_scratch_must_hold_a_sector_and_the_scratch_trailer() -> None:
    small = dict(sector_size=64, flash_size=64 * 64 * 8)
    areas = (Area("primary", 0, 64 * 64, image=0), Area("secondary", 64 * 64, 64 * 64, image=0))
    with raises("scratch area of 0x40 bytes cannot hold the 72-byte scratch trailer"):
        make(*areas, Area("scratch", 128 * 64, 64), **small, max_sectors=64)
    assert make(*areas, Area("scratch", 128 * 64, 128), **small, max_sectors=64).scratch


def test_scratch_with_more_sectors_than_max_sectors_is_refused() -> None:
    with raises("scratch area has 3 sectors, more than max_sectors 2"):
        make(*slots(), Area("scratch", 8 * SECTOR, 3 * SECTOR), max_sectors=2)


def test_a_scratch_area_is_unused_but_allowed_without_swap_scratch() -> None:
    for strategy in ("overwrite", "swap-move", "swap-offset"):
        m = make(*slots(size=4 * SECTOR), scratch(), strategy=strategy, max_sectors=8)
        assert m.scratch == scratch()


@pytest.mark.parametrize("strategy", ["overwrite", "swap-scratch", "swap-move", "swap-offset"])
def test_a_status_area_belongs_to_swap_status_only(strategy: str) -> None:
    areas = (*slots(), scratch(), Area("status", 8 * SECTOR, SECTOR, image=0))
    with raises(
        rf"\({strategy}\): status \(image 0\) area: only swap-status keeps its progress in a "
        "status partition"
    ):
        make(*areas, strategy=strategy)


def status_map(status_size: int, *, images: int = 1, **kwargs: Any) -> FlashMap:
    row = 0x200
    areas: list[Area] = []
    for image in range(images):
        areas += [
            Area("primary", (image * 2) * 8 * row, 8 * row, image=image),
            Area("secondary", (image * 2 + 1) * 8 * row, 8 * row, image=image),
        ]
    at = images * 2 * 8 * row
    areas += [Area("status", at, status_size, image=0), Area("scratch", at + status_size, row)]
    options: dict[str, Any] = {
        "name": "status",
        "flash_size": 128 * row,
        "sector_size": row,
        "write_align": row,
        "max_sectors": 24,
        "strategy": "swap-status",
        "erased_value": 0,
        "write_mode": "replace",
    }
    options.update(kwargs)
    return FlashMap(areas=tuple(areas), **options)


def test_swap_status_partition_size_is_checked() -> None:
    assert status_map(0x1800).status_partition_size == 0x1800
    with raises(
        r"status area of 0x1600 bytes is smaller than the 0x1800 bytes swap_status.h needs for "
        r"1 image\(s\) and max_sectors 24"
    ):
        status_map(0x1600)
    assert status_map(0x2800, images=2).status_partition_size == 0x2800
    with raises("smaller than the 0x2800 bytes swap_status.h needs for 2 image"):
        status_map(0x1800, images=2)


def test_swap_status_partition_has_at_most_64_sectors() -> None:
    with raises("status area has 65 sectors, more than the 64 MCUboot reads"):
        status_map(65 * 0x200, max_sectors=100, flash_size=256 * 0x200)


def test_swap_status_needs_exactly_one_status_partition() -> None:
    m = status_map(0x1800)
    areas = tuple(a for a in m.areas if a.name != "status")
    with raises("swap-status needs exactly one status area"):
        FlashMap(**{**_fields(m), "areas": areas})
    two = status_map(0x2800, images=2)
    extra = Area("status", 100 * 0x200, 0x2800, image=1)
    with raises("swap-status needs exactly one status area"):
        FlashMap(**{**_fields(two), "areas": (*two.areas, extra), "flash_size": 256 * 0x200})


def test_swap_status_write_align_is_at_most_a_row() -> None:
    with raises("write alignment 512 does not divide the sector size 0x100"):
        status_map(0x1800, sector_size=0x100)
    assert status_map(0x1800, write_align=8).max_align == 8


def test_swap_status_max_image_size_follows_the_cypress_loader() -> None:
    # img_size > write_align * sectors - write_align is erased: the last row is the trailer's
    assert status_map(0x1800).max_image_size() == 8 * 0x200 - 0x200
    assert status_map(0x1800, write_align=8).max_image_size() == 8 * 8 - 8


def test_areas_given_as_a_list_become_a_tuple() -> None:
    m = FlashMap("t", 64 * KIB, SECTOR, 8, list(slots()))  # type: ignore[arg-type]
    assert isinstance(m.areas, tuple)
    assert m == make(*slots(), name="t")
    assert hash(m) == hash(make(*slots(), name="t"))


# --- malformed JSON ----------------------------------------------------------------------------


def valid() -> dict[str, Any]:
    return copy.deepcopy(preset("sim-small").to_dict())


def with_change(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    data = valid()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def without(path: tuple[str | int, ...]) -> dict[str, Any]:
    data = valid()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "flash map must be a JSON object, not list"),
        ("psoc6", "flash map must be a JSON object, not str"),
        (None, "flash map must be a JSON object, not NoneType"),
        (without(("name",)), "flash map has no 'name' key"),
        (without(("flash",)), "flash map has no 'flash' key"),
        (without(("areas",)), "flash map has no 'areas' key"),
        (without(("flash", "size")), "flash map field flash has no 'size' key"),
        (without(("flash", "sector_size")), "flash has no 'sector_size' key"),
        (without(("flash", "write_align")), "flash has no 'write_align' key"),
        (without(("areas", 1, "address")), r"field areas\[1\] has no 'address' key"),
        (without(("areas", 1, "size")), r"field areas\[1\] has no 'size' key"),
        (without(("areas", 1, "name")), r"field areas\[1\] has no 'name' key"),
        (without(("areas", 1, "image")), r"areas\[1\]: primary area at offset 0x1000 has no image"),
        (with_change(("extra",), 1), "flash map has unknown key\\(s\\) 'extra'"),
        (with_change(("flash", "sector-size"), 1), "flash has unknown key\\(s\\) 'sector-size'"),
        (with_change(("areas", 0, "offset"), 1), r"areas\[0\] has unknown key\(s\) 'offset'"),
        (with_change(("name",), 5), "flash map name must be a string, not 5"),
        (with_change(("flash",), [1]), "field flash must be a JSON object, not list"),
        (with_change(("areas",), {}), "field areas must be a list, not dict"),
        (with_change(("areas", 2), "secondary"), r"field areas\[2\] must be a JSON object"),
        (with_change(("areas", 2, "name"), None), r"areas\[2\].name must be a string, not None"),
        (with_change(("areas", 2, "name"), "app"), r"areas\[2\]: unknown area name 'app'"),
        (with_change(("flash", "size"), 65536.0), "flash.size must be an integer .*not 65536.0"),
        (with_change(("flash", "size"), True), "flash.size must be an integer .*not True"),
        (with_change(("flash", "size"), [1]), "flash.size must be an integer"),
        (with_change(("flash", "base"), None), "flash.base must be an integer"),
        (with_change(("flash", "size"), "64K"), "flash.size is '64K', not a non-negative decimal"),
        (with_change(("flash", "size"), ""), "flash.size is '', not a non-negative"),
        (with_change(("flash", "size"), " 4096"), "flash.size is ' 4096', not"),
        (with_change(("flash", "size"), "0x"), "flash.size is '0x', not"),
        (with_change(("flash", "size"), "0xfg"), "flash.size is '0xfg', not"),
        (with_change(("flash", "size"), "1e4"), "flash.size is '1e4', not"),
        (with_change(("flash", "size"), "0b101"), "flash.size is '0b101', not"),
        (with_change(("flash", "size"), "1_000"), "flash.size is '1_000', not"),
        (with_change(("flash", "size"), "-0x1000"), "flash.size is '-0x1000', not"),
        (
            with_change(("flash", "size"), -65536),
            "flash.size is -65536, but it must not be negative",
        ),
        (with_change(("flash", "write_align"), -8), "flash.write_align is -8, but it must not be"),
        (with_change(("flash", "write_align"), 7), "write alignment 7 is not one of"),
        (with_change(("flash", "max_sectors"), 0), "max_sectors is 0 but must be at least 1"),
        (with_change(("areas", 1, "image"), -1), r"areas\[1\].image is -1, but it must not be"),
        (with_change(("areas", 1, "image"), 0.0), r"areas\[1\].image must be an integer"),
        (with_change(("areas", 3, "image"), 0), r"areas\[3\]: scratch area is shared by all"),
        (with_change(("areas", 1, "size"), "9" * 5000), r"areas\[1\].size is a 5000-digit number"),
        (with_change(("areas", 1, "size"), "0x1" + "0" * 5000), "past the end of the flash"),
        (with_change(("areas", 1, "size"), 0), "size of area primary \\(image 0\\) is 0"),
        (with_change(("areas", 1, "address"), -4096), r"areas\[1\].address is -4096"),
        (
            with_change(("flash", "base"), "0x10000000"),
            r"areas\[0\] \(bootloader\) has address 0x0, below the flash base 0x10000000",
        ),
        (with_change(("areas",), []), "has no image slots"),
    ],
)
def test_malformed_input_is_a_flash_map_error(data: object, match: str) -> None:
    with raises(match):
        FlashMap.from_dict(data)


def test_missing_file_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="cannot read flash map"):
        FlashMap.load(tmp_path / "absent.json")


def test_directory_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="is a directory"):
        FlashMap.load(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is not valid JSON: Expecting value at line 1 column 1"),
        (b'{"name": "x",', "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "is not usable JSON"),
        (b'{"name": 1e999999, "flash": {}, "areas": []}', "name must be a string, not inf"),
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'{"name": 1' + b"0" * 5000 + b"}", "is not usable JSON: Exceeds the limit"),
    ],
)
def test_bad_files_are_flash_map_errors(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "map.json"
    path.write_bytes(content)
    with raises(match):
        FlashMap.load(path)


def test_load_names_the_file_in_validation_errors(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(with_change(("flash", "write_align"), 7)))
    with raises(f"^{re.escape(str(path))}: flash map sim-small: write alignment 7"):
        FlashMap.load(path)


def test_save_to_a_missing_folder_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError):
        preset("sim-small").save(tmp_path / "nope" / "map.json")


def test_every_area_kind_round_trips() -> None:
    m = preset("psoc6-2m-swap")
    assert {a.name for a in m.areas} == set(AREA_KINDS)
    assert FlashMap.from_dict(m.to_dict()) == m


# --- property test -----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["0x1000", "0x10000", "4096", "8", "0", "-1", "0xZZ", "primary", "status"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.sampled_from(["name", "flash", "areas", "size", "address", "image", "base"])
            | st.text(max_size=6),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)
# Values that pass the type checks, so mutated maps reach the layout rules.
field_values = (
    st.integers(min_value=0, max_value=2**20).map(lambda n: n * 512)
    | st.integers(min_value=-2, max_value=40)
    | st.sampled_from(AREA_KINDS)
    | st.integers(min_value=0, max_value=2**20).map(lambda n: hex(n * 512))
    | json_values
)
PATHS = [
    ("name",),
    ("flash",),
    ("areas",),
    ("flash", "size"),
    ("flash", "base"),
    ("flash", "sector_size"),
    ("flash", "write_align"),
    ("flash", "max_sectors"),
    ("flash", "erased_value"),
    ("flash", "write_mode"),
    ("strategy",),
    *[("areas", i, key) for i in range(5) for key in ("name", "address", "size", "image")],
    *[("areas", i) for i in range(5)],
]


def _mutate(changes: list[tuple[tuple[str | int, ...], Any]]) -> dict[str, Any]:
    """The sim-small map with some fields replaced by random values."""
    data = valid()
    for path, value in changes:
        target: Any = data
        for key in path[:-1]:
            try:
                target = target[key]
            except (KeyError, IndexError, TypeError):
                break
        else:
            with contextlib.suppress(IndexError, TypeError):
                target[path[-1]] = value
    return data


@settings(max_examples=200)
@given(
    st.one_of(
        json_values,
        st.lists(st.tuples(st.sampled_from(PATHS), field_values), min_size=1, max_size=3).map(
            _mutate
        ),
    )
)
def test_random_input_only_raises_flash_map_error(data: object) -> None:
    try:
        result = FlashMap.from_dict(data)
    except FlashMapError as exc:
        message = str(exc)
    else:
        assert FlashMap.from_dict(result.to_dict()) == result
        return
    assert message
