"""``otakit sim``: a device folder driven through the real entry point."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

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


def _boot(otakit: Otakit, device: Path, *args: str) -> dict:
    result = otakit("sim", "boot", device, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _status(otakit: Otakit, device: Path) -> dict:
    result = otakit("sim", "status", device, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
