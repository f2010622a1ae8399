"""The gateway model (§7): littlefs on the flash model, resumable downloads, the external MCU."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from otakit.device.agent import Outcome
from otakit.device.config import AgentConfig
from otakit.device.flash import Flash, PowerCut
from otakit.device.gateway import (
    CommandProgrammer,
    ExternalProgrammer,
    GatewayStorage,
    LittleFsStore,
    PackageImage,
)
from otakit.device.journal import Download
from otakit.device.service import AgentService
from otakit.errors import (
    DowngradeError,
    FileOperationError,
    HashMismatchError,
    ImageTooLargeError,
    KeyMismatchError,
    McuProgramError,
    PackageError,
    UsageError,
)
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.package import build_package
from otakit.image.sign import SignOptions, sign_image
from otakit.image.tlv import Dependency
from otakit.protocol.fwinfo import ERRORS, STATES
from otakit.protocol.version import FirmwareVersion
from otakit.sim.agent import SIMULATOR
from otakit.sim.device import SimDevice
from otakit.sim.programmer import SimMcuProgrammer

from .server_harness import BIN, Server, start_server
from .test_device_package import manifest, tar


def fixed_key(seed: int) -> SigningKey:
    """An Ed25519 key from a fixed seed: images (and their signatures) are the same every run."""
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


KEY = fixed_key(1)
SECTOR = 4096
SECTORS = 64
FILE = "/firmware.bin"
PROGRESS = "/progress.json"


def signed(version: str, size: int = 12000, *, key: SigningKey = KEY) -> bytes:
    payload = random.Random(f"{version}/{size}").randbytes(size)
    return sign_image(payload, key, SignOptions(ImageVersion.parse(version), pad_header=True))


V1, V2, V3 = signed("1.0.0"), signed("2.0.0"), signed("3.0.0")


def new_flash() -> Flash:
    return Flash(SECTORS * SECTOR, SECTOR)


def job(image: bytes, version: str, *, sha256: str | None = None) -> Download:
    """What the desired ``extFwInfo`` gives: version, size, URL (signed, changes) and SHA-256."""
    digest = sha256 or hashlib.sha256(image).hexdigest().upper()
    return Download(f"https://blob/fw.bin?sig={version}", len(image), version, sha256=digest)


@dataclass
class RecordingProgrammer:
    programmed: list[tuple[bytes, str]] = field(default_factory=list)

    def program(self, data: bytes, version: str) -> None:
        self.programmed.append((data, version))


@dataclass
class Transfer:
    """What a transport does: from ``open()``'s answer, append chunks and commit each."""

    storage: GatewayStorage
    download: Download
    image: bytes
    chunk: int = 1000
    written: int = 0  # bytes handed to write()
    committed: int = 0  # end of the last commit() that returned

    def run(self) -> int:
        start = self.storage.open(self.download)
        self.written = self.committed = start
        for offset in range(start, len(self.image), self.chunk):
            data = self.image[offset : offset + self.chunk]
            self.storage.write(offset, data)
            self.written = offset + len(data)
            self.storage.commit(self.written)
            self.committed = self.written
        return start


def gateway(
    store: LittleFsStore, programmer: ExternalProgrammer, current: str = "1"
) -> GatewayStorage:
    return GatewayStorage(store, current_version=current, programmer=programmer)


@pytest.fixture
def mcu(tmp_path: Path) -> Path:
    SimDevice.create(tmp_path / "mcu", V1, [KEY.public_key], layout="sim-small")
    return tmp_path / "mcu"


# --- the happy path ----------------------------------------------------------------------------


