"""The fleet simulator against a real otakit server on loopback (SQLite): hundreds of devices
enroll, download, verify, reboot, confirm, and the server counts them; faults converge; broken
devices revert and say so; devices that keep failing back off and give up; the command's
report; seeded faults.

Nothing sleeps to synchronise: a fleet run ends when every device has settled (or when no
device made progress for its timeout); devices poll every few milliseconds here. On a loaded
machine a request may time out and be tried again: the tests assert on what the report counts
as failed (devices that did not settle, and their failed attempts), never on the transient
failures the devices recovered from.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otakit.device.bootloader import Strategy
from otakit.device.core.retry import RetryPolicy
from otakit.device.flash import Flash, PowerCut
from otakit.errors import UsageError
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.sim.fleet import (
    Fleet,
    FleetConfig,
    FleetReport,
    MqttBroker,
    SectorPool,
    SharedBacking,
    fault_profiles,
)

from .server_harness import Server, start_server

KEY = SigningKey.generate("ecdsa-p256")
BOARD = "BOARD_F"
IMAGE_SIZE = 60_000  # payload bytes: small images keep a run of 150 devices to a few seconds


def image(version: str, size: int = IMAGE_SIZE) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("fleet-server"))
    admin = srv.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield srv
    srv.stop()


class Product:
    """A product of its own with an enrollment token, and what is deployed to it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.admin = server.admin_client()
        self.name = f"fleet-{uuid.uuid4().hex[:8]}"
        response = self.admin.put(f"/api/v1/products/{self.name}", json={"board": BOARD})
        assert response.status_code == 200, response.text
        self.enroll = server.token("enroll", "--product", self.name, "--group", "g")
        self.images: dict[str, bytes] = {}

    def deploy(self, version: str) -> int:
        data = self.images[version] = image(version)
        artifact = self.admin.post(
            "/api/v1/artifacts", params={"name": "app.img"}, content=data
        ).json()
        body = {"artifact_id": artifact["id"], "product": self.name, "group": "g"}
        response = self.admin.post("/api/v1/deployments", json=body)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def counts(self, deployment: int) -> dict[str, int]:
        counts: dict[str, int] = self.admin.get(f"/api/v1/deployments/{deployment}").json()[
            "counts"
        ]
        return counts

    def config(self, devices: int, **extra: Any) -> FleetConfig:
        settings: dict[str, Any] = {
            "server": self.server.url,
            "token": self.enroll,
            "product": self.name,
            "group": "g",
            "board": BOARD,
            "devices": devices,
            "keys": (KEY.public_key,),
            "poll": 0.02,
            "timeout": 60,
            "serial_prefix": self.name,
            **extra,
        }
        return FleetConfig(**settings)


@pytest.fixture
def product(server: Server) -> Product:
    return Product(server)


def run(fleet: Fleet) -> FleetReport:
    return asyncio.run(fleet.run())


def primary(fleet: Fleet, index: int, size: int) -> bytes:
    flash = fleet.devices[index].flash
    return flash.read(fleet.map.primary(0).offset, size)


# --- updates ------------------------------------------------------------------------------------


