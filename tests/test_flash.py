"""The NOR flash model: erase/program semantics, wear counters, backings and power cuts."""

from __future__ import annotations

from pathlib import Path

import pytest

from otakit.device.flash import ERASED, FileBacking, Flash, MemoryBacking, PowerCut
from otakit.errors import FlashError, InputFileError

KIB = 1024
SECTOR = 4 * KIB
SIZE = 16 * SECTOR
FF = b"\xff"


def flash(**kwargs: object) -> Flash:
    return Flash(SIZE, SECTOR, **kwargs)  # type: ignore[arg-type]


def pattern(length: int, start: int = 0) -> bytes:
    """Bytes with no 0xFF among them, so a stored byte is told apart from an erased one."""
    return bytes((start + i) % 0xFF for i in range(length))


# --- erase and program -------------------------------------------------------------------------


def test_a_new_flash_reads_erased() -> None:
    f = flash()
    assert ERASED == 0xFF
    assert f.read(0, SIZE) == FF * SIZE
    assert f.is_erased(0, SIZE)
    assert f.read(SIZE - 1, 1) == FF
    assert f.read(SIZE, 0) == b""


def test_write_then_read_back() -> None:
    f = flash()
    f.write(SECTOR - 8, pattern(16))  # across a sector boundary
    assert f.read(SECTOR - 8, 16) == pattern(16)
    assert f.read(SECTOR - 16, 8) == FF * 8
    assert f.read(SECTOR + 8, 8) == FF * 8
    assert not f.is_erased(0, 2 * SECTOR)


def test_writing_over_data_ands_the_bits() -> None:
    f = flash()
    f.write(0, b"\xf0\x0f\xaa\xff\x00\x3c\xc3\x81")
    f.write(0, b"\x3c\xff\x55\x0f\xff\xff\x00\x01")
    assert f.read(0, 8) == b"\x30\x0f\x00\x0f\x00\x3c\x00\x01"


def test_writing_ff_changes_nothing() -> None:
    f = flash()
    f.write(0, pattern(8))
    f.write(0, FF * 8)
    assert f.read(0, 8) == pattern(8)


def test_erase_sets_whole_sectors_back_to_ff() -> None:
    f = flash()
    f.write(0, bytes(3 * SECTOR))
    f.erase(SECTOR, SECTOR)
    assert f.read(0, SECTOR) == bytes(SECTOR)
    assert f.is_erased(SECTOR, SECTOR)
    assert f.read(2 * SECTOR, SECTOR) == bytes(SECTOR)
    f.erase(0, 3 * SECTOR)
    assert f.is_erased(0, SIZE)
    f.write(8, pattern(8))  # an erased area can be programmed again
    assert f.read(8, 8) == pattern(8)


# --- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length"), [(4, 8), (0, 12), (3, 5), (SECTOR + 1, 16)])
def test_misaligned_writes_are_refused(offset: int, length: int) -> None:
    f = flash()
    with pytest.raises(FlashError, match="is not aligned to 8 bytes") as info:
        f.write(offset, pattern(length))
    assert info.value.value == offset
    assert f.is_erased(0, 2 * SECTOR)
    assert f.operations == 0  # a refused write is not an operation


def test_write_align_is_configurable() -> None:
    f = flash(write_align=1)
    f.write(3, b"\x01")
    assert f.read(0, 5) == b"\xff\xff\xff\x01\xff"
    with pytest.raises(FlashError, match="not aligned to 16 bytes"):
        flash(write_align=16).write(8, pattern(16))


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda f: f.read(SIZE - 4, 8), "read of 8 bytes at 0xfffc"),
        (lambda f: f.read(-1, 1), "read of 1 bytes at 0x-1"),
        (lambda f: f.read(0, -1), "read of -1 bytes"),
        (lambda f: f.read(SIZE + 1, 0), "read of 0 bytes"),
        (lambda f: f.write(SIZE - 8, pattern(16)), "write of 16 bytes at 0xfff8"),
        (lambda f: f.write(-8, pattern(8)), "write of 8 bytes"),
        (lambda f: f.erase(SIZE - SECTOR, 2 * SECTOR), "erase of 8192 bytes at 0xf000"),
        (lambda f: f.erase(-SECTOR, SECTOR), "erase of 4096 bytes"),
    ],
)
def test_out_of_range_access_is_refused(call: object, what: str) -> None:
    f = flash()
    with pytest.raises(FlashError, match=f"{what}.* is outside the {SIZE}-byte flash"):
        call(f)  # type: ignore[operator]
    assert f.operations == 0


