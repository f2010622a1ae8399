"""The gateway model (§7): littlefs on the flash model, resumable downloads, the external MCU."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from otakit.device.flash import Flash, PowerCut
from otakit.device.gateway import ExternalProgrammer, GatewayStorage, LittleFsStore
from otakit.device.journal import Download
from otakit.errors import (
    DowngradeError,
    FileOperationError,
    HashMismatchError,
    ImageTooLargeError,
    KeyMismatchError,
    McuProgramError,
    UsageError,
)
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.fwinfo import ERRORS, STATES
from otakit.protocol.version import FirmwareVersion
from otakit.sim.device import SimDevice
from otakit.sim.programmer import SimMcuProgrammer


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
