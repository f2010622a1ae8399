"""The simulated external MCU of the gateway model (protocols.md §7): a simulated MCUboot device.

A gateway (:class:`~otakit.device.gateway.GatewayStorage`) programs its MCU through an
:class:`~otakit.device.gateway.ExternalProgrammer`. On real hardware that is a flasher command
(:class:`~otakit.device.gateway.CommandProgrammer`); here it is a simulated device folder
(:class:`~otakit.sim.device.SimDevice`), whose bootloader installs the image as a real one
would. It lives in the simulator so that the device layer never depends on it: ``otakit agent
run`` hands it to :class:`~otakit.device.service.AgentService` (``storage.mcu``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from otakit.device.core.after_boot import BootVerdict, after_boot
from otakit.errors import McuProgramError
from otakit.image.header import ImageVersion
from otakit.protocol.version import FirmwareVersion
from otakit.sim.device import SimDevice


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

    def running(self) -> FirmwareVersion | None:
        """The version the simulated MCU runs, or None when it runs nothing."""
        slots: list[dict[str, Any]] = SimDevice(self.device_dir).status()["slots"]
        for slot in slots:
            if slot["image"] == self.image and slot["running"] is not None:
                return FirmwareVersion.from_image(ImageVersion.parse(slot["running"]))
        return None