@pytest.mark.parametrize(("offset", "length"), [(1, SECTOR), (0, SECTOR - 1), (8, 8), (0, 1)])
def test_erase_only_on_sector_boundaries(offset: int, length: int) -> None:
    f = flash()
    f.write(0, bytes(2 * SECTOR))
    with pytest.raises(FlashError, match="is not on 4096-byte sector boundaries"):
        f.erase(offset, length)
    assert f.read(0, 2 * SECTOR) == bytes(2 * SECTOR)


@pytest.mark.parametrize(
    ("size", "sector", "align", "match"),
    [
        (SIZE + 1, SECTOR, 8, "not a positive multiple of the sector size"),
        (0, SECTOR, 8, "not a positive multiple"),
        (SIZE, 0, 8, "not a positive multiple"),
        (SIZE, SECTOR, 3, "write alignment 3 must divide the sector size 4096"),
        (SIZE, SECTOR, 0, "write alignment 0 must divide"),
    ],
)
def test_bad_geometry_is_refused(size: int, sector: int, align: int, match: str) -> None:
    with pytest.raises(FlashError, match=match):
        Flash(size, sector, write_align=align)


# --- counters ----------------------------------------------------------------------------------


def test_counters_per_sector_and_in_total() -> None:
    f = flash()
    f.write(SECTOR - 8, pattern(16))  # one write touching sectors 0 and 1
    f.write(0, pattern(8))
    f.read(0, 3 * SECTOR)  # one read touching sectors 0, 1, 2
    f.erase(SECTOR, 2 * SECTOR)  # two erases: sectors 1 and 2
    f.erase(SECTOR, SECTOR)
    stats = f.stats
    assert (stats.sector(0).reads, stats.sector(0).writes, stats.sector(0).erases) == (1, 2, 0)
    assert (stats.sector(1).reads, stats.sector(1).writes, stats.sector(1).erases) == (1, 1, 2)
    assert (stats.sector(2).reads, stats.sector(2).writes, stats.sector(2).erases) == (1, 0, 1)
    assert stats.sector(9).erases == 0
    assert stats.writes == 3  # per-sector write counts summed
    assert stats.erases == 3
    assert stats.max_erases == 2
    assert stats.bytes_written == 24
    assert stats.bytes_read == 3 * SECTOR
    assert f.operations == 2 + 3  # two writes, three sector erases; reads are not operations


def test_counters_start_at_zero() -> None:
    stats = flash().stats
    assert (stats.writes, stats.erases, stats.max_erases) == (0, 0, 0)
    assert (stats.bytes_read, stats.bytes_written) == (0, 0)


def test_is_erased_counts_as_a_read() -> None:
    f = flash()
    f.is_erased(0, SECTOR)
    assert f.stats.sector(0).reads == 1
    assert f.stats.bytes_read == SECTOR


# --- backings ----------------------------------------------------------------------------------


def test_memory_backing_allocates_nothing_for_an_untouched_flash() -> None:
    backing = MemoryBacking(1024 * SECTOR, SECTOR)
    f = Flash(1024 * SECTOR, SECTOR, backing=backing)
    assert f.read(0, f.size) == FF * f.size
    f.erase(0, f.size)
    f.write(0, FF * (3 * SECTOR))  # programming all-0xFF changes nothing
    f.write(SECTOR + 8, FF * 8)
    assert f.is_erased(0, f.size)
    assert backing.allocated_bytes == 0


