"""Where a download is written: one interface for every transport (HTTP, MQTT, push).

A storage target is opened for a :class:`~otakit.device.journal.Download`, written at offsets,
committed (the bytes so far made durable and recorded for resumption), verified, and finally set
pending (or aborted, which leaves the target clean). Two targets exist:

- :class:`UpdateStorage`: what the drivers use on an MCUboot device: a single image goes to
  image 0's secondary slot exactly as :class:`SlotStorage` writes it; a TAR package
  (protocols.md §6) is demultiplexed as it streams and each component goes to its image's
  secondary slot, all of them verified and then marked pending together;
- :class:`SlotStorage`: the secondary slot of an MCUboot device (the flash model and bootloader
  of otakit.device); the image is verified (hash, signature, version, security counter, size,
  nothing unsigned after its TLVs) before it is marked pending, as a TEST or PERM request. Only
  the part of the download below the slot's trailer is written: the request in the trailer is
  the device's own (:meth:`SlotStorage.set_pending`), never bytes that came with the image;
- ``otakit.device.gateway.GatewayStorage``: the gateway model of protocols.md §7, a file in a
  littlefs file system on external flash, then programmed into the attached MCU.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from otakit.device.bootloader import Bootloader
from otakit.device.core.package import MIN_PACKAGE_SIZE, PackageStream, SlotWrite
from otakit.device.journal import Download, Journal, JournalRecord
from otakit.errors import (
    DependencyError,
    DowngradeError,
    FlashError,
    HashMismatchError,
    ImageTooLargeError,
    OtakitError,
)
from otakit.image.header import ImageVersion
from otakit.image.keys import PublicKey
from otakit.image.layout import check_erased_after
from otakit.image.package import MAGIC_OFFSET, PackageManifest, is_package
from otakit.image.source import iter_range
from otakit.image.tlv import Dependency, TlvType
from otakit.image.verify import VerifiedImage, verify_image
from otakit.protocol.version import FirmwareVersion

log = logging.getLogger("otakit.storage")


class Storage(Protocol):
    """A download target."""

    def progress(self) -> JournalRecord | None:
        """The download in progress and how many of its bytes are durable, if any."""
        ...

    def open(self, download: Download) -> int:
        """Prepare for ``download``; return how many of its bytes are already stored.

        A different download than the one in progress starts over (the target is erased).
        Raises an OtakitError when the download cannot fit.
        """
        ...

    def write(self, offset: int, data: bytes) -> None: ...

    def commit(self, end: int) -> None:
        """Make bytes ``[0, end)`` durable and record them for resumption."""
        ...

    def verify(self) -> str:
        """Check the complete download; return its version. Raises an OtakitError."""
        ...

    def set_pending(self, *, permanent: bool) -> None:
        """Hand the verified download over (bootloader request, or programming the MCU)."""
        ...

    def abort(self) -> None:
        """Forget the download and leave the target clean."""
        ...


class SlotStorage:
    """The secondary slot of image ``image`` on an MCUboot device.

    What is written where: bytes of the download below the start of the slot's trailer
    (``bootloader.map.max_image_size(image)``) go to flash; bytes at or past it (the trailer
    area of an ``imgtool --pad`` image, or whatever a server appended) are never written, only
    kept in memory for :meth:`sha256` of the whole download. So the only request in the
    secondary trailer is the one :meth:`set_pending` writes. :meth:`verify` refuses bytes that
    are not erased between the end of the image's TLVs and the trailer (unsigned data), an image
    older than the running one (unless ``allow_downgrade``) and, independently of
    ``allow_downgrade``, a security counter lower than the running image's (unless the
    bootloader is configured with ``ignore_security_counter``).
    """

    # slots: a fleet simulator holds one per device while thousands of them download
    __slots__ = (
        "_download",
        "_tail",
        "_tail_received",
        "allow_downgrade",
        "boot",
        "current",
        "image",
        "journal",
        "keys",
    )

    def __init__(
        self,
        bootloader: Bootloader,
        journal: Journal,
        keys: Sequence[PublicKey],
        *,
        current_version: str,
        image: int = 0,
        allow_downgrade: bool = False,
    ) -> None:
        self.boot = bootloader
        self.journal = journal
        self.keys = tuple(keys)
        self.current = FirmwareVersion.parse(current_version)
        self.image = image
        self.allow_downgrade = allow_downgrade
        self._download: Download | None = None
        # the download's bytes in the trailer area, never written to flash (see sha256())
        self._tail = bytearray()
        self._tail_received = bytearray()

    def progress(self) -> JournalRecord | None:
        return self.journal.load()

    @property
    def _slot_size(self) -> int:
        return self.boot.map.primary(self.image).size

    @property
    def data_end(self) -> int:
        """Where the slot's trailer starts: no downloaded byte is written at or past it."""
        return self.boot.map.max_image_size(self.image)

    def open(self, download: Download) -> int:
        # An imgtool --pad image fills the whole slot, trailer included: its trailer bytes are
        # not written, and verify() checks the image itself fits below the trailer.
        if download.size > self._slot_size:
            raise ImageTooLargeError(
                f"the image is {download.size} bytes, larger than the {self._slot_size}-byte slot",
                value=download.size,
            )
        self._download = download
        tail = max(0, download.size - self.data_end)
        self._tail = bytearray(b"\xff" * tail)
        self._tail_received = bytearray(tail)
        record = self.journal.load()
        if record is not None and record.download.same_image(download):
            # durable bytes never reach into the trailer area (commit), so the tail is sent again
            durable = min(record.durable, self.data_end)
            log.info("resuming image %d at byte %d of %d", self.image, durable, download.size)
            return durable
        log.info("erasing the secondary slot of image %d", self.image)
        self.boot.secondary(self.image).erase_all()
        self.journal.save(JournalRecord(download, 0))
        return 0

    def write(self, offset: int, data: bytes) -> None:
        """Write at any offset: NOR programming of equal bytes is idempotent, so an unaligned
        start is widened with the bytes already there and the end padded with erased bytes.
        Bytes in the slot's trailer area are kept in memory, not written."""
        data_end = self.data_end
        if offset + len(data) > data_end:
            self._keep_tail(offset, data, data_end)
            data = data[: max(0, data_end - offset)]
        if not data:
            return
        _program(self.boot, self.image, offset, data)

    def _keep_tail(self, offset: int, data: bytes, data_end: int) -> None:
        start = max(offset, data_end)
        end = offset + len(data)
        if end > self._slot_size:
            raise FlashError(
                f"a write of {len(data)} bytes at {offset} ends past the {self._slot_size}-byte "
                "slot",
                value=offset,
            )
        first = start - data_end
        if first + (end - start) > len(self._tail):  # past the announced size: grow
            grow = first + (end - start) - len(self._tail)
            self._tail += b"\xff" * grow
            self._tail_received += bytes(grow)
        self._tail[first : first + end - start] = data[start - offset :]
        self._tail_received[first : first + end - start] = b"\x01" * (end - start)

    def commit(self, end: int) -> None:
        assert self._download is not None, "open() first"
        self.boot.flash.flush()
        # bytes in the trailer area are not in flash: they are not durable
        self.journal.save(JournalRecord(self._download, min(end, self.data_end)))

    def sha256(self, size: int) -> bytes:
        """SHA-256 of the first ``size`` bytes written (what the file's digest covers), the
        trailer-area bytes received since :meth:`open` included. Raises
        :class:`HashMismatchError` when some of them were not received."""
        data_end = self.data_end
        hasher = hashlib.sha256()
        for chunk in iter_range(self.boot.update_area(self.image), 0, min(size, data_end)):
            hasher.update(chunk)
        if size > data_end:
            tail = size - data_end
            if len(self._tail_received) < tail or not all(self._tail_received[:tail]):
                raise HashMismatchError(
                    f"bytes {data_end} to {size} of the download were not received",
                    value=size,
                )
            hasher.update(bytes(self._tail[:tail]))
        return hasher.digest()

    def verify(self) -> str:
        verified = self._verified()
        return str(FirmwareVersion.from_image(verified.version))

    def _verified(self) -> VerifiedImage:
        slot = self.boot.update_area(self.image)
        data_end = self.data_end
        verified = verify_image(slot, self.keys or None, max_size=data_end)
        version = FirmwareVersion.from_image(verified.version)
        if not self.allow_downgrade and not version > self.current:
            raise DowngradeError(
                f"the downloaded image is {version}, not newer than the running {self.current}",
                value=str(version),
            )
        self.boot.check_security_counter(verified, self.image)
        # what follows the TLVs up to the trailer must be erased: written bytes there are
        # unsigned (appended to the file); an imgtool --pad image has only erased bytes there
        end = data_end if self._download is None else min(data_end, self._download.size)
        check_erased_after(
            self.boot.update_area(self.image), verified.layout, end, self.boot.flash.erased_value
        )
        return verified

    def set_pending(self, *, permanent: bool) -> None:
        log.info("image %d pending (%s)", self.image, "permanent" if permanent else "test")
        self.boot.set_pending(self.image, permanent=permanent)
        self.boot.flash.flush()
        self.journal.clear()

    def abort(self) -> None:
        log.info("erasing the secondary slot of image %d (aborted)", self.image)
        self.boot.secondary(self.image).erase_all()
        self.boot.flash.flush()
        self.journal.clear()
        self._download = None
        self._tail = bytearray()
        self._tail_received = bytearray()


