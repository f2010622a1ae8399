"""A simulated device kept in a folder: its flash, flash map, identity and trusted keys.

::

    DIR/device.json     identity, bootloader settings, boot count, last boot and last failure
    DIR/flashmap.json   the flash map (see otakit.device.flashmap)
    DIR/flash.bin       the flash contents, byte for byte (erased bytes read the map's erased value)
    DIR/keys/*.pem      trusted public keys (only the public part of a given key is kept)

Every command opens the flash file, acts, and closes it; ``device.json`` is replaced atomically,
so a simulated device survives the process being killed between any two commands.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otakit.device.bootloader import (
    Action,
    Bootloader,
    BootloaderConfig,
    BootResult,
    ImageStatus,
    Strategy,
)
from otakit.device.flash import Flash, PowerCut
from otakit.device.flashmap import FlashMap, preset
from otakit.errors import DeviceError, OtakitError
from otakit.files import read_input, write_atomic
from otakit.image.delta import image_digest
from otakit.image.keys import PublicKey
from otakit.image.layout import check_erased_after
from otakit.image.source import BytesSource
from otakit.image.verify import VerifiedImage, verify_image

DEVICE_FILE = "device.json"
FLASHMAP_FILE = "flashmap.json"
FLASH_FILE = "flash.bin"
KEYS_DIR = "keys"
DEFAULT_LAYOUT = "psoc6-2m-swap"


@dataclass
class Identity:
    board: str = "CY8CPROTO_062_4343W"
    product: str = "otakit-sim"
    serial: str = "SIM-0001"
    manufacturer: str = "otakit"


@dataclass
class DeviceState:
    identity: Identity
    strategy: Strategy
    allow_downgrade: bool = False
    ignore_security_counter: bool = False
    boots: int = 0
    last_boot: dict[str, Any] | None = None
    last_failure: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": vars(self.identity),
            "bootloader": {
                "strategy": self.strategy.value,
                "allow_downgrade": self.allow_downgrade,
                "ignore_security_counter": self.ignore_security_counter,
            },
            "boots": self.boots,
            "last_boot": self.last_boot,
            "last_failure": self.last_failure,
        }

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> DeviceState:
        try:
            loader = data["bootloader"]
            return cls(
                identity=Identity(**{k: str(v) for k, v in data["identity"].items()}),
                strategy=Strategy(loader["strategy"]),
                allow_downgrade=bool(loader.get("allow_downgrade", False)),
                ignore_security_counter=bool(loader.get("ignore_security_counter", False)),
                boots=int(data.get("boots", 0)),
                last_boot=data.get("last_boot"),
                last_failure=data.get("last_failure"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DeviceError(
                f"{path} is not a valid device file: {exc}", value=str(path)
            ) from None


@dataclass(frozen=True)
class BootReport:
    """What ``sim boot`` reports: the boot result, or where the power was cut."""

    result: BootResult | None
    power_cut_after: int | None
    status: list[ImageStatus]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"power_cut": self.power_cut_after is not None}
        if self.power_cut_after is not None:
            data["operations_before_cut"] = self.power_cut_after
        if self.result is not None:
            data.update(self.result.to_dict())
        data["slots"] = [s.to_dict() for s in self.status]
        return data


class SimDevice:
    """A device folder; use :meth:`create` to make one and the constructor to open one."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        device_file = self.dir / DEVICE_FILE
        if not device_file.is_file():
            raise DeviceError(
                f"{self.dir} is not a simulated device (no {DEVICE_FILE}); "
                "make one with `otakit sim create`",
                value=str(self.dir),
            )
        try:
            data = json.loads(read_input(device_file))
        except json.JSONDecodeError as exc:
            raise DeviceError(f"{device_file} is not valid JSON: {exc}") from None
        self.state = DeviceState.from_dict(data, device_file)
        self.map = FlashMap.load(self.dir / FLASHMAP_FILE)
        self.keys = tuple(PublicKey.load(p) for p in sorted((self.dir / KEYS_DIR).glob("*.pem")))

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        image: bytes,
        keys: Sequence[PublicKey],
        *,
        layout: FlashMap | str = DEFAULT_LAYOUT,
        identity: Identity | None = None,
        strategy: Strategy | None = None,
        allow_downgrade: bool = False,
        ignore_security_counter: bool = False,
        images: Mapping[int, bytes] | None = None,
    ) -> SimDevice:
        """Make a device folder with ``image`` (verified first) in the primary slot of image 0,
        and each of ``images`` (image index -> signed image, e.g. ``{1: secure_image}`` on the
        two-image layout) in the primary slot of its image. Raises DeviceError for an image
        index the layout does not have, and what verification raises for a bad image."""
        target = Path(directory)
        if target.exists() and any(target.iterdir()):
            raise DeviceError(f"{target} exists and is not empty", value=str(target))
        if not keys:
            raise DeviceError("give at least one trusted key: the bootloader checks signatures")
        fm = preset(layout) if isinstance(layout, str) else layout
        if strategy is not None and strategy != fm.strategy:
            fm = fm.with_strategy(strategy)
        strategy = Strategy(fm.strategy)
        _verify_for_slot(image, keys, fm)
        others = dict(images or {})
        for index, data in others.items():
            if index == 0 or index not in fm.images:
                raise DeviceError(
                    f"layout {fm.name} has no image {index} besides image 0", value=index
                )
            _verify_for_slot(data, keys, fm, index)
        target.mkdir(parents=True, exist_ok=True)
        (target / KEYS_DIR).mkdir()
        for index, key in enumerate(keys):
            write_atomic(target / KEYS_DIR / f"trusted-{index}.pem", key.pem())
        fm.save(target / FLASHMAP_FILE)
        state = DeviceState(
            identity or Identity(), strategy, allow_downgrade, ignore_security_counter
        )
        with _open_flash(target, fm) as flash:
            Bootloader(flash, fm, _config(state, keys))  # checks the layout suits the strategy
            flash.write(fm.primary(0).offset, _aligned(image, fm))
            for index, data in sorted(others.items()):
                flash.write(fm.primary(index).offset, _aligned(data, fm))
        write_atomic(target / DEVICE_FILE, _json(state.to_dict()))
        return cls(target)

    # --- commands ------------------------------------------------------------------------------

    def install(
        self, image: bytes, *, image_index: int = 0, permanent: bool = False
    ) -> VerifiedImage:
        """Write ``image`` to the secondary slot and mark it pending (what an agent does).

        As an agent does, only the signed part is written, never the trailer area of an
        ``imgtool --pad`` file: the request is ``permanent``'s, not the file's. Unsigned bytes
        after the TLVs are refused (TrailingDataError, image/layout.check_erased_after with the
        flash's erased value, as the agent's SlotStorage checks them).
        """
        if image_index not in self.map.images:
            raise DeviceError(f"this device has no image {image_index}", value=image_index)
        verified = _verify_for_slot(image, self.keys, self.map, image_index)
        data_end = self.map.max_image_size(image_index)
        check_erased_after(
            BytesSource(image), verified.layout, min(data_end, len(image)), self.map.erased_value
        )
        with self.bootloader() as boot:
            boot.secondary(image_index).erase_all()
            boot.update_area(image_index).write(0, _aligned(image[: verified.layout.end], self.map))
            boot.set_pending(image_index, permanent=permanent)
        return verified

    def boot(self, *, power_cut_after: int | None = None, tear: bool = False) -> BootReport:
        """Run the bootloader; with a cut, stop after that many flash operations."""
        with self.bootloader() as boot:
            if power_cut_after is not None:
                boot.flash.cut_after(power_cut_after, tear=tear, seed=power_cut_after)
            try:
                result: BootResult | None = boot.boot()
            except PowerCut:
                result = None
            boot.flash.power_on()
            status = boot.status()
        self.state.boots += 1
        if result is not None:
            self.state.last_boot = result.to_dict()
            failures = [i for i in result.images if i.reason is not None]
            if failures:
                self.state.last_failure = {
                    "boot": self.state.boots,
                    "image": failures[0].image,
                    "error": failures[0].error,
                    "reason": failures[0].reason,
                }
        else:
            self.state.last_boot = {"power_cut": True, "operations_before_cut": power_cut_after}
        self._save_state()
        return BootReport(result, power_cut_after if result is None else None, status)

    def image_sha256(self) -> str | None:
        """What image 0 runs, as a delta's base is named: :func:`~otakit.image.delta.
        image_digest` of its primary slot (64 lowercase hex); None when it holds no image."""
        with self.bootloader() as boot:
            try:
                return image_digest(boot.primary(0)).sha256.hex()
            except OtakitError:
                return None

    def confirm(self, image_index: int = 0) -> bool:
        with self.bootloader() as boot:
            return boot.confirm(image_index)

    def status(self) -> dict[str, Any]:
        with self.bootloader() as boot:
            slots = [s.to_dict() for s in boot.status()]
        last = self.state.last_boot or {}
        return {
            "device": str(self.dir),
            **self.state.to_dict(),
            "layout": self.map.name,
            "trusted_keys": [k.fingerprint for k in self.keys],
            "reverted": any(i.get("action") == Action.REVERT for i in last.get("images", [])),
            "slots": slots,
        }

    # --- internals -----------------------------------------------------------------------------

    @contextmanager
    def bootloader(self) -> Iterator[Bootloader]:
        """The bootloader on this device's flash, open for the duration of the block."""
        with _open_flash(self.dir, self.map) as flash:
            yield Bootloader(flash, self.map, _config(self.state, self.keys))

    def _save_state(self) -> None:
        write_atomic(self.dir / DEVICE_FILE, _json(self.state.to_dict()))


