"""An MCUboot-compatible bootloader model that survives a power cut at any flash operation.

At every boot, for each image (pair of slots) in turn:

1. An upgrade recorded as in progress in the image's swap status is resumed where it stopped.
2. Otherwise the slot trailers decide, with MCUboot's table (``bootutil/src/swap_misc.c``):

   ==================  ====================  ==============================  ===========
   secondary magic     secondary image_ok    primary (magic, image_ok, cd)   swap type
   ==================  ====================  ==============================  ===========
   good                unset                 any                             TEST
   good                set                   any                             PERM
   unset               any                   (good, unset, set)              REVERT
   otherwise                                                                 NONE
   ==================  ====================  ==============================  ===========

   ``imgtool sign --pad`` writes the magic (a TEST request); ``--pad --confirm`` also image_ok
   (PERM). An agent marks a download pending the same way (:meth:`Bootloader.set_pending`).
3. TEST and PERM: the secondary image is validated (hash, signature by a trusted key, fits the
   primary slot, version not lower than the running image's unless downgrades are allowed,
   security counter not lower unless ``ignore_security_counter``: as in MCUboot, rollback
   protection is independent of version downgrades). If it fails, the secondary trailer is
   erased, the old image keeps running and the reason is reported. Otherwise the images are
   swapped (or, overwrite-only, copied). REVERT swaps back an image that was tested but never
   confirmed. (A received image never brings its own trailer: the storage writes only its
   signed part and sets the request; see :mod:`otakit.device.storage`.)
4. The primary image is validated before it runs; if it is not valid there is nothing to run.

The running application confirms itself with :meth:`Bootloader.confirm` (sets image_ok in the
primary trailer); an unconfirmed TEST image is reverted at the next boot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from otakit.device.flash import Flash
from otakit.device.flashmap import FlashMap
from otakit.device.overwrite import overwrite_steps, run_overwrite
from otakit.device.slot import FlashArea, Slot
from otakit.device.swap_scratch import run_swap, swap_steps
from otakit.device.swap_status import SwapProgress, SwapStatus
from otakit.errors import (
    BadMagicError,
    DowngradeError,
    FlashMapError,
    ImageFormatError,
    OtakitError,
)
from otakit.image.header import ImageVersion
from otakit.image.keys import PublicKey
from otakit.image.layout import ImageLayout, read_layout
from otakit.image.trailer import MAX_ALIGN, SwapType, TrailerState
from otakit.image.verify import VerifiedImage, verify_image


class Strategy(StrEnum):
    SWAP_SCRATCH = "swap-scratch"
    OVERWRITE = "overwrite"


class Action(StrEnum):
    """What a boot did for one image."""

    NONE = "none"  # ran the primary image as it was
    UPGRADE_TEST = "upgrade-test"  # swapped in a new image on trial
    UPGRADE_PERMANENT = "upgrade-permanent"  # swapped (or copied) in a new image for good
    REVERT = "revert"  # swapped back the previous image
    REJECTED = "rejected"  # the candidate image was invalid; its request was erased


_ACTIONS = {
    SwapType.TEST: Action.UPGRADE_TEST,
    SwapType.PERM: Action.UPGRADE_PERMANENT,
    SwapType.REVERT: Action.REVERT,
}


def swap_type_from_trailers(primary: TrailerState, secondary: TrailerState) -> SwapType:
    """MCUboot's decision table (see the module docstring)."""
    if secondary.magic:
        return SwapType.PERM if secondary.image_ok else SwapType.TEST
    if primary.magic and not primary.image_ok and primary.copy_done:
        return SwapType.REVERT
    return SwapType.NONE


@dataclass(frozen=True)
class BootloaderConfig:
    strategy: Strategy = Strategy.SWAP_SCRATCH
    keys: tuple[PublicKey, ...] = ()  # empty: images are checked for integrity only
    allow_downgrade: bool = False  # versions only: the security counter is still enforced
    ignore_security_counter: bool = False  # turns off rollback protection (TLV 0x50) itself


@dataclass(frozen=True)
class ImageBoot:
    """The outcome of a boot for one image."""

    image: int
    action: Action
    resumed: bool  # an interrupted upgrade was completed
    version: ImageVersion | None  # of the image that runs; None if nothing valid can run
    reason: str | None = None  # why a candidate was rejected, or why nothing can run
    error: str | None = None  # the error code that goes with the reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "action": self.action.value,
            "resumed": self.resumed,
            "version": None if self.version is None else str(self.version),
            "reason": self.reason,
            "error": self.error,
        }


@dataclass(frozen=True)
class BootResult:
    images: tuple[ImageBoot, ...]

    @property
    def bootable(self) -> bool:
        return all(i.version is not None for i in self.images)

    def to_dict(self) -> dict[str, Any]:
        return {"bootable": self.bootable, "images": [i.to_dict() for i in self.images]}


@dataclass(frozen=True)
class SlotInfo:
    version: ImageVersion | None  # None when the slot holds no readable image header
    request: str  # trailer request: none, test, permanent


