"""swap-move and swap-offset against MCUboot's own ``swap_move.c`` and ``swap_offset.c`` (the
mcuboot-host-swap-move and -swap-offset harnesses).

For the same starting flash, otakit's bootloader and MCUboot must write the same bytes with the
same number of flash operations, and after a power cut after any operation N (clean, or torn
half as the harness tears) they must leave the same flash and each must finish the other's
interrupted update exactly as it finishes its own. The small layouts (4 KiB sectors, 5-6
sectors per slot, MCUBOOT_MAX_IMG_SECTORS 8) try every cut point of an upgrade and of a revert.
swap-move's layouts have a primary slot one sector larger than the secondary; swap-offset's the
reverse, with the update image starting one sector into the secondary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from otakit.device.bootloader import Bootloader, BootloaderConfig, BootResult
from otakit.device.flash import Flash, PowerCut
from otakit.device.flashmap import Area, FlashMap, Strategy, preset
from otakit.device.swap_mode import mode_class
from otakit.image.keys import PublicKey

from .conftest import Run
from .mcuboot_host import HostResult, McubootHost, flash_bytes, flash_from_bytes

SECTOR = 0x1000
HDR = "0x200"
V1, V2 = "1.0.0+1", "2.0.0+2"


def small_map(
    strategy: Strategy,
    *,
    primary_sectors: int,
    secondary_sectors: int,
    max_sectors: int = 8,
    erased: int = 0xFF,
    write_mode: str = "and",
    write_align: int = 8,
) -> FlashMap:
    """Primary at 0, secondary right after it, 4 KiB sectors."""
    p, s = primary_sectors * SECTOR, secondary_sectors * SECTOR
    return FlashMap(
        name=f"{strategy.value}-{primary_sectors}-{secondary_sectors}-{erased:02x}-a{write_align}",
        flash_size=p + s,
        sector_size=SECTOR,
        write_align=write_align,
        max_sectors=max_sectors,
        strategy=strategy,
        erased_value=erased,
        write_mode=write_mode,
        areas=(Area("primary", 0, p, image=0), Area("secondary", p, s, image=0)),
    )


@dataclass
class Outcome:
    """One boot's result, comparable between otakit and MCUboot."""

    data: bytes
    ops: int
    cut: bool
    version: str | None  # the image that runs; None if nothing boots (or cut)


