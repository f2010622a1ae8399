"""The bootloader: MCUboot decisions, validation, surviving a power cut at every operation, and
the same flash operations as MCUboot itself (the host harness of ../shared/mcuboot-host)."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from otakit.device.bootloader import Action, Bootloader, BootloaderConfig, Strategy
from otakit.device.flash import Flash, PowerCut
from otakit.device.flashmap import FlashMap, preset
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.trailer import BOOT_MAGIC
from otakit.image.verify import verify_image

from .conftest import Run
from .mcuboot_host import (
    HostResult,
    McubootHost,
    flash_bytes,
    flash_from_bytes,
    small_layout_dict,
)

KEY = SigningKey.generate("ecdsa-p256")
STRATEGIES = [Strategy.SWAP_SCRATCH, Strategy.OVERWRITE]


def signed(version: str, size: int, *, key: SigningKey = KEY, counter: int | None = None) -> bytes:
    payload = random.Random(f"{version}/{size}").randbytes(size)
    options = SignOptions(ImageVersion.parse(version), pad_header=True, security_counter=counter)
    image = sign_image(payload, key, options)
    return image + b"\xff" * (-len(image) % 8)


@dataclass
class Device:
    flash: Flash
    map: FlashMap
    boot: Bootloader

    def running_digest(self, image: int = 0) -> bytes:
        data_end = self.map.max_image_size(image)
        return verify_image(self.boot.primary(image), [KEY.public_key], max_size=data_end).digest

    def secondary_digest(self, image: int = 0) -> bytes:
        return verify_image(self.boot.secondary(image), [KEY.public_key]).digest


def make_device(
    strategy: Strategy = Strategy.SWAP_SCRATCH,
    layout: str = "sim-small",
    *,
    allow_downgrade: bool = False,
    primary: dict[int, bytes] | None = None,
) -> Device:
    fm = preset(layout)
    if fm.strategy is not strategy:
        fm = fm.with_strategy(strategy)
    flash = fm.new_flash()
    config = BootloaderConfig(keys=(KEY.public_key,), allow_downgrade=allow_downgrade)
    device = Device(flash, fm, Bootloader(flash, fm, config))
    for image, data in (primary or {0: V1}).items():
        device.boot.primary(image).write(0, data)
    return device


def install(device: Device, data: bytes, *, image: int = 0, permanent: bool = False) -> None:
    """What an agent does: erase the secondary slot, write the image, mark it pending."""
    slot = device.boot.secondary(image)
    slot.erase_all()
    slot.write(0, data)
    device.boot.set_pending(image, permanent=permanent)


V1 = signed("1.0.0", 9000)
V2 = signed("1.1.0", 12000)  # spans 3 sectors + the trailer sector: 4 regions moved
D1 = verify_image(V1).digest
D2 = verify_image(V2).digest


# --- MCUboot decisions ------------------------------------------------------------------------


def test_fresh_device_boots_its_image() -> None:
    device = make_device()
    result = device.boot.boot()
    assert result.bootable
    assert result.images[0].action is Action.NONE
    assert result.images[0].version == ImageVersion(1, 0, 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_test_upgrade_then_confirm(strategy: Strategy) -> None:
    device = make_device(strategy)
    install(device, V2)
    assert device.boot.status()[0].pending == "test"
    first = device.boot.boot().images[0]
    assert first.version == ImageVersion(1, 1, 0)
    assert device.running_digest() == D2
    if strategy is Strategy.SWAP_SCRATCH:
        assert first.action is Action.UPGRADE_TEST
        assert device.boot.status()[0].state == "testing"
        assert device.secondary_digest() == D1  # the old image waits in the secondary slot
        assert device.boot.confirm() is True
        assert device.boot.confirm() is False  # already confirmed
    else:
        assert first.action is Action.UPGRADE_PERMANENT  # overwrite-only cannot test
    assert device.boot.status()[0].state == "confirmed"
    again = device.boot.boot().images[0]
    assert again.action is Action.NONE
    assert device.running_digest() == D2


def test_unconfirmed_test_image_is_reverted() -> None:
    device = make_device()
    install(device, V2)
    device.boot.boot()
    assert device.boot.status()[0].pending == "revert"
    reverted = device.boot.boot().images[0]
    assert reverted.action is Action.REVERT
    assert reverted.version == ImageVersion(1, 0, 0)
    assert device.running_digest() == D1
    assert device.secondary_digest() == D2
    status = device.boot.status()[0]
    assert (status.state, status.pending) == ("confirmed", "none")
    assert device.boot.boot().images[0].action is Action.NONE


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_permanent_upgrade(strategy: Strategy) -> None:
    device = make_device(strategy)
    install(device, V2, permanent=True)
    assert device.boot.status()[0].pending == "permanent"
    assert device.boot.boot().images[0].action is Action.UPGRADE_PERMANENT
    assert device.boot.status()[0].state == "confirmed"
    assert device.boot.boot().images[0].action is Action.NONE
    assert device.running_digest() == D2


@pytest.mark.parametrize(
    ("candidate", "error"),
    [
        (signed("1.1.0", 5000, key=SigningKey.generate("ecdsa-p256")), "KEY_MISMATCH"),
        (signed("0.9.0", 5000), "DOWNGRADE"),
        (signed("1.1.0", 5000, counter=4), "DOWNGRADE"),  # the running image has counter 5
        (signed("1.1.0", 12000)[:8000], "BAD_MAGIC"),  # erased flash where its TLVs should be
        (None, "IMAGE_TOO_LARGE"),  # 8 bytes over MCUboot's limit for the layout
    ],
    ids=["bad-signature", "downgrade", "security-counter", "truncated", "too-large"],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invalid_candidates_are_rejected(
    strategy: Strategy, candidate: bytes | None, error: str
) -> None:
    device = make_device(strategy, primary={0: signed("1.0.0", 9000, counter=5)})
    before = device.running_digest()
    if candidate is None:
        candidate = over_limit(device.map.max_image_size())
        assert len(candidate) <= device.map.primary().size - 16  # room left for the magic
    install(device, candidate)
    result = device.boot.boot().images[0]
    assert result.action is Action.REJECTED
    assert result.error == error
    assert result.reason
    assert result.version == ImageVersion(1, 0, 0)
    assert device.running_digest() == before
    # the request is gone, with the whole secondary slot (boot_scramble_slot)
    assert device.flash.is_erased(device.map.secondary().offset, device.map.secondary().size)
    assert device.boot.status()[0].pending == "none"
    assert device.boot.boot().images[0].action is Action.NONE


def over_limit(limit: int) -> bytes:
    """A valid image whose TLVs end 8 bytes past ``limit``."""
    overhead = len(signed("1.1.0", 1000)) - 1000
    image = signed("1.1.0", limit + 8 - overhead)
    assert limit < len(image) <= limit + 16
    return image


def test_tampered_candidate_is_rejected() -> None:
    device = make_device()
    bad = bytearray(V2)
    bad[3000] ^= 0x10
    install(device, bytes(bad))
    result = device.boot.boot().images[0]
    assert (result.action, result.error) == (Action.REJECTED, "HASH_MISMATCH")
    assert device.running_digest() == D1


def test_downgrade_allowed_when_configured() -> None:
    device = make_device(allow_downgrade=True)
    install(device, signed("0.9.0", 5000), permanent=True)
    result = device.boot.boot().images[0]
    assert result.action is Action.UPGRADE_PERMANENT
    assert result.version == ImageVersion(0, 9, 0)


def test_revert_refused_when_the_old_image_is_gone() -> None:
    """If the secondary slot was erased while testing, the revert cannot happen: MCUboot (swap
    scratch) keeps running the test image and tries again at every boot until it is confirmed."""
    device = make_device()
    install(device, V2)
    device.boot.boot()
    device.boot.secondary().erase_all()
    for _ in range(2):
        result = device.boot.boot().images[0]
        assert result.action is Action.REJECTED
        assert result.version == ImageVersion(1, 1, 0)
        assert device.boot.status()[0].state == "testing"
    assert device.boot.confirm()
    assert device.boot.status()[0].state == "confirmed"
    assert device.boot.boot().images[0].action is Action.NONE


def test_no_valid_image_is_reported() -> None:
    device = make_device(primary={0: b"\x00" * 64})
    result = device.boot.boot()
    assert not result.bootable
    assert result.images[0].version is None
    assert result.images[0].error == "BAD_MAGIC"


def test_multi_image_pairs_upgrade_independently() -> None:
    app1, sec1 = signed("1.0.0", 30000), signed("2.0.0", 20000)
    device = make_device(layout="two-image", primary={0: app1, 1: sec1})
    sec2 = signed("2.1.0", 25000)
    install(device, sec2, image=1, permanent=True)
    result = device.boot.boot()
    assert [i.action for i in result.images] == [Action.NONE, Action.UPGRADE_PERMANENT]
    assert [str(i.version) for i in result.images] == ["1.0.0+0", "2.1.0+0"]
    app2 = signed("1.2.0", 40000)
    install(device, app2, image=0)
    install(device, signed("1.0.0", 1000), image=1)  # a downgrade of image 1
    result = device.boot.boot()
    assert [i.action for i in result.images] == [Action.UPGRADE_TEST, Action.REJECTED]
    assert result.images[1].error == "DOWNGRADE"
    assert device.running_digest(0) == verify_image(app2).digest
    assert device.running_digest(1) == verify_image(sec2).digest


# --- imgtool trailers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "action"),
    [(["--pad"], Action.UPGRADE_TEST), (["--pad", "--confirm"], Action.UPGRADE_PERMANENT)],
)
def test_imgtool_padded_images_are_requests(
    tmp_path: Path, imgtool: Callable[..., Run], flags: list[str], action: Action
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(KEY.to_pem())
    (tmp_path / "app.bin").write_bytes(os.urandom(9000))
    result = imgtool(
        "sign", "-k", key_file, "-v", "2.0.0", "-H", "0x400", "--pad-header", "--align", "8",
        "-S", "0x5000", "-M", "128", *flags, tmp_path / "app.bin", tmp_path / "app.img",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    device = make_device()
    padded = (tmp_path / "app.img").read_bytes()
    assert len(padded) == device.map.primary(0).size
    device.boot.secondary().write(0, padded)  # flashed as-is, trailer included
    boot = device.boot.boot().images[0]
    assert boot.action is action
    assert boot.version == ImageVersion(2, 0, 0)
    assert device.running_digest() == verify_image(padded).digest


# --- power cuts -------------------------------------------------------------------------------


def _operations(scenario: Callable[[], Device]) -> int:
    """Flash operations the final boot of a scenario takes without a cut."""
    device = scenario()
    before = device.flash.operations
    device.boot.boot()
    return device.flash.operations - before


def _upgrade(strategy: Strategy, permanent: bool) -> Callable[[], Device]:
    def scenario() -> Device:
        device = make_device(strategy)
        install(device, V2, permanent=permanent)
        return device

    return scenario


def _revert() -> Device:
    device = make_device()
    install(device, V2)
    device.boot.boot()  # v2 on test, not confirmed
    return device


CUT_SCENARIOS = {
    "swap-test": (_upgrade(Strategy.SWAP_SCRATCH, False), D2, D1, "testing"),
    "swap-permanent": (_upgrade(Strategy.SWAP_SCRATCH, True), D2, D1, "confirmed"),
    "overwrite": (_upgrade(Strategy.OVERWRITE, False), D2, None, "confirmed"),
    "revert": (_revert, D1, D2, "confirmed"),
}


@pytest.mark.parametrize("name", list(CUT_SCENARIOS))
def test_power_cut_at_every_operation(name: str, report: Callable[[str], None]) -> None:
    """Cut the power at each flash operation (clean and torn), boot again: the request completes."""
    scenario, running, kept, state = CUT_SCENARIOS[name]
    total = _operations(scenario)
    assert total >= 4 * 2  # at least 4 sectors moved, each erased and written
    tried = 0
    for tear in (False, True):
        for cut in range(total):
            device = scenario()
            device.flash.cut_after(cut, tear=tear, seed=cut)
            with pytest.raises(PowerCut):
                device.boot.boot()
            device.flash.power_on()
            result = device.boot.boot()
            assert result.bootable, (name, cut, tear, result)
            expect_running, expect_kept, expect_state = running, kept, state
            if state == "testing" and tear and cut == total - 1:
                # The torn write of the last flag finished the swap, but the test image never
                # ran to confirm itself: like MCUboot, the next boot reverts it.
                assert result.images[0].action is Action.REVERT
                assert kept is not None
                expect_running, expect_kept, expect_state = kept, running, "confirmed"
            assert device.running_digest() == expect_running, (name, cut, tear)
            if expect_kept is not None:
                assert device.secondary_digest() == expect_kept, (name, cut, tear)
            status = device.boot.status()[0]
            pending = "revert" if expect_state == "testing" else "none"
            if name == "overwrite" and cut >= total - 2 and status.pending == "test":
                # cut while the secondary's first sector (header) or last sector (trailer) is
                # erased: the header is gone but the trailer still asks for an upgrade, which
                # MCUboot (overwrite-only) refuses at every boot without touching the flash
                pending = "test"
                again = device.flash.operations
                assert device.boot.boot().images[0].version == ImageVersion(1, 1, 0)
                assert device.flash.operations == again
            assert (status.state, status.pending) == (expect_state, pending), (name, cut, tear)
            tried += 1
    report(
        f"power cuts, {name}: {total} flash operations, {tried} cut points tried (clean and torn)"
    )
    assert tried == 2 * total


@pytest.mark.parametrize("permanent", [True, False], ids=["permanent", "test"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_repeated_power_cuts_during_recovery(strategy: Strategy, permanent: bool) -> None:
    """Cut again and again while resuming: the boot that completes runs a whole image.

    MCUboot needs enough operations between two cuts to get past a step (overwrite-only starts
    the copy again at every boot), so each boot gets up to 40."""
    rng = random.Random(f"{strategy.value}/{permanent}")
    for trial in range(30):
        device = make_device(strategy)
        install(device, V2, permanent=permanent)
        cuts = 0
        while True:
            assert cuts < 200, "no progress"
            limit = 40 if cuts else 20  # the first boot is always cut
            device.flash.cut_after(rng.randrange(0, limit), tear=rng.random() < 0.5, seed=trial)
            try:
                result = device.boot.boot()
            except PowerCut:
                cuts += 1
                device.flash.power_on()
                continue
            break
        device.flash.power_on()
        assert cuts > 0
        assert result.bootable
        if permanent or strategy is Strategy.OVERWRITE:
            assert device.running_digest() == D2
        elif device.running_digest() == D1:
            # the swap finished during a cut and the test image never confirmed: reverted
            assert result.images[0].action is Action.REVERT
            assert device.secondary_digest() == D2
        else:
            assert device.running_digest() == D2
            assert device.secondary_digest() == D1


def test_power_cut_while_rejecting_a_bad_candidate() -> None:
    bad = signed("1.1.0", 5000, key=SigningKey.generate("ecdsa-p256"))

    def scenario() -> Device:
        device = make_device()
        install(device, bad)
        return device

    total = _operations(scenario)
    assert total > 0
    for cut in range(total):
        device = scenario()
        device.flash.cut_after(cut, tear=True, seed=cut)
        with pytest.raises(PowerCut):
            device.boot.boot()
        device.flash.power_on()
        result = device.boot.boot().images[0]
        assert result.version == ImageVersion(1, 0, 0)
        assert device.running_digest() == D1
        assert device.boot.status()[0].pending == "none"


# --- against MCUboot itself (../shared/mcuboot-host) ------------------------------------------
#
# Same starting flash for otakit and the harness's mcuboot-host-MODE binary (one image, sim-small
# geometry: 4 KiB sectors, align 8, erased 0xff); they must write the same bytes with the same
# number of flash operations, and after a power cut at any operation (clean or torn in half, as
# the harness tears) in either one, the other must finish the boot exactly as the one itself.


@dataclass
class Cross:
    host: McubootHost
    map: FlashMap
    path: Path

    def harness(
        self, data: bytes, cut: int | None = None, torn: bool = False
    ) -> tuple[HostResult, bytes]:
        self.path.write_bytes(data)
        pems = [KEY.public_key.pem()]
        result = self.host.run_map(self.map, self.path, key_pems=pems, cut_after=cut, torn=torn)
        assert result.cut == (cut is not None and result.rc == -1)
        return result, self.path.read_bytes()

    def otakit(
        self, data: bytes, cut: int | None = None, torn: bool = False
    ) -> tuple[str | None, bytes, int]:
        """(version booted or None; None also after a cut), flash bytes, operations done."""
        flash = flash_from_bytes(data, self.map)
        boot = Bootloader(flash, self.map, BootloaderConfig(keys=(KEY.public_key,)))
        if cut is not None:
            flash.cut_after(cut, tear_half=torn)
        try:
            result = boot.boot().images[0]
        except PowerCut:
            flash.power_on()
            return None, flash_bytes(flash), flash.operations
        version = None if result.version is None else str(result.version)
        return version, flash_bytes(flash), flash.operations


def cross_map(strategy: Strategy, max_sectors: int) -> FlashMap:
    fm = preset("sim-small")
    if fm.strategy is not strategy:
        fm = fm.with_strategy(strategy)
    return dataclasses.replace(fm, max_sectors=max_sectors)


def pending_flash(fm: FlashMap, candidate: bytes = V2, *, permanent: bool = False) -> bytes:
    flash = fm.new_flash()
    boot = Bootloader(flash, fm, BootloaderConfig(keys=(KEY.public_key,)))
    boot.primary().write(0, V1)
    boot.secondary().write(0, candidate)
    boot.set_pending(permanent=permanent)
    return flash_bytes(flash)


CROSS_CASES = [
    (Strategy.SWAP_SCRATCH, 8, "test"),
    (Strategy.SWAP_SCRATCH, 8, "permanent"),
    (Strategy.SWAP_SCRATCH, 8, "revert"),
    (Strategy.SWAP_SCRATCH, 200, "test"),  # the trailer spans two sectors
    (Strategy.SWAP_SCRATCH, 200, "revert"),
    (Strategy.OVERWRITE, 8, "test"),
    (Strategy.OVERWRITE, 128, "permanent"),
]


@pytest.mark.parametrize(
    ("strategy", "max_sectors", "flow"),
    CROSS_CASES,
    ids=[f"{s.value}-M{m}-{f}" for s, m, f in CROSS_CASES],
)
def test_same_flash_operations_as_mcuboot(
    strategy: Strategy,
    max_sectors: int,
    flow: str,
    mcuboot_host: McubootHost,
    tmp_path: Path,
    report: Callable[[str], None],
) -> None:
    fm = cross_map(strategy, max_sectors)
    cross = Cross(mcuboot_host, fm, tmp_path / "flash.bin")
    start = pending_flash(fm, permanent=flow == "permanent")
    if flow == "revert":
        first, start = cross.harness(start)  # MCUboot runs v2 on test; no confirm follows
        assert first.version == "1.1.0+0"
    expected = "1.0.0+0" if flow == "revert" else "1.1.0+0"

    full, full_bytes = cross.harness(start)
    version, ours, ops = cross.otakit(start)
    assert (full.version, full.ops) == (expected, ops)
    assert version == expected
    assert ours == full_bytes

    for torn in (False, True):
        for cut in range(full.ops):
            where = (cut, torn)
            cut_result, cut_bytes = cross.harness(start, cut, torn)
            assert cut_result.cut, where
            _, our_cut, our_ops = cross.otakit(start, cut, torn)
            assert our_ops == cut, where
            assert our_cut == cut_bytes, where  # otakit cut at N == MCUboot cut at N
            after, after_bytes = cross.harness(cut_bytes)
            assert after.booted, where
            version, ours, ops = cross.otakit(cut_bytes)  # otakit finishes what MCUboot left
            assert (version, ops) == (after.version, after.ops), where
            assert ours == after_bytes, where
    report(
        f"MCUboot cross check, {strategy.value} M={max_sectors} {flow}: {full.ops} operations, "
        f"{2 * full.ops} cut points (clean and torn) identical both ways"
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_confirm_and_rejection_agree_with_mcuboot(
    strategy: Strategy, mcuboot_host: McubootHost, tmp_path: Path
) -> None:
    fm = cross_map(strategy, 8)
    cross = Cross(mcuboot_host, fm, tmp_path / "flash.bin")
    # otakit upgrades on test and confirms; MCUboot then keeps v2 without touching the flash
    flash = flash_from_bytes(pending_flash(fm), fm)
    boot = Bootloader(flash, fm, BootloaderConfig(keys=(KEY.public_key,)))
    assert str(boot.boot().images[0].version) == "1.1.0+0"
    assert boot.confirm()  # overwrite-only: the copied trailer has the magic, image_ok unset
    kept, kept_bytes = cross.harness(flash_bytes(flash))
    assert (kept.version, kept.ops) == ("1.1.0+0", 0)
    assert kept_bytes == flash_bytes(flash)
    # MCUboot upgrades on test, otakit confirms, MCUboot keeps it
    first, data = cross.harness(pending_flash(fm))
    assert first.version == "1.1.0+0"
    flash = flash_from_bytes(data, fm)
    boot = Bootloader(flash, fm, BootloaderConfig(keys=(KEY.public_key,)))
    assert boot.confirm()
    again, _ = cross.harness(flash_bytes(flash))
    assert (again.version, again.ops) == ("1.1.0+0", 0)
    # a candidate signed by another key: both erase it the same way and keep v1
    stranger = signed("1.1.0", 5000, key=SigningKey.generate("ecdsa-p256"))
    start = pending_flash(fm, stranger)
    refused, refused_bytes = cross.harness(start)
    version, ours, ops = cross.otakit(start)
    assert (refused.version, refused.ops) == ("1.0.0+0", ops)
    assert version == "1.0.0+0"
    assert ours == refused_bytes


# --- status, the update area, downgrade prevention in every mode ------------------------------


SMALL_V1 = signed("1.0.0", 4000)  # images that fit every small layout (swap-status: 11776 B)
SMALL_V2 = signed("1.1.0", 6000)


def _small(strategy: Strategy) -> FlashMap:
    """The cross tests' small single-image layout of ``strategy``."""
    return FlashMap.from_dict(small_layout_dict(strategy.value))


