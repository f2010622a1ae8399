"""``otakit demo``: the end-to-end demo a newcomer runs first, through the real command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .server_harness import IN_CI

OTAKIT = Path(sys.executable).parent / "otakit"


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OTAKIT), "demo", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={"PATH": "/usr/bin:/bin:/usr/sbin", "COLUMNS": "120", "NO_COLOR": "1"},
    )


def test_demo_updates_the_fleet_and_one_device_reverts() -> None:
    done = demo("-n", "8")
    assert done.returncode == 0, done.stderr
    out = done.stderr
    assert "otakit demo: 8 simulated devices" in out
    assert "dashboard http://127.0.0.1:" in out
    assert out.count("updated, confirmed") == 7
    assert out.count("reverted (never confirmed)") == 1
    assert "rollout 1: completed; Applied 7, Reverted 1" in out
    work = out.split("working in ")[1].split()[0]
    assert not Path(work).exists()  # cleaned up without --keep


def test_demo_over_mqtt() -> None:
    if shutil.which("mosquitto", path="/usr/sbin:/usr/bin") is None:
        if IN_CI:
            pytest.fail("mosquitto is not installed (make test installs it)")
        pytest.skip("mosquitto is not installed")
    done = demo("-n", "4", "--mqtt")
    assert done.returncode == 0, done.stderr
    assert "devices take their updates over MQTT" in done.stderr
    assert done.stderr.count("updated, confirmed") == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-n", "1"), "--devices 1 is not from 2 to 500"),
        (("-n", "many"), "--devices 'many' is not an integer"),
    ],
)
def test_bad_arguments_are_one_line_errors(args: tuple[str, ...], message: str) -> None:
    done = demo(*args)
    assert done.returncode == 2
    assert done.stderr.startswith("otakit: error [BADARG]: ")
    assert message in done.stderr
    assert "Traceback" not in done.stderr