class Bench:
    """One layout, two signed images and both bootloaders."""

    def __init__(
        self,
        host: McubootHost,
        imgtool: Callable[..., Run],
        key_dir: Path,
        tmp: Path,
        fmap: FlashMap,
    ) -> None:
        self.host, self.imgtool, self.tmp, self.map = host, imgtool, tmp, fmap
        self.key = key_dir / "ecdsa-p256.pem"
        pub = imgtool("getpub", "-k", self.key, "-e", "pem")
        assert pub.returncode == 0, pub.stderr
        self.pub_pem = pub.stdout.encode()
        self.public_key = PublicKey.from_pem(self.pub_pem)
        self.flash_file = tmp / "flash.bin"

    # --- images --------------------------------------------------------------------------------

    def sign(
        self, version: str, slot_size: int, *, pad: bool, size: int, key: Path | None = None
    ) -> bytes:
        seed = sum(map(ord, version))
        payload = self.tmp / f"payload-{version}-{size}.bin"
        payload.write_bytes(bytes((i * 7 + seed) & 0xFF for i in range(size)))
        out = self.tmp / f"{version}-{size}-{pad}.img"
        args = ["sign", "-k", key or self.key, "--header-size", HDR, "--pad-header"]
        args += ["--align", str(min(self.map.write_align, 8)), "-v", version]
        args += ["-S", hex(slot_size), "-M", str(self.map.max_sectors)]
        args += ["-R", "0xff" if self.map.erased_value == 0xFF else "0"]
        if pad:
            args.append("--pad")
        result = self.imgtool(*args, payload, out)
        assert result.returncode == 0, result.stderr
        return out.read_bytes()

    def start(
        self,
        *,
        v1_size: int = 9000,
        v2_size: int = 10000,
        v2_key: Path | None = None,
        primary: bool = True,
    ) -> bytes:
        """v1 in the primary slot, v2 signed with ``--pad`` (a pending test upgrade) where the
        mode expects an update in the secondary slot."""
        fmap = self.map
        pri, sec = fmap.primary(0), fmap.secondary(0)
        off = fmap.image_offset(0)
        flash = bytearray([fmap.erased_value]) * fmap.flash_size
        if primary:
            v1 = self.sign(V1, pri.size, pad=False, size=v1_size)
            flash[pri.offset : pri.offset + len(v1)] = v1
        v2 = self.sign(V2, sec.size - off, pad=True, size=v2_size, key=v2_key)
        flash[sec.offset + off : sec.offset + off + len(v2)] = v2
        return bytes(flash)

    # --- the two bootloaders -------------------------------------------------------------------

    def mcuboot(self, data: bytes, cut: int | None = None, torn: bool = False) -> Outcome:
        self.flash_file.write_bytes(data)
        res: HostResult = self.host.run_map(
            self.map, self.flash_file, key_pems=[self.pub_pem], cut_after=cut, torn=torn
        )
        version = res.version if res.booted and not res.cut else None
        return Outcome(self.flash_file.read_bytes(), res.ops, res.cut, version)

    def flash(self, data: bytes) -> Flash:
        return flash_from_bytes(data, self.map)

    def bootloader(self, flash: Flash, *, allow_downgrade: bool = True) -> Bootloader:
        """otakit's bootloader configured as the harness's MCUboot is built: no downgrade
        prevention (otakit's default refuses older candidates, see
        :func:`check_default_config_finishes_reverts`)."""
        config = BootloaderConfig(keys=(self.public_key,), allow_downgrade=allow_downgrade)
        return Bootloader(flash, self.map, config)

    def otakit(
        self,
        data: bytes,
        cut: int | None = None,
        torn: bool = False,
        *,
        allow_downgrade: bool = True,
    ) -> Outcome:
        flash = self.flash(data)
        if cut is not None:
            flash.cut_after(cut, tear_half=torn)
        result: BootResult | None = None
        try:
            result = self.bootloader(flash, allow_downgrade=allow_downgrade).boot()
        except PowerCut:
            flash.power_on()
        version = None
        if result is not None and result.images[0].version is not None:
            version = str(result.images[0].version)
        return Outcome(flash_bytes(flash), flash.operations, result is None, version)


def first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return f"first differing byte at 0x{i:x}: mcuboot {x:#04x}, otakit {y:#04x}"
    return "same bytes"


def assert_same(mcuboot: Outcome, otakit: Outcome, what: str) -> None:
    assert (otakit.ops, otakit.cut, otakit.version) == (
        mcuboot.ops,
        mcuboot.cut,
        mcuboot.version,
    ), (
        f"{what}: mcuboot {mcuboot.ops} ops, cut {mcuboot.cut}, runs {mcuboot.version}; "
        f"otakit {otakit.ops} ops, cut {otakit.cut}, runs {otakit.version}"
    )
    assert otakit.data == mcuboot.data, f"{what}: {first_difference(mcuboot.data, otakit.data)}"


def both(bench: Bench, data: bytes, what: str) -> Outcome:
    """Boot ``data`` with both bootloaders, check they agree, return MCUboot's outcome."""
    theirs, ours = bench.mcuboot(data), bench.otakit(data)
    assert_same(theirs, ours, what)
    return theirs


def check_upgrade_revert(bench: Bench) -> tuple[bytes, bytes]:
    """Upgrade, revert (not confirmed), then an idle boot: both agree at each step.
    Returns the starting flash and the flash after the upgrade."""
    start = bench.start()
    upgraded = both(bench, start, "upgrade")
    assert upgraded.version == V2
    assert upgraded.ops > 0
    reverted = both(bench, upgraded.data, "revert of the unconfirmed image")
    assert reverted.version == V1
    assert reverted.ops > 0
    idle = both(bench, reverted.data, "boot after the revert")
    assert idle.version == V1
    assert idle.ops == 0
    return start, upgraded.data