def test_fresh_download_is_verified_and_programmed_into_the_mcu(mcu: Path) -> None:
    flash = new_flash()
    store = LittleFsStore(flash)
    assert store.formatted
    programmer = SimMcuProgrammer(mcu)
    assert programmer.running() == FirmwareVersion(1)
    storage = gateway(store, programmer)
    assert storage.status().to_dict() == {"Status": "applied", "Error": "None", "Version": "1"}

    transfer = Transfer(storage, job(V2, "2"), V2)
    storage.open(transfer.download)
    record = json.loads(store.read(PROGRESS))
    assert record["Downloading"] == "2"
    assert record["sha256"] == transfer.download.sha256
    assert storage.status().to_dict() == {"Status": "downloading", "Error": "None"}
    assert transfer.run() == 0
    assert store.read(FILE) == V2

    assert storage.verify() == "2"
    assert json.loads(store.read(PROGRESS))["Completed"] == "2"
    storage.set_pending(permanent=True)

    assert programmer.running() == FirmwareVersion(2)
    assert SimDevice(mcu).status()["slots"][0]["state"] == "confirmed"
    assert storage.status().to_dict() == {"Status": "applied", "Error": "None", "Version": "2"}
    assert store.size(FILE) is None
    assert store.size(PROGRESS) is None
    assert storage.progress() is None
    with pytest.raises(DowngradeError):  # versions only go up: 2 is now the running one
        storage.open(job(V2, "2"))


def test_a_store_hit_by_a_power_cut_stays_dead() -> None:
    flash = new_flash()
    store = LittleFsStore(flash)
    flash.cut_after(0)
    with pytest.raises(PowerCut):
        store.write_file("/a", b"x" * 5000)
    flash.power_on()
    with pytest.raises(PowerCut):  # mount a new store instead
        store.size("/a")
    assert LittleFsStore(flash).size("/a") is None


def test_store_mounts_what_it_formatted() -> None:
    flash = new_flash()
    LittleFsStore(flash).write_file("/a", b"kept")
    again = LittleFsStore(flash)
    assert not again.formatted
    assert again.read("/a") == b"kept"


def test_file_backed_flash_resumes_across_reboots(tmp_path: Path) -> None:
    path = tmp_path / "gateway-flash.bin"
    download = job(V2, "2")
    flash = Flash.open_file(path, SECTORS * SECTOR, SECTOR)
    storage = gateway(LittleFsStore(flash), RecordingProgrammer())
    storage.open(download)
    storage.write(0, V2[:5000])
    storage.commit(5000)
    flash.close()  # the gateway reboots

    flash = Flash.open_file(path, SECTORS * SECTOR, SECTOR)
    programmer = RecordingProgrammer()
    storage = gateway(LittleFsStore(flash), programmer)
    assert storage.status().to_dict() == {"Status": "interrupted", "Error": "None"}
    progress = storage.progress()
    assert progress is not None
    assert progress.durable == 5000
    assert Transfer(storage, download, V2).run() == 5000
    storage.set_pending(permanent=True)  # verifies first
    assert programmer.programmed == [(V2, "2")]
    flash.close()


# --- power cuts --------------------------------------------------------------------------------


def _operations(action: Callable[[Flash], None]) -> int:
    flash = new_flash()
    before = flash.operations
    action(flash)
    return flash.operations - before


def test_power_cut_at_every_operation_of_the_transfer_resumes_intact() -> None:
    download = job(V3, "3")

    def prepared() -> tuple[Flash, Transfer]:
        flash = new_flash()
        storage = gateway(LittleFsStore(flash), RecordingProgrammer())
        storage.open(download)
        return flash, Transfer(storage, download, V3, chunk=777)

    flash, transfer = prepared()
    before = flash.operations
    transfer.run()
    total = flash.operations - before
    assert total > 30

    recovered = 0
    for cut in range(total):
        flash, transfer = prepared()
        flash.cut_after(cut, tear=True, seed=cut)
        with pytest.raises(PowerCut):
            transfer.run()
        flash.power_on()

        programmer = RecordingProgrammer()
        store = LittleFsStore(flash)
        assert not store.formatted
        storage = gateway(store, programmer)
        durable = storage.open(download)
        assert transfer.committed <= durable <= transfer.written, cut
        assert store.read(FILE) == V3[:durable], cut
        assert Transfer(storage, download, V3, chunk=777).run() == durable
        assert storage.verify() == "3"
        storage.set_pending(permanent=True)
        assert programmer.programmed == [(V3, "3")]
        recovered += 1
    assert recovered == total


