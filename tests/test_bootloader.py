"""The bootloader: MCUboot decisions, validation, and surviving a power cut at every operation."""

from __future__ import annotations

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
from otakit.image.verify import verify_image

from .conftest import Run

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
    flash = Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align)
    config = BootloaderConfig(
        strategy=strategy, keys=(KEY.public_key,), allow_downgrade=allow_downgrade
    )
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
        (signed("1.1.0", 17300), "IMAGE_TOO_LARGE"),  # runs into the primary trailer
    ],
    ids=["bad-signature", "downgrade", "security-counter", "truncated", "too-large"],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invalid_candidates_are_rejected(strategy: Strategy, candidate: bytes, error: str) -> None:
    device = make_device(strategy, primary={0: signed("1.0.0", 9000, counter=5)})
    before = device.running_digest()
    install(device, candidate)
    result = device.boot.boot().images[0]
    assert result.action is Action.REJECTED
    assert result.error == error
    assert result.reason
    assert result.version == ImageVersion(1, 0, 0)
    assert device.running_digest() == before
    # the request is gone: the next boot does nothing
    assert device.boot.status()[0].pending == "none"
    assert device.boot.boot().images[0].action is Action.NONE


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
    """If the secondary slot was overwritten while testing, keep the running image for good."""
    device = make_device()
    install(device, V2)
    device.boot.boot()
    device.boot.secondary().erase_all()
    result = device.boot.boot().images[0]
    assert result.action is Action.REJECTED
    assert result.version == ImageVersion(1, 1, 0)
    assert device.boot.status()[0].state == "confirmed"


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


# --- imgtool trailers on the PSoC 6 layout -----------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "action"),
    [(["--pad"], Action.UPGRADE_TEST), (["--pad", "--confirm"], Action.UPGRADE_PERMANENT)],
)
def test_imgtool_padded_images_are_requests(
    tmp_path: Path, imgtool: Callable[..., Run], flags: list[str], action: Action
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(KEY.to_pem())
    (tmp_path / "app.bin").write_bytes(os.urandom(70000))
    result = imgtool(
        "sign", "-k", key_file, "-v", "2.0.0", "-H", "0x400", "--pad-header", "--align", "8",
        "-S", "0xe6000", *flags, tmp_path / "app.bin", tmp_path / "app.img",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    device = make_device(layout="psoc6-2m-swap")
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
                expect_running, expect_kept, expect_state = kept, running, "confirmed"
            assert device.running_digest() == expect_running, (name, cut, tear)
            if expect_kept is not None:
                assert device.secondary_digest() == expect_kept, (name, cut, tear)
            status = device.boot.status()[0]
            pending = "revert" if expect_state == "testing" else "none"
            assert (status.state, status.pending) == (expect_state, pending), (name, cut, tear)
            tried += 1
    report(
        f"power cuts, {name}: {total} flash operations, {tried} cut points tried (clean and torn)"
    )
    assert tried == 2 * total


@pytest.mark.parametrize("permanent", [True, False], ids=["permanent", "test"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_repeated_power_cuts_during_recovery(strategy: Strategy, permanent: bool) -> None:
    """Cut again and again while resuming: the boot that completes runs a whole image."""
    rng = random.Random(f"{strategy.value}/{permanent}")
    for trial in range(30):
        device = make_device(strategy)
        install(device, V2, permanent=permanent)
        cuts = 0
        while True:
            device.flash.cut_after(rng.randrange(0, 12), tear=rng.random() < 0.5, seed=trial)
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
