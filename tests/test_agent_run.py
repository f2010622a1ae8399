"""``otakit agent run --config``, the Agent thread and the gateway path (protocols.md §7), end to
end against a real otakit server on loopback."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from otakit.device.agent import Agent, Outcome
from otakit.device.config import AgentConfig
from otakit.device.events import Event, Reason, State
from otakit.device.flash import PowerCut
from otakit.device.journal import Journal
from otakit.device.service import AgentService
from otakit.device.storage import SlotStorage
from otakit.device.transports.http import HttpSettings, HttpTransport
from otakit.sim.agent import SIMULATOR, device_token
from otakit.sim.device import SimDevice

from .server_harness import Server

# The fixtures and helpers of the agent's end-to-end tests: importing them runs none of its tests.
from .test_agent import BOARD, Setup, image, server  # noqa: F401 - the module-scoped server

OTAKIT = Path(sys.executable).parent / "otakit"


class Fleet(Setup):
    """A product with its own enrollment token, deployments, devices and agent configs."""

    def config(self, name: str, storage: str, **sections: str) -> Path:
        serial = f"GW-{uuid.uuid4().hex[:8]}"
        text = f"""
[agent]
server = "{self.server.url}"
token = "{self.enroll}"

[identity]
serial = "{serial}"
board = "{BOARD}"
product = "{self.product}"
version = "1.0.0"

[behaviour]
reboot_upon_completion = true
validate_after_reboot = true

