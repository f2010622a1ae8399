"""A delta update on an MCUboot device: the patch stored beside the agent's journal, then
applied from the primary slot (the running image, the patch's base) into the secondary slot.

:class:`DeltaStorage` is a :class:`~otakit.device.storage.Storage`, so every transport
downloads a patch exactly as it downloads an image (the resumable ranged download over HTTP,
the chunk assembly over MQTT), then the agent verifies it as any download:

- ``open``/``write``/``commit``: the patch goes to a file beside the journal
  (``<journal>-delta.part``, fsynced at every range) and its own journal
  (``<journal>-delta.json``) records the durable bytes, so a cut download resumes with Range.
  Nothing of the secondary slot is touched while the patch downloads.
- :meth:`DeltaStorage.apply` (the agent calls it when the patch is stored, before VERIFY):
  the patch's SHA-256 must be the offered one, its header and
  digest good (:func:`~otakit.image.delta.check_delta`), its base and result the offered ones
  and its base the image in the primary slot (:func:`~otakit.image.delta.check_base`), all
  before anything is erased. Then the wrapped slot storage is opened for the result (it erases
  the secondary slot, or resumes), the patch is applied streaming into it and every block
  committed to the slot storage's journal (the durable resume point). :meth:`DeltaStorage.
  verify` then verifies the result as any image: hash and signature, version, security
  counter (:meth:`SlotStorage.verify <otakit.device.storage.SlotStorage.verify>`).
- A power cut while applying: the next attempt finds the patch complete (:meth:`ready`), does
  not download it again, and applies it again from byte 0 of the patch with ``written=`` the
  slot journal's durable point (the decoder is deterministic; the blocks below it are decoded,
  not written again).
- ``set_pending`` hands over to the slot storage, then removes the patch and its journal;
  ``abort`` leaves the secondary slot clean and removes them too.

A problem of the patch raises :class:`~otakit.errors.DeltaError` with its reason; the agent
then aborts this storage and downloads the full image in the same attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import logging
import os
from pathlib import Path

from otakit.device.journal import Download, Journal, JournalRecord
from otakit.device.storage import Storage
from otakit.device.transports.base import DeltaJob
from otakit.errors import DeltaError, FlashError, OtakitError
from otakit.image.delta import COMPRESSIONS, apply_delta, check_base, check_delta, image_digest
from otakit.image.source import ByteSource

log = logging.getLogger("otakit.storage")

RESULT_SOURCE = "delta:"
"""The prefix of the slot journal's download while a patch is applied: ``delta:<patch sha256>``."""


def delta_compressions() -> tuple[str, ...]:
    """The compressions this agent applies (what its check-in offers as ``delta``): those of
    :data:`~otakit.image.delta.COMPRESSIONS`, or none when detools is not installed."""
    if importlib.util.find_spec("detools") is None:
        return ()
    return tuple(COMPRESSIONS)


