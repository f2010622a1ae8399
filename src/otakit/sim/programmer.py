"""The simulated external MCU of the gateway model (protocols.md §7): a simulated MCUboot device.

A gateway (:class:`~otakit.device.gateway.GatewayStorage`) programs its MCU through an
:class:`~otakit.device.gateway.ExternalProgrammer`. On real hardware that is a flasher command
(:class:`~otakit.device.gateway.CommandProgrammer`); here it is a simulated device folder
(:class:`~otakit.sim.device.SimDevice`), whose bootloader installs the image as a real one
would; a multi-image package (:meth:`SimMcuProgrammer.program_package`) goes to the secondary
slots of the images it holds, which are marked pending together. It lives in the simulator so that the device layer never depends on it: ``otakit agent
run`` hands it to :class:`~otakit.device.service.AgentService` (``storage.mcu``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otakit.device.bootloader import Bootloader
from otakit.device.core.after_boot import BootVerdict, after_boot
from otakit.device.gateway import PackageImage
from otakit.device.storage import pending_order
from otakit.errors import ImageTooLargeError, McuProgramError, OtakitError
from otakit.image.header import ImageVersion
from otakit.image.layout import check_erased_after
from otakit.image.verify import VerifiedImage, verify_image
from otakit.protocol.version import FirmwareVersion
from otakit.sim.device import SimDevice

log = logging.getLogger("otakit.storage")


class SimMcuProgrammer:
    """Programs a simulated MCUboot device (:class:`~otakit.sim.device.SimDevice` folder).

    The image must be a signed MCUboot image the device's bootloader trusts: it is installed as a
    permanent request, the device boots, and must then run ``version``.
    """

    def __init__(self, device_dir: str | os.PathLike[str], *, image: int = 0) -> None:
        self.device_dir = Path(device_dir)
        self.image = image

    def program(self, data: bytes, version: str) -> None:
        """Install ``data`` and boot. Raises :class:`~otakit.errors.McuProgramError` when the
        device does not run ``version`` afterwards (the bootloader refused the image); the
        :class:`~otakit.errors.OtakitError` of :meth:`SimDevice.install` when the image cannot be
        written to the device's secondary slot (no such image, too large, not trusted...)."""
        device = SimDevice(self.device_dir)
        device.install(data, image_index=self.image, permanent=True)
        booted = device.boot()
        wanted = FirmwareVersion.parse(version)
        verdict = after_boot(
            booted.result.images if booted.result is not None else (),
            expected={self.image: wanted},
            previous=None,
        )
        running = self.running()
        if verdict.verdict is not BootVerdict.UPDATED or running != wanted:
            raise McuProgramError(
                f"the MCU runs {running or 'nothing'} after programming, not {wanted}: "
                f"{verdict.reason}",
                value=str(running) if running is not None else None,
            )

    def program_package(self, images: Sequence[PackageImage], version: str) -> None:
        """Install the components of a package as one update, as an agent on the MCU would.

        Every component must name an image of the device's flash map and fit its slot below
        the trailer (checked before anything is written: :class:`~otakit.errors.McuProgramError`,
        :class:`~otakit.errors.ImageTooLargeError`). Each is streamed into its image's secondary
        slot and verified there (signature with the device's keys, size, nothing unsigned after
        its TLVs, security counter); a failure erases the slots written and raises. Then all
        are marked pending (permanent), images that depend on another image of the package
        first, and the device boots: every image must then run its new version, else
        :class:`~otakit.errors.McuProgramError` (the bootloader refused them, e.g. an unmet
        dependency). ``version`` is the package's; the images' own versions are checked.
        """
        device = SimDevice(self.device_dir)
        fm = device.map
        seen: set[int] = set()
        for part in images:
            if part.image not in fm.images or part.image in seen:
                raise McuProgramError(
                    f"{part.name} ({part.file_type}) is for image {part.image}, which the MCU "
                    f"({fm.name}, images {', '.join(map(str, fm.images))}) "
                    + ("gets twice" if part.image in seen else "does not have"),
                    value=part.image,
                )
            seen.add(part.image)
            limit = fm.max_image_size(part.image)
            if part.size > limit:
                raise ImageTooLargeError(
                    f"{part.name} is {part.size} bytes, larger than the {limit} bytes image "
                    f"{part.image} can take",
                    value=part.size,
                )
        if not images:
            raise McuProgramError(f"package {version} holds no image", value=version)
        with device.bootloader() as boot:
            verified: dict[int, VerifiedImage] = {}
            try:
                for part in images:
                    boot.secondary(part.image).erase_all()
                    _write(boot, part)
                    verified[part.image] = _verify(boot, device, part)
            except OtakitError:
                for part in images:
                    boot.secondary(part.image).erase_all()
                raise
            for image in pending_order(verified):
                log.info("MCU image %d pending (permanent)", image)
                boot.set_pending(image, permanent=True)
            boot.flash.flush()
        booted = device.boot()
        expected = {i: FirmwareVersion.from_image(v.version) for i, v in verified.items()}
        verdict = after_boot(
            booted.result.images if booted.result is not None else (),
            expected=expected,
            previous=None,
        )
        if verdict.verdict is not BootVerdict.UPDATED:
            raise McuProgramError(
                f"the MCU does not run package {version} after programming: {verdict.reason}",
                value=version,
            )

    def running(self) -> FirmwareVersion | None:
        """The version the simulated MCU runs, or None when it runs nothing."""
        slots: list[dict[str, Any]] = SimDevice(self.device_dir).status()["slots"]
        for slot in slots:
            if slot["image"] == self.image and slot["running"] is not None:
                return FirmwareVersion.from_image(ImageVersion.parse(slot["running"]))
        return None


def _write(boot: Bootloader, part: PackageImage) -> None:
    """Stream ``part`` into its image's (erased) update area, in whole write units."""
    area = boot.update_area(part.image)
    align, erased = boot.flash.write_align, bytes([boot.flash.erased_value])
    offset, pending = 0, b""
    for chunk in part.chunks():
        pending += chunk
        if offset + len(pending) > part.size:
            break
        whole = len(pending) - len(pending) % align
        if whole:
            area.write(offset, pending[:whole])
            offset, pending = offset + whole, pending[whole:]
    if offset + len(pending) != part.size:
        raise McuProgramError(
            f"{part.name} gave {offset + len(pending)} bytes, not the {part.size} announced",
            value=offset + len(pending),
        )
    if pending:
        area.write(offset, pending + erased * (-len(pending) % align))


def _verify(boot: Bootloader, device: SimDevice, part: PackageImage) -> VerifiedImage:
    area = boot.update_area(part.image)
    try:
        verified = verify_image(
            area, device.keys or None, max_size=boot.map.max_image_size(part.image)
        )
        check_erased_after(area, verified.layout, part.size, boot.flash.erased_value)
        boot.check_security_counter(verified, part.image)
    except OtakitError as exc:
        exc.message = f"image {part.image} ({part.name}): {exc.message}"
        exc.args = (exc.message,)
        raise
    return verified
