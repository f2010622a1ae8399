"""Multi-image TAR packages (protocols.md §6) installed on devices: the I/O-free demultiplexer
(PackageStream), UpdateStorage on the two-image flash map (resume after power cuts, verification,
marking both images pending, the two-image swap and its revert, MCUboot's dependency check), and
a package deployed with ``otakit deploy`` and installed by a simulated device over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otakit.device.bootloader import Action, Bootloader, BootloaderConfig
from otakit.device.core.package import PackageStream, SlotWrite
from otakit.device.flash import Flash, PowerCut
from otakit.device.flashmap import preset
from otakit.device.journal import Download, Journal, JournalRecord
from otakit.device.storage import UpdateStorage
from otakit.errors import (
    DependencyError,
    DowngradeError,
    ImageTooLargeError,
    KeyMismatchError,
    ManifestError,
    OtakitError,
    PackageFormatError,
    PackageLimitError,
)
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.package import BLOCK_SIZE, build_package
from otakit.image.sign import SignOptions, sign_image
from otakit.image.tlv import Dependency
from otakit.image.verify import verify_image
from otakit.sim.agent import JOURNAL_FILE, run
from otakit.sim.device import Identity, SimDevice

from .mqtt_harness import Broker
from .server_harness import BIN, Server, start_server

# the publisher's helpers: a broker of this module's own, and `otakit publisher` running
from .test_publisher import KIT, OTAKIT, broker, command, fresh_company  # noqa: F401 - fixture

KEY = SigningKey.generate("ecdsa-p256")
OTHER_KEY = SigningKey.generate("ecdsa-p256")
# the HTTP and MQTT tests share a server, where the package is one artifact (by its SHA-256)
# that takes the board of the first product it is deployed to
BOARD = KIT
SLOTS = {0: 5000, 1: 3000}


def signed(
    version: str,
    size: int,
    *,
    key: SigningKey = KEY,
    depends: tuple[Dependency, ...] = (),
) -> bytes:
    payload = random.Random(f"{version}/{size}").randbytes(size)
    options = SignOptions(ImageVersion.parse(version), pad_header=True, dependencies=depends)
    return sign_image(payload, key, options)


def aligned(image: bytes) -> bytes:
    """Padded with erased bytes to the flash's write size, for writing straight to a slot."""
    return image + b"\xff" * (-len(image) % 8)


def tar(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive of exactly these members, in this order (no checks)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def manifest(*files: tuple[str, str, int], count: int | None = None) -> bytes:
    entries = [{"fileName": "components.json", "fileType": "component_list"}]
    entries += [{"fileName": n, "fileType": t, "fileSize": str(s)} for n, t, s in files]
    doc = {"numberOfComponents": str(count or len(entries)), "version": "1.0.0", "files": entries}
    return json.dumps(doc).encode()


SMALL = build_package([("app.bin", "NSPE", b"A" * 1000), ("spe.bin", "SPE", b"S" * 700)], "1.2.3")


def demux(package: bytes, chunk: int, slots: dict[int, int] = SLOTS) -> dict[int, bytes]:
    stream = PackageStream(len(package), slots=slots)
    images: dict[int, bytearray] = {}
    for start in range(0, len(package), chunk):
        for step in stream.feed(package[start : start + chunk]):
            if isinstance(step, SlotWrite):
                image = images.setdefault(step.image, bytearray())
                assert step.offset == len(image)  # in order, no gap
                image += step.data
    stream.finish()
    return {i: bytes(b) for i, b in images.items()}


# --- PackageStream ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 64, 511, 512, 513, 4096, len(SMALL)])
def test_any_chunking_gives_the_same_writes(chunk: int) -> None:
    assert demux(SMALL, chunk) == {0: b"A" * 1000, 1: b"S" * 700}


def _resumed_everywhere(package: bytes, cuts: range) -> None:
    """Feed up to each cut, save the state as JSON, restore it, feed the rest."""
    for cut in cuts:
        first = PackageStream(len(package), slots=SLOTS)
        writes = [w for w in first.feed(package[:cut]) if isinstance(w, SlotWrite)]
        state = json.loads(json.dumps(first.to_dict()))
        second = PackageStream.from_dict(state, len(package), slots=SLOTS)
        assert second.position == cut
        writes += [w for w in second.feed(package[cut:]) if isinstance(w, SlotWrite)]
        assert second.finish().version == "1.2.3"
        got: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}
        for w in writes:
            assert w.offset == len(got[w.image])
            got[w.image] += w.data
        assert got == {0: bytearray(b"A" * 1000), 1: bytearray(b"S" * 700)}, cut
        # what the file was made of: the kept bytes and the slot ranges give the file again
        slots = {0: b"A" * 1000, 1: b"S" * 700}
        rebuilt = b"".join(
            s.data if s.image is None else slots[s.image][s.start : s.start + s.length]
            for s in second.segments()
        )
        assert rebuilt == package