def test_memory_backing_allocates_the_sectors_written() -> None:
    backing = MemoryBacking(SIZE, SECTOR)
    f = Flash(SIZE, SECTOR, backing=backing)
    f.write(SECTOR - 8, pattern(16))
    assert backing.allocated_bytes == 2 * SECTOR
    f.write(5 * SECTOR, FF * 8 + pattern(8))  # only the non-erased part allocates
    assert backing.allocated_bytes == 3 * SECTOR
    assert f.read(5 * SECTOR, 16) == FF * 8 + pattern(8)


def test_file_backing_is_created_erased(tmp_path: Path) -> None:
    path = tmp_path / "flash.bin"
    f = Flash.open_file(path, SIZE, SECTOR)
    try:
        assert f.is_erased(0, SIZE)
    finally:
        f.close()
    assert path.read_bytes() == FF * SIZE


def test_file_backing_creates_large_files_erased(tmp_path: Path) -> None:
    size = 2 * 1024 * KIB + SECTOR  # more than one 1 MiB chunk, and not a multiple of it
    path = tmp_path / "big.bin"
    Flash.open_file(path, size, SECTOR).close()
    data = path.read_bytes()
    assert len(data) == size
    assert data == FF * size


def test_file_backing_persists_between_flash_objects(tmp_path: Path) -> None:
    path = tmp_path / "flash.bin"
    first = Flash.open_file(path, SIZE, SECTOR)
    first.write(SECTOR, pattern(64))
    first.erase(0, SECTOR)
    first.flush()
    first.close()
    second = Flash.open_file(path, SIZE, SECTOR)
    try:
        assert second.read(SECTOR, 64) == pattern(64)
        second.write(SECTOR, bytes(8))  # still NOR semantics on the file
        assert second.read(SECTOR, 16) == bytes(8) + pattern(64)[8:16]
    finally:
        second.close()
    data = path.read_bytes()
    assert data[SECTOR : SECTOR + 8] == bytes(8)
    assert data[SECTOR + 8 : SECTOR + 64] == pattern(64)[8:]


def test_file_backing_refuses_a_file_of_the_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "flash.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(FlashError, match=r"flash\.bin is 100 bytes but the flash is 65536") as info:
        Flash.open_file(path, SIZE, SECTOR)
    assert info.value.value == 100
    assert path.read_bytes() == b"\x00" * 100  # left alone


def test_file_backing_in_a_missing_folder_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="cannot open flash file"):
        FileBacking(tmp_path / "missing" / "flash.bin", SIZE)


def test_file_backing_close_twice_is_harmless(tmp_path: Path) -> None:
    backing = FileBacking(tmp_path / "flash.bin", SIZE)
    backing.close()
    backing.close()


# --- power cuts --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3])
def test_cut_after_lets_exactly_n_writes_complete(n: int) -> None:
    f = flash()
    f.cut_after(n)
    for i in range(n):
        f.write(8 * i, pattern(8, i))
    with pytest.raises(PowerCut, match="power cut before the write at 0x"):
        f.write(8 * n, pattern(8, n))
    assert not f.powered
    assert f.operations == n
    f.power_on()
    for i in range(n):
        assert f.read(8 * i, 8) == pattern(8, i)
    assert f.is_erased(8 * n, 8)  # the interrupted write was not applied


def test_cut_counts_from_the_operations_already_done() -> None:
    f = flash()
    f.write(0, pattern(8))
    f.erase(SECTOR, SECTOR)
    f.cut_after(1)
    f.write(8, pattern(8))
    with pytest.raises(PowerCut):
        f.erase(0, SECTOR)
    f.power_on()
    assert f.read(0, 16) == pattern(8) + pattern(8)  # the erase did not happen


def test_cut_in_a_multi_sector_erase_stops_at_that_sector() -> None:
    f = flash()
    f.write(0, bytes(4 * SECTOR))
    f.cut_after(2)
    with pytest.raises(PowerCut, match="power cut before the erase of sector 2"):
        f.erase(0, 4 * SECTOR)
    f.power_on()
    assert f.is_erased(0, 2 * SECTOR)
    assert f.read(2 * SECTOR, 2 * SECTOR) == bytes(2 * SECTOR)
    assert f.stats.sector(2).erases == 0


