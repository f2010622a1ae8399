"""The bootloader: MCUboot's ``loader.c`` boot flow, ported operation for operation.

:meth:`Bootloader.boot` is ``context_boot_go`` of an MCUboot built for the flash map's
strategy (``MCUBOOT_VALIDATE_PRIMARY_SLOT``, no encryption, every image handled as in a
single-image build): for each image,

1. ``boot_prepare_image_for_update``: read both headers; if the slots are compatible, look for
   an interrupted swap (``swap_read_status``), read the headers again with that boot status
   (swap-move and swap-offset give up on the image for this boot when a header is not where
   the status says), and complete the swap (``boot_complete_partial_swap``); otherwise decide
   with the trailers (``boot_swap_type_multi``)::

       secondary magic  secondary image_ok  primary magic/image_ok/copy_done  swap type
       good             unset               any                               TEST
       good             set                 any                               PERM
       any              any                 good / unset / set                REVERT
       otherwise                                                              NONE

   (swap-offset adds a first row: secondary good, image_ok unset, copy_done set -> REVERT).
   For an upgrade the secondary image is validated (``boot_validate_slot``): an invalid one is
   erased (``boot_scramble_slot``) and the swap type becomes NONE.
2. ``boot_perform_update``: swap (``boot_swap_image``, then image_ok for PERM/REVERT and
   copy_done) or, overwrite-only, copy (``boot_copy_image``); FAIL sets image_ok.
3. The primary image is validated before it may run.

What differs per mode is in :mod:`otakit.device.swap_mode` and its implementations; every
trailer access goes through the mode's :class:`~otakit.device.boot_status.TrailerStore`.
swap-status (Infineon's ``cypress`` branch) has a loader of its own, which
:class:`~otakit.device.swap_status.SwapStatusMode` runs whole (:meth:`Bootloader.boot` maps
its outcome to the same :class:`ImageBoot`).

Downgrade prevention (otakit's extra; the harness's MCUboot is built without it) is MCUboot's
own ``MCUBOOT_DOWNGRADE_PREVENTION``, and does nothing unless it refuses something:

- swap modes: ``check_downgrade_prevention`` in ``context_boot_go``, for a TEST or PERM swap
  of a secondary image that passed validation: an image whose version (major, minor,
  revision, then build: ``MCUBOOT_VERSION_CMP_USE_BUILD_NUMBER``) is lower than the primary
  slot's, or (independently, unless ``ignore_security_counter``) whose security counter is
  missing or lower than the primary image's, is erased (``boot_scramble_slot``) and nothing
  is swapped. The primary's header only counts when it has an image magic, and its counter
  only when it has one (a device without a readable image takes any valid update).
  The one exception: swap-move's ``fixup_revert`` turns a revert that is starting into a PERM
  request in the secondary trailer (image_ok, swap_size and magic written, swap_info left
  erased) before it rewrites the primary's trailer. A power cut in that window leaves the old
  image in the secondary slot as a PERM request, and refusing it would lose the old image and
  keep the unconfirmed one for good (MCUboot itself, built with downgrade prevention, does
  so). So a PERM request whose secondary trailer has exactly that shape (swap_size written,
  swap_info erased) while the primary trailer is not a confirmed image's (magic good,
  image_ok and copy_done set) is the revert it is and is not checked.
- overwrite-only: the version check inside ``boot_validate_slot``, before the header checks
  (as loader.c does with OVERWRITE_ONLY), the security counter after the image check (where
  MCUboot's rollback protection refuses an image); both erase the secondary slot.
- swap-status: the Infineon loader has no such check; otakit applies the swap modes' rule at
  the same point of its boot (a refused image is erased as that loader erases an invalid one).

Every refusal is reported with its reason in :class:`ImageBoot`. Without keys images are
checked for integrity only (MCUboot always needs a signature).

:meth:`Bootloader.status` reads without writing anything and validates what it reports (hash,
signature and size limit of each slot's image, as the boot would check them);
:meth:`Bootloader.update_area` says where an update image is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from otakit.device.boot_status import (
    BootStatus,
    BootSwapType,
    Flag,
    Magic,
    SwapState,
    is_upgrade,
    swap_type_from_states,
)
from otakit.device.flash import Flash
from otakit.device.flashmap import Area, FlashMap, Strategy
from otakit.device.slot import FlashArea, Slot
from otakit.device.swap_mode import (
    BOOT_SLOT_PRIMARY,
    BOOT_SLOT_SECONDARY,
    HEADER_SIZE,
    IMAGE_F_COMPRESSED_LZMA1,
    IMAGE_F_COMPRESSED_LZMA2,
    IMAGE_F_ENCRYPTED_AES128,
    IMAGE_F_ENCRYPTED_AES256,
    IMAGE_F_NON_BOOTABLE,
    BootContext,
    McubootError,
    RawHeader,
    SwapMode,
    area_sectors,
    mode_class,
    read_header,
    scramble_slot,
)
from otakit.device.swap_status import BootOutcome, McubootAbort, SwapStatusMode
from otakit.errors import (
    BadMagicError,
    DowngradeError,
    FlashMapError,
    ImageFormatError,
    OtakitError,
)
from otakit.image.header import IMAGE_MAGIC, ImageVersion
from otakit.image.keys import PublicKey
from otakit.image.layout import read_layout
from otakit.image.source import ByteSource
from otakit.image.tlv import Dependency, TlvType
from otakit.image.trailer import SwapType, TrailerState
from otakit.image.verify import VerifiedImage, verify_image

__all__ = [
    "Action",
    "BootResult",
    "Bootloader",
    "BootloaderConfig",
    "ImageBoot",
    "ImageStatus",
    "SlotInfo",
    "Strategy",
    "swap_type_from_trailers",
]


class Action(StrEnum):
    """What a boot did for one image."""

    NONE = "none"  # ran the primary image as it was
    UPGRADE_TEST = "upgrade-test"  # swapped in a new image on trial
    UPGRADE_PERMANENT = "upgrade-permanent"  # swapped (or copied) in a new image for good
    REVERT = "revert"  # swapped back the previous image
    REJECTED = "rejected"  # the candidate image was refused and erased


_ACTIONS = {
    BootSwapType.TEST: Action.UPGRADE_TEST,
    BootSwapType.PERM: Action.UPGRADE_PERMANENT,
    BootSwapType.REVERT: Action.REVERT,
}


def swap_type_from_trailers(primary: TrailerState, secondary: TrailerState) -> SwapType:
    """MCUboot's decision table (``boot_swap_type_multi``) on two decoded trailers; a magic that
    is not good counts as unset, flags are set or not (the otakit trailer view)."""

    def state(t: TrailerState) -> SwapState:
        return SwapState(
            Magic.GOOD if t.magic else Magic.UNSET,
            BootSwapType.NONE,
            0,
            Flag.SET if t.copy_done else Flag.UNSET,
            Flag.SET if t.image_ok else Flag.UNSET,
        )

    return SwapType(int(swap_type_from_states(state(primary), state(secondary))))


@dataclass(frozen=True)
class BootloaderConfig:
    keys: tuple[PublicKey, ...] = ()  # empty: images are checked for integrity only
    allow_downgrade: bool = False  # versions only: the security counter is still enforced
    ignore_security_counter: bool = False  # turns off rollback protection (TLV 0x50) itself
    strategy: Strategy | None = None  # None: the flash map's; if given it must be the map's


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
    """One slot as :meth:`Bootloader.status` sees it."""

    version: ImageVersion | None  # of the image header; None when the slot has no image header
    request: str  # trailer request: none, test, permanent
    valid: bool = False  # the image passes the checks the boot makes (hash, signature, size)
    problem: str | None = None  # why it does not (None when valid)

    def to_dict(self) -> dict[str, Any]:
        return {"version": _version(self.version), "valid": self.valid, "problem": self.problem}


@dataclass(frozen=True)
class ImageStatus:
    """Read-only view of one image pair."""

    image: int
    primary: SlotInfo
    secondary: SlotInfo
    state: str  # "confirmed", "testing" (reverts at next boot unless confirmed), "upgrading"
    pending: str  # what the next boot will do: none, test, permanent, revert, resume

    @property
    def running(self) -> ImageVersion | None:
        """The version that runs: the primary slot's, if it holds a valid image and no upgrade
        is half done (mid-upgrade the primary holds parts of two images until a boot)."""
        if not self.primary.valid or self.state == "upgrading":
            return None
        return self.primary.version

    @property
    def problem(self) -> str | None:
        """Why nothing runs (None when an image does)."""
        return None if self.running is not None else self.primary.problem

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "running": _version(self.running),
            "problem": self.problem,
            "state": self.state,
            "next_boot": self.pending,
            "primary": self.primary.to_dict(),
            "secondary": {**self.secondary.to_dict(), "request": self.secondary.request},
        }


def _version(version: ImageVersion | None) -> str | None:
    return None if version is None else str(version)


class _Fih(IntEnum):
    """The fault-injection-hardened results of ``boot_validate_slot``."""

    SUCCESS = 0
    FAILURE = 1
    NO_BOOTABLE_IMAGE = 2


@dataclass
class _ImageRun:
    """MCUboot's per-image state during one boot, plus what otakit reports."""

    mode: SwapMode
    bs: BootStatus = field(default_factory=BootStatus)
    swap_type: int = BootSwapType.NONE
    requested: int = BootSwapType.NONE  # boot_swap_type_multi before validation
    resumed: bool = False
    resumed_type: int = BootSwapType.NONE
    reason: str | None = None
    error: str | None = None
    panic: str | None = None

    @property
    def ctx(self) -> BootContext:
        return self.mode.ctx


