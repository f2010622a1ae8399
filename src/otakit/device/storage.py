"""Where a download is written: one interface for every transport (HTTP, MQTT, push).

A storage target is opened for a :class:`~otakit.device.journal.Download`, written at offsets,
committed (the bytes so far made durable and recorded for resumption), verified, and finally set
pending (or aborted, which leaves the target clean). Two targets exist:

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
from collections.abc import Sequence
from typing import Protocol

from otakit.device.bootloader import Bootloader
from otakit.device.journal import Download, Journal, JournalRecord
from otakit.errors import (
    DowngradeError,
    FlashError,
    HashMismatchError,
    ImageTooLargeError,
)
from otakit.image.keys import PublicKey
from otakit.image.layout import check_erased_after
from otakit.image.source import iter_range
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
        slot = self.boot.update_area(self.image)
        align = self.boot.flash.write_align
        start = offset - offset % align
        head = slot.read_at(start, offset - start)
        block = head + data
        block += bytes([self.boot.flash.erased_value]) * (-len(block) % align)
        slot.write(start, block)

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
