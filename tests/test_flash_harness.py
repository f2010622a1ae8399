"""FlashMap.max_image_size checked against MCUboot itself (the mcuboot-host harness).

For every strategy on the presets and on layouts chosen to hit the corner cases of MCUboot's
size arithmetic, an update image of exactly ``max_image_size`` bytes (header, payload and TLVs,
signed by the real imgtool) is put in the secondary slot as a pending test upgrade: MCUboot must
upgrade to it. An image one byte larger must be refused: MCUboot keeps running the old image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from otakit.device.flashmap import Area, FlashMap, Strategy, preset
from otakit.errors import FlashMapError
from otakit.image.trailer import BOOT_MAGIC

from .conftest import Run
from .mcuboot_host import McubootHost

HEADER = 0x200


class Signer:
    """Signs images of an exact total size with the real imgtool."""

    def __init__(self, imgtool: Callable[..., Run], directory: Path) -> None:
        self.imgtool = imgtool
        self.dir = directory
        self.key = directory / "key.pem"
        result = imgtool("keygen", "-t", "ecdsa-p256", "-k", self.key)
        assert result.returncode == 0, result.stderr
        self.pub = directory / "pub.pem"
        result = imgtool("getpub", "-k", self.key, "-e", "pem")
        assert result.returncode == 0, result.stderr
        self.pub.write_text(result.stdout)
        self._overhead: int | None = None

    def _sign(self, version: str, payload_size: int, erased: int) -> bytes:
        payload = self.dir / f"payload-{payload_size}.bin"
        payload.write_bytes(bytes((i * 7 + 3) & 0xFF for i in range(payload_size)))
        out = self.dir / f"image-{version}-{payload_size}.bin"
        result = self.imgtool(
            "sign", "-k", self.key, "-H", hex(HEADER), "--pad-header", "--pad-sig",
            "--align", "8", "-v", version, "-S", hex(16 * 1024 * 1024), "-M", "1",
            "-R", "0xff" if erased == 0xFF else "0", payload, out,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return out.read_bytes()

    def image(self, version: str, size: int, erased: int) -> bytes:
        """A signed image of exactly ``size`` bytes."""
        if self._overhead is None:
            self._overhead = len(self._sign("0.0.1", 1000, erased)) - 1000
        image = self._sign(version, size - self._overhead, erased)
        assert len(image) == size
        return image


@pytest.fixture(scope="module")
def signer(imgtool: Callable[..., Run], tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return Signer(imgtool, tmp_path_factory.mktemp("harness-sign"))


def _padded_scratch_map() -> FlashMap:
    """swap-scratch where the trailer only just spills into a second sector (1 KiB sectors,
    max_sectors 41: 1032-byte trailer, 8 bytes of it in the first trailer sector), so MCUboot
    keeps room for the 72-byte scratch trailer in front of it."""
    kib = 1024
    return FlashMap(
        name="padded-scratch",
        flash_size=64 * kib,
        sector_size=kib,
        write_align=8,
        max_sectors=41,
        strategy=Strategy.SWAP_SCRATCH,
        areas=(
            Area("primary", 0, 20 * kib, image=0),
            Area("secondary", 20 * kib, 20 * kib, image=0),
            Area("scratch", 40 * kib, kib),
        ),
    )


def _offset_map() -> FlashMap:
    """swap-offset with the optimal geometry: the secondary one sector larger."""
    sector = 4096
    return FlashMap(
        name="offset",
        flash_size=64 * 1024,
        sector_size=sector,
        write_align=8,
        max_sectors=32,
        strategy=Strategy.SWAP_OFFSET,
        areas=(
            Area("primary", 0, 5 * sector, image=0),
            Area("secondary", 5 * sector, 6 * sector, image=0),
        ),
    )


CASES: dict[str, FlashMap] = {
    "sim-small/swap-scratch": preset("sim-small"),
    "sim-small/overwrite": preset("sim-small").with_strategy(Strategy.OVERWRITE),
    "sim-small/swap-move": preset("sim-small").with_strategy(Strategy.SWAP_MOVE),
    "sim-small/swap-offset": preset("sim-small").with_strategy(Strategy.SWAP_OFFSET),
    "padded-scratch/swap-scratch": _padded_scratch_map(),
    "offset/swap-offset": _offset_map(),
    "nrf52840-swap-move/swap-move": preset("nrf52840-swap-move"),
    "sim-small-status/swap-status": preset("sim-small-status"),
    "psoc6-swap-single/swap-status": preset("psoc6-swap-single"),
    "psoc6-2m-swap/swap-status": preset("psoc6-2m-swap"),
    "external-flash/swap-status": preset("external-flash"),
}


def _boot_with_update(
    host: McubootHost, signer: Signer, m: FlashMap, size: int, path: Path
) -> str | None:
    """Version MCUboot runs after one boot with a size-byte test upgrade pending."""
    erased = m.erased_value
    flash = bytearray([erased]) * m.flash_size
    v1 = signer.image("1.0.0", 2048, erased)
    flash[m.primary().offset : m.primary().offset + len(v1)] = v1
    start = m.secondary().offset + m.image_offset()
    flash[start : start + size] = signer.image("2.0.0", size, erased)
    end = m.secondary().end
    assert start + size <= end - len(BOOT_MAGIC)
    flash[end - len(BOOT_MAGIC) : end] = BOOT_MAGIC  # pending test upgrade
    path.write_bytes(flash)
    result = host.run_map(m, path, key_pems=[signer.pub])
    assert result.booted, result.raw
    return result.version


@pytest.mark.parametrize("case", sorted(CASES))
def test_max_image_size_is_exactly_what_mcuboot_accepts(
    case: str, mcuboot_host: McubootHost, signer: Signer, tmp_path: Path
) -> None:
    m = CASES[case]
    limit = m.max_image_size()
    assert _boot_with_update(mcuboot_host, signer, m, limit, tmp_path / "max.bin") == "2.0.0+0"
    assert _boot_with_update(mcuboot_host, signer, m, limit + 1, tmp_path / "over.bin") == (
        "1.0.0+0"
    )


# --- geometries FlashMap refuses: MCUboot never upgrades on them --------------------------------


def _raw(m: FlashMap, **changes: object) -> dict[str, object]:
    """The fields of ``m`` with ``changes``, for a geometry FlashMap itself would refuse."""
    fields: dict[str, object] = {
        "name": m.name,
        "flash_size": m.flash_size,
        "sector_size": m.sector_size,
        "write_align": m.write_align,
        "areas": m.areas,
        "base_address": m.base_address,
        "max_sectors": m.max_sectors,
        "strategy": m.strategy,
        "erased_value": m.erased_value,
        "write_mode": m.write_mode,
    }
    fields.update(changes)
    return fields


class _Unchecked:
    """Just enough of a FlashMap for mcuboot_host.map_args, without validation."""

    def __init__(self, valid: FlashMap, **changes: object) -> None:
        self.__dict__.update(_raw(valid, **changes))
        self._valid = valid

    def _area(self, kind: str) -> Area:
        areas: tuple[Area, ...] = self.__dict__["areas"]
        return next(a for a in areas if a.name == kind)

    def primary(self, image: int = 0) -> Area:
        return self._area("primary")

    def secondary(self, image: int = 0) -> Area:
        return self._area("secondary")

    def status(self, image: int = 0) -> Area | None:
        areas: tuple[Area, ...] = self.__dict__["areas"]
        return next((a for a in areas if a.name == "status"), None)

    @property
    def scratch(self) -> Area | None:
        areas: tuple[Area, ...] = self.__dict__["areas"]
        return next((a for a in areas if a.name == "scratch"), None)


def _resized(m: FlashMap, primary: int, secondary: int) -> tuple[Area, ...]:
    """``m``'s areas with slots of ``primary`` and ``secondary`` sectors, back to back."""
    s = m.sector_size
    first = m.primary().offset
    return (
        Area("primary", first, primary * s, image=0),
        Area("secondary", first + primary * s, secondary * s, image=0),
        *(a for a in m.areas if a.name not in ("primary", "secondary", "bootloader")),
    )