def sweep_cuts(
    bench: Bench, base: bytes, torn: bool, what: str, stride: int = 1
) -> tuple[int, set[str]]:
    """Cut both bootloaders after every operation N of the boot of ``base``; the cut flash
    must be the same, and otakit must finish it exactly as MCUboot does. Returns the number of
    cut points tried (every ``stride``-th operation) and the versions the resumed boots ran."""
    full = bench.mcuboot(base)
    assert not full.cut
    assert full.ops > 0
    seen: set[str] = set()
    points = range(0, full.ops, stride)
    for n in points:
        label = f"{what}, {'torn' if torn else 'clean'} cut after {n} of {full.ops} ops"
        theirs, ours = bench.mcuboot(base, n, torn), bench.otakit(base, n, torn)
        assert (theirs.cut, theirs.ops) == (True, n), label
        assert_same(theirs, ours, label)
        resumed = both(bench, theirs.data, f"{label}, then a full boot")
        assert resumed.version in (V1, V2), f"{label}: nothing valid boots after the cut"
        seen.add(resumed.version)
    return len(points), seen


def check_cut_sweep(
    bench: Bench, kind: str, torn: bool, report: Callable[[str], None], stride: int = 1
) -> None:
    start = bench.start()
    base = start if kind == "upgrade" else bench.mcuboot(start).data
    count, seen = sweep_cuts(bench, base, torn, f"{bench.map.strategy.value} {kind}", stride)
    want = V2 if kind == "upgrade" else V1
    assert want in seen
    report(
        f"{bench.map.strategy.value} {bench.map.name} {kind}: {count} "
        f"{'torn' if torn else 'clean'} cut points"
        f"{f' (every {stride}th operation)' if stride > 1 else ''} agree with MCUboot "
        f"(resumed boots ran {sorted(seen)})"
    )


def check_cuts_during_resume(bench: Bench, stride: int, report: Callable[[str], None]) -> None:
    """Cut an upgrade, then cut the boot that resumes it (sampled), then finish: both agree."""
    start = bench.start()
    full = bench.mcuboot(start)
    pairs = 0
    for n1 in range(0, full.ops, stride):
        first = bench.mcuboot(start, n1, torn=n1 % 2 == 1)
        resume = bench.mcuboot(first.data)
        for n2 in range(0, resume.ops, stride):
            label = f"cut after {n1}, resume cut after {n2}"
            theirs, ours = bench.mcuboot(first.data, n2), bench.otakit(first.data, n2)
            assert_same(theirs, ours, label)
            final = both(bench, theirs.data, f"{label}, then a full boot")
            assert final.version in (V1, V2), label
            pairs += 1
    assert pairs > 0
    report(f"{bench.map.strategy.value} {bench.map.name}: {pairs} cut-during-resume pairs agree")


def check_default_config_finishes_reverts(bench: Bench, report: Callable[[str], None]) -> None:
    """With otakit's default configuration (older candidates refused), a revert cut at any
    point still finishes: the old image runs again and the unconfirmed one is not kept."""
    upgraded = bench.mcuboot(bench.start())
    full = bench.mcuboot(upgraded.data)
    wrong = []
    for torn in (False, True):
        for n in range(full.ops):
            cut = bench.mcuboot(upgraded.data, n, torn)
            resumed = bench.otakit(cut.data, allow_downgrade=False)
            if resumed.version != V1:
                wrong.append((n, torn, resumed.version))
    report(
        f"{bench.map.strategy.value} {bench.map.name}: default config after {2 * full.ops} "
        f"revert cuts: {len(wrong)} do not finish the revert"
    )
    assert not wrong, f"(cut, torn, version run) where the revert was not finished: {wrong}"


def check_confirm(bench: Bench) -> None:
    """otakit confirms on the flash MCUboot upgraded; neither then reverts."""
    upgraded = bench.mcuboot(bench.start())
    flash = bench.flash(upgraded.data)
    assert bench.bootloader(flash).confirm(0) is True
    assert bench.bootloader(flash).confirm(0) is False  # already confirmed: nothing written
    confirmed = flash_bytes(flash)
    kept = both(bench, confirmed, "boot after confirm")
    assert kept.version == V2
    assert kept.ops == 0


def check_refused(bench: Bench, data: bytes, what: str) -> None:
    """A candidate both refuse identically: v1 keeps running and the request is gone."""
    out = both(bench, data, what)
    assert out.version == V1
    again = both(bench, out.data, f"boot after {what}")
    assert again.version == V1
    assert again.ops == 0


def check_tampered(bench: Bench) -> None:
    data = bytearray(bench.start())
    at = bench.map.secondary(0).offset + bench.map.image_offset(0) + 0x300  # a payload byte
    data[at] ^= 0x01
    check_refused(bench, bytes(data), "tampered payload")


