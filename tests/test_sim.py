"""``otakit sim``: a device folder driven through the real entry point."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otakit.device.flashmap import FlashMap

from .conftest import Run

Otakit = Callable[..., Run]


@pytest.fixture
def images(tmp_path: Path, otakit: Otakit) -> Path:
    (tmp_path / "app.bin").write_bytes(os.urandom(50000))
    assert otakit("keygen", "-t", "ed25519", "-o", tmp_path / "key.pem").returncode == 0
    assert otakit("keygen", "-t", "ed25519", "-o", tmp_path / "other.pem").returncode == 0
    for version in ("1.0.0", "1.1.0", "0.9.0"):
        result = otakit(
            "sign", "-k", tmp_path / "key.pem", "-v", version, "--pad-header",
            tmp_path / "app.bin", tmp_path / f"v{version}.img",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    result = otakit(
        "sign", "-k", tmp_path / "other.pem", "-v", "2.0.0", "--pad-header",
        tmp_path / "app.bin", tmp_path / "foreign.img",
    )  # fmt: skip
    assert result.returncode == 0
    return tmp_path


def _create(otakit: Otakit, images: Path, *extra: str) -> Path:
    device = images / "dev"
    result = otakit(
        "sim", "create", device, "--image", images / "v1.0.0.img", "--key", images / "key.pem",
        "--serial", "SIM-7", "--board", "BOARD_X", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return device


def _boot(otakit: Otakit, device: Path, *args: str) -> dict[str, Any]:
    result = otakit("sim", "boot", device, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    booted: dict[str, Any] = json.loads(result.stdout)
    return booted


def _status(otakit: Otakit, device: Path) -> dict[str, Any]:
    result = otakit("sim", "status", device, "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def test_create_keeps_only_public_keys(otakit: Otakit, images: Path) -> None:
    device = _create(otakit, images)
    keys = list((device / "keys").glob("*.pem"))
    assert len(keys) == 1
    assert "PUBLIC KEY" in keys[0].read_text()
    assert "PRIVATE" not in keys[0].read_text()
    status = _status(otakit, device)
    assert status["identity"]["serial"] == "SIM-7"
    assert status["identity"]["board"] == "BOARD_X"
    assert status["slots"][0]["running"] == "1.0.0+0"
    assert (device / "flash.bin").stat().st_size == 2 * 1024 * 1024  # the PSoC 6 layout


def test_test_upgrade_power_cut_resume_confirm(otakit: Otakit, images: Path) -> None:
    device = _create(otakit, images)
    assert otakit("sim", "install", device, images / "v1.1.0.img").returncode == 0
    assert _status(otakit, device)["slots"][0]["next_boot"] == "test"

    # the PSoC 6 status area alone is 30 sectors to erase: cut well into the swap itself
    cut = _boot(otakit, device, "--power-cut-after", "100", "--tear")
    assert cut["power_cut"] is True
    assert cut["slots"][0]["state"] == "upgrading"
    assert cut["slots"][0]["running"] is None

    booted = _boot(otakit, device)
    assert booted["images"][0] == {
        "image": 0, "action": "upgrade-test", "resumed": True, "version": "1.1.0+0",
        "reason": None, "error": None,
    }  # fmt: skip
    assert _status(otakit, device)["slots"][0]["state"] == "testing"
    confirmed = otakit("sim", "confirm", device)
    assert "confirmed" in confirmed.stderr
    assert _boot(otakit, device)["images"][0]["action"] == "none"
    status = _status(otakit, device)
    assert status["slots"][0]["running"] == "1.1.0+0"
    assert status["slots"][0]["state"] == "confirmed"
    assert status["boots"] == 3


def test_unconfirmed_upgrade_reverts(otakit: Otakit, images: Path) -> None:
    device = _create(otakit, images)
    otakit("sim", "install", device, images / "v1.1.0.img")
    assert _boot(otakit, device)["images"][0]["action"] == "upgrade-test"
    reverted = _boot(otakit, device)
    assert reverted["images"][0]["action"] == "revert"
    assert reverted["images"][0]["version"] == "1.0.0+0"
    assert _status(otakit, device)["reverted"] is True


def test_rejections_are_recorded(otakit: Otakit, images: Path) -> None:
    device = _create(otakit, images)
    # install refuses an image the device does not trust, before touching the flash
    foreign = otakit("sim", "install", device, images / "foreign.img")
    assert foreign.returncode == 1
    assert "KEY_MISMATCH" in foreign.stderr
    # a downgrade is signed correctly, so it is installed, and the bootloader refuses it
    assert otakit("sim", "install", device, images / "v0.9.0.img", "--permanent").returncode == 0
    booted = _boot(otakit, device)
    assert booted["images"][0]["action"] == "rejected"
    assert booted["images"][0]["error"] == "DOWNGRADE"
    status = _status(otakit, device)
    assert status["last_failure"]["error"] == "DOWNGRADE"
    assert "older" in status["last_failure"]["reason"]
    human = otakit("sim", "status", device)
    assert "last failure" in human.stdout


def _flip(device: Path, slot: str, at: int) -> None:
    """Flip the bits of one byte ``at`` bytes into ``slot`` of the device's flash.bin."""
    fm = FlashMap.load(device / "flashmap.json")
    offset = (fm.primary(0) if slot == "primary" else fm.secondary(0)).offset + at
    with (device / "flash.bin").open("r+b") as flash:
        flash.seek(offset)
        byte = flash.read(1)[0]
        flash.seek(offset)
        flash.write(bytes([byte ^ 0xFF]))


