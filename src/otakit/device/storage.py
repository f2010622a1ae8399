"""Where a download is written: one interface for every transport (HTTP, MQTT, push).

A storage target is opened for a :class:`~otakit.device.journal.Download`, written at offsets,
committed (the bytes so far made durable and recorded for resumption), verified, and finally set
pending (or aborted, which leaves the target clean). Two targets exist:

- :class:`SlotStorage`: the secondary slot of an MCUboot device (the flash model and bootloader
  of otakit.device); the image is verified (hash, signature, version, size) before it is marked
  pending, as a TEST or PERM request;
- ``otakit.device.gateway.GatewayStorage``: the gateway model of protocols.md §7, a file in a
  littlefs file system on external flash, then programmed into the attached MCU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from otakit.device.bootloader import Bootloader
from otakit.device.journal import Download, Journal, JournalRecord
from otakit.errors import DowngradeError, ImageTooLargeError
from otakit.image.keys import PublicKey
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
    """The secondary slot of image ``image`` on an MCUboot device."""

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

    def progress(self) -> JournalRecord | None:
        return self.journal.load()

    @property
    def _slot_size(self) -> int:
        return self.boot.map.primary(self.image).size

    def open(self, download: Download) -> int:
        # An imgtool --pad image fills the whole slot, trailer included; verify() checks the
        # image itself fits below the trailer.
        if download.size > self._slot_size:
            raise ImageTooLargeError(
                f"the image is {download.size} bytes, larger than the {self._slot_size}-byte slot",
                value=download.size,
            )
        self._download = download
        record = self.journal.load()
        if record is not None and record.download.same_image(download):
            log.info(
                "resuming image %d at byte %d of %d", self.image, record.durable, download.size
            )
            return record.durable
        log.info("erasing the secondary slot of image %d", self.image)
        self.boot.secondary(self.image).erase_all()
        self.journal.save(JournalRecord(download, 0))
        return 0

    def write(self, offset: int, data: bytes) -> None:
        """Write at any offset: NOR programming of equal bytes is idempotent, so an unaligned
        start is widened with the bytes already there and the end padded with erased bytes."""
        slot = self.boot.secondary(self.image)
        align = self.boot.flash.write_align
        start = offset - offset % align
        head = slot.read_at(start, offset - start)
        block = head + data
        block += b"\xff" * (-len(block) % align)
        slot.write(start, block)

    def commit(self, end: int) -> None:
        assert self._download is not None, "open() first"
        self.boot.flash.flush()
        self.journal.save(JournalRecord(self._download, end))

    def verify(self) -> str:
        verified = self._verified()
        return str(FirmwareVersion.from_image(verified.version))

    def _verified(self) -> VerifiedImage:
        slot = self.boot.secondary(self.image)
        verified = verify_image(
            slot, self.keys or None, max_size=self.boot.map.max_image_size(self.image)
        )
        version = FirmwareVersion.from_image(verified.version)
        if not self.allow_downgrade and not version > self.current:
            raise DowngradeError(
                f"the downloaded image is {version}, not newer than the running {self.current}",
                value=str(version),
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