def test_reads_do_not_count_towards_a_cut() -> None:
    f = flash()
    f.cut_after(1)
    f.read(0, SIZE)
    f.is_erased(0, SECTOR)
    f.write(0, pattern(8))
    with pytest.raises(PowerCut):
        f.write(8, pattern(8))


def test_after_a_cut_every_access_raises_until_power_on() -> None:
    f = flash()
    f.write(0, pattern(8))
    f.cut_after(0)
    with pytest.raises(PowerCut):
        f.erase(0, SECTOR)
    for access in (
        lambda: f.read(0, 8),
        lambda: f.is_erased(0, 8),
        lambda: f.write(8, pattern(8)),
        lambda: f.erase(SECTOR, SECTOR),
        lambda: f.write(0, b""),
    ):
        with pytest.raises(PowerCut, match="while the power is off"):
            access()
    assert f.operations == 1
    f.power_on()
    assert f.powered
    assert f.read(0, 8) == pattern(8)
    # power_on also disarms the cut: any number of operations now succeed
    for i in range(5):
        f.erase(i * SECTOR, SECTOR)
    f.write(0, pattern(8))
    assert f.operations == 1 + 5 + 1


def test_an_empty_erase_also_raises_while_the_power_is_off() -> None:
    f = flash()
    f.cut_after(0)
    with pytest.raises(PowerCut):
        f.write(0, pattern(8))
    with pytest.raises(PowerCut):
        f.erase(0, 0)


def test_a_torn_write_stores_a_strict_prefix() -> None:
    lengths = set()
    for seed in range(40):
        f = flash()
        f.write(SECTOR, pattern(8))  # data after the torn write must survive untouched
        data = pattern(64, 7)
        f.cut_after(0, tear=True, seed=seed)
        with pytest.raises(PowerCut, match=r"power cut during the write at 0xfc0") as info:
            f.write(SECTOR - 64, data)
        f.power_on()
        stored = f.read(SECTOR - 64, 64)
        done = len(stored.rstrip(FF))
        assert 0 < done < len(data), seed
        assert f"({done} bytes done)" in str(info.value)
        assert stored == data[:done] + FF * (len(data) - done), seed
        assert f.read(SECTOR, 8) == pattern(8)
        assert f.is_erased(0, SECTOR - 64)
        lengths.add(done)
    assert len(lengths) > 10  # the tear point varies with the seed


def test_a_torn_write_over_data_ands_its_prefix() -> None:
    f = flash()
    f.write(0, b"\x0f" * 16)
    f.cut_after(0, tear=True, seed=3)
    with pytest.raises(PowerCut):
        f.write(0, b"\xf3" * 16)
    f.power_on()
    stored = f.read(0, 16)
    done = stored.count(b"\x03")
    assert 0 < done < 16
    assert stored == b"\x03" * done + b"\x0f" * (16 - done)


def test_a_one_byte_write_cannot_tear() -> None:
    f = flash(write_align=1)
    f.cut_after(0, tear=True)
    with pytest.raises(PowerCut, match="before the write"):
        f.write(0, b"\x00")
    f.power_on()
    assert f.is_erased(0, 8)


def test_a_torn_erase_erases_a_prefix_of_the_sector() -> None:
    points = set()
    for seed in range(40):
        f = flash()
        f.write(0, bytes(3 * SECTOR))
        f.cut_after(1, tear=True, seed=seed)
        with pytest.raises(PowerCut, match="power cut during the erase of sector 1"):
            f.erase(0, 3 * SECTOR)
        f.power_on()
        assert f.is_erased(0, SECTOR)  # the sector before completed
        torn = f.read(SECTOR, SECTOR)
        done = len(torn) - len(torn.lstrip(FF))
        assert 0 < done < SECTOR, seed
        assert torn == FF * done + bytes(SECTOR - done), seed
        assert f.read(2 * SECTOR, SECTOR) == bytes(SECTOR)  # the sector after was not reached
        points.add(done)
    assert len(points) > 10