REFUSED: dict[str, tuple[FlashMap, dict[str, object], str]] = {
    "more sectors than max_sectors": (
        preset("sim-small"),
        {"max_sectors": 4},
        "more than max_sectors 4",
    ),
    "swap-status slot with more sectors than max_sectors": (
        preset("psoc6-swap-single"),
        {"max_sectors": 100},
        "more than max_sectors 100",
    ),
    "swap-scratch unequal slots": (
        preset("sim-small"),
        {"areas": _resized(preset("sim-small"), 4, 5)},
        "must have the same size",
    ),
    "swap-move primary two sectors larger": (
        preset("nrf52840-swap-move"),
        {"areas": _resized(preset("nrf52840-swap-move"), 119, 117)},
        "swap-move needs the primary slot",
    ),
    "swap-move secondary larger": (
        preset("nrf52840-swap-move"),
        {"areas": _resized(preset("nrf52840-swap-move"), 117, 118)},
        "swap-move needs the primary slot",
    ),
    "swap-offset primary larger": (
        _offset_map(),
        {"areas": _resized(_offset_map(), 6, 5)},
        "swap-offset needs the secondary slot",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_geometries_flashmap_refuses_do_not_upgrade_in_mcuboot(
    case: str, mcuboot_host: McubootHost, signer: Signer, tmp_path: Path
) -> None:
    valid, changes, message = REFUSED[case]
    with pytest.raises(FlashMapError, match=message):
        FlashMap(**_raw(valid, **changes))  # type: ignore[arg-type]
    m = _Unchecked(valid, **changes)
    size = 4096
    erased = valid.erased_value
    flash = bytearray([erased]) * valid.flash_size
    v1 = signer.image("1.0.0", 2048, erased)
    flash[m.primary().offset : m.primary().offset + len(v1)] = v1
    start = m.secondary().offset + valid.image_offset()
    flash[start : start + size] = signer.image("2.0.0", size, erased)
    end = m.secondary().end
    flash[end - len(BOOT_MAGIC) : end] = BOOT_MAGIC
    path = tmp_path / "flash.bin"
    path.write_bytes(flash)
    result = mcuboot_host.run_map(m, path, key_pems=[signer.pub])  # type: ignore[arg-type]
    assert result.version != "2.0.0+0", result.raw