def test_power_cut_anywhere_from_first_use_to_programming_recovers() -> None:
    """Formatting, the progress records, the transfer, verification and clean-up: wherever
    the power goes, the next boot finishes the job and the MCU gets exactly the image."""
    download = job(V2, "2")

    def flow(flash: Flash, programmer: RecordingProgrammer) -> None:
        storage = gateway(LittleFsStore(flash), programmer)
        Transfer(storage, download, V2, chunk=1500).run()
        storage.verify()
        storage.set_pending(permanent=True)

    total = _operations(lambda flash: flow(flash, RecordingProgrammer()))
    recovered = 0
    for cut in range(total):
        flash = new_flash()
        first = RecordingProgrammer()
        flash.cut_after(cut, tear=True, seed=cut)
        with pytest.raises(PowerCut):
            flow(flash, first)
        flash.power_on()
        if first.programmed:  # cut while cleaning up: the MCU runs 2 already
            assert first.programmed == [(V2, "2")]
            storage = gateway(LittleFsStore(flash), RecordingProgrammer(), current="2")
            with pytest.raises(DowngradeError):
                storage.open(download)
            storage.abort()
        else:
            second = RecordingProgrammer()
            flow(flash, second)
            assert second.programmed == [(V2, "2")], cut
        recovered += 1
    assert recovered == total > 50


# --- refusals and failures ---------------------------------------------------------------------


def test_sha256_mismatch_deletes_the_file_and_reports_it() -> None:
    store = LittleFsStore(new_flash())
    programmer = RecordingProgrammer()
    storage = gateway(store, programmer)
    wrong = hashlib.sha256(b"something else").hexdigest().upper()
    Transfer(storage, job(V2, "2", sha256=wrong), V2).run()
    with pytest.raises(HashMismatchError) as failure:
        storage.verify()
    assert failure.value.value == hashlib.sha256(V2).hexdigest().upper()
    assert store.size(FILE) is None
    assert store.size(PROGRESS) is None
    assert storage.status().to_dict() == {"Status": "error", "Error": "SHA256 verify fail"}
    assert programmer.programmed == []


def test_corrupted_file_fails_verification() -> None:
    store = LittleFsStore(new_flash())
    storage = gateway(store, RecordingProgrammer())
    download = job(V2, "2")
    tampered = bytearray(V2)
    tampered[100] ^= 1
    Transfer(storage, download, bytes(tampered)).run()
    with pytest.raises(HashMismatchError):
        storage.set_pending(permanent=True)  # verification is not optional
    assert store.size(FILE) is None


@pytest.mark.parametrize("version", ["2", "1", "1.9.9"])
def test_same_or_older_version_is_refused_and_nothing_is_touched(version: str) -> None:
    store = LittleFsStore(new_flash())
    storage = gateway(store, RecordingProgrammer(), current="2")
    storage.open(job(V3, "3"))
    storage.write(0, V3[:4000])
    storage.commit(4000)
    with pytest.raises(DowngradeError):
        storage.open(job(V1, version))
    assert storage.status().to_dict() == {"Status": "invalid", "Error": "None"}
    assert store.read(FILE) == V3[:4000]
    assert json.loads(store.read(PROGRESS))["Downloading"] == "3"


@pytest.mark.parametrize("sha256", [None, "", "ABC", "G" * 64])
def test_sha256_is_required(sha256: str | None) -> None:
    storage = gateway(LittleFsStore(new_flash()), RecordingProgrammer())
    download = Download("u", len(V2), "2", sha256=sha256)
    with pytest.raises(UsageError):
        storage.open(download)
    assert storage.status().status == "invalid"


def test_completed_record_skips_the_download() -> None:
    flash = new_flash()
    storage = gateway(LittleFsStore(flash), RecordingProgrammer())
    download = job(V2, "2")
    Transfer(storage, download, V2).run()
    storage.verify()  # {"Completed": "2"}, then the gateway reboots before programming

    store = LittleFsStore(flash)
    programmer = RecordingProgrammer()
    storage = gateway(store, programmer)
    progress = storage.progress()
    assert progress is not None
    assert progress.durable == len(V2)
    writes = flash.operations
    assert storage.open(job(V2, "2")) == len(V2)  # a new signed URL: still the same image
    assert flash.operations == writes  # nothing written
    assert storage.verify() == "2"
    storage.set_pending(permanent=True)
    assert programmer.programmed == [(V2, "2")]