[storage]
{storage}
"""
        for section, body in sections.items():
            text += f"\n[{section}]\n{body}\n"
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        return path

    def device_status(self, serial: str) -> dict[str, Any]:
        status: dict[str, Any] = self.admin.get(f"/api/v1/devices/{serial}").json()
        return status


@pytest.fixture
def fleet(server: Server, tmp_path: Path) -> Fleet:  # noqa: F811 - test_agent.server
    return Fleet(server, tmp_path)


def agent_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OTAKIT), "agent", "run", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- the gateway path ----------------------------------------------------------------------------


def test_gateway_power_cut_resume_sha256_program_mcu_report_applied(fleet: Fleet) -> None:
    """§7 end to end: check-in job with SHA-256 and signed URL, download into littlefs, power
    cut, resume, SHA-256 check, the simulated MCU programmed, applied reported."""
    data = image("2.0.0", 120_000)
    deployment = fleet.deploy(data)
    mcu = fleet.device("1.0.0")
    config = AgentConfig.from_toml(
        fleet.config(
            "gw",
            f'kind = "gateway"\npath = "gw-flash.bin"\nfs_size = 1048576\nmcu = "{mcu.dir}"',
        )
    )
    serial = config.identity.serial

    service = AgentService(config, simulator=SIMULATOR)
    storage, _ = service._open_gateway()
    flash = storage.store.flash
    flash.cut_after(40, tear=True, seed=3)  # littlefs writes ~one block per 4 KiB range
    with pytest.raises(PowerCut):
        service.attempt()
    flash.power_on()
    flash.close()  # the gateway lost power: everything it had in memory is gone
    assert fleet.device_status(serial)["status"] == "downloading"

    events: list[Event] = []
    again = AgentService(config, callback=events.append, simulator=SIMULATOR)
    try:
        result = again.attempt()
        assert result.outcome is Outcome.UPDATED, result
        writes = [e for e in events if e.state is State.STORAGE_WRITE]
        assert writes[0].bytes_done is not None
        assert writes[0].bytes_done > 4096
        assert writes[-1].percentage == 100
        assert again.attempt().outcome is Outcome.NO_UPDATE  # the MCU now runs 2.0.0
    finally:
        again.close()

    assert SimDevice(mcu.dir).status()["slots"][0]["running"] == "2.0.0+0"
    with SimDevice(mcu.dir).bootloader() as boot:
        assert boot.primary().read_at(0, len(data)) == data
    status = fleet.device_status(serial)
    assert (status["status"], status["version"]) == ("applied", "2.0.0")
    counts = fleet.admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    assert counts["Applied"] == 1
    twin = fleet.admin.get(f"/api/v1/devices/{serial}/twin").json()
    assert twin["reported"]["extFwInfo"] == {"Status": "applied", "Error": "None", "Version": 2}


def test_gateway_drops_a_download_the_server_aborted(fleet: Fleet) -> None:
    """A rollout aborted while the gateway is mid-download: the next check-in says so and the
    gateway discards the partial file instead of resuming it."""
    data = image("2.5.0", 60_000)
    artifact = fleet.admin.post(
        "/api/v1/artifacts", params={"name": "mcu.img"}, content=data
    ).json()
    body = {
        "deployment": {"artifact_id": artifact["id"], "product": fleet.product, "group": "g"},
        "phases": [{"percent": 100, "manual": True}],  # stays running until approved
    }
    rollout = fleet.admin.post("/api/v1/rollouts", json=body)
    assert rollout.status_code == 201, rollout.text
    mcu = fleet.device("1.0.0")
    config = AgentConfig.from_toml(
        fleet.config(
            "gw-abort",
            f'kind = "gateway"\npath = "gw-abort.bin"\nfs_size = 1048576\nmcu = "{mcu.dir}"',
        )
    )
    service = AgentService(config, simulator=SIMULATOR)
    storage, _ = service._open_gateway()
    storage.store.flash.cut_after(30, tear=True, seed=5)
    with pytest.raises(PowerCut):
        service.attempt()
    storage.store.flash.power_on()
    storage.store.flash.close()
    abort = fleet.admin.post(f"/api/v1/rollouts/{rollout.json()['id']}/abort")
    assert abort.status_code == 200, abort.text

    again = AgentService(config, simulator=SIMULATOR)
    try:
        gateway, transport = again._open_gateway()
        assert gateway.progress() is not None  # the partial download survived the power cut
        assert again.attempt().outcome is Outcome.NO_UPDATE
        assert transport.aborted is not None
        assert gateway.progress() is None  # discarded, not resumed
    finally:
        again.close()
    assert SimDevice(mcu.dir).status()["slots"][0]["running"] == "1.0.0+0"


def test_gateway_cli_with_a_programmer_command(fleet: Fleet) -> None:
    """`otakit agent run --once` on a gateway whose MCU is programmed by an external command;
    the installed version survives restarts, so the next run has nothing to do."""
    data = image("3.0.0", 50_000)
    fleet.deploy(data)
    out = fleet.tmp / "programmed.bin"
    copy = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"
    config = fleet.config(
        "gw-cmd",
        f'kind = "gateway"\npath = "flash.bin"\nfs_size = 524288\n'
        f'program = ["{sys.executable}", "-c", "{copy}", "{{file}}", "{out}"]',
        logging='level = "warning"\nfacilities = { http = "info" }',
    )
    first = agent_run(config)
    assert first.returncode == 0, first.stderr
    assert "updated to 3.0.0" in first.stderr
    assert out.read_bytes() == data
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    # per-facility levels: http at info is shown, storage (at the global warning) is not
    assert "otakit.http: downloading /dl/" in first.stderr
    assert "otakit.storage" not in first.stderr
    # no secret in the log: neither token nor URL signature
    assert fleet.enroll not in first.stderr
    assert "sig=" not in first.stderr
    assert "?" not in first.stderr.split("downloading")[1][:80]

    second = agent_run(config)
    assert second.returncode == 0, second.stderr
    assert "no update" in second.stderr


def test_gateway_programmer_failure_is_reported(fleet: Fleet) -> None:
    fleet.deploy(image("4.0.0", 20_000))
    config = fleet.config(
        "gw-fail",
        f'kind = "gateway"\npath = "flash.bin"\nfs_size = 262144\n'
        f'program = ["{sys.executable}", "-c", "import sys; sys.exit(\'probe not found\')"]',
    )
    done = agent_run(config)
    assert done.returncode == 1
    assert "probe not found" in done.stderr
    serial = AgentConfig.from_toml(config).identity.serial
    status = fleet.device_status(serial)
    assert (status["status"], status["error"]) == ("error", "MCU Download fail")


# --- a simulated device through `otakit agent run` -------------------------------------------------


def test_agent_run_updates_reboots_and_confirms_a_sim_device(fleet: Fleet) -> None:
    fleet.deploy(image("1.1.0"))
    device = fleet.device()
    config = fleet.config(
        "dev",
        f'kind = "sim-device"\npath = "{device.dir}"',
        timing="chunk_size = 8192",
    )
    text = config.read_text().replace(
        'serial = "GW-', f'serial = "{device.state.identity.serial}"\n# was "GW-'
    )
    config.write_text(text)
    done = agent_run(config)
    assert done.returncode == 0, done.stderr
    assert "updated to 1.1.0" in done.stderr
    assert "running 1.1.0+0, confirmed" in done.stderr
    status = SimDevice(device.dir).status()["slots"][0]
    assert status["running"] == "1.1.0+0"
    assert fleet.device_status(device.state.identity.serial)["status"] == "applied"


def test_agent_run_refuses_a_config_without_storage(tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text(
        '[agent]\nserver = "http://127.0.0.1:9"\n'
        '[identity]\nserial = "S"\nboard = "B"\nversion = "1.0.0"\n'
    )
    done = agent_run(config)
    assert done.returncode == 2
    assert done.stderr.startswith("otakit: error [CONFIG]: the configuration has no [storage]")
    assert "Traceback" not in done.stderr


# --- the Agent thread --------------------------------------------------------------------------


def test_agent_thread_check_now_reboot_and_stop(fleet: Fleet) -> None:
    fleet.deploy(image("1.2.0"))
    device = fleet.device()
    token = device_token(device, HttpSettings(server=fleet.server.url, token=fleet.enroll), "1.0.0")
    assert token is not None
    assert token != fleet.enroll
    config = AgentConfig.from_dict(
        {
            "agent": {"server": fleet.server.url, "token": token},
            "identity": {"serial": "x", "board": BOARD, "version": "1.0.0"},
            "timing": {"initial_check": 3600, "next_check": 3600},
            "behaviour": {"reboot_upon_completion": True, "validate_after_reboot": True},
        }
    )
    finished = threading.Event()
    states: list[State] = []
    reboots: list[bool] = []

    def callback(event: Event) -> None:
        states.append(event.state)
        if event.state is State.OTA_COMPLETE or event.reason is Reason.FAILURE:
            finished.set()

    with device.bootloader() as boot:
        storage = SlotStorage(
            boot, Journal(device.dir / "j.json"), device.keys, current_version="1.0.0"
        )
        transport = HttpTransport(HttpSettings(server=fleet.server.url, token=token), board=BOARD)
        agent = Agent.from_config(
            config, transport, storage, callback=callback, reboot=lambda: reboots.append(True)
        )
        agent.start()
        assert agent.running
        assert not finished.is_set()
        assert states == []
        agent.check_now()
        assert finished.wait(60), states
        agent.stop()
        assert not agent.running
    assert agent.last is not None
    assert agent.last.outcome is Outcome.UPDATED, agent.last
    assert reboots == [True]
    assert SimDevice(device.dir).boot().to_dict()["images"][0]["action"] == "upgrade-test"


def test_poll_follows_the_timing_knobs() -> None:
    """initial_check first; after a failure `retries` retries retry_interval apart, then
    next_check; a success resets the count."""
    from otakit.device.agent import Result, poll
    from otakit.device.config import Timing

    class Waits(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[float] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.seen.append(float(timeout or 0))
            return False

    outcomes = [Outcome.FAILED] * 4 + [Outcome.NO_UPDATE, Outcome.FAILED, Outcome.NO_UPDATE]
    stop, waits = threading.Event(), Waits()

    def attempt() -> Result:
        outcome = outcomes.pop(0)
        if not outcomes:
            stop.set()
        return Result(outcome)

    timing = Timing(
        initial_check=10,
        next_check=1000,
        retry_interval=7,
        retries=2,
        retry_backoff=1,  # the original's constant interval (the backoff: test_agent_retry.py)
        retry_jitter=0,
    )
    last = poll(attempt, timing=timing, stop=stop, wake=waits)
    assert last is not None
    assert last.outcome is Outcome.NO_UPDATE
    assert waits.seen == [10, 7, 7, 1000, 7, 1000, 7]