def test_150_devices_update_and_the_server_counts_them_applied(product: Product) -> None:
    deployment = product.deploy("1.1.0")
    events: list[dict[str, Any]] = []
    fleet = Fleet(product.config(150), on_event=events.append)
    report = run(fleet)
    assert (report.settled, report.updated, report.reverted) == (150, 150, 0), report
    assert report.failed == {}
    assert report.errors == {}
    assert report.gave_up == 0
    assert report.versions == {"1.1.0": 150}
    assert not report.timed_out
    assert product.counts(deployment)["Applied"] == 150
    # every device enrolled, got its own token and runs the deployed image byte for byte
    assert len({d.token for d in fleet.devices}) == 150
    data = product.images["1.1.0"]
    assert all(primary(fleet, i, len(data)) == data for i in (0, 77, 149))
    # one check-in to get the job, one to say what runs; two status reports; ranges. A request
    # that timed out on a loaded machine and was made good later adds to these, no more.
    asked = (report.requests["checkin"], report.requests["status"])
    if not report.recovered and report.retried == 0:
        assert asked == (300, 300), report.requests
    else:
        assert min(asked) >= 300, report.requests
    assert report.bytes_downloaded >= 150 * len(data)
    assert report.update_seconds["p50"] is not None
    # all devices hold the same sectors: the fleet keeps each distinct one once
    assert report.shared_sector_bytes < 4 * fleet.map.primary(0).size
    kinds = {e["event"] for e in events}
    assert {"enrolled", "job", "pending", "booted", "updated", "settled"} <= kinds
    serial = fleet.devices[3].serial
    status = product.admin.get(f"/api/v1/devices/{serial}").json()
    assert (status["status"], status["version"]) == ("applied", "1.1.0")


def test_drops_and_power_cuts_resume_and_converge(product: Product) -> None:
    deployment = product.deploy("1.1.0")
    config = product.config(
        60, drop_rate=0.15, power_cut_rate=0.4, chunk_size=8192, seed=7, strategy=Strategy.OVERWRITE
    )
    events: list[dict[str, Any]] = []
    fleet = Fleet(config, on_event=events.append)
    report = run(fleet)
    assert (report.settled, report.updated) == (60, 60), report
    assert report.errors == {}
    assert report.failed == {}
    assert report.drops > 0, report
    assert report.retried > 0, report  # dropped ranges asked again within the attempt
    assert report.power_cuts > 0, report
    assert report.resumes > 0, report
    resumed = [e for e in events if e["event"] == "resume"]
    assert all(e["offset"] > 0 for e in resumed)
    assert product.counts(deployment)["Applied"] == 60
    # torn writes and resumed downloads leave every image byte-exact
    data = product.images["1.1.0"]
    assert all(primary(fleet, i, len(data)) == data for i in range(60))


def test_broken_devices_revert_and_report_it(product: Product) -> None:
    deployment = product.deploy("1.1.0")
    fleet = Fleet(product.config(40, broken=0.25))
    assert fleet.strategy is Strategy.SWAP_SCRATCH  # going back needs a swap
    report = run(fleet)
    assert (report.settled, report.updated, report.reverted) == (40, 30, 10), report
    assert report.errors == {}
    assert report.failed == {}
    assert report.versions == {"1.0.0": 10, "1.1.0": 30}
    counts = product.counts(deployment)
    assert counts["Applied"] == 30
    assert counts.get("Reverted", 0) + counts["Error"] == 10
    broken = next(d for d in fleet.devices if d.profile.broken)
    status = product.admin.get(f"/api/v1/devices/{broken.serial}").json()
    assert status["status"] == "error"
    assert "reverted" in status["error"]
    assert status["version"] == "1.0.0"


@pytest.mark.parametrize(
    "strategy",
    [Strategy.SWAP_SCRATCH, Strategy.SWAP_MOVE, Strategy.SWAP_OFFSET, Strategy.SWAP_STATUS],
)
def test_every_swap_mode_updates_and_reverts_broken_devices(
    product: Product, strategy: Strategy
) -> None:
    """The fleet's flash map is laid out for each MCUboot mode (swap-status: PSoC 6 rows erased
    to 0x00 with a status partition); downloads with power cuts converge, broken devices go
    back."""
    deployment = product.deploy("1.1.0")
    config = product.config(
        12, broken=0.25, power_cut_rate=0.3, chunk_size=8192, seed=5, strategy=strategy
    )
    fleet = Fleet(config)
    assert fleet.map.strategy is strategy
    if strategy is Strategy.SWAP_STATUS:
        assert (fleet.map.sector_size, fleet.map.erased_value) == (0x200, 0x00)
        assert fleet.map.status(0) is not None
    report = run(fleet)
    assert (report.settled, report.updated, report.reverted) == (12, 9, 3), report
    assert report.errors == {}
    assert report.failed == {}
    assert report.strategy == strategy.value
    assert report.power_cuts > 0, report
    assert report.versions == {"1.0.0": 3, "1.1.0": 9}
    assert product.counts(deployment)["Applied"] == 9
    data = product.images["1.1.0"]
    updated = [i for i, d in enumerate(fleet.devices) if not d.profile.broken]
    assert all(primary(fleet, i, len(data)) == data for i in updated)