def _row(human: str, image: int = 0) -> list[str]:
    """The cells of ``image``'s row in ``sim status``'s table."""
    for line in human.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == str(image):
            return cells
    raise AssertionError(f"no row for image {image} in:\n{human}")


def test_status_says_when_the_primary_holds_no_valid_image(otakit: Otakit, images: Path) -> None:
    device = _create(otakit, images)
    before = otakit("sim", "status", device)
    assert _row(before.stdout)[1:3] == ["1.0.0+0", "confirmed"]
    _flip(device, "primary", 1000)  # in the payload: the header still says 1.0.0

    slot = _status(otakit, device)["slots"][0]
    assert slot["running"] is None
    assert slot["primary"]["version"] == "1.0.0+0"
    assert slot["primary"]["valid"] is False
    assert "SHA256 does not match" in slot["primary"]["problem"]
    assert slot["problem"] == slot["primary"]["problem"]
    human = otakit("sim", "status", device)
    assert human.returncode == 0, human.stderr
    assert _row(human.stdout)[1:3] == ["none", "no valid image"]
    assert "confirmed" not in human.stdout
    assert (
        "image 0: nothing runs, the primary slot (1.0.0+0) holds no valid image: image SHA256 "
        "does not match its contents" in human.stdout
    )
    # the bootloader agrees: nothing can run
    booted = otakit("sim", "boot", device)
    assert booted.returncode == 1
    assert json.loads(booted.stdout)["images"][0]["version"] is None


def test_status_flags_an_invalid_candidate_that_the_boot_then_erases(
    otakit: Otakit, images: Path
) -> None:
    device = _create(otakit, images)
    assert otakit("sim", "install", device, images / "v1.1.0.img").returncode == 0
    slot = _status(otakit, device)["slots"][0]
    assert (slot["secondary"]["valid"], slot["secondary"]["problem"]) == (True, None)
    _flip(device, "secondary", 1000)

    slot = _status(otakit, device)["slots"][0]
    assert (slot["running"], slot["next_boot"]) == ("1.0.0+0", "test")
    assert slot["secondary"]["valid"] is False
    human = otakit("sim", "status", device).stdout
    assert _row(human)[1:5] == ["1.0.0+0", "confirmed", "test", "1.1.0+0 (invalid)"]
    assert "image 0: the secondary slot's image 1.1.0+0 is not valid: image SHA256" in human
    booted = _boot(otakit, device)
    assert booted["images"][0]["action"] == "rejected"
    assert booted["images"][0]["version"] == "1.0.0+0"
    slot = _status(otakit, device)["slots"][0]
    assert (slot["running"], slot["secondary"]["version"]) == ("1.0.0+0", None)
    # swap-status erases the slot; the request left in its status partition goes at the next
    # boot (the cypress loader finds the header erased and clears the trailer)
    again = _boot(otakit, device)
    assert again["images"][0]["version"] == "1.0.0+0"
    slot = _status(otakit, device)["slots"][0]
    assert (slot["running"], slot["state"], slot["next_boot"]) == ("1.0.0+0", "confirmed", "none")


def test_overwrite_strategy_and_small_layout(otakit: Otakit, images: Path) -> None:
    small = images / "small.bin"
    small.write_bytes(os.urandom(9000))
    for version in ("1.0.0", "1.2.0"):
        otakit(
            "sign",
            "-k",
            images / "key.pem",
            "-v",
            version,
            "--pad-header",
            small,
            images / f"s{version}.img",
        )
    device = images / "small-dev"
    created = otakit(
        "sim", "create", device, "--image", images / "s1.0.0.img", "--key", images / "key.pem",
        "--layout", "sim-small", "--strategy", "overwrite",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    otakit("sim", "install", device, images / "s1.2.0.img")
    assert _boot(otakit, device)["images"][0]["action"] == "upgrade-permanent"
    assert _status(otakit, device)["slots"][0]["running"] == "1.2.0+0"


def test_usage_errors(otakit: Otakit, images: Path, tmp_path: Path) -> None:
    missing = otakit("sim", "status", tmp_path / "nope")
    assert missing.returncode == 2
    assert "otakit: error [DEVICE]" in missing.stderr
    device = _create(otakit, images)
    again = otakit(
        "sim", "create", device, "--image", images / "v1.0.0.img", "--key", images / "key.pem"
    )
    assert again.returncode == 2
    assert "not empty" in again.stderr
    bad_layout = otakit(
        "sim", "create", tmp_path / "d2", "--image", images / "v1.0.0.img", "--key",
        images / "key.pem", "--layout", "nosuch",
    )  # fmt: skip
    assert bad_layout.returncode == 2
    assert "FLASH_MAP" in bad_layout.stderr
    bad_strategy = otakit(
        "sim", "create", tmp_path / "d3", "--image", images / "v1.0.0.img", "--key",
        images / "key.pem", "--strategy", "swap-move",
    )  # fmt: skip
    assert bad_strategy.returncode == 2
    for result in (missing, again, bad_layout, bad_strategy):
        assert "Traceback" not in result.stderr