def test_another_version_starts_over() -> None:
    store = LittleFsStore(new_flash())
    storage = gateway(store, RecordingProgrammer())
    storage.open(job(V2, "2"))
    storage.write(0, V2[:3000])
    storage.commit(3000)
    assert storage.open(job(V3, "3")) == 0
    assert store.size(FILE) == 0
    assert json.loads(store.read(PROGRESS))["Downloading"] == "3"
    # same version, another SHA-256: another image, start over as well
    other = hashlib.sha256(b"other build").hexdigest()
    storage.write(0, V3[:100])
    storage.commit(100)
    assert storage.open(job(V3, "3", sha256=other)) == 0


def test_writes_only_append() -> None:
    storage = gateway(LittleFsStore(new_flash()), RecordingProgrammer())
    storage.open(job(V2, "2"))
    storage.write(0, V2[:100])
    with pytest.raises(UsageError):
        storage.write(50, V2[50:150])
    with pytest.raises(UsageError):
        storage.write(100, b"\0" * len(V2))  # past the announced size
    with pytest.raises(UsageError):
        gateway(LittleFsStore(new_flash()), RecordingProgrammer()).write(0, b"x")


def test_programmer_failure_reports_mcu_download_fail(mcu: Path, tmp_path: Path) -> None:
    store = LittleFsStore(new_flash())
    storage = gateway(store, SimMcuProgrammer(mcu))
    foreign = signed("2.0.0", key=fixed_key(2))  # the MCU does not trust it
    Transfer(storage, job(foreign, "2"), foreign).run()
    with pytest.raises(KeyMismatchError):
        storage.set_pending(permanent=True)
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}
    assert json.loads(store.read(PROGRESS))["Completed"] == "2"  # kept for a retry...
    storage.abort()  # ...or removed
    assert store.size(FILE) is None
    assert store.size(PROGRESS) is None
    assert storage.status().status == "error"
    assert SimMcuProgrammer(mcu).running() == FirmwareVersion(1)


def test_mcu_running_another_version_is_a_failure(mcu: Path) -> None:
    storage = gateway(LittleFsStore(new_flash()), SimMcuProgrammer(mcu))
    Transfer(storage, job(V2, "3"), V2).run()  # announced 3, the image says 2.0.0
    with pytest.raises(McuProgramError):
        storage.set_pending(permanent=True)
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}


def test_too_large_image_is_refused_and_the_largest_fits() -> None:
    store = LittleFsStore(new_flash())
    storage = gateway(store, RecordingProgrammer())
    storage.open(job(V2, "2"))
    storage.write(0, V2)  # an old download: its space counts as free for the next one
    storage.commit(len(V2))
    room = storage._room(store.size(FILE) or 0)
    assert 200_000 < room < SECTORS * SECTOR
    big = random.Random(1).randbytes(room + 1)
    with pytest.raises(ImageTooLargeError):
        storage.open(job(big, "3"))
    assert storage.status().to_dict() == {"Status": "error", "Error": "File operation fail"}
    assert store.read(FILE) == V2  # refused before anything changed

    largest = big[:room]
    programmer = RecordingProgrammer()
    storage = gateway(store, programmer)
    Transfer(storage, job(largest, "3"), largest, chunk=3000).run()
    storage.set_pending(permanent=True)
    assert programmer.programmed == [(largest, "3")]


def test_full_file_system_is_a_file_operation_failure() -> None:
    store = LittleFsStore(new_flash())
    storage = gateway(store, RecordingProgrammer())
    image = random.Random(2).randbytes(150_000)
    storage.open(job(image, "2"))  # fits
    store.write_file("/other", random.Random(3).randbytes(150_000))  # someone else took it

    def fill() -> None:
        for offset in range(0, len(image), 4096):
            storage.write(offset, image[offset : offset + 4096])
            storage.commit(offset + 4096)

    with pytest.raises(FileOperationError):
        fill()
    assert 0 < (store.size(FILE) or 0) < len(image)
    assert storage.status().to_dict() == {"Status": "error", "Error": "File operation fail"}