def check_wrong_keys(bench: Bench, key_dir: Path) -> None:
    check_refused(bench, bench.start(v2_key=key_dir / "ed25519.pem"), "an ed25519 signature")
    check_refused(bench, bench.start(v2_key=key_dir / "ecdsa-p384.pem"), "an unknown key")


def check_max_image_size(bench: Bench) -> None:
    """otakit's limit is MCUboot's app_max_size: an image above it is refused by both, one
    just below it is installed by both."""
    fmap = bench.map
    limit = fmap.max_image_size(0)
    flash = bench.flash(bench.start())
    mode = bench.bootloader(flash).mode(0)
    assert mode.app_max_size() == limit
    assert mode_class(fmap.strategy.value) is type(mode)
    overhead = len(bench.sign(V2, fmap.secondary(0).size, pad=False, size=100)) - 100
    too_big = bench.start(v2_size=limit - overhead + 300)
    check_refused(bench, too_big, "an image larger than app_max_size")
    fits = bench.start(v2_size=limit - overhead - 300)
    assert both(bench, fits, "an image just under app_max_size").version == V2


# --- the layouts ---------------------------------------------------------------------------------


def _layouts(strategy: Strategy, primary: int, secondary: int) -> dict[str, Callable[[], FlashMap]]:
    """The small layouts of a mode with ``primary`` and ``secondary`` sectors per slot."""
    return {
        "small": lambda: small_map(strategy, primary_sectors=primary, secondary_sectors=secondary),
        # PSoC 6-like cells: erased 0x00, row writes replace
        "small-00": lambda: small_map(
            strategy,
            primary_sectors=primary,
            secondary_sectors=secondary,
            erased=0x00,
            write_mode="replace",
        ),
        # 4-byte writes (nRF52-style): status entries of 4 bytes, fields still 8 apart
        "small-a4": lambda: small_map(
            strategy, primary_sectors=primary, secondary_sectors=secondary, write_align=4
        ),
    }


MAPS: dict[str, dict[str, Callable[[], FlashMap]]] = {
    # primary one sector larger than the secondary (the optimal swap-move layout), and equal
    # slots (MCUboot allows them) with a 3120-byte trailer (MAX_IMG_SECTORS 128)
    "swap-move": _layouts(Strategy.SWAP_MOVE, 6, 5)
    | {
        "equal-128": lambda: small_map(
            Strategy.SWAP_MOVE, primary_sectors=6, secondary_sectors=6, max_sectors=128
        )
    },
    # secondary one sector larger than the primary (the swap-offset layout), and a 2104-byte
    # trailer (MAX_IMG_SECTORS 128)
    "swap-offset": _layouts(Strategy.SWAP_OFFSET, 5, 6)
    | {
        "small-128": lambda: small_map(
            Strategy.SWAP_OFFSET, primary_sectors=6, secondary_sectors=7, max_sectors=128
        )
    },
}
# how many cuts into the resumed upgrade are tried after each first cut
RESUME_CUTS = {"swap-move": 5, "swap-offset": 4}
# a running image larger than the update that still fits the small layout's primary slot
LARGE_OLD_IMAGE = {"swap-move": 15000, "swap-offset": 14000}
LAYOUT_IDS = [f"{mode}/{layout}" for mode in MAPS for layout in MAPS[mode]]


def _map(layout_id: str) -> FlashMap:
    mode, layout = layout_id.split("/")
    return MAPS[mode][layout]()


@pytest.fixture(params=LAYOUT_IDS)
def any_bench(
    request: pytest.FixtureRequest,
    mcuboot_host: McubootHost,
    imgtool: Callable[..., Run],
    key_dir: Path,
    tmp_path: Path,
) -> Bench:
    return Bench(mcuboot_host, imgtool, key_dir, tmp_path, _map(request.param))


@pytest.fixture(params=list(MAPS))
def small(
    request: pytest.FixtureRequest,
    mcuboot_host: McubootHost,
    imgtool: Callable[..., Run],
    key_dir: Path,
    tmp_path: Path,
) -> Bench:
    return Bench(mcuboot_host, imgtool, key_dir, tmp_path, _map(f"{request.param}/small"))


@pytest.fixture
def small_offset(
    mcuboot_host: McubootHost, imgtool: Callable[..., Run], key_dir: Path, tmp_path: Path
) -> Bench:
    return Bench(mcuboot_host, imgtool, key_dir, tmp_path, _map("swap-offset/small"))


