"""After a reboot (device/core/after_boot.py): boot results in, what to confirm and report out.

Pure: the bootloader's per-image results are built by hand, as the bootloader model's boots
produce them (test_sim.py runs the real one through ``otakit sim run``).
"""

from __future__ import annotations

from otakit.device.bootloader import Action, ImageBoot
from otakit.device.core.after_boot import (
    NOT_STARTED_ERROR,
    REVERT_ERROR,
    AfterBoot,
    BootVerdict,
    after_boot,
)
from otakit.protocol.fwinfo import FwStatus
from otakit.protocol.version import FirmwareVersion

OLD = FirmwareVersion(1, 0, 0)
NEW = FirmwareVersion(1, 1, 0)


def boot(
    action: Action,
    version: FirmwareVersion | None,
    image: int = 0,
    *,
    reason: str | None = None,
    error: str | None = None,
) -> ImageBoot:
    return ImageBoot(
        image=image,
        action=action,
        resumed=False,
        version=None if version is None else version.to_image(),
        reason=reason,
        error=error,
    )


def test_the_new_image_runs_confirm_and_report_applied() -> None:
    result = after_boot([boot(Action.UPGRADE_TEST, NEW)], expected=[NEW], previous=OLD)
    assert result == AfterBoot(
        BootVerdict.UPDATED,
        NEW,
        confirm=True,
        report=FwStatus.APPLIED,
        error=None,
        reason="running 1.1.0 (before: 1.0.0)",
    )


def test_a_permanent_upgrade_is_updated_too() -> None:
    result = after_boot([boot(Action.UPGRADE_PERMANENT, NEW)], expected=[NEW], previous=OLD)
    assert (result.verdict, result.report) == (BootVerdict.UPDATED, FwStatus.APPLIED)


def test_an_unhealthy_new_image_is_not_confirmed_and_not_reported() -> None:
    result = after_boot(
        [boot(Action.UPGRADE_TEST, NEW)], expected=[NEW], previous=OLD, healthy=False
    )
    assert result.verdict is BootVerdict.NOT_STARTED
    assert result.running == NEW
    assert not result.confirm
    assert result.report is None  # the revert at the next boot is what gets reported
    assert "next boot reverts" in str(result.reason)


def test_a_revert_reports_the_revert_error_and_the_running_version() -> None:
    for expected in ([NEW], None):  # the watchdog's reboot, or the next run's first look
        result = after_boot([boot(Action.REVERT, OLD)], expected=expected, previous=OLD)
        assert result.verdict is BootVerdict.REVERTED
        assert (result.report, result.error, result.running) == (FwStatus.ERROR, REVERT_ERROR, OLD)
        assert not result.confirm
    assert REVERT_ERROR.startswith("reverted:")  # what the server counts as a revert


def test_a_rejected_candidate_did_not_start() -> None:
    rejected = boot(Action.REJECTED, OLD, reason="bad signature", error="VERIFY")
    result = after_boot([rejected], expected=[NEW], previous=OLD)
    assert result.verdict is BootVerdict.NOT_STARTED
    assert (result.report, result.error, result.running) == (FwStatus.ERROR, "VERIFY", OLD)
    assert not result.confirm
    assert "bad signature" in str(result.reason)


def test_the_old_image_still_runs_without_a_reason() -> None:
    result = after_boot([boot(Action.NONE, OLD)], expected=[NEW], previous=OLD)
    assert result.verdict is BootVerdict.NOT_STARTED
    assert result.error == NOT_STARTED_ERROR
    assert "the bootloader did none" in str(result.reason)


def test_nothing_can_run() -> None:
    dead = boot(Action.NONE, None, reason="no valid image", error="NO_BOOTABLE_IMAGE")
    for expected in ([NEW], None):
        result = after_boot([dead], expected=expected, previous=OLD)
        assert result.verdict is BootVerdict.NOT_STARTED
        assert result.running is None
        assert (result.report, result.error) == (FwStatus.ERROR, "NO_BOOTABLE_IMAGE")


def test_an_ordinary_boot_is_unchanged() -> None:
    result = after_boot([boot(Action.NONE, OLD)], expected=None, previous=None)
    assert result == AfterBoot(
        BootVerdict.UNCHANGED, OLD, confirm=False, report=None, error=None, reason="nothing changed"
    )
    refused = boot(Action.REJECTED, OLD, reason="too old")
    result = after_boot([refused], expected=None, previous=None)
    assert result.verdict is BootVerdict.UNCHANGED
    assert "too old" in str(result.reason)


def test_an_upgrade_the_driver_did_not_expect_is_confirmed_when_healthy() -> None:
    result = after_boot([boot(Action.UPGRADE_TEST, NEW)], expected=None, previous=None)
    assert (result.verdict, result.confirm, result.report) == (
        BootVerdict.UPDATED,
        True,
        FwStatus.APPLIED,
    )
    sick = after_boot([boot(Action.UPGRADE_TEST, NEW)], expected=None, previous=None, healthy=False)
    assert (sick.verdict, sick.confirm) == (BootVerdict.NOT_STARTED, False)


# --- several images: a package upgrades them together ----------------------------------------

APP_NEW, NET_OLD, NET_NEW = FirmwareVersion(2, 0, 0), FirmwareVersion(5, 0, 0), FirmwareVersion(6)


def test_a_package_is_updated_only_when_every_image_runs_its_version() -> None:
    images = [boot(Action.UPGRADE_TEST, APP_NEW, 0), boot(Action.UPGRADE_TEST, NET_NEW, 1)]
    result = after_boot(images, expected=[APP_NEW, NET_NEW], previous=OLD)
    assert (result.verdict, result.confirm, result.running) == (BootVerdict.UPDATED, True, APP_NEW)
    # the boot result's order does not matter; image numbers do
    again = after_boot(list(reversed(images)), expected={1: NET_NEW, 0: APP_NEW}, previous=OLD)
    assert again == result


def test_one_image_of_a_package_not_started_confirms_none() -> None:
    images = [
        boot(Action.UPGRADE_TEST, APP_NEW, 0),
        boot(Action.REJECTED, NET_OLD, 1, reason="dependency not met", error="DEPENDENCY"),
    ]
    result = after_boot(images, expected=[APP_NEW, NET_NEW], previous=OLD)
    assert result.verdict is BootVerdict.NOT_STARTED
    assert not result.confirm  # so the next boot reverts image 0 too: the images stay together
    assert result.error == "DEPENDENCY"
    assert str(result.reason).startswith("image 1 runs 5.0.0")


def test_a_package_reverted_together() -> None:
    images = [boot(Action.REVERT, OLD, 0), boot(Action.REVERT, NET_OLD, 1)]
    result = after_boot(images, expected=[APP_NEW, NET_NEW], previous=OLD)
    assert (result.verdict, result.error, result.running) == (
        BootVerdict.REVERTED,
        REVERT_ERROR,
        OLD,
    )
    assert "image 0, 1" in str(result.reason)


def test_a_package_for_some_images_only() -> None:
    images = [boot(Action.NONE, OLD, 0), boot(Action.UPGRADE_TEST, NET_NEW, 1)]
    result = after_boot(images, expected={1: NET_NEW}, previous=OLD)
    assert (result.verdict, result.confirm, result.running) == (BootVerdict.UPDATED, True, OLD)
    missing = after_boot(images[:1], expected={1: NET_NEW}, previous=OLD)
    assert missing.verdict is BootVerdict.NOT_STARTED
    assert "no image 1" in str(missing.reason)