# --- reported state ----------------------------------------------------------------------------


def test_reported_states_and_errors_are_the_originals() -> None:
    assert STATES == ("downloading", "interrupted", "applying", "applied", "error", "invalid")
    assert ERRORS == (
        "SHA256 verify fail",
        "Http Response > 400",
        "Network Timeout",
        "MCU Download fail",
        "File operation fail",
        "None",
    )
    storage = gateway(LittleFsStore(new_flash()), RecordingProgrammer())
    storage.mark("interrupted", "Network Timeout")
    assert storage.status().to_dict() == {"Status": "interrupted", "Error": "Network Timeout"}
    storage.mark("error", "Http Response > 400")
    assert storage.status().to_dict() == {"Status": "error", "Error": "Http Response > 400"}
    with pytest.raises(UsageError):
        storage.mark("idle")
    with pytest.raises(UsageError):
        storage.mark("error", "Disk full")


# --- multi-image packages ----------------------------------------------------------------------

SPE1 = signed("2.0.0", 4000)
SPE2 = signed("2.1.0", 4500)
# the application needs the new secure image: the MCU must mark it pending first
APP2 = sign_image(
    random.Random("app 1.1.0").randbytes(7000),
    KEY,
    SignOptions(
        ImageVersion.parse("1.1.0"),
        pad_header=True,
        dependencies=(Dependency(1, ImageVersion(2, 1, 0, 0)),),
    ),
)
APP1 = signed("1.0.0", 6000)
PACKAGE = build_package([("app.bin", "NSPE", APP2), ("spe.bin", "SPE", SPE2)], "1.1.0")


@pytest.fixture
def mcu2(tmp_path: Path) -> Path:
    """A simulated two-image MCU running application 1.0.0 and secure image 2.0.0."""
    SimDevice.create(
        tmp_path / "mcu2", APP1, [KEY.public_key], layout="two-image", images={1: SPE1}
    ).boot()
    return tmp_path / "mcu2"


def mcu_flash(mcu: Path) -> bytes:
    with SimDevice(mcu).bootloader() as boot:
        return boot.flash.read(0, boot.flash.size)


def running(mcu: Path) -> list[str | None]:
    return [slot["running"] for slot in SimDevice(mcu).status()["slots"]]


def stored_package(
    programmer: ExternalProgrammer, package: bytes = PACKAGE, current: str = "1"
) -> tuple[LittleFsStore, GatewayStorage]:
    """A gateway that has downloaded ``package`` (SHA-256 right) as version 1.1.0."""
    store = LittleFsStore(new_flash())
    storage = gateway(store, programmer, current)
    Transfer(storage, job(package, "1.1.0"), package, chunk=1500).run()
    return store, storage


def test_a_package_is_read_from_littlefs_and_both_images_run_on_the_mcu(mcu2: Path) -> None:
    programmer = SimMcuProgrammer(mcu2)
    assert running(mcu2) == ["1.0.0+0", "2.0.0+0"]
    store, storage = stored_package(programmer, current="1.0.0")
    assert storage.verify() == "1.1.0"
    assert storage.package is not None
    assert [(c.name, c.image_index, c.size) for c in storage.package.components] == [
        ("app.bin", 0, len(APP2)),
        ("spe.bin", 1, len(SPE2)),
    ]
    storage.set_pending(permanent=True)
    assert running(mcu2) == ["1.1.0+0", "2.1.0+0"]
    assert [s["state"] for s in SimDevice(mcu2).status()["slots"]] == ["confirmed"] * 2
    actions = SimDevice(mcu2).state.last_boot
    assert actions is not None
    assert [i["action"] for i in actions["images"]] == ["upgrade-permanent"] * 2
    assert storage.status().to_dict() == {"Status": "applied", "Error": "None", "Version": "1.1.0"}
    assert store.size(FILE) is None
    assert store.size(PROGRESS) is None
    assert programmer.running() == FirmwareVersion(1, 1, 0)