class DeltaStorage:
    """Downloads a patch into ``patch`` (a file, or a bytearray that the caller keeps, as a
    fleet simulator's in-memory device does; ``journal`` records its durable bytes) and
    applies it from ``base`` (the primary slot of image 0) into ``inner`` (the
    :class:`~otakit.device.storage.UpdateStorage` or
    :class:`~otakit.device.storage.SlotStorage` of the same device, with its own journal).

    :meth:`prepare` names the offered patch before a download; :meth:`running_sha256` is the
    running image's digest, computed once (the primary slot changes only across a reboot)."""

    def __init__(
        self, inner: Storage, base: ByteSource, journal: Journal, patch: Path | bytearray
    ) -> None:
        self.inner = inner
        self.base = base
        self.journal = journal
        self.patch = patch if isinstance(patch, bytearray) else Path(patch)
        self.accepts = delta_compressions()
        self._running: tuple[str | None] | None = None
        self._offer: DeltaJob | None = None
        self._version = ""
        self._download: Download | None = None
        self._applied = False

    @classmethod
    def beside(
        cls, inner: Storage, base: ByteSource, journal: str | os.PathLike[str]
    ) -> DeltaStorage:
        """The patch and its journal next to the agent's journal file ``journal``:
        ``<stem>-delta.part`` and ``<stem>-delta.json``."""
        path = Path(journal)
        return cls(
            inner,
            base,
            Journal(path.with_name(f"{path.stem}-delta.json")),
            path.with_name(f"{path.stem}-delta.part"),
        )

    # --- what runs -----------------------------------------------------------------------------

    def running_sha256(self) -> str | None:
        """:func:`~otakit.image.delta.image_digest` of the primary slot (64 lowercase hex), or
        None when it holds no readable image. Computed on the first call only."""
        if self._running is None:
            try:
                digest: str | None = image_digest(self.base).sha256.hex()
            except OtakitError as exc:
                log.warning("the running image cannot be identified: %s", exc.message)
                digest = None
            self._running = (digest,)
        return self._running[0]

    def prepare(self, offer: DeltaJob, *, version: str = "") -> None:
        """The patch to download and apply next, for the job's ``version``."""
        self._offer = offer
        self._version = version
        self._applied = False

    def ready(self) -> bool:
        """Whether the prepared patch is already stored whole (a power cut came while it was
        applied): it is then applied without downloading it again."""
        offer = self._offer
        record = self.journal.load()
        if offer is None or record is None or record.durable != record.download.size:
            return False
        known = record.download.sha256
        if known is None or known.lower() != offer.sha256.lower():
            return False
        return self._size() == record.download.size

    # --- Storage: the patch download -----------------------------------------------------------

    def progress(self) -> JournalRecord | None:
        return self.journal.load()

    def open(self, download: Download) -> int:
        """Prepare the patch file for ``download``; the bytes of it already stored. Raises
        DeltaError (``CORRUPT``) when the server's file is not the size the offer said."""
        offer = self._require_offer()
        if download.size != offer.size:
            raise DeltaError(
                f"the patch is {download.size} bytes, the offer said {offer.size}",
                reason="CORRUPT",
                value=download.size,
            )
        self._download = download
        record = self.journal.load()
        if record is not None and record.download.same_image(download):
            stored = self._size()
            if stored is not None:
                stored = min(record.durable, stored)
                log.info("resuming the delta patch at byte %d of %d", stored, download.size)
                return stored
        log.info("storing a %d-byte delta patch", download.size)
        if isinstance(self.patch, bytearray):
            self.patch.clear()
        else:
            self.patch.parent.mkdir(parents=True, exist_ok=True)
            self.patch.write_bytes(b"")
        self.journal.save(JournalRecord(download, 0))
        return 0

    def _size(self) -> int | None:
        """The patch bytes stored (None: no patch file)."""
        if isinstance(self.patch, bytearray):
            return len(self.patch)
        try:
            return self.patch.stat().st_size
        except OSError:
            return None

    def _source(self) -> Path | bytes:
        return bytes(self.patch) if isinstance(self.patch, bytearray) else self.patch

    def write(self, offset: int, data: bytes) -> None:
        if self._download is None:
            raise FlashError("write before open()", value=offset)
        if offset + len(data) > self._download.size:
            raise DeltaError(
                f"a write of {len(data)} bytes at {offset} ends past the "
                f"{self._download.size}-byte patch",
                reason="CORRUPT",
                value=offset,
            )
        if isinstance(self.patch, bytearray):
            if len(self.patch) < offset:
                self.patch += bytes(offset - len(self.patch))
            self.patch[offset : offset + len(data)] = data
            return
        with self.patch.open("r+b") as file:
            file.seek(offset)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def commit(self, end: int) -> None:
        if self._download is None:
            raise FlashError("commit before open()", value=end)
        self.journal.save(JournalRecord(self._download, end))

    # --- Storage: apply and verify -------------------------------------------------------------

    def verify(self) -> str:
        """:meth:`apply` (when not done yet), then verify the result as any image (the slot
        storage's ``verify``: hash, signature, version, security counter); its version."""
        if not self._applied:
            self.apply()
        return self.inner.verify()

    def apply(self) -> None:
        """Check the stored patch and its base (before anything is erased), then apply it into
        the slot storage, resuming at its journal's durable point.

        Raises DeltaError (the patch, its base or its result; the caller falls back to the
        full image) and what the slot storage raises (a flash error)."""
        offer = self._require_offer()
        record = self.journal.load()
        if record is None or record.durable < record.download.size:
            raise DeltaError(
                "the delta patch is not stored whole", reason="TRUNCATED", value=offer.size
            )
        patch = self._source()
        self._check_file(offer, patch)
        header = check_delta(patch)
        if header.base_sha256.hex() != offer.base_sha256.lower():
            raise DeltaError(
                "the patch names another base than the offer", reason="WRONG_BASE",
                value=header.base_sha256.hex(),
            )  # fmt: skip
        if header.new_sha256.hex() != offer.new_sha256.lower():
            raise DeltaError(
                "the patch makes another image than the offer says", reason="CORRUPT",
                value=header.new_sha256.hex(),
            )  # fmt: skip
        check_base(header, self.base)  # WRONG_BASE: nothing of the slot touched yet
        result = Download(
            source=RESULT_SOURCE + offer.sha256.lower(),
            size=header.new_size,
            version=self._version,
            sha256=offer.new_sha256.lower(),
        )
        written = self.inner.open(result)
        if written:
            log.info("resuming the delta apply at byte %d of %d", written, header.new_size)
        apply_delta(
            self.base,
            patch,
            self.inner,
            written=written,
            progress=lambda done, _total: self.inner.commit(done),
        )
        self._applied = True

    def _check_file(self, offer: DeltaJob, patch: Path | bytes) -> None:
        hasher = hashlib.sha256()
        try:
            if isinstance(patch, bytes):
                hasher.update(patch)
            else:
                with patch.open("rb") as file:
                    while chunk := file.read(64 * 1024):
                        hasher.update(chunk)
        except OSError as exc:
            raise DeltaError(
                f"the stored delta patch cannot be read: {exc}", reason="TRUNCATED"
            ) from None
        if not hmac.compare_digest(hasher.hexdigest(), offer.sha256.lower()):
            raise DeltaError(
                "the delta patch's SHA-256 is not the offered one",
                reason="CORRUPT",
                value=hasher.hexdigest(),
            )

    def set_pending(self, *, permanent: bool) -> None:
        self.inner.set_pending(permanent=permanent)
        self.discard()

    def abort(self) -> None:
        """Leave the secondary slot clean (the slot storage's abort) and remove the patch."""
        try:
            self.inner.abort()
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the patch file and its journal (nothing else)."""
        self._download = None
        self._applied = False
        self.journal.clear()
        if isinstance(self.patch, bytearray):
            self.patch.clear()
        else:
            self.patch.unlink(missing_ok=True)

    def _require_offer(self) -> DeltaJob:
        if self._offer is None:
            raise DeltaError("no delta patch was prepared", reason="NOT_A_DELTA")
        return self._offer
