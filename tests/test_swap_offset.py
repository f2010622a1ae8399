"""swap-offset against MCUboot's own ``swap_offset.c`` (the mcuboot-host-swap-offset harness).

Same checks as ``test_swap_move.py`` (whose helpers this uses): identical flash bytes and
operation counts for an upgrade, a revert and every power cut of both (clean and torn), on
layouts where the secondary slot has one sector more than the primary and the update image
starts one sector into it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from otakit.device.flashmap import Strategy

from .conftest import Run
from .mcuboot_host import McubootHost
from .test_swap_move import (
    V1,
    V2,
    Bench,
    both,
    check_confirm,
    check_cut_sweep,
    check_cuts_during_resume,
    check_default_config_finishes_reverts,
    check_max_image_size,
    check_refused,
    check_tampered,
    check_upgrade_revert,
    check_wrong_keys,
    small_map,
)

OFFSET_MAPS = {
    # secondary one sector larger than the primary (the swap-offset layout)
    "small": lambda: small_map(Strategy.SWAP_OFFSET, primary_sectors=5, secondary_sectors=6),
    # PSoC 6-like cells: erased 0x00, row writes replace
    "small-00": lambda: small_map(
        Strategy.SWAP_OFFSET,
        primary_sectors=5,
        secondary_sectors=6,
        erased=0x00,
        write_mode="replace",
    ),
    # 4-byte writes
    "small-a4": lambda: small_map(
        Strategy.SWAP_OFFSET, primary_sectors=5, secondary_sectors=6, write_align=4
    ),
    # a 2104-byte trailer (MAX_IMG_SECTORS 128)
    "small-128": lambda: small_map(
        Strategy.SWAP_OFFSET, primary_sectors=6, secondary_sectors=7, max_sectors=128
    ),
}


@pytest.fixture(params=sorted(OFFSET_MAPS))
def offset_bench(
    request: pytest.FixtureRequest,
    mcuboot_host: McubootHost,
    imgtool: Callable[..., Run],
    key_dir: Path,
    tmp_path: Path,
) -> Bench:
    return Bench(mcuboot_host, imgtool, key_dir, tmp_path, OFFSET_MAPS[request.param]())


@pytest.fixture
def small_offset(
    mcuboot_host: McubootHost, imgtool: Callable[..., Run], key_dir: Path, tmp_path: Path
) -> Bench:
    return Bench(mcuboot_host, imgtool, key_dir, tmp_path, OFFSET_MAPS["small"]())


def test_upgrade_revert_and_idle_boot_match_mcuboot(offset_bench: Bench) -> None:
    check_upgrade_revert(offset_bench)


def test_confirm_on_mcuboot_flash_keeps_the_upgrade(offset_bench: Bench) -> None:
    check_confirm(offset_bench)


@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn"])
@pytest.mark.parametrize("kind", ["upgrade", "revert"])
@pytest.mark.parametrize("layout", ["small", "small-00", "small-a4"])
def test_every_cut_point_matches_mcuboot(
    mcuboot_host: McubootHost,
    imgtool: Callable[..., Run],
    key_dir: Path,
    tmp_path: Path,
    report: Callable[[str], None],
    layout: str,
    kind: str,
    torn: bool,
) -> None:
    bench = Bench(mcuboot_host, imgtool, key_dir, tmp_path, OFFSET_MAPS[layout]())
    check_cut_sweep(bench, kind, torn, report)


def test_default_config_finishes_interrupted_reverts(
    small_offset: Bench, report: Callable[[str], None]
) -> None:
    check_default_config_finishes_reverts(small_offset, report)


def test_cuts_during_a_resumed_upgrade_match_mcuboot(
    small_offset: Bench, report: Callable[[str], None]
) -> None:
    check_cuts_during_resume(small_offset, 4, report)


def test_wrong_key_is_refused_like_mcuboot(small_offset: Bench, key_dir: Path) -> None:
    check_wrong_keys(small_offset, key_dir)


def test_tampered_image_is_refused_like_mcuboot(small_offset: Bench) -> None:
    check_tampered(small_offset)


def test_image_size_limit_is_mcuboots(small_offset: Bench) -> None:
    check_max_image_size(small_offset)


def test_larger_old_image_sets_the_swap_size(small_offset: Bench) -> None:
    start = small_offset.start(v1_size=14000, v2_size=3000)
    upgraded = both(small_offset, start, "upgrade to a smaller image")
    assert upgraded.version == V2
    assert both(small_offset, upgraded.data, "revert to the larger image").version == V1


def test_update_at_the_start_of_the_secondary_is_refused(small_offset: Bench) -> None:
    """An update written at offset 0 instead of one sector in: MCUboot finds its header there
    (boot_read_image_header looks in both places) and refuses it as uploaded to the wrong
    address."""
    fmap = small_offset.map
    sec = fmap.secondary(0)
    right = small_offset.start()
    wrong = bytearray(right)
    image = right[sec.offset + fmap.image_offset(0) : sec.end]
    erased = bytes([fmap.erased_value])
    wrong[sec.offset : sec.end] = image + erased * (sec.size - len(image))
    check_refused(small_offset, bytes(wrong), "an update at the start of the secondary")


def test_no_upgrade_into_an_empty_primary(small_offset: Bench) -> None:
    out = both(small_offset, small_offset.start(primary=False), "pending image, empty primary")
    assert out.ops == 0
    assert out.version is None