def _program(boot: Bootloader, image: int, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of image ``image``'s update area. NOR programming of equal
    bytes is idempotent, so an unaligned start is widened with the bytes already there and the
    end padded with erased bytes."""
    slot = boot.update_area(image)
    align = boot.flash.write_align
    start = offset - offset % align
    head = slot.read_at(start, offset - start)
    block = head + data
    block += bytes([boot.flash.erased_value]) * (-len(block) % align)
    slot.write(start, block)


_DETECT = MAGIC_OFFSET + 5  # bytes needed to tell a package ("ustar" at 257) from an image


class UpdateStorage:
    """An MCUboot device's update target for a single image or a multi-image TAR package.

    The kind of download is told from its first 262 bytes (``ustar`` at byte 257):

    - a **single image** is written to image 0's secondary slot by a :class:`SlotStorage`,
      exactly as that class does (same journal records, same checks). Until 262 bytes have
      arrived the bytes go to that slot too; a download larger than image 0's slot cannot be an
      image, so nothing is erased or written until its first bytes show it is a package
      (otherwise :class:`ImageTooLargeError`, as SlotStorage raises at :meth:`open`);
    - a **package** is demultiplexed by a :class:`~otakit.device.core.package.PackageStream`
      as it arrives: when components.json is complete and checked (each component names an
      image of this flash map and fits below its slot's trailer) the secondary slots it names
      are erased, then each component's bytes are written to its slot. Every
      :meth:`commit` saves the stream's state with the journal record, so a power cut at any
      byte resumes there. :meth:`verify` checks every image (hash, signature with ``keys``,
      not older than the running image of its slot, at least one newer, the security counter,
      nothing unsigned after its TLVs, and the DEPENDENCY TLVs against the images that will
      run); :meth:`set_pending` marks them all pending, in dependency order (see there).

    :attr:`installed` lists ``(image, version)`` of what :meth:`verify` accepted, for the
    after-boot check of a driver (every image must run its new version before confirming).
    """

    # slots: a fleet simulator holds one per device while thousands of them download
    __slots__ = (
        "_download",
        "_head",
        "_mode",
        "_slot_open",
        "_stream",
        "_verified",
        "allow_downgrade",
        "boot",
        "current",
        "installed",
        "journal",
        "keys",
        "single",
    )

    def __init__(
        self,
        bootloader: Bootloader,
        journal: Journal,
        keys: Sequence[PublicKey],
        *,
        current_version: str,
        allow_downgrade: bool = False,
    ) -> None:
        self.single = SlotStorage(
            bootloader,
            journal,
            keys,
            current_version=current_version,
            allow_downgrade=allow_downgrade,
        )
        self.boot = bootloader
        self.journal = journal
        self.keys = self.single.keys  # the same tuple(keys): immutable, kept once
        self.current = self.single.current  # the same parsed version (frozen)
        self.allow_downgrade = allow_downgrade
        self.installed: tuple[tuple[int, FirmwareVersion], ...] = ()
        self._download: Download | None = None
        self._mode = "none"  # none, undecided, image, package
        self._slot_open = False  # undecided: image 0's secondary slot was opened by `single`
        self._head = bytearray()  # undecided: the first bytes
        self._stream: PackageStream | None = None
        self._verified: dict[int, VerifiedImage] = {}

    # --- Storage -------------------------------------------------------------------------------

    def progress(self) -> JournalRecord | None:
        return self.journal.load()

    @property
    def is_package(self) -> bool:
        """Whether the download in progress is a TAR package."""
        return self._mode == "package"

    def _slots(self) -> dict[int, int]:
        return {image: self.boot.map.max_image_size(image) for image in self.boot.map.images}

    def open(self, download: Download) -> int:
        """Prepare for ``download``; return the durable bytes to resume from. Raises
        ImageTooLargeError for a download that fits neither as an image nor as a package."""
        self._download = download
        self._stream, self._head, self._slot_open = None, bytearray(), False
        self._verified, self.installed = {}, ()
        record = self.journal.load()
        same = record is not None and record.download.same_image(download)
        if same and record is not None and record.package is not None:
            try:
                stream = PackageStream.from_dict(record.package, download.size, slots=self._slots())
            except OtakitError as exc:
                log.warning("the package download cannot be resumed (%s): starting over", exc)
            else:
                if stream.position == record.durable:
                    self._mode, self._stream = "package", stream
                    log.info(
                        "resuming the package at byte %d of %d", stream.position, download.size
                    )
                    return stream.position
            self.journal.clear()  # not a record SlotStorage may resume either
        slot_size = self.boot.map.primary(0).size
        if download.size < MIN_PACKAGE_SIZE:
            self._mode = "image"
            return self.single.open(download)
        if download.size > slot_size:
            # only a package can be this large: nothing is erased before its first bytes
            self._mode = "undecided"
            self.journal.save(JournalRecord(download, 0))
            return 0
        stored = self.single.open(download)
        if stored >= _DETECT:
            self._mode = "image"  # a package would have been resumed above
            return stored
        self._mode, self._slot_open = "undecided", True
        self._head = bytearray(self.boot.update_area(0).read_at(0, stored))
        return stored

    def write(self, offset: int, data: bytes) -> None:
        """Write the download's bytes at ``offset``. Raises FlashError for a write past a gap
        in a package or before :meth:`open`, what PackageStream raises for a bad package, and
        ImageTooLargeError for an image larger than image 0's slot."""
        if self._mode == "image":
            self.single.write(offset, data)
        elif self._mode == "undecided":
            self._write_undecided(offset, data)
        elif self._mode == "package":
            self._write_package(offset, data)
        else:
            raise FlashError("write before open()", value=offset)

    def _write_undecided(self, offset: int, data: bytes) -> None:
        assert self._download is not None
        known = len(self._head)
        if offset > known:
            raise FlashError(
                f"a write at byte {offset} leaves a gap after byte {known}", value=offset
            )
        data = data[known - offset :]
        if self._slot_open:
            self.single.write(known, data)
        need = min(_DETECT, self._download.size) - known
        self._head += data[:need]  # only what detection needs: a first range may be 1 MiB
        if len(self._head) < min(_DETECT, self._download.size):
            return
        head, self._head = bytes(self._head), bytearray()
        if not is_package(head):
            if not self._slot_open:
                size = self.boot.map.primary(0).size
                raise ImageTooLargeError(
                    f"the image is {self._download.size} bytes, larger than the {size}-byte slot",
                    value=self._download.size,
                )
            self._mode = "image"
            return
        log.info("the download is a TAR package")
        if self._slot_open:
            self._erase(0)  # the package's first bytes were written there
        self._mode = "package"
        self._stream = PackageStream(self._download.size, slots=self._slots())
        self._write_package(0, head)
        if len(data) > need:
            self._write_package(len(head), data[need:])

    def _write_package(self, offset: int, data: bytes) -> None:
        stream = self._stream
        assert stream is not None
        if offset > stream.position:
            raise FlashError(
                f"a write at byte {offset} leaves a gap after byte {stream.position}",
                value=offset,
            )
        data = data[stream.position - offset :]  # bytes already demultiplexed come again
        for step in stream.feed(data):
            if isinstance(step, SlotWrite):
                _program(self.boot, step.image, step.offset, step.data)
            else:
                self._start(step)

    def _start(self, manifest: PackageManifest) -> None:
        """components.json arrived and fits: erase the secondary slots the package uses."""
        for component in manifest.components:
            log.info(
                "erasing the secondary slot of image %d for %s (%s, %d bytes)",
                component.image_index, component.name, component.file_type, component.size,
            )  # fmt: skip
            self._erase(component.image_index)

    def _erase(self, image: int) -> None:
        """Erase the secondary slot of ``image``, skipping sectors that already read erased
        (wear, and time: SlotStorage.open has just erased image 0's)."""
        area = self.boot.map.secondary(image)
        sector = self.boot.flash.sector_size
        for start in range(area.offset, area.offset + area.size, sector):
            if not self.boot.flash.is_erased(start, sector):
                self.boot.flash.erase(start, sector)

    def commit(self, end: int) -> None:
        """Make the bytes so far durable and record them (with the package state)."""
        if self._mode == "package":
            assert self._download is not None
            assert self._stream is not None
            self.boot.flash.flush()
            stream = self._stream
            self.journal.save(JournalRecord(self._download, stream.position, stream.to_dict()))
        elif self._mode == "undecided":
            if self._slot_open:
                self.single.commit(min(end, len(self._head)))
        else:
            self.single.commit(end)

    def sha256(self, size: int) -> bytes:
        """SHA-256 of the first ``size`` bytes of the download, read back from the slots and
        the package's kept bytes. Raises HashMismatchError when some were not received."""
        if self._mode != "package":
            return self.single.sha256(size)
        assert self._stream is not None
        if size > self._stream.position:
            raise HashMismatchError(
                f"bytes {self._stream.position} to {size} of the download were not received",
                value=size,
            )
        hasher = hashlib.sha256()
        left = size
        for segment in self._stream.segments():
            if left <= 0:
                break
            length = min(segment.length, left)
            if segment.image is None:
                hasher.update(segment.data[:length])
            else:
                area = self.boot.update_area(segment.image)
                for chunk in iter_range(area, segment.start, segment.start + length):
                    hasher.update(chunk)
            left -= length
        return hasher.digest()

    def verify(self) -> str:
        """Check the complete download; return its version (image 0's for a package that has
        one, else the package's). Raises what SlotStorage.verify raises for an image; for a
        package what PackageStream raises (truncated, a listed member missing), a
        verification error of any image, DowngradeError (an image older than the running
        one of its slot, nothing newer, a lower security counter) and DependencyError."""
        if self._mode != "package":
            version = self.single.verify()
            self.installed = ((0, FirmwareVersion.parse(version)),)
            return version
        assert self._stream is not None
        manifest = self._stream.finish()
        verified: dict[int, VerifiedImage] = {}
        for component in manifest.components:
            verified[component.image_index] = self._verify_image(
                component.image_index, component.size
            )
        versions = {i: FirmwareVersion.from_image(v.version) for i, v in verified.items()}
        if not self.allow_downgrade and not any(
            versions[i] > self._running_version(i) for i in versions
        ):
            raise DowngradeError(
                "no image of the package is newer than the one running: "
                + ", ".join(f"image {i} {versions[i]}" for i in sorted(versions)),
                value=manifest.version,
            )
        self._check_dependencies(verified)
        self._verified = verified
        self.installed = tuple(sorted(versions.items()))
        if 0 in versions:
            return str(versions[0])
        return str(FirmwareVersion.parse(manifest.version))

    def _running_version(self, image: int) -> FirmwareVersion:
        """What runs in image ``image``: the agent's version for image 0, the primary slot's
        header otherwise (0.0.0 when it has none)."""
        if image == 0:
            return self.current
        version = self.boot.slot_version(image)
        return FirmwareVersion.from_image(version or ImageVersion(0, 0, 0, 0))

    def _verify_image(self, image: int, size: int) -> VerifiedImage:
        area = self.boot.update_area(image)
        limit = self.boot.map.max_image_size(image)
        try:
            verified = verify_image(area, self.keys or None, max_size=limit)
        except OtakitError as exc:
            exc.message = f"image {image}: {exc.message}"
            exc.args = (exc.message,)
            raise
        version = FirmwareVersion.from_image(verified.version)
        running = self._running_version(image)
        if not self.allow_downgrade and version < running:
            raise DowngradeError(
                f"image {image} of the package is {version}, older than the running {running}",
                value=str(version),
            )
        self.boot.check_security_counter(verified, image)
        check_erased_after(area, verified.layout, size, self.boot.flash.erased_value)
        return verified

    def _check_dependencies(self, verified: dict[int, VerifiedImage]) -> None:
        """Every DEPENDENCY TLV of a new image must hold for the images that will run: the
        package's own, or the primary slot's for an image it does not hold."""
        for image, candidate in sorted(verified.items()):
            for dep in _dependencies(candidate):
                if dep.image_id not in self.boot.map.images:
                    raise DependencyError(
                        f"image {image} depends on image {dep.image_id}, which this device "
                        "does not have",
                        value=dep.image_id,
                    )
                other = verified.get(dep.image_id)
                have = other.version if other is not None else self.boot.slot_version(dep.image_id)
                if have is None or have < dep.min_version:
                    raise DependencyError(
                        f"image {image} needs image {dep.image_id} at {dep.min_version} or "
                        f"later; it would run {have if have is not None else 'nothing'}",
                        value=str(dep.min_version),
                    )

    def set_pending(self, *, permanent: bool) -> None:
        """Mark every verified image pending (TEST, or PERM when ``permanent``), then one flush
        and the journal is cleared.

        Order: MCUboot acts on each image's own trailer, so a power cut between two marks
        leaves one image pending alone. Images whose DEPENDENCY TLVs name another image of
        the package are marked first: alone, such an image's dependency is not met (the other
        image stays in its primary slot, older) and ``boot_verify_dependencies`` upgrades
        nothing at all. The images others depend on are marked last, once every dependent is
        already pending. Without dependency TLVs a lone TEST upgrade is possible; the driver's
        after-boot check (every image of :attr:`installed` must run) then does not confirm it,
        and the next reset reverts it.
        """
        if self._mode != "package":
            self.single.set_pending(permanent=permanent)
            return
        for image in pending_order(self._verified):
            log.info("image %d pending (%s)", image, "permanent" if permanent else "test")
            self.boot.set_pending(image, permanent=permanent)
        self.boot.flash.flush()
        self.journal.clear()

    def abort(self) -> None:
        """Forget the download: erase the secondary slots it wrote (a single image's slot as
        SlotStorage does; every slot a package named), clear the journal. A slot the download
        did not touch is left as it was. Without :meth:`open` (a new process) what the journal
        records is erased."""
        if self._mode == "image" or (self._mode == "none" and not self._journal_package()):
            self.single.abort()
        else:
            images: set[int] = {0} if self._slot_open else set()
            if self._stream is not None:
                images |= set(self._stream.images())
            elif self._mode == "none":
                images = self._journal_package() or {0}
            for image in sorted(images):
                log.info("erasing the secondary slot of image %d (aborted)", image)
                self._erase(image)
            self.boot.flash.flush()
            self.journal.clear()
        self._download, self._stream, self._mode = None, None, "none"
        self._head, self._verified, self._slot_open = bytearray(), {}, False

    def _journal_package(self) -> set[int]:
        """The images of the package the journal records (empty: none recorded)."""
        record = self.journal.load()
        if record is None or record.package is None:
            return set()
        try:
            stream = PackageStream.from_dict(
                record.package, record.download.size, slots=self._slots()
            )
        except OtakitError:
            return set(self.boot.map.images)
        return set(stream.images()) or {0}


def pending_order(verified: Mapping[int, VerifiedImage]) -> list[int]:
    """The order to mark a package's images pending in: images whose DEPENDENCY TLVs name
    another image of the package first (see :meth:`UpdateStorage.set_pending`)."""
    depending = {
        image
        for image, candidate in verified.items()
        if any(d.image_id in verified and d.image_id != image for d in _dependencies(candidate))
    }
    return sorted(verified, key=lambda image: (image not in depending, image))


def _dependencies(candidate: VerifiedImage) -> list[Dependency]:
    """The DEPENDENCY TLVs of an image's protected area (where MCUboot reads them)."""
    return [
        Dependency.unpack(t.value)
        for t in candidate.layout.protected_tlvs
        if t.kind == TlvType.DEPENDENCY
    ]
