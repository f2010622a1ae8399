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

from otakit.device.flashmap import AREA_KINDS, PRESETS, Area, FlashMap, preset
from otakit.errors import FlashMapError, InputFileError
from otakit.image.trailer import trailer_size

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


def test_presets_are_the_four_documented_ones() -> None:
    assert set(PRESETS) == {"psoc6-2m-swap", "two-image", "external-flash", "sim-small"}
    for name, flash_map in PRESETS.items():
        assert flash_map.name == name
        assert preset(name) is flash_map


def test_psoc6_layout_is_exactly_protocols_md() -> None:
    m = preset("psoc6-2m-swap")
    assert (m.base_address, m.flash_size, m.sector_size, m.write_align) == (
        0x10000000,
        0x200000,
        0x200,
        8,
    )
    assert m.images == [0]
    got = {a.label: (m.address(a), a.size) for a in m.areas}
    assert got == {
        "bootloader": (0x10000000, 0x18000),
        "primary (image 0)": (0x10028000, 0xE6000),
        "secondary (image 0)": (0x1010E000, 0xE6000),
        "status (image 0)": (0x101F4000, 0x3C00),
        "scratch": (0x101F7C00, 0x1000),
    }
    assert m.primary().offset == 0x28000
    assert m.primary().end == 0x10E000 == m.secondary().offset
    status = m.status()
    assert status is not None
    assert status.offset == 0x1F4000
    scratch = m.scratch
    assert scratch is not None
    assert scratch.end == 0x1F8C00
    assert m.trailer_size == trailer_size(8, 128) == 3120
    assert m.max_image_size() == 0xE6000 - 3120


def test_two_image_preset() -> None:
    m = preset("two-image")
    assert m.images == [0, 1]
    assert (m.flash_size, m.sector_size) == (2 * 1024 * KIB, SECTOR)
    assert m.primary(0).size == m.secondary(0).size == 0x60000
    assert m.primary(1).size == m.secondary(1).size == 0x20000
    assert m.scratch is not None
    assert m.scratch.size == SECTOR
    for image in (0, 1):
        status = m.status(image)
        assert status is not None
        assert status.size == 2 * SECTOR
    assert m.bootloader == Area("bootloader", 0, 64 * KIB)


def test_external_flash_preset() -> None:
    m = preset("external-flash")
    assert m.flash_size == 16 * 1024 * KIB
    assert m.primary() == Area("primary", 0x10000, 1024 * KIB, image=0)
    assert m.secondary().offset == m.primary().end
    status = m.status()
    assert status is not None
    assert status.size == 2 * SECTOR
    assert m.scratch is not None
    assert m.scratch.size == SECTOR


def test_sim_small_preset() -> None:
    m = preset("sim-small")
    assert (m.flash_size, m.sector_size, m.write_align) == (64 * KIB, SECTOR, 8)
    assert [(a.name, a.size // SECTOR) for a in m.areas] == [
        ("bootloader", 1),
        ("primary", 5),
        ("secondary", 5),
        ("scratch", 1),
        ("status", 1),
    ]
    assert m.max_image_size() == 5 * SECTOR - 3120


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
        "write_align": 8,
        "max_sectors": 128,
    }
    assert data["areas"][0] == {"name": "bootloader", "address": "0x10000000", "size": "0x18000"}
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


def test_max_sectors_sizes_the_trailer() -> None:
    m = make(*slots(size=4 * SECTOR), max_sectors=512, write_align=4)
    assert m.trailer_size == 512 * 3 * 4 + 48
    assert m.max_image_size() == 4 * SECTOR - m.trailer_size


# --- validation rules --------------------------------------------------------------------------


def test_a_valid_minimal_map() -> None:
    m = make(*slots())
    assert m.images == [0]


@pytest.mark.parametrize("align", [0, 3, 64])
def test_write_align_must_be_a_valid_alignment(align: int) -> None:
    with raises(f"write alignment {align} is not one of 1, 2, 4, 8, 16, 32"):
        make(*slots(), write_align=align)


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


def test_secondary_must_not_be_smaller_than_primary() -> None:
    areas = (
        Area("primary", 0, 3 * SECTOR, image=0),
        Area("secondary", 3 * SECTOR, 2 * SECTOR, image=0),
    )
    with raises(
        r"secondary \(image 0\) slot of 0x2000 bytes is smaller than its primary slot of 0x3000"
    ):
        make(*areas)


def test_secondary_may_be_larger_than_primary() -> None:
    areas = (
        Area("primary", 0, 2 * SECTOR, image=0),
        Area("secondary", 2 * SECTOR, 3 * SECTOR, image=0),
    )
    assert make(*areas).secondary().size == 3 * SECTOR


def test_primary_must_be_larger_than_the_trailer() -> None:
    # 512-byte sectors: 6 sectors (3072 bytes) cannot hold the 3120-byte trailer, 7 can.
    small = dict(flash_size=64 * KIB, sector_size=512)
    with raises(r"primary \(image 0\) slot of 0xc00 bytes cannot hold the 3120-byte trailer"):
        make(*slots(at=0, size=6 * 512), **small)
    assert make(*slots(at=0, size=7 * 512), **small).max_image_size() == 7 * 512 - 3120


def test_max_sectors_and_align_change_the_trailer_limit() -> None:
    # 5 sectors of 4 KiB hold the default trailer but not one for 1024 sectors
    with raises("cannot hold the 24624-byte trailer"):
        make(*slots(size=5 * SECTOR), flash_size=64 * KIB, max_sectors=1024)


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
    m = preset("two-image")
    assert {a.name for a in m.areas} == set(AREA_KINDS)
    assert FlashMap.from_dict(m.to_dict()).areas == m.areas


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