@dataclass
class PackageRecorder(RecordingProgrammer):
    packages: list[tuple[list[tuple[int, str, str, bytes]], str]] = field(default_factory=list)

    def program_package(self, images: Sequence[PackageImage], version: str) -> None:
        self.packages.append(([(i.image, i.file_type, i.name, i.read()) for i in images], version))


def test_a_package_that_stops_after_a_verify_resumes_as_a_package_after_a_restart() -> None:
    flash = new_flash()
    storage = gateway(LittleFsStore(flash), PackageRecorder())
    Transfer(storage, job(PACKAGE, "1.1.0"), PACKAGE).run()
    storage.verify()  # {"Completed": ...}; the gateway reboots before programming

    programmer = PackageRecorder()
    storage = gateway(LittleFsStore(flash), programmer)
    assert storage.open(job(PACKAGE, "1.1.0")) == len(PACKAGE)
    storage.set_pending(permanent=True)  # verifies (and reads the package) again
    assert programmer.programmed == []
    assert programmer.packages == [
        ([(0, "NSPE", "app.bin", APP2), (1, "SPE", "spe.bin", SPE2)], "1.1.0")
    ]


RECORDER = """\
import json, os, sys
from pathlib import Path
log, fail = Path(sys.argv[1]), sys.argv[2]
names = ("OTAKIT_VERSION", "OTAKIT_IMAGE", "OTAKIT_FILE_TYPE", "OTAKIT_FILE_NAME",
         "OTAKIT_PART", "OTAKIT_PARTS")
call = {name: os.environ.get(name) for name in names}
call["file"] = Path(sys.argv[3]).name
call["data"] = Path(sys.argv[3]).read_bytes().hex()
with log.open("a") as out:
    out.write(json.dumps(call) + "\\n")
if fail == os.environ.get("OTAKIT_IMAGE"):
    sys.exit("probe lost at image " + fail)
"""


def recorder(
    tmp_path: Path, *, fail: str = "none", name: str = "calls"
) -> tuple[CommandProgrammer, Path]:
    script, log = tmp_path / "flasher.py", tmp_path / f"{name}.jsonl"
    script.write_text(RECORDER)
    return CommandProgrammer([sys.executable, str(script), str(log), fail, "{file}"]), log