def test_state_saved_and_restored_at_every_byte_of_the_archive() -> None:
    end = 10 * BLOCK_SIZE  # 8 blocks of headers and data, then the two end blocks
    assert SMALL[end - 2 * BLOCK_SIZE : end] == bytes(2 * BLOCK_SIZE)
    _resumed_everywhere(SMALL, range(end + 1))


def test_state_saved_and_restored_in_the_zeros_after_the_archive() -> None:
    _resumed_everywhere(SMALL, range(10 * BLOCK_SIZE, len(SMALL) + 1, 97))


def _feed_all(stream: PackageStream, package: bytes) -> None:
    for start in range(0, len(package), 100):
        stream.feed(package[start : start + 100])
    stream.finish()


def _fails(
    package: bytes, error: type[OtakitError], text: str, slots: dict[int, int] = SLOTS
) -> OtakitError:
    stream = PackageStream(len(package), slots=slots)
    with pytest.raises(error) as caught:
        _feed_all(stream, package)
    assert text in caught.value.message
    with pytest.raises(error):  # the same error again
        stream.feed(b"")
    return caught.value


def test_bad_packages_are_named_errors() -> None:
    app = b"A" * 100
    listed = manifest(("app.bin", "NSPE", 100))
    _fails(tar([("app.bin", app), ("components.json", listed)]), ManifestError, "must come first")
    _fails(
        tar([("components.json", manifest(("x.bin", "BOOTLOADER", 100))), ("x.bin", app)]),
        ManifestError,
        "unknown fileType 'BOOTLOADER'",
    )
    _fails(tar([("components.json", listed), ("other.bin", app)]), ManifestError, "not listed")
    _fails(
        tar([("components.json", manifest(("app.bin", "NSPE", 99))), ("app.bin", app)]),
        ManifestError,
        "100 bytes but components.json says 99",
    )
    _fails(tar([("components.json", listed)]), ManifestError, "no such member")
    _fails(
        tar([("components.json", manifest(("app.bin", "NSPE", 100), count=3)), ("app.bin", app)]),
        ManifestError,
        "numberOfComponents",
    )
    nine = manifest(*[(f"f{i}", "NSPE", 0) for i in range(8)])
    _fails(tar([("components.json", nine)]), PackageLimitError, "lists 9 files; at most 8")
    # a component for an image this device does not have, one that does not fit
    _fails(SMALL, ManifestError, "image 1, which this device does not have", {0: 5000})
    error = _fails(SMALL, ImageTooLargeError, "more than the 500 bytes", {0: 500, 1: 3000})
    assert error.value == 1000
    # broken archive: checksum, truncation, bytes after the end, more than announced
    broken = bytearray(SMALL)
    broken[BLOCK_SIZE * 2] ^= 1  # the name of app.bin's header
    _fails(bytes(broken), PackageFormatError, "bad checksum")
    stream = PackageStream(len(SMALL), slots=SLOTS)
    stream.feed(SMALL[:3000])
    with pytest.raises(PackageFormatError, match="truncated"):
        stream.finish()
    tail = bytearray(SMALL)
    tail[-1] = 1
    _fails(bytes(tail), PackageFormatError, "after the end of the archive is not zero")
    stream = PackageStream(10, slots=SLOTS)
    with pytest.raises(PackageFormatError, match="more than the announced 10 bytes"):
        stream.feed(SMALL[:11])


def test_a_broken_saved_state_is_refused() -> None:
    with pytest.raises(PackageFormatError, match="not valid"):
        PackageStream.from_dict({"v": 1, "position": 3}, len(SMALL), slots=SLOTS)
    state = PackageStream(len(SMALL), slots=SLOTS)
    state.feed(SMALL[:100])
    data = state.to_dict()
    data["position"] = 99  # disagrees with what it kept
    with pytest.raises(PackageFormatError):
        PackageStream.from_dict(data, len(SMALL), slots=SLOTS)


# --- UpdateStorage on the two-image flash map -------------------------------------------------