def test_until_updated_waits_for_a_version_nobody_offers_then_times_out(product: Product) -> None:
    product.deploy("1.1.0")
    report = run(Fleet(product.config(5, until_updated="1.2.0", timeout=1.5)))
    assert report.timed_out
    assert report.updated == 5
    assert report.settled == 0
    assert report.failed == {"TIMEOUT": 5}
    assert report.errors == {}


def test_an_unknown_enrollment_token_is_an_error_per_device(product: Product) -> None:
    product.deploy("1.1.0")
    report = run(Fleet(product.config(3, token="otk_not-a-token", timeout=0.5)))
    assert report.timed_out
    assert report.updated == 0
    assert set(report.errors) == {"GET_JOB"}
    assert report.failed == {"GET_JOB": 3}
    assert report.recovered == {}


def test_devices_back_off_and_give_up_on_an_artifact_that_keeps_failing(
    product: Product,
) -> None:
    """An image the devices do not trust fails verification at every attempt: each device
    waits longer after each failure, reports each attempt once, and gives up after
    ``give_up_after`` attempts; the report counts them as failed, nothing as recovered."""
    deployment = product.deploy("1.1.0")
    stranger = SigningKey.generate("ecdsa-p256")
    retry = RetryPolicy(first=0.01, factor=2.0, cap=0.1, jitter=0.0, give_up_after=3)
    events: list[dict[str, Any]] = []
    config = product.config(4, keys=(stranger.public_key,), retry=retry)
    report = run(Fleet(config, on_event=events.append))
    assert not report.timed_out
    assert (report.settled, report.updated, report.gave_up) == (4, 0, 4), report
    assert len(report.failed) == 1, report
    (code,) = report.failed
    assert report.failed == {code: 4}
    assert report.errors == {code: 12}  # three attempts each, then no more
    assert report.recovered == {}
    assert report.versions == {"1.0.0": 4}
    gave_up = [e for e in events if e["event"] == "gave-up"]
    assert sorted(e["failures"] for e in gave_up) == [3, 3, 3, 3]
    # downloading, then the error, once per attempt
    assert report.requests["status"] == 4 * 3 * 2
    assert product.counts(deployment)["Error"] == 4


def test_the_report_tells_recovered_failures_from_failed_devices() -> None:
    """A failed attempt of a device that settled afterwards is "recovered"; the failed
    attempts of a device that did not settle, or gave up, are "errors", and the device is
    "failed" by its last error."""
    config = FleetConfig(server="http://127.0.0.1:1", token="t", product="p", devices=4)
    fleet = Fleet(config)
    recovered, stuck, gave_up, clean = fleet.devices
    fleet._fail(recovered, "GET_DATA", "timed out", "download")
    recovered.settled = True
    fleet._fail(stuck, "GET_DATA", "timed out", "download")
    fleet._fail(stuck, "GET_JOB", "refused", "checkin")
    fleet._fail(gave_up, "HASH_MISMATCH", "bad", "verify")
    gave_up.settled = gave_up.gave_up = True
    clean.settled = True
    clean.retried = 2
    report = fleet.report()
    assert report.recovered == {"GET_DATA": 1}
    assert report.errors == {"GET_DATA": 1, "GET_JOB": 1, "HASH_MISMATCH": 1}
    assert report.failed == {"GET_JOB": 1, "HASH_MISMATCH": 1}
    assert (report.settled, report.gave_up, report.retried) == (3, 1, 2)