def test_the_same_seed_gives_the_same_tear() -> None:
    def torn(seed: int) -> tuple[bytes, bytes]:
        f = flash()
        f.write(SECTOR, bytes(SECTOR))
        f.cut_after(0, tear=True, seed=seed)
        with pytest.raises(PowerCut):
            f.write(0, pattern(256))
        f.power_on()
        f.cut_after(0, tear=True, seed=seed)
        with pytest.raises(PowerCut):
            f.erase(SECTOR, SECTOR)
        f.power_on()
        return f.read(0, 256), f.read(SECTOR, SECTOR)

    assert torn(5) == torn(5)
    assert torn(123) == torn(123)
    assert len({torn(seed) for seed in range(6)}) > 1


def test_without_tear_a_cut_leaves_nothing_half_done() -> None:
    f = flash()
    f.write(0, bytes(SECTOR))
    f.cut_after(0, seed=9)
    with pytest.raises(PowerCut, match="before the erase of sector 0"):
        f.erase(0, SECTOR)
    f.power_on()
    assert f.read(0, SECTOR) == bytes(SECTOR)


def test_a_torn_erase_of_a_one_unit_sector_raises_power_cut() -> None:
    f = Flash(64, 8, write_align=8)
    f.write(0, bytes(8))
    f.cut_after(0, tear=True)
    with pytest.raises(PowerCut):
        f.erase(0, 8)
    f.power_on()
    assert f.read(0, 8) == bytes(8)  # too small to tear: the erase did not happen


# --- erased value, write modes and the harness's torn operations --------------------------------
# The MCUboot host harness (host/src/host_flash.c) is the reference: erased 0xff ANDs, erased 0x00
# ORs, "replace" stores the data; --torn does the first half (rounded down) of a write's bytes
# and the first half of the sector of an erase; the interrupted operation is not counted.


def test_erased_zero_flash_reads_zero_everywhere(tmp_path: Path) -> None:
    f = flash(erased_value=0x00)
    assert f.read(0, SIZE) == bytes(SIZE)
    assert f.is_erased(0, SIZE)
    g = Flash.open_file(tmp_path / "f.bin", SIZE, SECTOR, erased_value=0x00, write_mode="replace")
    assert (g.erased_value, g.write_mode) == (0x00, "replace")
    g.close()
    assert (tmp_path / "f.bin").read_bytes() == bytes(SIZE)
    assert MemoryBacking(SIZE, SECTOR, 0x00).read(SECTOR - 2, 4) == bytes(4)


@pytest.mark.parametrize(
    ("erased", "mode", "first", "second", "stored"),
    [
        (0xFF, "and", 0x0F, 0xF3, 0x03),  # NOR: bits only go 1 -> 0
        (0x00, "and", 0x0F, 0xF3, 0xFF),  # erased 0x00: bits only go 0 -> 1
        (0xFF, "replace", 0x0F, 0xF3, 0xF3),  # row writes: the new data
        (0x00, "replace", 0x0F, 0xF3, 0xF3),
    ],
)
def test_writing_over_data_follows_the_write_mode(
    erased: int, mode: str, first: int, second: int, stored: int
) -> None:
    f = flash(erased_value=erased, write_mode=mode)
    f.write(0, bytes([first]) * 8)
    f.write(0, bytes([second]) * 8)
    assert f.read(0, 8) == bytes([stored]) * 8
    assert f.operations == 2


def test_erase_restores_the_erased_value() -> None:
    f = flash(erased_value=0x00, write_mode="replace")
    f.write(SECTOR, pattern(SECTOR))
    f.erase(SECTOR, SECTOR)
    assert f.read(SECTOR, SECTOR) == bytes(SECTOR)