def _padded(data: bytes, fm: FlashMap) -> bytes:
    return data + bytes([fm.erased_value]) * (-len(data) % fm.write_align)


def _device(
    fm: FlashMap,
    running: bytes = SMALL_V1,
    *,
    allow_downgrade: bool = False,
    ignore_security_counter: bool = False,
) -> Device:
    flash = fm.new_flash()
    config = BootloaderConfig(
        keys=(KEY.public_key,),
        allow_downgrade=allow_downgrade,
        ignore_security_counter=ignore_security_counter,
    )
    boot = Bootloader(flash, fm, config)
    boot.primary().write(0, _padded(running, fm))
    return Device(flash, fm, boot)


def _install(device: Device, data: bytes, *, permanent: bool = False) -> None:
    """What an agent does, where the strategy wants the image (``Bootloader.update_area``)."""
    device.boot.secondary().erase_all()
    device.boot.update_area().write(0, _padded(data, device.map))
    device.boot.set_pending(permanent=permanent)


def test_status_validates_what_it_reports() -> None:
    device = make_device()
    stranger = signed("1.1.0", 5000, key=SigningKey.generate("ecdsa-p256"))
    install(device, stranger)
    status = device.boot.status()[0]
    assert (status.primary.valid, status.primary.problem) == (True, None)
    assert status.secondary.version == ImageVersion(1, 1, 0)  # read from its header...
    assert not status.secondary.valid  # ...but it is not signed by a trusted key
    assert status.secondary.problem
    assert status.pending == "test"  # the trailer asks for it; the boot will refuse it
    shown = status.to_dict()
    assert (shown["running"], shown["problem"]) == ("1.0.0+0", None)
    assert shown["secondary"]["valid"] is False
    # a primary image whose payload was damaged: nothing valid runs, and status says why
    device.flash.erase(device.map.primary().offset + device.map.sector_size, device.map.sector_size)
    status = device.boot.status()[0]
    assert status.primary.version == ImageVersion(1, 0, 0)  # the header is still there
    assert not status.primary.valid
    shown = status.to_dict()
    assert shown["running"] is None
    assert shown["problem"] == status.primary.problem
    assert shown["problem"]
    assert {"image", "state", "next_boot", "primary", "secondary"} <= shown.keys()
    assert {"version", "request"} <= shown["secondary"].keys()
    assert device.boot.boot().images[0].version is None  # the boot agrees