class Bootloader:
    """Boots a :class:`~otakit.device.flash.Flash` laid out by a :class:`FlashMap`."""

    def __init__(self, flash: Flash, flashmap: FlashMap, config: BootloaderConfig) -> None:
        self.flash = flash
        self.map = flashmap
        self.config = config
        strategy = Strategy(flashmap.strategy)
        if config.strategy is not None and Strategy(config.strategy) is not strategy:
            raise FlashMapError(
                f"flash map {flashmap.name!r} is laid out for {strategy.value}, not "
                f"{Strategy(config.strategy).value}; use flashmap.with_strategy() to change it",
                value=str(config.strategy),
            )
        self.strategy = strategy
        try:
            self._mode_cls = mode_class(strategy.value)
        except ImportError as exc:
            raise FlashMapError(
                f"the {strategy.value} bootloader mode is not available: {exc}",
                value=strategy.value,
            ) from None
        if self._mode_cls.needs_scratch and flashmap.scratch is None:
            raise FlashMapError(
                f"flash map {flashmap.name!r} has no scratch area, which {strategy.value} needs",
                value=flashmap.name,
            )
        if strategy is Strategy.SWAP_STATUS and len(flashmap.images) > 1:
            raise FlashMapError(
                f"flash map {flashmap.name!r} has {len(flashmap.images)} images: otakit's "
                "swap-status bootloader (like the harness's) handles one",
                value=flashmap.name,
            )

    # --- areas ---------------------------------------------------------------------------------

    def primary(self, image: int = 0) -> Slot:
        return Slot(self.flash, self.map.primary(image))

    def secondary(self, image: int = 0) -> Slot:
        return Slot(self.flash, self.map.secondary(image))

    def update_area(self, image: int = 0) -> FlashArea:
        """Where an update image for ``image`` is written: the secondary slot from
        ``map.image_offset(image)`` (one sector in for swap-offset, the start otherwise) to its
        end. The image itself may take at most ``map.max_image_size(image)`` bytes of it; the
        area ends with the slot so that an image padded by ``imgtool --pad`` for a slot of
        this area's size puts its trailer where MCUboot reads the secondary's trailer."""
        return _sub_area(
            FlashArea(self.flash, self.map.secondary(image)), self.map.image_offset(image)
        )

    def mode(self, image: int = 0, *, read_only: bool = False) -> SwapMode:
        """A fresh mode object for ``image`` with its context, sectors and trailer store
        (``read_only``: a store whose reads have no side effects, for :meth:`status`)."""
        scratch = self.map.scratch
        status = self.map.status(0) if 0 in self.map.images else None
        ctx = BootContext(
            flash=self.flash,
            map=self.map,
            image=image,
            primary=self.primary(image),
            secondary=self.secondary(image),
            scratch=FlashArea(self.flash, scratch) if scratch is not None else None,
            geometry=self._mode_cls.geometry(self.map),
            status=FlashArea(self.flash, status) if status is not None else None,
            image_count=len(self.map.images),
        )
        mode = self._mode_cls(ctx)
        ctx.store = mode.make_store(read_only)
        # boot_read_sectors
        ctx.sectors[ctx.primary_ref.kind] = area_sectors(ctx.primary)
        ctx.sectors[ctx.secondary_ref.kind] = area_sectors(ctx.secondary)
        if ctx.scratch is not None:
            ctx.sectors[ctx.scratch_ref.kind] = area_sectors(ctx.scratch)
        return mode

    # --- booting -------------------------------------------------------------------------------

    def boot(self) -> BootResult:
        """``context_boot_go``. May raise PowerCut from the flash."""
        if self.strategy is Strategy.SWAP_STATUS:
            return BootResult(tuple(self._boot_swap_status(image) for image in self.map.images))
        runs = [_ImageRun(self.mode(image)) for image in self.map.images]
        for run in runs:
            if self._sectors_ok(run):
                self._guard(run, self._prepare_image_for_update)
            if is_upgrade(run.swap_type) and run.requested == BootSwapType.NONE:
                run.requested = run.swap_type
        if len(runs) > 1 and any(is_upgrade(run.swap_type) for run in runs):
            self._verify_dependencies(runs)
        for run in runs:
            if run.panic is None:
                self._guard(run, self._perform)
        return BootResult(tuple(self._finish(run) for run in runs))

    def _verify_dependencies(self, runs: Sequence[_ImageRun]) -> None:
        """``boot_verify_dependencies`` (multi-image swap and overwrite builds): image by image,
        the DEPENDENCY TLVs of the image that will run (the secondary's when the image is
        upgraded or reverted, the primary's otherwise) are checked against the version in the
        header of the slot each named image will run from. The first image whose dependencies
        are not met, or cannot be read (no TLV area, a TLV of the wrong size, an image number
        the map does not have), stops the check and every image's swap type becomes NONE: no
        image is upgraded or reverted in this boot, and the requests stay in the trailers."""
        by_image = {run.ctx.image: run for run in runs}
        for run in runs:
            if run.panic is not None:
                continue
            slot = (
                BOOT_SLOT_PRIMARY
                if run.swap_type in (BootSwapType.NONE, BootSwapType.FAIL)
                else BOOT_SLOT_SECONDARY
            )
            problem = self._unmet_dependency(run, slot, by_image)
            if problem is None:
                continue
            for other in runs:
                if is_upgrade(other.swap_type):
                    if other is run:
                        other.reason, other.error = problem, "DEPENDENCY"
                    else:
                        other.reason = (
                            f"not upgraded: image {run.ctx.image}'s dependency is not met "
                            f"({problem})"
                        )
                        other.error = "DEPENDENCY"
                    other.swap_type = BootSwapType.NONE
            return

    def _unmet_dependency(
        self, run: _ImageRun, slot: int, by_image: dict[int, _ImageRun]
    ) -> str | None:
        """``boot_verify_slot_dependencies`` for ``slot`` of ``run``'s image: why its
        dependencies are not met, or None when they are."""
        try:
            layout = read_layout(self._image_source(run.mode, slot))
            deps = [
                Dependency.unpack(t.value)
                for t in layout.protected_tlvs
                if t.kind == TlvType.DEPENDENCY
            ]
        except OtakitError as exc:
            return f"the dependencies of image {run.ctx.image} cannot be read: {exc.message}"
        for dep in deps:
            other = by_image.get(dep.image_id)
            if other is None:
                return f"image {run.ctx.image} depends on image {dep.image_id}, which is not here"
            other_slot = BOOT_SLOT_SECONDARY if is_upgrade(other.swap_type) else BOOT_SLOT_PRIMARY
            have = ImageVersion(*other.ctx.header(other_slot).version)
            if have < dep.min_version:
                return (
                    f"image {run.ctx.image} needs image {dep.image_id} at {dep.min_version} "
                    f"or later, which would run {have}"
                )
        return None

    def slot_version(self, image: int = 0, *, secondary: bool = False) -> ImageVersion | None:
        """The version in the header of a slot's image; None when the slot has no image
        header (its magic is not an image's)."""
        mode = self.mode(image, read_only=True)
        source = self._image_source(mode, BOOT_SLOT_SECONDARY if secondary else BOOT_SLOT_PRIMARY)
        header = _header_of(source)
        return ImageVersion(*header.version) if header.magic == IMAGE_MAGIC else None

    def _guard(self, run: _ImageRun, step: Any) -> None:
        """Run a step; an MCUboot assertion (McubootError) makes the image unbootable."""
        try:
            step(run)
        except McubootError as exc:
            run.panic = f"MCUboot would stop here ({exc.code}): {exc}"
            run.swap_type = BootSwapType.PANIC

    def _sectors_ok(self, run: _ImageRun) -> bool:
        """``boot_read_sectors``: a primary slot with more sectors than MCUBOOT_MAX_IMG_SECTORS
        is refused (swap type NONE, no preparation)."""
        ctx = run.ctx
        if ctx.num_sectors(BOOT_SLOT_PRIMARY) > ctx.geometry.max_sectors:
            run.swap_type = BootSwapType.NONE
            return False
        return True

    def _read_image_headers(
        self, run: _ImageRun, bs: BootStatus | None, require_all: bool = False
    ) -> bool:
        """``boot_read_image_headers``: False when it returns an error. A failed read of the
        primary's header is one; the secondary's only with ``require_all`` (its header is
        kept either way). Reads fail only where the mode says so (:meth:`SwapMode.header_ok`)."""
        for slot in (BOOT_SLOT_PRIMARY, BOOT_SLOT_SECONDARY):
            hdr = run.mode.read_image_header(slot, bs)
            run.ctx.headers[slot] = hdr
            if not run.mode.header_ok(hdr, bs):
                return slot > BOOT_SLOT_PRIMARY and not require_all
        return True

    def _prepare_image_for_update(self, run: _ImageRun) -> None:
        """``boot_prepare_image_for_update``."""
        mode, bs = run.mode, run.bs
        self._read_image_headers(run, None)
        if not mode.slots_compatible():
            run.swap_type = BootSwapType.NONE
            return
        bs.reset(mode.reset_op)
        if not mode.overwrite_only:
            mode.read_status(bs)
            # read again with the status, reset or not: it says where each header is
            if not self._read_image_headers(run, bs, not bs.is_reset(mode.reset_op)):
                run.swap_type = BootSwapType.NONE
                return
        if not bs.is_reset(mode.reset_op):
            run.resumed, run.resumed_type = True, bs.swap_type
            self._complete_partial_swap(run)
            self._read_image_headers(run, None)
            run.swap_type = BootSwapType.NONE
        elif bs.swap_type == BootSwapType.NONE:
            run.swap_type = self._validated_swap_type(run)
        else:
            fih = self._validate_slot(run, BOOT_SLOT_SECONDARY, bs, 0)
            run.swap_type = BootSwapType.FAIL if fih is not _Fih.SUCCESS else bs.swap_type

    def _complete_partial_swap(self, run: _ImageRun) -> None:
        """``boot_complete_partial_swap``."""
        mode, bs = run.mode, run.bs
        mode.swap_image(bs)
        if bs.swap_type in (BootSwapType.REVERT, BootSwapType.PERM):
            mode.set_image_ok()
        if is_upgrade(bs.swap_type):
            mode.set_copy_done()

    def _swap_type_multi(self, mode: SwapMode) -> int:
        """``boot_swap_type_multi``."""
        return mode.decide_swap_type(*self._states(mode))

    def _states(self, mode: SwapMode) -> tuple[SwapState, SwapState]:
        """The decoded primary and secondary trailers."""
        ctx, store = mode.ctx, mode.store
        return store.read_swap_state(ctx.primary_ref), store.read_swap_state(ctx.secondary_ref)

    def _validated_swap_type(self, run: _ImageRun) -> int:
        """``boot_validated_swap_type``."""
        swap_type = self._swap_type_multi(run.mode)
        run.requested = swap_type
        if is_upgrade(swap_type):
            fih = self._validate_slot(run, BOOT_SLOT_SECONDARY, run.bs, swap_type)
            if fih is _Fih.NO_BOOTABLE_IMAGE:
                swap_type = BootSwapType.NONE
            elif fih is not _Fih.SUCCESS:
                swap_type = BootSwapType.FAIL
        return swap_type

    def _validate_slot(
        self, run: _ImageRun, slot: int, bs: BootStatus | None, expected: int
    ) -> _Fih:
        """``boot_validate_slot``; records why a candidate was refused in ``run``."""
        mode, ctx = run.mode, run.ctx
        hdr = ctx.header(slot)
        area = ctx.slot_area(slot)
        if ctx.header_erased(slot) or hdr.flags & IMAGE_F_NON_BOOTABLE:
            if slot != BOOT_SLOT_PRIMARY and not mode.overwrite_only:
                mode.scramble_trailer_sectors(ctx.secondary_ref)
                if mode.swap_move and (
                    (bs is not None and bs.swap_type == BootSwapType.REVERT)
                    or self._swap_type_multi(mode) == BootSwapType.REVERT
                ):
                    mode.scramble_trailer_sectors(ctx.primary_ref)
            self._refuse(run, slot, "the slot holds no bootable image", "NO_IMAGE")
            return _Fih.NO_BOOTABLE_IMAGE
        if (
            mode.swap_offset
            and slot != BOOT_SLOT_PRIMARY
            and bs is not None
            and bs.is_reset(mode.reset_op)
            and expected in (BootSwapType.TEST, BootSwapType.PERM)
            and read_header(area, 0).magic == IMAGE_MAGIC
        ):
            self._refuse(
                run, slot, "image header in the first sector: written at the wrong offset?",
                "BAD_OFFSET",
            )  # fmt: skip
            scramble_slot(area)
            return _Fih.NO_BOOTABLE_IMAGE
        if mode.overwrite_only and slot != BOOT_SLOT_PRIMARY:
            older = self._older_version(ctx.header(BOOT_SLOT_PRIMARY), hdr)
            if older is not None:  # OVERWRITE_ONLY with DOWNGRADE_PREVENTION
                self._refuse(run, slot, older.message, older.code)
                scramble_slot(area)
                return _Fih.NO_BOOTABLE_IMAGE
        fih = _Fih.SUCCESS
        if not self._header_valid(ctx, slot):
            self._refuse(run, slot, "the image header is not valid for this slot", "BAD_HEADER")
            fih = _Fih.FAILURE
        else:
            try:
                self._check_image(mode, slot)
                if mode.overwrite_only and slot != BOOT_SLOT_PRIMARY:
                    lower = self._lower_counter(ctx.primary, self._image_source(mode, slot))
                    if lower is not None:
                        raise lower
            except OtakitError as exc:
                self._refuse(run, slot, exc.message, exc.code)
                fih = _Fih.FAILURE
        if fih is not _Fih.SUCCESS:
            if slot != BOOT_SLOT_PRIMARY:
                scramble_slot(area)
            return _Fih.NO_BOOTABLE_IMAGE
        return _Fih.SUCCESS

    def _refuse(self, run: _ImageRun, slot: int, reason: str, code: str) -> None:
        if slot != BOOT_SLOT_PRIMARY:
            run.reason, run.error = reason, code

    def _header_valid(self, ctx: BootContext, slot: int) -> bool:
        """``boot_check_header_valid``."""
        hdr = ctx.header(slot)
        if hdr.magic != IMAGE_MAGIC:
            return False
        size = hdr.img_size + hdr.hdr_size
        if size > 0xFFFFFFFF:
            return False
        size += hdr.protect_tlv_size
        if size > 0xFFFFFFFF or size >= ctx.slot_area(slot).size:
            return False
        if hdr.flags & (IMAGE_F_ENCRYPTED_AES128 | IMAGE_F_ENCRYPTED_AES256):
            return False
        return not hdr.flags & (IMAGE_F_COMPRESSED_LZMA1 | IMAGE_F_COMPRESSED_LZMA2)

    def _image_source(self, mode: SwapMode, slot: int) -> FlashArea:
        """The slot's area from where its image starts (``boot_get_state_secondary_offset``)."""
        return _sub_area(mode.ctx.slot_area(slot), mode.image_offset(slot))

    def _check_image(self, mode: SwapMode, slot: int) -> VerifiedImage:
        """``boot_check_image`` / ``bootutil_img_validate``: hash, signature, size limit."""
        keys: Sequence[PublicKey] | None = self.config.keys or None
        limit = mode.max_image_size(slot)
        return verify_image(self._image_source(mode, slot), keys, max_size=limit)

    def _perform(self, run: _ImageRun) -> None:
        """The second image loop of ``context_boot_go`` for one image."""
        mode, bs = run.mode, run.bs
        if len(self.map.images) > 1:
            bs.reset(mode.reset_op)
        bs.swap_type = run.swap_type
        if run.swap_type == BootSwapType.NONE:
            return
        if run.swap_type in (BootSwapType.TEST, BootSwapType.PERM) and self._downgrade_prevented(
            run
        ):
            run.swap_type = BootSwapType.NONE
            return
        if is_upgrade(run.swap_type):
            self._perform_update(run)
        elif run.swap_type == BootSwapType.FAIL:
            if not mode.overwrite_only:
                mode.set_image_ok()
        else:
            run.panic = f"swap type {run.swap_type} cannot be performed"

    def _perform_update(self, run: _ImageRun) -> None:
        """``boot_perform_update``."""
        mode, bs = run.mode, run.bs
        if mode.overwrite_only:
            mode.copy_image(bs)
            return
        mode.swap_image(bs)
        if run.swap_type in (BootSwapType.REVERT, BootSwapType.PERM):
            mode.set_image_ok()
        if is_upgrade(run.swap_type):
            mode.set_copy_done()

    def _finish(self, run: _ImageRun) -> ImageBoot:
        """The third image loop: re-read headers after an update, validate the primary slot."""
        image = run.ctx.image
        if run.resumed:
            action = _ACTIONS.get(BootSwapType(run.resumed_type), Action.NONE)
        elif is_upgrade(run.swap_type):
            action = _ACTIONS[BootSwapType(run.swap_type)]
        elif is_upgrade(run.requested) and run.reason is not None:
            action = Action.REJECTED
        else:
            action = Action.NONE
        if run.mode.overwrite_only and action in (Action.UPGRADE_TEST, Action.REVERT):
            action = Action.UPGRADE_PERMANENT  # overwrite-only copies: there is no way back
        if run.panic is not None:
            return ImageBoot(image, action, run.resumed, None, run.panic, "MCUBOOT_PANIC")
        if run.swap_type != BootSwapType.NONE:
            self._read_image_headers(run, None)
        if run.ctx.headers[BOOT_SLOT_PRIMARY] is None:
            self._read_image_headers(run, None)
        problem = self._slot_problem(run.mode, BOOT_SLOT_PRIMARY)
        if isinstance(problem, OtakitError):
            reason = f"no valid image in the primary slot: {problem.message}"
            return ImageBoot(image, action, run.resumed, None, reason, problem.code)
        return ImageBoot(image, action, run.resumed, problem.version, run.reason, run.error)

    def _slot_problem(self, mode: SwapMode, slot: int) -> VerifiedImage | OtakitError:
        """``boot_validate_slot`` of a slot without its side effects, with the headers in
        ``mode.ctx``: the verified image, or what is wrong with it."""
        ctx = mode.ctx
        try:
            if ctx.header(slot).magic != IMAGE_MAGIC:
                raise BadMagicError(f"no image header in the {_SLOT_NAMES[slot]} slot")
            if not self._header_valid(ctx, slot):
                raise ImageFormatError(f"the {_SLOT_NAMES[slot]} slot's image header is not valid")
            return self._check_image(mode, slot)
        except OtakitError as exc:
            return exc

    # --- swap-status: the Infineon loader, run whole -------------------------------------------

    def _boot_swap_status(self, image: int) -> ImageBoot:
        """``boot_go`` of the cypress branch for ``image``, reported as an :class:`ImageBoot`."""
        mode = self.mode(image)
        if not isinstance(mode, SwapStatusMode):  # pragma: no cover - mode_class guarantees it
            raise FlashMapError("swap-status needs its own mode", value=self.strategy.value)
        keys: Sequence[PublicKey] | None = self.config.keys or None
        codes: dict[int, str] = {}  # slot -> error code of its last refusal
        refused: list[OtakitError] = []

        def check(source: ByteSource, slot: int) -> str | None:
            try:
                verify_image(source, keys)
            except OtakitError as exc:
                codes[slot] = exc.code
                return exc.message
            return None

        def downgrade(primary: ByteSource, secondary: ByteSource) -> str | None:
            error = self._downgrade_error(primary, secondary)
            if error is not None:
                refused.append(error)
                return error.message
            return None

        try:
            outcome = mode.boot_go(check, downgrade)
        except McubootAbort as exc:
            reason = f"MCUboot would stop here: {exc.message}"
            return ImageBoot(image, Action.NONE, False, None, reason, "MCUBOOT_PANIC")
        return self._status_boot(image, outcome, codes, refused)

    def _status_boot(
        self,
        image: int,
        outcome: BootOutcome,
        codes: dict[int, str],
        refused: list[OtakitError],
    ) -> ImageBoot:
        """A swap-status :class:`~otakit.device.swap_status.BootOutcome` as an ImageBoot."""
        reason = error = None
        if "secondary" in outcome.erased_slots:
            reason = (
                "the secondary image reaches the slot's last row: MCUboot erased it "
                f"(at most {self.map.max_image_size(image)} bytes)"
            )
            error = "IMAGE_TOO_LARGE"
        elif refused:
            reason, error = refused[-1].message, refused[-1].code
        elif outcome.rejected is not None:
            reason = outcome.rejected
            error = codes.get(BOOT_SLOT_SECONDARY, "NO_IMAGE")
        if outcome.resumed:
            action = _ACTIONS.get(BootSwapType(outcome.resumed_swap_type), Action.NONE)
        elif is_upgrade(outcome.swap_type):
            action = _ACTIONS[BootSwapType(outcome.swap_type)]
        elif reason is not None:
            action = Action.REJECTED
        else:
            action = Action.NONE
        if not outcome.booted or outcome.version is None:
            why = outcome.invalid_primary or "no bootable image"
            if "primary" in outcome.erased_slots:
                why = "the image reached the slot's last row and MCUboot erased it"
            code = codes.get(BOOT_SLOT_PRIMARY, "NO_IMAGE")
            return ImageBoot(
                image, action, outcome.resumed, None, f"no valid image in the primary slot: {why}",
                code,
            )  # fmt: skip
        version = ImageVersion.parse(outcome.version)
        return ImageBoot(image, action, outcome.resumed, version, reason, error)

    # --- downgrade prevention (otakit's extra, MCUboot's MCUBOOT_DOWNGRADE_PREVENTION) ---------

    def _downgrade_prevented(self, run: _ImageRun) -> bool:
        """``check_downgrade_prevention`` for a TEST or PERM swap (see the module docstring):
        True when the candidate was refused and erased."""
        if self.config.allow_downgrade and self.config.ignore_security_counter:
            return False
        if run.mode.swap_move and self._revert_in_disguise(run):
            return False
        candidate = self._image_source(run.mode, BOOT_SLOT_SECONDARY)
        error = self._downgrade_error(run.ctx.primary, candidate)
        if error is None:
            return False
        self._refuse(run, BOOT_SLOT_SECONDARY, error.message, error.code)
        scramble_slot(run.ctx.secondary)
        return True

    def _revert_in_disguise(self, run: _ImageRun) -> bool:
        """A PERM request that swap-move's ``fixup_revert`` wrote for a revert: secondary
        trailer with image_ok set, swap_size written and swap_info erased, and a primary
        trailer that is not a confirmed image's."""
        ctx, store = run.ctx, run.mode.store
        primary, secondary = self._states(run.mode)
        if run.swap_type != BootSwapType.PERM or secondary.image_ok is not Flag.SET:
            return False
        if store.read_swap_info_raw(ctx.secondary_ref) is not None:
            return False
        erased_size = int.from_bytes(bytes([self.flash.erased_value]) * 4, "little")
        if store.read_swap_size(ctx.secondary_ref) == erased_size:
            return False
        return not (
            primary.magic is Magic.GOOD
            and primary.image_ok is Flag.SET
            and primary.copy_done is Flag.SET
        )

    def _downgrade_error(self, primary: ByteSource, candidate: ByteSource) -> DowngradeError | None:
        """What downgrade prevention says of ``candidate`` (the version first, then the
        security counter); None when it may be installed."""
        older = self._older_version(_header_of(primary), _header_of(candidate))
        return older if older is not None else self._lower_counter(primary, candidate)

    def _older_version(self, primary: RawHeader, candidate: RawHeader) -> DowngradeError | None:
        """``boot_compare_version(secondary, primary) < 0`` (build numbers compared), unless
        downgrades are allowed or the primary has no image header."""
        if self.config.allow_downgrade or primary.magic != IMAGE_MAGIC:
            return None
        new, old = ImageVersion(*candidate.version), ImageVersion(*primary.version)
        if not new < old:
            return None
        return DowngradeError(f"image {new} is older than the running {old}", value=str(new))

    def _lower_counter(self, primary: ByteSource, candidate: ByteSource) -> DowngradeError | None:
        """The security counter variant: the candidate's must be there and at least the
        primary image's, when that one has a counter."""
        if self.config.ignore_security_counter:
            return None
        try:
            old = read_layout(primary).security_counter
        except ImageFormatError:
            return None
        if old is None:
            return None
        try:
            new = read_layout(candidate).security_counter
        except ImageFormatError:
            new = None
        if new is not None and new >= old:
            return None
        return DowngradeError(
            f"security counter {new} is lower than the running image's {old}", value=new
        )

    def check_security_counter(self, candidate: VerifiedImage, image: int = 0) -> None:
        """MCUboot's rollback protection, independent of version downgrades: raise
        DowngradeError when ``candidate``'s security counter is lower than the running image's
        (unless ``ignore_security_counter``). An agent calls it before marking an image
        pending; the bootloader checks again at boot."""
        if self.config.ignore_security_counter:
            return
        try:
            old = read_layout(self.primary(image)).security_counter
        except ImageFormatError:
            return
        new = candidate.security_counter
        if old is not None and (new is None or new < old):
            raise DowngradeError(
                f"security counter {new} is lower than the running image's {old}", value=new
            )

    # --- application side (bootutil_public.c) --------------------------------------------------

    def confirm(self, image: int = 0) -> bool:
        """``boot_set_confirmed_multi``: image_ok in the primary trailer when its magic is good
        and image_ok is unset; return whether anything was written."""
        mode = self.mode(image)
        state = self.mode(image, read_only=True).store.read_swap_state(mode.ctx.primary_ref)
        writes = state.magic is Magic.GOOD and state.image_ok is Flag.UNSET
        if isinstance(mode, SwapStatusMode):
            # its reads may move trailer fields into the status partition: let it do all
            return mode.set_confirmed() == 0 and writes
        if writes:
            mode.store.write_image_ok(mode.ctx.primary_ref)
        return writes

    def set_pending(self, image: int = 0, *, permanent: bool = False) -> None:
        """``boot_set_pending_multi``: request an upgrade to the image in the secondary slot.

        On an unset trailer: magic, then image_ok if ``permanent``, then swap_info (PERM or
        TEST). A trailer whose magic is already good is left alone (a swap is already
        scheduled); a damaged one is refused (swap-status: MCUboot erases the slot first).
        The caller verifies the image first.
        """
        mode = self.mode(image)
        damaged = FlashMapError(
            f"the secondary slot of image {image} has a damaged trailer; erase the slot "
            "before writing an image (MCUboot: BOOT_EBADIMAGE)",
            value=image,
        )
        if isinstance(mode, SwapStatusMode):
            rc = mode.set_pending(permanent)
            if rc == 3:
                raise damaged
            if rc != 0:
                raise FlashMapError(f"the request could not be written (MCUboot: {rc})", value=rc)
            return
        ref = mode.ctx.secondary_ref
        state = mode.store.read_swap_state(ref)
        if state.magic is Magic.GOOD:
            return
        if state.magic is Magic.BAD:
            raise damaged
        mode.store.write_magic(ref)
        if permanent:
            mode.store.write_image_ok(ref)
        swap_type = BootSwapType.PERM if permanent else BootSwapType.TEST
        mode.store.write_swap_info(ref, swap_type, image)

    # --- status --------------------------------------------------------------------------------

    def status(self) -> list[ImageStatus]:
        """What each image pair holds and what the next boot will do, read without writing
        anything; each slot's image is validated as the boot would (hash, signature with the
        configured keys, size limit)."""
        return [self._image_status(image) for image in self.map.images]

    def _image_status(self, image: int) -> ImageStatus:
        mode = self.mode(image, read_only=True)
        ctx = mode.ctx
        p_state, s_state = self._states(mode)
        bs = BootStatus()
        bs.reset(mode.reset_op)
        if not mode.overwrite_only and mode.slots_compatible():
            try:
                mode.read_status(bs)
            except McubootError:
                bs.reset(mode.reset_op)
        upgrading = not bs.is_reset(mode.reset_op)
        # the headers as the loader reads them before it decides (with a reset status):
        # swap-offset then finds an update one sector into the secondary, a revert at its start
        reset = BootStatus()
        reset.reset(mode.reset_op)
        for slot in (BOOT_SLOT_PRIMARY, BOOT_SLOT_SECONDARY):
            ctx.headers[slot] = mode.read_image_header(slot, reset)
        infos = []
        for slot, state in ((BOOT_SLOT_PRIMARY, p_state), (BOOT_SLOT_SECONDARY, s_state)):
            hdr = ctx.header(slot)
            version = ImageVersion(*hdr.version) if hdr.magic == IMAGE_MAGIC else None
            checked = self._slot_problem(mode, slot)
            problem = checked.message if isinstance(checked, OtakitError) else None
            if slot == BOOT_SLOT_PRIMARY and upgrading:
                problem = "an upgrade was interrupted: the next boot completes it"
            request = "none"
            if state.magic is Magic.GOOD:
                request = "permanent" if state.image_ok is Flag.SET else "test"
            infos.append(SlotInfo(version, request, problem is None, problem))
        if upgrading:
            state_name, pending = "upgrading", "resume"
        else:
            testing = (
                p_state.magic is Magic.GOOD
                and p_state.image_ok is Flag.UNSET
                and p_state.copy_done is Flag.SET
            )
            state_name = "testing" if testing else "confirmed"
            pending = _PENDING.get(mode.decide_swap_type(p_state, s_state), "none")
        return ImageStatus(image, infos[0], infos[1], state_name, pending)


_SLOT_NAMES = {BOOT_SLOT_PRIMARY: "primary", BOOT_SLOT_SECONDARY: "secondary"}
_PENDING: dict[int, str] = {
    BootSwapType.NONE: "none",
    BootSwapType.TEST: "test",
    BootSwapType.PERM: "permanent",
    BootSwapType.REVERT: "revert",
}


def _sub_area(area: FlashArea, offset: int) -> FlashArea:
    """``area`` from ``offset`` to its end."""
    if offset == 0:
        return area
    inner = area.area
    return FlashArea(
        area.flash, Area(inner.name, inner.offset + offset, inner.size - offset, inner.image)
    )


def _header_of(source: ByteSource) -> RawHeader:
    """The image header at the start of ``source``."""
    return RawHeader.parse(source.read_at(0, HEADER_SIZE).ljust(HEADER_SIZE, b"\0"))