# --- the flash model of the fleet ---------------------------------------------------------------


def test_shared_sectors_behave_as_the_flash_model() -> None:
    """A flash on the fleet's shared sectors gives the same contents and operation counts as
    the model's own memory flash, for random writes (over data too), erases and a torn cut."""
    rng = random.Random(3)
    sector, size = 4096, 16 * 4096
    model = Flash(size, sector)
    fleet = Flash(size, sector, backing=SharedBacking(SectorPool(), sector, b"\xff" * sector))
    for step in range(300):
        if step == 250:
            for flash in (model, fleet):
                flash.cut_after(3, tear=True, seed=5)
        erase = rng.random() < 0.2
        if erase:
            offset, data = rng.randrange(16) * sector, b""
        else:
            offset = rng.randrange(size // 8) * 8
            data = rng.randbytes(min(size - offset, rng.randrange(1, 1200) * 8))
        outcomes: list[str] = []
        for flash in (model, fleet):
            try:
                if erase:
                    flash.erase(offset, sector)
                else:
                    flash.write(offset, data)
                outcomes.append("ok")
            except PowerCut:
                flash.power_on()
                outcomes.append("cut")
        assert outcomes[0] == outcomes[1]
        assert model.operations == fleet.operations
    assert model.read(0, size) == fleet.read(0, size)


# --- seeds and configuration --------------------------------------------------------------------


def test_fault_assignment_is_seeded() -> None:
    def broken(seed: int) -> list[int]:
        config = FleetConfig(
            server="http://127.0.0.1:1", token="t", product="p", devices=200, broken=0.1, seed=seed
        )
        return [i for i, p in enumerate(fault_profiles(config)) if p.broken]

    assert broken(1) == broken(1)
    assert len(broken(1)) == 20
    assert broken(1) != broken(2)
    config = FleetConfig(server="http://127.0.0.1:1", token="t", product="p", devices=3, seed=9)
    draws = [[d.rng.random() for _ in range(5)] for d in Fleet(config).devices]
    again = [[d.rng.random() for _ in range(5)] for d in Fleet(config).devices]
    assert draws == again
    assert draws[0] != draws[1]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"drop_rate": 1.0}, "--drop-rate"),
        ({"broken": 0.2, "strategy": Strategy.OVERWRITE}, "swap-scratch"),
        ({"server": "ftp://x"}, "--server"),
        ({"chunk_size": 100}, "--chunk-size"),
        ({"version": "1.x"}, "1.x"),
    ],
)
def test_impossible_configurations_are_refused(changes: dict[str, Any], words: str) -> None:
    base: dict[str, Any] = {"server": "http://127.0.0.1:1", "token": "t", "product": "p"}
    with pytest.raises(UsageError, match=words.replace(".", r"\.")) as raised:
        Fleet(FleetConfig(**{**base, **changes}))
    assert raised.value.exit_status == 2 or raised.value.code == "BAD_VERSION"


# --- the command --------------------------------------------------------------------------------

# `otakit sim fleet` as it will be registered: the command added to the sim app, run by main()
WRAPPER = (
    "import sys; import otakit.sim.cli as sim; from otakit.sim.fleet_cli import fleet; "
    "sim.app.command('fleet')(fleet); from otakit.cli import main; "
    "sys.exit(main(['sim', 'fleet', *sys.argv[1:]]))"
)


def otakit_fleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        check=False,
    )