APP1, SEC1 = signed("1.0.0", 6000), signed("2.0.0", 4000)
SEC2 = signed("2.1.0", 4500)
APP2 = signed("1.1.0", 7000, depends=(Dependency(1, ImageVersion(2, 1, 0, 0)),))
PACKAGE = build_package([("app.bin", "NSPE", APP2), ("spe.bin", "SPE", SEC2)], "1.1.0")


@dataclass
class Device:
    flash: Flash
    boot: Bootloader
    journal: Journal

    def storage(self) -> UpdateStorage:
        return UpdateStorage(self.boot, self.journal, [KEY.public_key], current_version="1.0.0")

    def running(self) -> list[str]:
        return [str(i.running) for i in self.boot.status()]

    def secondary_erased(self, image: int) -> bool:
        area = self.boot.map.secondary(image)
        return self.flash.is_erased(area.offset, area.size)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    fm = preset("two-image")
    flash = fm.new_flash()
    boot = Bootloader(flash, fm, BootloaderConfig(keys=(KEY.public_key,)))
    boot.primary(0).write(0, aligned(APP1))
    boot.primary(1).write(0, aligned(SEC1))
    return Device(flash, boot, Journal(tmp_path / "journal.json"))


def download(storage: UpdateStorage, data: bytes, chunk: int = 1024, source: str = "pkg") -> int:
    """What a transport does: open, write each piece at its offset, commit after each."""
    offset = start = storage.open(Download(source=source, size=len(data), version="1.1.0"))
    while offset < len(data):
        piece = data[offset : offset + chunk]
        storage.write(offset, piece)
        offset += len(piece)
        storage.commit(offset)
    return start


def test_a_package_goes_to_both_slots_swaps_together_and_reverts_together(
    device: Device,
) -> None:
    storage = device.storage()
    download(storage, PACKAGE, chunk=333)
    assert storage.is_package
    assert storage.sha256(len(PACKAGE)) == hashlib.sha256(PACKAGE).digest()
    assert storage.verify() == "1.1.0"
    assert [(i, str(v)) for i, v in storage.installed] == [(0, "1.1.0"), (1, "2.1.0")]
    storage.set_pending(permanent=False)
    assert device.journal.load() is None
    result = device.boot.boot()
    assert [i.action for i in result.images] == [Action.UPGRADE_TEST, Action.UPGRADE_TEST]
    assert device.running() == ["1.1.0+0", "2.1.0+0"]
    result = device.boot.boot()  # not confirmed: both go back
    assert [i.action for i in result.images] == [Action.REVERT, Action.REVERT]
    assert device.running() == ["1.0.0+0", "2.0.0+0"]


def test_a_single_image_still_goes_to_image_0_as_before(device: Device) -> None:
    storage = device.storage()
    download(storage, signed("1.2.0", 5000), chunk=100)
    assert not storage.is_package
    assert storage.verify() == "1.2.0"
    storage.set_pending(permanent=True)
    result = device.boot.boot()
    assert [i.action for i in result.images] == [Action.UPGRADE_PERMANENT, Action.NONE]


def test_an_old_journal_without_package_state_still_loads(device: Device) -> None:
    device.journal.path.write_text(
        json.dumps({"download": {"source": "x", "size": 10, "version": ""}, "durable": 4})
    )
    assert device.journal.load() == JournalRecord(Download("x", 10), 4)


def test_power_cuts_during_the_download_resume_at_the_durable_byte(device: Device) -> None:
    """A cut at sampled flash operations (torn writes included); every restart resumes where
    the journal says and the slots end up holding exactly the package's images."""
    budgets = [50, 98, 1, 2, 3, 5, 8, 13, 21]  # the first attempt erases image 0's 96 sectors
    cuts = 0
    while True:
        storage = device.storage()
        if cuts < len(budgets):
            device.flash.cut_after(budgets[cuts], tear=True, seed=cuts)
        try:
            start = download(storage, PACKAGE, chunk=700)
        except PowerCut:
            device.flash.power_on()
            cuts += 1
            record = device.journal.load()
            assert record is None or 0 <= record.durable <= len(PACKAGE)
            continue
        device.flash.power_on()  # disarms the cut that did not come
        break
    assert cuts >= 5
    assert start > 0  # the last run resumed
    storage = device.storage()
    assert download(storage, PACKAGE) == len(PACKAGE)  # everything is durable
    assert storage.sha256(len(PACKAGE)) == hashlib.sha256(PACKAGE).digest()
    storage.verify()
    assert verify_image(device.boot.update_area(0), [KEY.public_key]).digest == (
        verify_image(APP2, [KEY.public_key]).digest
    )
    assert verify_image(device.boot.update_area(1), [KEY.public_key]).digest == (
        verify_image(SEC2, [KEY.public_key]).digest
    )