@dataclass(frozen=True)
class ImageStatus:
    """Read-only view of one image pair."""

    image: int
    primary: SlotInfo
    secondary: SlotInfo
    state: str  # "confirmed", "testing" (reverts at next boot unless confirmed), "upgrading"
    pending: str  # what the next boot will do: none, test, permanent, revert, resume

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            # mid-upgrade the primary slot holds parts of two images: nothing runs until a boot
            "running": None
            if self.primary.version is None or self.state == "upgrading"
            else str(self.primary.version),
            "state": self.state,
            "next_boot": self.pending,
            "primary": {"version": _version(self.primary.version)},
            "secondary": {
                "version": _version(self.secondary.version),
                "request": self.secondary.request,
            },
        }


def _version(version: ImageVersion | None) -> str | None:
    return None if version is None else str(version)


class Bootloader:
    """Boots a :class:`~otakit.device.flash.Flash` laid out by a :class:`FlashMap`."""

    def __init__(self, flash: Flash, flashmap: FlashMap, config: BootloaderConfig) -> None:
        self.flash = flash
        self.map = flashmap
        self.config = config
        if flashmap.write_align > MAX_ALIGN:
            raise FlashMapError(
                f"write alignment {flashmap.write_align} is not supported: the trailer layout "
                f"assumes at most {MAX_ALIGN}",
                value=flashmap.write_align,
            )
        scratch = flashmap.scratch
        self._scratch = FlashArea(flash, scratch) if scratch is not None else None
        if config.strategy is Strategy.SWAP_SCRATCH and self._scratch is None:
            raise FlashMapError(
                f"flash map {flashmap.name!r} has no scratch area, which swap-scratch needs; "
                "add one or use the overwrite strategy",
                value=flashmap.name,
            )
        for image in flashmap.images:
            status = self._status(image)
            # the largest upgrade (the whole slot) must fit in the status record
            size = flashmap.primary(image).size
            status.require_capacity(self._steps(size, size - flashmap.trailer_size))

    # --- areas ---------------------------------------------------------------------------------

    def primary(self, image: int = 0) -> Slot:
        return Slot(self.flash, self.map.primary(image))

    def secondary(self, image: int = 0) -> Slot:
        return Slot(self.flash, self.map.secondary(image))

    def _status(self, image: int) -> SwapStatus:
        area = self.map.status(image)
        if area is None:
            raise FlashMapError(
                f"flash map {self.map.name!r} has no status area for image {image}; the "
                "bootloader keeps upgrade progress there",
                value=image,
            )
        return SwapStatus(FlashArea(self.flash, area))

    def _data_end(self, image: int) -> int:
        return self.map.primary(image).size - self.map.trailer_size

    def _steps(self, slot_size: int, copy_size: int) -> int:
        trailer = self.map.trailer_size
        if self.config.strategy is Strategy.OVERWRITE:
            return overwrite_steps(slot_size, self.flash.sector_size, copy_size, trailer)
        assert self._scratch is not None
        return swap_steps(slot_size, self._scratch.size, copy_size, trailer)

    # --- booting -------------------------------------------------------------------------------

    def boot(self) -> BootResult:
        """Run the boot sequence for every image. May raise PowerCut from the flash."""
        return BootResult(tuple(self._boot_image(image) for image in self.map.images))

    def _boot_image(self, image: int) -> ImageBoot:
        status = self._status(image)
        progress = status.read()
        resumed = progress is not None
        reason = error = None
        if progress is None:
            primary, secondary = self.primary(image), self.secondary(image)
            swap_type = swap_type_from_trailers(primary.trailer(), secondary.trailer())
            if self.config.strategy is Strategy.OVERWRITE and swap_type is SwapType.REVERT:
                swap_type = SwapType.NONE  # nothing to go back to
            if swap_type is not SwapType.NONE:
                try:
                    progress = self._prepare(image, swap_type)
                except OtakitError as exc:
                    reason, error = exc.message, exc.code
                    if swap_type is SwapType.REVERT:
                        # the previous image is gone: keep the running one for good
                        primary.write_image_ok()
                    else:
                        secondary.erase_trailer(self.map.trailer_size)
                else:
                    status.start(progress.swap_type, progress.copy_size)
        if progress is not None:
            self._run(image, status, progress)
            action = _ACTIONS[progress.swap_type]
        else:
            action = Action.REJECTED if reason is not None else Action.NONE
        try:
            running = self._validate(self.primary(image), image).version
        except OtakitError as exc:
            return ImageBoot(
                image,
                action,
                resumed,
                None,
                f"no valid image in the primary slot: {exc.message}",
                exc.code,
            )
        return ImageBoot(image, action, resumed, running, reason, error)

    def _run(self, image: int, status: SwapStatus, progress: SwapProgress) -> None:
        primary, secondary = self.primary(image), self.secondary(image)
        if self.config.strategy is Strategy.OVERWRITE:
            run_overwrite(
                primary=primary,
                secondary=secondary,
                status=status,
                progress=progress,
                trailer_size=self.map.trailer_size,
            )
        else:
            assert self._scratch is not None
            run_swap(
                image=image,
                primary=primary,
                secondary=secondary,
                scratch=self._scratch,
                status=status,
                progress=progress,
                trailer_size=self.map.trailer_size,
            )

    def _prepare(self, image: int, swap_type: SwapType) -> SwapProgress:
        """Validate the candidate and size the move; raise an OtakitError to refuse it."""
        candidate = self._validate(self.secondary(image), image)
        if swap_type is not SwapType.REVERT:
            self._check_not_older(candidate, image)
        copy_size = candidate.layout.end
        if self.config.strategy is Strategy.SWAP_SCRATCH:
            copy_size = max(copy_size, self._extent(self.primary(image), image))
        if self.config.strategy is Strategy.OVERWRITE:
            swap_type = SwapType.PERM
        return SwapProgress(swap_type, copy_size, 0)

    def _validate(self, slot: Slot, image: int) -> VerifiedImage:
        keys: Sequence[PublicKey] | None = self.config.keys or None
        return verify_image(slot, keys, max_size=self._data_end(image))

    def _extent(self, slot: Slot, image: int) -> int:
        """Bytes of the slot that hold its image (all of the data area if unsure)."""
        try:
            return read_layout(slot, max_size=self._data_end(image)).end
        except BadMagicError:
            return 0  # no image: nothing to keep
        except ImageFormatError:
            return self._data_end(image)

    def _running(self, image: int) -> ImageLayout | None:
        """The layout of the image in the primary slot, or None if nothing valid is there."""
        try:
            return read_layout(self.primary(image), max_size=self._data_end(image))
        except ImageFormatError:
            return None

    def _check_not_older(self, candidate: VerifiedImage, image: int) -> None:
        current = self._running(image)
        if current is None:
            return  # nothing valid runs: any valid image is an improvement
        if not self.config.allow_downgrade and candidate.version < current.header.version:
            raise DowngradeError(
                f"image {candidate.version} is older than the running {current.header.version}",
                value=str(candidate.version),
            )
        self._check_counter(candidate, current)

    def check_security_counter(self, candidate: VerifiedImage, image: int = 0) -> None:
        """MCUboot's rollback protection, independent of version downgrades: raise
        DowngradeError when ``candidate``'s security counter is lower than the running image's
        (unless ``ignore_security_counter``). An agent calls it before marking an image
        pending; the bootloader checks again at boot."""
        current = self._running(image)
        if current is not None:
            self._check_counter(candidate, current)

    def _check_counter(self, candidate: VerifiedImage, current: ImageLayout) -> None:
        if self.config.ignore_security_counter:
            return
        new_counter, old_counter = candidate.security_counter, current.security_counter
        if old_counter is not None and (new_counter or 0) < old_counter:
            raise DowngradeError(
                f"security counter {new_counter} is lower than the running image's {old_counter}",
                value=new_counter,
            )

    # --- application side ----------------------------------------------------------------------

    def confirm(self, image: int = 0) -> bool:
        """Mark the running image good (image_ok); return whether anything was written."""
        trailer = self.primary(image).trailer()
        if not trailer.magic or trailer.image_ok:
            return False
        self.primary(image).write_image_ok()
        return True

    def set_pending(self, image: int = 0, *, permanent: bool = False) -> None:
        """Request an upgrade to the image in the secondary slot at the next boot.

        The caller verifies the image first. Flags can only be set, never cleared, without
        erasing the trailer sectors (which may hold the end of the image): setting a request
        twice is harmless, and a permanent request stays permanent.
        """
        secondary = self.secondary(image)
        if permanent:
            secondary.write_image_ok()
        secondary.write_magic()

    def status(self) -> list[ImageStatus]:
        return [self._image_status(image) for image in self.map.images]

    def _image_status(self, image: int) -> ImageStatus:
        primary, secondary = self.primary(image), self.secondary(image)
        p_trailer, s_trailer = primary.trailer(), secondary.trailer()
        infos = []
        for slot, trailer in ((primary, p_trailer), (secondary, s_trailer)):
            try:
                version: ImageVersion | None = read_layout(
                    slot, max_size=self._data_end(image)
                ).header.version
            except ImageFormatError:
                version = None
            infos.append(SlotInfo(version, trailer.request))
        if self._status(image).read() is not None:
            state, pending = "upgrading", "resume"
        else:
            testing = p_trailer.magic and not p_trailer.image_ok and p_trailer.copy_done
            state = "testing" if testing else "confirmed"
            swap_type = swap_type_from_trailers(p_trailer, s_trailer)
            if self.config.strategy is Strategy.OVERWRITE and swap_type is SwapType.REVERT:
                swap_type = SwapType.NONE
            pending = {
                SwapType.NONE: "none",
                SwapType.TEST: "test",
                SwapType.PERM: "permanent",
                SwapType.REVERT: "revert",
            }[swap_type]
        return ImageStatus(image, infos[0], infos[1], state, pending)