def calls(log: Path) -> list[dict[str, str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_command_programmer_runs_once_per_component_with_its_image(tmp_path: Path) -> None:
    programmer, log = recorder(tmp_path)
    store, storage = stored_package(programmer)
    storage.set_pending(permanent=True)
    assert calls(log) == [
        {
            "OTAKIT_VERSION": "1.1.0",
            "OTAKIT_IMAGE": "0",
            "OTAKIT_FILE_TYPE": "NSPE",
            "OTAKIT_FILE_NAME": "app.bin",
            "OTAKIT_PART": "1",
            "OTAKIT_PARTS": "2",
            "file": "app.bin",
            "data": APP2.hex(),
        },
        {
            "OTAKIT_VERSION": "1.1.0",
            "OTAKIT_IMAGE": "1",
            "OTAKIT_FILE_TYPE": "SPE",
            "OTAKIT_FILE_NAME": "spe.bin",
            "OTAKIT_PART": "2",
            "OTAKIT_PARTS": "2",
            "file": "spe.bin",
            "data": SPE2.hex(),
        },
    ]
    assert storage.status().to_dict() == {"Status": "applied", "Error": "None", "Version": "1.1.0"}
    assert store.size(FILE) is None

    # a single image: one run, image 0, no package fields
    single, log = recorder(tmp_path, name="single")
    storage = gateway(LittleFsStore(new_flash()), single)
    Transfer(storage, job(V2, "2"), V2).run()
    storage.set_pending(permanent=True)
    [call] = calls(log)
    assert {k: v for k, v in call.items() if k != "data"} == {
        "OTAKIT_VERSION": "2",
        "OTAKIT_IMAGE": "0",
        "OTAKIT_FILE_TYPE": "",
        "OTAKIT_FILE_NAME": "",
        "OTAKIT_PART": "1",
        "OTAKIT_PARTS": "1",
        "file": "firmware.bin",
    }
    assert bytes.fromhex(call["data"]) == V2


def test_a_command_programmer_stops_at_the_first_failing_component(tmp_path: Path) -> None:
    programmer, log = recorder(tmp_path, fail="0")
    store, storage = stored_package(programmer)
    with pytest.raises(McuProgramError) as failure:
        storage.set_pending(permanent=True)
    assert "component 1 of 2, app.bin (NSPE, image 0)" in failure.value.message
    assert "probe lost at image 0" in failure.value.message
    assert [c["OTAKIT_IMAGE"] for c in calls(log)] == ["0"]  # the SPE was not tried
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}
    storage.abort()
    assert store.size(FILE) is None


def _too_many() -> bytes:
    files = [(f"f{i}.bin", 10) for i in range(8)]
    members = [("components.json", manifest(*((n, "NSPE", s) for n, s in files)))]
    return tar(members + [(n, b"x" * s) for n, s in files])


BAD_PACKAGES = {
    "unknown component": tar(
        [
            ("components.json", manifest(("app.bin", "NSPE", 100), ("bl.bin", "BOOT", 10))),
            ("app.bin", b"a" * 100),
            ("bl.bin", b"b" * 10),
        ]
    ),
    "not listed": tar(
        [
            ("components.json", manifest(("app.bin", "NSPE", 100))),
            ("app.bin", b"a" * 100),
            ("extra.bin", b"e" * 10),
        ]
    ),
    "size mismatch": tar(
        [("components.json", manifest(("app.bin", "NSPE", 100))), ("app.bin", b"a" * 99)]
    ),
    "too many files": _too_many(),
    "bad checksum": PACKAGE[:148] + b"0000000\0" + PACKAGE[156:],
    "truncated": PACKAGE[:1536],
}


@pytest.mark.parametrize("name", list(BAD_PACKAGES))
def test_a_bad_package_programs_nothing_is_deleted_and_reported(mcu2: Path, name: str) -> None:
    package = BAD_PACKAGES[name]
    programmer = PackageRecorder()
    store, storage = stored_package(programmer, package)
    with pytest.raises(PackageError) as failure:
        storage.verify()
    assert "the package was refused and deleted" in failure.value.message
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}
    assert programmer.programmed == []
    assert programmer.packages == []
    assert store.size(FILE) is None
    assert store.size(PROGRESS) is None


def test_a_programmer_without_package_support_refuses_packages() -> None:
    programmer = RecordingProgrammer()
    store, storage = stored_package(programmer)
    with pytest.raises(McuProgramError, match="cannot install packages"):
        storage.verify()
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}
    assert programmer.programmed == []
    assert store.size(FILE) is None


def test_a_component_the_mcu_has_no_image_for_programs_nothing(mcu: Path) -> None:
    """A two-image package for a single-image MCU: refused before anything is written."""
    before = mcu_flash(mcu)
    _, storage = stored_package(SimMcuProgrammer(mcu))
    with pytest.raises(McuProgramError, match="image 1, which the MCU"):
        storage.set_pending(permanent=True)
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}
    assert SimMcuProgrammer(mcu).running() == FirmwareVersion(1)
    assert mcu_flash(mcu) == before


def test_a_package_with_a_foreign_image_leaves_the_mcu_as_it_was(mcu2: Path) -> None:
    foreign = signed("2.1.0", 4500, key=fixed_key(2))
    package = build_package([("app.bin", "NSPE", APP2), ("spe.bin", "SPE", foreign)], "1.1.0")
    _, storage = stored_package(SimMcuProgrammer(mcu2), package, "1.0.0")
    with pytest.raises(KeyMismatchError, match=r"image 1 \(spe.bin\)"):
        storage.set_pending(permanent=True)
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}
    assert running(mcu2) == ["1.0.0+0", "2.0.0+0"]
    slots = SimDevice(mcu2).status()["slots"]
    assert all(s["state"] == "confirmed" for s in slots)
    with SimDevice(mcu2).bootloader() as boot:  # both secondary slots erased again
        for image in (0, 1):
            area = boot.map.secondary(image)
            assert boot.flash.is_erased(area.offset, area.size)