@pytest.mark.parametrize(("erased", "mode"), [(0xFF, "and"), (0x00, "replace"), (0x00, "and")])
@pytest.mark.parametrize("length", [8, 24, 64])
def test_tear_half_writes_the_first_half_of_a_write(erased: int, mode: str, length: int) -> None:
    f = flash(erased_value=erased, write_mode=mode)
    old = bytes([0x5A]) * length
    f.write(0, old)
    data = pattern(length, 3)
    f.cut_after(0, tear_half=True)
    with pytest.raises(PowerCut, match=f"during the write at 0x0 \\({length // 2} bytes done\\)"):
        f.write(0, data)
    assert f.operations == 1  # the torn write is not counted
    f.power_on()
    half = length // 2
    if mode == "replace":
        expected = data[:half]
    elif erased == 0xFF:
        expected = bytes(a & b for a, b in zip(old, data[:half], strict=False))
    else:
        expected = bytes(a | b for a, b in zip(old, data[:half], strict=False))
    assert f.read(0, length) == expected + old[half:]


def test_tear_half_of_a_one_byte_write_writes_nothing() -> None:
    f = flash(write_align=1)
    f.cut_after(0, tear_half=True)
    with pytest.raises(PowerCut, match="before the write"):
        f.write(0, b"\x00")
    f.power_on()
    assert f.is_erased(0, 8)


@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_tear_half_erases_the_first_half_of_the_sector(erased: int) -> None:
    f = flash(erased_value=erased, write_mode="replace")
    data = pattern(3 * SECTOR, 1) if erased == 0xFF else bytes([0xA5]) * (3 * SECTOR)
    f.write(0, data)
    f.cut_after(1, tear_half=True)  # the first sector completes, the second is torn
    with pytest.raises(PowerCut, match="during the erase of sector 1"):
        f.erase(0, 3 * SECTOR)
    assert f.operations == 2
    f.power_on()
    e = bytes([erased])
    assert f.read(0, SECTOR) == e * SECTOR
    assert f.read(SECTOR, SECTOR) == e * (SECTOR // 2) + data[SECTOR + SECTOR // 2 : 2 * SECTOR]
    assert f.read(2 * SECTOR, SECTOR) == data[2 * SECTOR :]


def test_tear_half_wins_over_a_random_tear() -> None:
    f = flash()
    f.cut_after(0, tear=True, tear_half=True, seed=4)
    with pytest.raises(PowerCut, match=r"\(32 bytes done\)"):
        f.write(0, pattern(64))


def test_cut_after_a_negative_count_is_refused() -> None:
    with pytest.raises(FlashError, match="cannot cut after -1 operations"):
        flash().cut_after(-1)


@pytest.mark.parametrize(
    ("offset", "length", "sectors"),
    [(100, 8, [0]), (SECTOR - 8, 16, [0, 1]), (SECTOR, SECTOR + 1, [1, 2]), (0, SECTOR, [0])],
)
def test_widen_erases_erases_every_sector_a_range_touches(
    offset: int, length: int, sectors: list[int]
) -> None:
    f = flash(widen_erases=True)
    f.write(0, bytes(4 * SECTOR))
    f.erase(offset, length)
    assert f.operations == 1 + len(sectors)
    for index in range(4):
        erased = f.is_erased(index * SECTOR, SECTOR)
        assert erased == (index in sectors), index


def test_without_widen_erases_a_partial_erase_is_an_error() -> None:
    with pytest.raises(FlashError, match="not on 4096-byte sector boundaries"):
        flash().erase(100, 8)
    with pytest.raises(FlashError, match="not on 4096-byte sector boundaries"):
        flash(widen_erases=True).erase(100, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"erased_value": 0x7F}, "erased value 0x7f must be 0xff or 0x00"),
        ({"write_mode": "or"}, "write mode 'or' must be one of and, replace"),
    ],
)
def test_bad_erased_value_or_write_mode_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(FlashError, match=match):
        flash(**kwargs)


def test_open_file_refuses_a_bad_erased_value(tmp_path: Path) -> None:
    with pytest.raises(FlashError, match="erased value 0x01"):
        Flash.open_file(tmp_path / "f.bin", SIZE, SECTOR, erased_value=0x01)
    assert not (tmp_path / "f.bin").exists()