def _boot_with_cuts(device: Device, every: int) -> int:
    """Boot, cutting the power (torn) after ``every`` flash operations, then a few more each
    time (a resumed swap repeats its current step), until a boot completes; return how many
    cuts there were."""
    cuts = 0
    while True:
        assert cuts < 60, "the swap makes no progress"
        device.flash.cut_after(every + 3 * cuts, tear=True, seed=cuts)
        try:
            device.boot.boot()
        except PowerCut:
            device.flash.power_on()
            cuts += 1
            continue
        device.flash.power_on()
        return cuts


OLD, NEW = ["1.0.0+0", "2.0.0+0"], ["1.1.0+0", "2.1.0+0"]
SEC2_MUTUAL = signed("2.1.0", 4500, depends=(Dependency(0, ImageVersion(1, 1, 0, 0)),))
MUTUAL = build_package([("app.bin", "NSPE", APP2), ("spe.bin", "SPE", SEC2_MUTUAL)], "1.1.0")


@pytest.mark.parametrize("every", [2, 7, 19])
def test_power_cuts_during_the_two_image_swap(device: Device, every: int) -> None:
    """Only APP2 carries a dependency. A cut during image 1's swap makes the next boot see
    image 0's finished TEST swap as an unconfirmed one and revert it (MCUboot cannot tell the
    two apart), while image 1's swap is completed: a mixed pair for one boot, which the agent
    does not confirm (not every installed image runs), so the next reset reverts image 1 too."""
    storage = device.storage()
    download(storage, PACKAGE)
    storage.verify()
    storage.set_pending(permanent=False)
    assert _boot_with_cuts(device, every) >= 3
    assert device.running() in (NEW, ["1.0.0+0", "2.1.0+0"])
    for _ in range(2):
        if device.running() != OLD:
            assert _boot_with_cuts(device, every + 4) >= 1
    assert device.running() == OLD


@pytest.mark.parametrize("every", [2, 7, 19])
def test_mutual_dependencies_can_hold_a_cut_swap_half_done_until_image_0_is_confirmed(
    device: Device, every: int
) -> None:
    """Each image depends on the other's new version. A cut after image 0's swap and before
    image 1's leaves image 0 new on trial: the next boot would revert image 0 and upgrade
    image 1, and the dependency check (which disables every upgrade when one fails) refuses
    both, at every boot. Confirming image 0 lets image 1 follow. (So packages should carry one
    direction of dependency: the application on the secure image.)"""
    storage = device.storage()
    download(storage, MUTUAL)
    storage.verify()
    storage.set_pending(permanent=False)
    assert _boot_with_cuts(device, every) >= 3
    mixed = ["1.1.0+0", "2.0.0+0"]
    assert device.running() in (NEW, mixed)
    if device.running() == mixed:
        result = device.boot.boot()
        assert [i.error for i in result.images] == ["DEPENDENCY", "DEPENDENCY"]
        assert device.running() == mixed
        assert device.boot.confirm(0)
        device.boot.boot()
        assert device.running() == NEW
    else:
        assert _boot_with_cuts(device, every + 4) >= 1  # unconfirmed: both revert together
        assert device.running() == OLD


def test_a_power_cut_while_marking_never_upgrades_one_image_alone(device: Device) -> None:
    """APP2 depends on image 1 at 2.1.0: it is marked first, so a cut between the two marks
    leaves it pending alone, and MCUboot's dependency check upgrades nothing."""
    storage = device.storage()
    download(storage, PACKAGE)
    storage.verify()
    before = device.flash.operations
    storage.set_pending(permanent=False)
    marks = device.flash.operations - before
    assert marks >= 4
    for n in range(marks):
        device.boot.primary(0).erase_all()  # a fresh device for each cut point
        device.boot.primary(0).write(0, aligned(APP1))
        device.boot.primary(1).erase_all()
        device.boot.primary(1).write(0, aligned(SEC1))
        storage = device.storage()
        download(storage, PACKAGE)
        storage.verify()
        device.flash.cut_after(n)
        with pytest.raises(PowerCut):
            storage.set_pending(permanent=False)
        device.flash.power_on()
        result = device.boot.boot()
        actions = [i.action for i in result.images]
        assert actions[0] != Action.UPGRADE_TEST or actions[1] == Action.UPGRADE_TEST, n
        assert device.running() in (["1.0.0+0", "2.0.0+0"], ["1.1.0+0", "2.1.0+0"]), n
        for image in (0, 1):
            device.boot.secondary(image).erase_all()
        device.journal.clear()