def test_an_unmet_dependency_is_refused_by_the_mcus_bootloader(mcu2: Path) -> None:
    """The app needs secure image 2.1.0; the package brings only the app."""
    package = build_package([("app.bin", "NSPE", APP2)], "1.1.0")
    _, storage = stored_package(SimMcuProgrammer(mcu2), package, "1.0.0")
    with pytest.raises(McuProgramError, match=r"does not run package 1\.1\.0"):
        storage.set_pending(permanent=True)
    assert storage.status().to_dict() == {"Status": "error", "Error": "MCU Download fail"}
    assert running(mcu2) == ["1.0.0+0", "2.0.0+0"]


# --- end to end: `otakit deploy update.tar`, a real server, the gateway agent -------------------

BOARD = "GW-BOARD"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("gateway-server"))
    admin = srv.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield srv
    srv.stop()


def deployed_gateway(server: Server, tmp_path: Path, mcu: Path) -> AgentConfig:
    """A product whose group "g" has PACKAGE deployed with ``otakit deploy``, and the config of
    a gateway (littlefs in a file) in front of the simulated MCU ``mcu``."""
    admin = server.admin_client()
    product = f"p-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
    enroll = server.token("enroll", "--product", product, "--group", "g")
    path = tmp_path / "update.tar"
    path.write_bytes(PACKAGE)
    argv = [
        str(BIN / "otakit"), "deploy", str(path), "1.1.0", product, "g",
        "--server", server.url, "--token", server.admin,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[agent]
server = "{server.url}"
token = "{enroll}"

[identity]
serial = "GW-{uuid.uuid4().hex[:8]}"
board = "{BOARD}"
product = "{product}"
version = "1.0.0"

[storage]
kind = "gateway"
path = "{tmp_path / "gw-flash.bin"}"
fs_size = 1048576
mcu = "{mcu}"
"""
    )
    return AgentConfig.from_toml(config)


def reported(server: Server, config: AgentConfig) -> dict[str, Any]:
    admin = server.admin_client()
    twin = admin.get(f"/api/v1/devices/{config.identity.serial}/twin").json()
    info: dict[str, Any] = twin["reported"]["extFwInfo"]
    return info


def test_a_deployed_package_is_installed_through_the_gateway(
    server: Server, tmp_path: Path, mcu2: Path
) -> None:
    config = deployed_gateway(server, tmp_path, mcu2)
    service = AgentService(config, simulator=SIMULATOR)
    try:
        result = service.attempt()
        assert result.outcome is Outcome.UPDATED, result
        assert result.version == "1.1.0"
        storage, _ = service._open_gateway()
        assert storage.store.size(FILE) is None  # programmed, then deleted
        assert service.attempt().outcome is Outcome.NO_UPDATE
    finally:
        service.close()
    assert running(mcu2) == ["1.1.0+0", "2.1.0+0"]
    assert reported(server, config) == {"Status": "applied", "Error": "None", "Version": "1.1.0"}

    again = AgentService(config, simulator=SIMULATOR)  # a restart: nothing left to do
    try:
        assert again.attempt().outcome is Outcome.NO_UPDATE
    finally:
        again.close()


def test_a_deployed_package_the_mcu_cannot_take_is_reported_and_deleted(
    server: Server, tmp_path: Path, mcu: Path
) -> None:
    """The same package for a single-image MCU: the gateway downloads it, the MCU has no
    image 1, nothing is programmed, the file goes and the server hears "MCU Download fail"."""
    config = deployed_gateway(server, tmp_path, mcu)
    before = mcu_flash(mcu)
    service = AgentService(config, simulator=SIMULATOR)
    try:
        result = service.attempt()
        assert result.outcome is Outcome.FAILED
        assert result.message is not None
        assert "image 1, which the MCU" in result.message
        storage, _ = service._open_gateway()
        assert storage.store.size(FILE) is None
        assert storage.store.size(PROGRESS) is None
    finally:
        service.close()
    assert reported(server, config) == {"Status": "error", "Error": "MCU Download fail"}
    assert mcu_flash(mcu) == before