def test_status_of_an_empty_primary() -> None:
    fm = preset("sim-small")
    device = Device(fm.new_flash(), fm, Bootloader(fm.new_flash(), fm, BootloaderConfig()))
    status = device.boot.status()[0]
    assert (status.primary.version, status.primary.valid) == (None, False)
    assert status.to_dict()["running"] is None
    assert "no image header" in (status.problem or "")


@pytest.mark.parametrize("strategy", list(Strategy))
def test_status_reads_without_writing(strategy: Strategy) -> None:
    """Even where MCUboot's own reads write (swap-status moves an ``imgtool --pad`` magic from
    the secondary slot into its status partition), status() leaves the flash alone."""
    fm = _small(strategy)
    device = _device(fm)
    secondary = fm.secondary(0)
    offset = fm.image_offset(0)
    device.flash.write(secondary.offset + offset, _padded(SMALL_V2, fm))
    row = max(fm.write_align, 16)  # the magic imgtool --pad leaves at the end of the slot
    tail = bytes([fm.erased_value]) * (row - 16) + BOOT_MAGIC
    device.flash.write(secondary.end - row, tail)
    before = (device.flash.operations, device.flash.read(0, fm.flash_size))
    status = device.boot.status()[0]
    assert (device.flash.operations, device.flash.read(0, fm.flash_size)) == before
    assert status.pending == "test"
    assert (status.secondary.version, status.secondary.valid) == (ImageVersion(1, 1, 0), True)
    assert status.to_dict()["running"] == "1.0.0+0"