def test_the_bootloader_refuses_an_upgrade_whose_dependency_is_not_met(device: Device) -> None:
    device.boot.secondary(0).write(0, aligned(APP2))
    device.boot.set_pending(0)
    result = device.boot.boot()
    assert result.images[0].action is Action.REJECTED
    assert result.images[0].error == "DEPENDENCY"
    assert "needs image 1 at 2.1.0" in (result.images[0].reason or "")
    assert device.running() == ["1.0.0+0", "2.0.0+0"]
    device.boot.secondary(1).write(0, aligned(SEC2))  # the dependency comes: both go
    device.boot.set_pending(1)
    result = device.boot.boot()
    assert [i.action for i in result.images] == [Action.UPGRADE_TEST, Action.UPGRADE_TEST]


@pytest.mark.parametrize(
    ("package", "error", "text"),
    [
        (
            build_package([("app.bin", "NSPE", APP2), ("spe.bin", "SPE", bytes(0x20000))], "1.1.0"),
            ImageTooLargeError,
            "more than the",
        ),
        (tar([("components.json", manifest(("a", "BOOT", 8))), ("a", bytes(8))]), ManifestError, "BOOT"),
        (
            build_package([("app.bin", "NSPE", APP2), ("spe.bin", "SPE", signed("2.1.0", 4500, key=OTHER_KEY))], "1.1.0"),
            KeyMismatchError,
            "image 1",
        ),
        (build_package([("app.bin", "NSPE", APP2)], "1.1.0"), DependencyError, "needs image 1"),
        (
            build_package([("app.bin", "NSPE", APP1), ("spe.bin", "SPE", SEC1)], "1.0.0"),
            DowngradeError,
            "no image of the package is newer",
        ),
    ],
    ids=["too-large", "unknown-component", "bad-signature", "dependency", "nothing-newer"],
)  # fmt: skip
def test_a_refused_package_leaves_every_slot_erased(
    device: Device, package: bytes, error: type[OtakitError], text: str
) -> None:
    before = device.flash.read(0, device.boot.map.flash_size)
    storage = device.storage()

    def install() -> None:
        download(storage, package)
        storage.verify()

    with pytest.raises(error) as caught:
        install()
    assert text in caught.value.message
    storage.abort()
    assert device.flash.read(0, device.boot.map.flash_size) == before  # every slot as it was
    assert device.journal.load() is None
    result = device.boot.boot()
    assert [i.action for i in result.images] == [Action.NONE, Action.NONE]
    assert device.running() == ["1.0.0+0", "2.0.0+0"]


def test_a_package_larger_than_image_0s_slot_in_tiny_chunks(device: Device) -> None:
    """More bytes than image 0's slot: nothing is erased before the first 262 bytes show a
    package; 100-byte chunks (an MQTT transfer) with a restart in the middle."""
    app = signed("1.1.0", 300_000, depends=(Dependency(1, ImageVersion(2, 1, 0, 0)),))
    sec = signed("2.1.0", 110_000)
    big = build_package([("app.bin", "NSPE", app), ("spe.bin", "SPE", sec)], "1.1.0")
    assert len(big) > device.boot.map.primary(0).size
    storage = device.storage()
    storage.open(Download(source="big", size=len(big), version="1.1.0"))
    before = device.flash.operations
    storage.write(0, big[:100])
    storage.commit(100)
    assert device.flash.operations == before  # undecided: nothing written or erased yet
    for offset in range(100, 20_000, 100):
        storage.write(offset, big[offset : offset + 100])
        storage.commit(offset + 100)
    assert storage.is_package
    resumed = device.storage()  # a restart
    assert download(resumed, big, chunk=4096, source="big") == 20_000
    assert resumed.verify() == "1.1.0"
    resumed.set_pending(permanent=True)
    device.boot.boot()
    assert device.running() == NEW


def test_an_image_larger_than_image_0s_slot_touches_nothing(device: Device) -> None:
    before = device.flash.read(0, device.boot.map.flash_size)
    storage = device.storage()
    image = signed("1.1.0", 400_000)
    with pytest.raises(ImageTooLargeError, match="larger than the"):
        download(storage, image, chunk=100)
    storage.abort()
    assert device.flash.read(0, device.boot.map.flash_size) == before


