"""After a reboot: did the update take, go back, fail to start, or was nothing asked?

The bootloader says, for each image, what the boot did and what runs now
(:class:`~otakit.device.bootloader.ImageBoot`). :func:`after_boot` turns that into what the
device does next, with no I/O: confirm the new image (MCUboot's ``image_ok``) or not, and what to
report to the server (``extFwInfo.Status`` and an error). The driver (the agent, the simulated
device's agent, the fleet) does the confirming and the reporting.

A package upgrades several images together: it counts as :attr:`BootVerdict.UPDATED` only
when every image it carries runs its new version, and is then confirmed as a whole; when one
of them did not start, none is confirmed, so the next boot reverts those that were swapped in
on trial and the images stay together::

    expected    the boot did                                  verdict      confirm  report
    given       every expected image runs its version         UPDATED      yes      applied
                (and the device is healthy)
    given       ... but the device is not healthy             NOT_STARTED  no       (none: the
                                                                                    revert is)
    any         an image went back (revert)                   REVERTED     no       error
                                                                                    REVERT_ERROR
    given       an expected image does not run its version    NOT_STARTED  no       error
    any         an image cannot run at all (no valid image)   NOT_STARTED  no       error
    None        swapped in an image on trial or for good      UPDATED      healthy  applied
    None        nothing                                       UNCHANGED    no       none
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from otakit.device.bootloader import Action, ImageBoot
from otakit.errors import BootError
from otakit.protocol.fwinfo import FwStatus
from otakit.protocol.version import FirmwareVersion

REVERT_ERROR = "reverted: not confirmed after reboot"
"""The error a device reports when the bootloader swapped back an unconfirmed image; the server
counts a report whose error starts with ``reverted:`` as a revert."""

NOT_STARTED_ERROR = BootError.code
"""The error reported when the new image did not start and the bootloader gave no code."""


class BootVerdict(StrEnum):
    """What a boot means for the update that preceded it."""

    UPDATED = "updated"  # every expected image runs its new version
    REVERTED = "reverted"  # the bootloader went back to the previous image(s)
    NOT_STARTED = "not-started"  # the new image(s) did not start, or started unhealthy
    UNCHANGED = "unchanged"  # nothing was asked of this boot, and nothing changed


@dataclass(frozen=True)
class AfterBoot:
    """What to do after a boot: :func:`after_boot`'s answer."""

    verdict: BootVerdict
    running: FirmwareVersion | None  # of the first image (the application); None: none runs
    confirm: bool  # the driver must confirm (image_ok) every image now
    report: FwStatus | None  # what to report (None: nothing)
    error: str | None  # the error to report with it (ERROR only)
    reason: str | None  # a sentence for logs and events


def _version(image: ImageBoot) -> FirmwareVersion | None:
    return None if image.version is None else FirmwareVersion.from_image(image.version)


def _expected_by_image(
    images: Sequence[ImageBoot],
    expected: Sequence[FirmwareVersion] | Mapping[int, FirmwareVersion],
) -> dict[int, FirmwareVersion]:
    """Image number -> expected version; a sequence counts from image 0 (or the first image)."""
    if isinstance(expected, Mapping):
        return dict(expected)
    first = min((i.image for i in images), default=0)
    return {first + n: version for n, version in enumerate(expected)}


def after_boot(
    images: Sequence[ImageBoot],
    *,
    expected: Sequence[FirmwareVersion] | Mapping[int, FirmwareVersion] | None,
    previous: FirmwareVersion | None,
    healthy: bool = True,
) -> AfterBoot:
    """Decide from the boot's per-image results (``BootResult.images``) what the update did.

    ``expected`` is what the update installed (pending): the new version of each image, as a
    sequence from the first image or as a mapping image number -> version (a package that
    updates some images only); ``None`` when no update was pending before this boot (an ordinary
    boot, or the first look after a reboot the driver did not watch). ``previous`` is the
    application's version before the update (for the sentences; ``None`` if unknown).
    ``healthy`` is the device's own check after starting the new image (a self-test, a watchdog
    that did not fire): an unhealthy new image is not confirmed, so the next boot reverts it.

    See the module docstring for the decision table. Raises nothing: every boot has a verdict.
    """
    images = tuple(sorted(images, key=lambda i: i.image))
    running = _version(images[0]) if images else None
    before = f" (before: {previous})" if previous is not None else ""

    reverted = [i for i in images if i.action is Action.REVERT]
    if reverted:
        which = ", ".join(str(i.image) for i in reverted)
        return AfterBoot(
            BootVerdict.REVERTED,
            running,
            confirm=False,
            report=FwStatus.ERROR,
            error=REVERT_ERROR,
            reason=f"the bootloader reverted image {which} (not confirmed); running {running}",
        )

    dead = [i for i in images if i.version is None]
    if dead:
        first = dead[0]
        return AfterBoot(
            BootVerdict.NOT_STARTED,
            running,
            confirm=False,
            report=FwStatus.ERROR,
            error=first.error or NOT_STARTED_ERROR,
            reason=f"image {first.image} cannot run: {first.reason or 'no valid image'}",
        )

    if expected is None:
        swapped = [i for i in images if i.action in (Action.UPGRADE_TEST, Action.UPGRADE_PERMANENT)]
        if not swapped:
            rejected = next((i for i in images if i.action is Action.REJECTED), None)
            reason = "nothing changed"
            if rejected is not None:
                reason = f"a candidate of image {rejected.image} was refused: {rejected.reason}"
            return AfterBoot(
                BootVerdict.UNCHANGED,
                running,
                confirm=False,
                report=None,
                error=None,
                reason=reason,
            )
        return _started(images, running, healthy, before)

    wanted = _expected_by_image(images, expected)
    by_image = {i.image: i for i in images}
    for number, version in sorted(wanted.items()):
        boot = by_image.get(number)
        actual = None if boot is None else _version(boot)
        if actual != version:
            if boot is None:
                why = f"the boot reported no image {number}"
                error = NOT_STARTED_ERROR
            else:
                why = boot.reason or f"the bootloader did {boot.action.value}"
                error = boot.error or NOT_STARTED_ERROR
            return AfterBoot(
                BootVerdict.NOT_STARTED,
                running,
                confirm=False,
                report=FwStatus.ERROR,
                error=error,
                reason=f"image {number} runs {actual}, not the new {version}: {why}{before}",
            )
    return _started(images, running, healthy, before)


def _started(
    images: Sequence[ImageBoot], running: FirmwareVersion | None, healthy: bool, before: str
) -> AfterBoot:
    """The new image(s) run: confirm and report them, unless the device is not healthy."""
    if not healthy:
        return AfterBoot(
            BootVerdict.NOT_STARTED,
            running,
            confirm=False,
            report=None,
            error=None,
            reason=f"{running} started but is not healthy: not confirmed, the next boot "
            f"reverts it{before}",
        )
    return AfterBoot(
        BootVerdict.UPDATED,
        running,
        confirm=True,
        report=FwStatus.APPLIED,
        error=None,
        reason=f"running {running}{before}",
    )