def test_update_area_is_where_mcuboot_looks_for_the_update() -> None:
    for strategy in Strategy:
        fm = _small(strategy)
        boot = Bootloader(fm.new_flash(), fm, BootloaderConfig())
        area, slot = boot.update_area().area, fm.secondary(0)
        assert area.offset == slot.offset + fm.image_offset(0)
        assert area.end == slot.end
        assert area.size >= fm.max_image_size(0)
    assert _small(Strategy.SWAP_OFFSET).image_offset(0) == 0x1000


def test_swap_offset_status_sees_the_pending_update() -> None:
    """The update sits one sector into the secondary; status reads the headers as the loader
    does before deciding, so it finds it there (and at the start of the slot for a revert)."""
    device = _device(_small(Strategy.SWAP_OFFSET), allow_downgrade=False)
    _install(device, SMALL_V2)
    status = device.boot.status()[0]
    assert (status.pending, status.secondary.version, status.secondary.valid) == (
        "test",
        ImageVersion(1, 1, 0),
        True,
    )
    assert device.boot.boot().images[0].action is Action.UPGRADE_TEST
    status = device.boot.status()[0]
    assert (status.state, status.pending) == ("testing", "revert")
    assert (status.secondary.version, status.secondary.valid) == (ImageVersion(1, 0, 0), True)