@contextmanager
def _open_flash(directory: Path, fm: FlashMap) -> Iterator[Flash]:
    flash = fm.open_flash(directory / FLASH_FILE)
    try:
        yield flash
    finally:
        flash.flush()
        flash.close()


def _config(state: DeviceState, keys: Sequence[PublicKey]) -> BootloaderConfig:
    return BootloaderConfig(
        keys=tuple(keys),
        allow_downgrade=state.allow_downgrade,
        ignore_security_counter=state.ignore_security_counter,
    )


def _verify_for_slot(
    image: bytes, keys: Sequence[PublicKey], fm: FlashMap, index: int = 0
) -> VerifiedImage:
    """Signed images are verified before they go anywhere near a slot.

    An imgtool ``--pad`` image is slot-sized; ``create`` writes it whole into the primary slot
    (as a programmer would), ``install`` only its signed part.
    """
    limit = fm.primary(index).size
    if len(image) > limit:
        raise DeviceError(
            f"the image file is {len(image)} bytes, larger than the {limit}-byte slot",
            value=len(image),
        )
    return verify_image(image, keys, max_size=fm.max_image_size(index))


def _aligned(data: bytes, fm: FlashMap) -> bytes:
    return data + bytes([fm.erased_value]) * (-len(data) % fm.write_align)


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