def test_abort_after_a_restart_erases_the_package_slots(device: Device) -> None:
    storage = device.storage()
    storage.open(Download(source="pkg", size=len(PACKAGE)))
    storage.write(0, PACKAGE[:9000])
    storage.commit(9000)
    fresh = device.storage()  # a new process: abort from the journal alone
    fresh.abort()
    assert device.secondary_erased(0)
    assert device.secondary_erased(1)


# --- end to end: otakit deploy, a simulated device, HTTP ---------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("package-server"))
    admin = srv.admin_client()
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    yield srv
    srv.stop()


def _two_image_device(tmp_path: Path, serial: str, *, board: str, product: str) -> SimDevice:
    """A booted simulated device of the ``two-image`` layout running APP1 and SEC1."""
    sim = SimDevice.create(
        tmp_path / serial,
        APP1,
        [KEY.public_key],
        layout="two-image",
        identity=Identity(board=board, product=product, serial=serial),
        images={1: SEC1},
    )
    sim.boot()
    return sim


def _deploy(server: Server, tmp_path: Path, product: str) -> None:
    """``otakit deploy update.tar`` to the product's group "g"."""
    path = tmp_path / "update.tar"
    path.write_bytes(PACKAGE)
    argv = [
        str(BIN / "otakit"), "deploy", str(path), "1.1.0", product, "g",
        "--server", server.url, "--token", server.admin,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_a_deployed_package_is_installed_over_http_through_power_cuts(
    server: Server, tmp_path: Path
) -> None:
    admin = server.admin_client()
    product = f"p-{uuid.uuid4().hex[:8]}"
    admin.put(f"/api/v1/products/{product}", json={"board": BOARD})
    enroll = server.token("enroll", "--product", product, "--group", "g")
    _deploy(server, tmp_path, product)
    serial = f"S-{uuid.uuid4().hex[:8]}"
    sim = _two_image_device(tmp_path, serial, board=BOARD, product=product)
    token: str | None = enroll
    resumable: list[int | bool] = []
    for cut in (30, 99, 10):  # in the erase of image 0's 96 sectors, in the writes, resumed
        report = run(sim.dir, server.url, token=token, power_cut_after=cut, chunk_size=512)
        token = None  # enrolled once
        assert report.result.error == "POWER_CUT", (cut, resumable, report.result.error)
        record = Journal(sim.dir / JOURNAL_FILE).load()
        resumable.append(record is not None and record.package is not None and record.durable)
    assert resumable[0] is False
    assert 0 < resumable[1] < resumable[2]
    report = run(sim.dir, server.url, chunk_size=512)
    assert report.result.error is None, report.result
    assert report.confirmed
    slots = sim.status()["slots"]
    assert [s["running"] for s in slots] == ["1.1.0+0", "2.1.0+0"]
    assert [i["action"] for i in (report.boot or {})["images"]] == ["upgrade-test"] * 2
    again = run(sim.dir, server.url)
    assert again.result.error is None
    assert again.boot is None


def test_a_deployed_package_is_installed_over_mqtt(
    server: Server,
    broker: Broker,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    """The same package, served by ``otakit publisher`` in MQTT chunks to ``otakit sim run
    --mqtt``: the chunks go through the same UpdateStorage."""
    admin = server.admin_client()
    product = f"p-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={"board": KIT}).status_code == 200
    _deploy(server, tmp_path, product)
    serial = f"S-{uuid.uuid4().hex[:8]}"
    sim = _two_image_device(tmp_path, serial, board=KIT, product=product)
    registered = {"product": product, "group": "g", "board": KIT, "version": "1.0.0"}
    assert admin.put(f"/api/v1/devices/{serial}", json=registered).status_code == 200
    company = fresh_company()
    args = ["sim", "run", str(sim.dir), "--mqtt", f"127.0.0.1:{broker.port}", "--company", company]
    with command("--data", server.data, "-c", company, "--port", str(broker.port)) as publisher:
        done = subprocess.run(
            [str(OTAKIT), *args, "--once"], capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stderr
    assert "running 1.1.0+0, confirmed" in done.stderr, "".join(publisher.lines)
    assert [s["running"] for s in sim.status()["slots"]] == ["1.1.0+0", "2.1.0+0"]


def test_the_package_demo_ends_as_it_says() -> None:
    """``otakit demo --package -n 2``: one device loses power mid-download and resumes, the
    other never confirms and both of its images go back."""
    from otakit.sim.demo import run_package_demo

    assert run_package_demo(2) == 0