OLDER = signed("0.9.0", 5000)
LOWER_COUNTER = signed("1.1.0", 5000, counter=4)


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize(
    ("candidate", "reason"),
    [(OLDER, "older"), (LOWER_COUNTER, "security counter")],
    ids=["older", "lower-counter"],
)
def test_downgrades_are_refused_in_every_mode(
    strategy: Strategy, candidate: bytes, reason: str
) -> None:
    fm = _small(strategy)
    device = _device(fm, signed("1.0.0", 4000, counter=5))
    _install(device, candidate, permanent=True)
    result = device.boot.boot().images[0]
    assert (result.action, result.error, result.version) == (
        Action.REJECTED,
        "DOWNGRADE",
        ImageVersion(1, 0, 0),
    )
    assert reason in (result.reason or "")
    secondary = fm.secondary(0)
    assert device.flash.read(secondary.offset, 0x400) == bytes([fm.erased_value]) * 0x400
    assert device.boot.boot().images[0].action in (Action.NONE, Action.REJECTED)
    assert device.boot.boot().images[0].version == ImageVersion(1, 0, 0)
    # the same candidate is taken when the configuration allows it
    allowed = _device(
        fm, signed("1.0.0", 4000, counter=5), allow_downgrade=True, ignore_security_counter=True
    )
    _install(allowed, candidate, permanent=True)
    assert allowed.boot.boot().images[0].action is Action.UPGRADE_PERMANENT


def test_a_forged_revert_trailer_does_not_bypass_downgrade_prevention() -> None:
    """swap-move lets a PERM request shaped like ``fixup_revert``'s through (an interrupted
    revert), but only while the running image is not confirmed."""
    fm = _small(Strategy.SWAP_MOVE)
    device = _device(fm)
    _install(device, SMALL_V2, permanent=True)
    assert device.boot.boot().images[0].version == ImageVersion(1, 1, 0)  # confirmed
    device.boot.secondary().erase_all()
    device.boot.update_area().write(0, _padded(OLDER, fm))
    mode = device.boot.mode()
    ref = mode.ctx.secondary_ref
    mode.store.write_image_ok(ref)  # what fixup_revert writes: image_ok, swap_size, magic
    mode.store.write_swap_size(ref, 0x3000)
    mode.store.write_magic(ref)
    result = device.boot.boot().images[0]
    assert (result.action, result.error) == (Action.REJECTED, "DOWNGRADE")
    assert result.version == ImageVersion(1, 1, 0)