# --- both modes ------------------------------------------------------------------------------------


def test_upgrade_revert_and_idle_boot_match_mcuboot(any_bench: Bench) -> None:
    check_upgrade_revert(any_bench)


def test_confirm_on_mcuboot_flash_keeps_the_upgrade(any_bench: Bench) -> None:
    check_confirm(any_bench)


@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn"])
@pytest.mark.parametrize("kind", ["upgrade", "revert"])
@pytest.mark.parametrize(
    "layout", [f"{mode}/{layout}" for mode in MAPS for layout in ("small", "small-00", "small-a4")]
)
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
    bench = Bench(mcuboot_host, imgtool, key_dir, tmp_path, _map(layout))
    check_cut_sweep(bench, kind, torn, report)


def test_default_config_finishes_interrupted_reverts(
    small: Bench, report: Callable[[str], None]
) -> None:
    check_default_config_finishes_reverts(small, report)


def test_cuts_during_a_resumed_upgrade_match_mcuboot(
    small: Bench, report: Callable[[str], None]
) -> None:
    check_cuts_during_resume(small, RESUME_CUTS[str(small.map.strategy)], report)


def test_wrong_key_is_refused_like_mcuboot(small: Bench, key_dir: Path) -> None:
    check_wrong_keys(small, key_dir)


def test_tampered_image_is_refused_like_mcuboot(small: Bench) -> None:
    check_tampered(small)


def test_image_size_limit_is_mcuboots(small: Bench) -> None:
    check_max_image_size(small)


def test_larger_old_image_sets_the_swap_size(small: Bench) -> None:
    """swap_size is the larger of the two images: here the running one."""
    start = small.start(v1_size=LARGE_OLD_IMAGE[str(small.map.strategy)], v2_size=3000)
    upgraded = both(small, start, "upgrade to a smaller image")
    assert upgraded.version == V2
    assert both(small, upgraded.data, "revert to the larger image").version == V1


def test_no_upgrade_into_an_empty_primary(small: Bench) -> None:
    """swap-move and swap-offset read the primary header with a boot status: no header there is
    an error (boot_read_image_header returns -1) and MCUboot does not touch the flash."""
    out = both(small, small.start(primary=False), "pending image, empty primary")
    assert out.ops == 0
    assert out.version is None


# --- one mode ------------------------------------------------------------------------------------


def test_update_at_the_start_of_the_secondary_is_refused(small_offset: Bench) -> None:
    """swap-offset: an update written at offset 0 instead of one sector in. MCUboot finds its
    header there (boot_read_image_header looks in both places) and refuses it as uploaded to
    the wrong address."""
    fmap = small_offset.map
    sec = fmap.secondary(0)
    right = small_offset.start()
    wrong = bytearray(right)
    image = right[sec.offset + fmap.image_offset(0) : sec.end]
    erased = bytes([fmap.erased_value])
    wrong[sec.offset : sec.end] = image + erased * (sec.size - len(image))
    check_refused(small_offset, bytes(wrong), "an update at the start of the secondary")


def test_zephyr_nrf52840_preset_matches_mcuboot(
    mcuboot_host: McubootHost,
    imgtool: Callable[..., Run],
    key_dir: Path,
    tmp_path: Path,
    report: Callable[[str], None],
) -> None:
    """The Zephyr-style swap-move preset (118/117 pages of 4 KiB, 4-byte writes, 128 sectors):
    upgrade and revert identical; cut points sampled with a stride."""
    full = preset("nrf52840-swap-move")
    # the slots only, moved to offset 0: the harness takes offsets from the start of its file
    shift = full.primary(0).offset
    fmap = FlashMap(
        name=full.name,
        flash_size=full.secondary(0).end - shift,
        sector_size=full.sector_size,
        write_align=full.write_align,
        max_sectors=full.max_sectors,
        strategy=full.strategy,
        erased_value=full.erased_value,
        write_mode=full.write_mode,
        areas=tuple(
            Area(a.name, a.offset - shift, a.size, a.image) for a in full.areas if a.image == 0
        ),
    )
    bench = Bench(mcuboot_host, imgtool, key_dir, tmp_path, fmap)
    check_upgrade_revert(bench)
    for kind in ("upgrade", "revert"):
        check_cut_sweep(bench, kind, True, report)
        check_cut_sweep(bench, kind, False, report, stride=5)