def test_command_report_and_events(product: Product, tmp_path: Path) -> None:
    deployment = product.deploy("1.1.0")
    key = tmp_path / "key.pem"
    key.write_bytes(KEY.public_key.pem())
    events = tmp_path / "events.jsonl"
    done = otakit_fleet(
        "--devices", "20", "--server", product.server.url, "--token", product.enroll,
        "--product", product.name, "--group", "g", "--board", BOARD, "-k", key,
        "--poll", "0.02", "--jitter", "0.5", "--drop-rate", "0.1", "--chunk-size", "16K",
        "--until-updated", "1.1.0", "--events", events, "--seed", "3", "--timeout", "60",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = {
        "devices", "settled", "updated", "reverted", "failed", "errors", "recovered",
        "retried", "gave_up", "resumes", "drops", "power_cuts", "bytes_downloaded", "requests",
        "wall_time_s", "update_seconds",
        "versions", "timed_out", "strategy", "shared_sectors", "shared_sector_bytes", "settings",
    }  # fmt: skip
    assert set(report) == expected
    assert (report["devices"], report["settled"], report["updated"]) == (20, 20, 20)
    assert report["failed"] == {}
    assert report["errors"] == {}
    assert report["retried"] > 0  # the dropped ranges
    assert set(report["update_seconds"]) == {"p50", "p99", "max"}
    assert report["settings"]["seed"] == 3
    assert report["settings"]["until_updated"] == "1.1.0"
    assert product.enroll not in done.stdout + done.stderr  # tokens are never printed
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert {"t", "device", "event"} <= set(lines[0])
    assert sum(e["event"] == "updated" for e in lines) == 20
    assert sum(e["event"] == "drop" for e in lines) == report["drops"]
    assert "fleet: 20 devices" in done.stderr
    assert "20/20 settled" in done.stderr
    assert product.counts(deployment)["Applied"] == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "ten"], "--devices 'ten' is not a whole number"),
        (["--devices", "0"], "--devices 0 is not from 1 to 1e+06"),
        (["--drop-rate", "1"], "--drop-rate 1 is not from 0 to 0.99"),
        (["--range-tries", "0"], "--range-tries 0 is not from 1 to 100"),
        (["--give-up-after", "-1"], "--give-up-after -1 is not from 0 to 1000"),
        (["--poll", "soon"], "--poll 'soon' is not a number"),
        (["--jitter", "nan"], "--jitter nan is not from 0 to 1"),
        (["--chunk-size", "64Q"], "--chunk-size '64Q' is not a size in bytes"),
        (
            ["--strategy", "swap-using-move"],
            "--strategy 'swap-using-move' is not one of overwrite, swap-scratch, swap-move, "
            "swap-offset, swap-status",
        ),
        (
            ["--strategy", "swap-status", "--slot-size", "4M"],
            "--strategy swap-status with --slot-size 4194304: ",
        ),
        (["--mqtt", "broker:0"], "--mqtt must be HOST or HOST:PORT"),
        (["--server", "localhost:8080"], "is not an http(s) URL"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    base = {"--devices": "5", "--server": "http://127.0.0.1:9", "--product": "p"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    done = otakit_fleet(*(item for pair in base.items() for item in pair))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("otakit: error [BADARG]: "), done.stderr
    assert message in lines[0]


# --- MQTT ---------------------------------------------------------------------------------------


def test_small_fleet_over_mqtt_with_drops_and_a_broken_device(product: Product) -> None:
    """Devices enroll with the server, then ask ``otakit publisher`` (serving the server's
    deployments) for the job and the image over one MQTT connection; the server counts them."""
    from .test_publisher import command, fresh_company, own_broker

    deployment = product.deploy("1.1.0")
    company = fresh_company()
    with own_broker() as broker:
        args = ("--data", product.server.data, "-c", company, "--port", str(broker.port))
        with command(*args):
            mqtt = MqttBroker("127.0.0.1", broker.port, company=company, chunk_timeout=1.0)
            config = product.config(12, mqtt=mqtt, drop_rate=0.05, broken=1 / 12, seed=4)
            report = run(Fleet(config))
    assert (report.settled, report.updated, report.reverted) == (12, 11, 1), report
    assert report.errors == {}
    assert report.failed == {}
    assert report.drops > 0
    assert report.retried > 0  # the dropped chunks, asked for again
    counts = product.counts(deployment)
    assert counts["Applied"] == 11
    assert counts.get("Reverted", 0) + counts["Error"] == 1
