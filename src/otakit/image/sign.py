"""Build signed MCUboot images, with imgtool (the reference implementation) doing the work.

imgtool's ``Image`` class is file-path oriented, prints as it goes and raises ``click``
exceptions. :func:`sign_image` feeds it bytes, silences it, turns its exceptions into
:class:`~otakit.errors.SigningError` and checks the result with otakit's own verifier before
returning it.
"""

from __future__ import annotations

import contextlib
import io
import struct
from dataclasses import dataclass
from typing import Any, Literal

import click
from imgtool import image as imgtool_image
from imgtool import keys as imgtool_keys
from imgtool.version import SemiSemVersion

from otakit.errors import OtakitError, SigningError
from otakit.image.header import HEADER_SIZE, ImageVersion
from otakit.image.keys import KeyType, SigningKey
from otakit.image.tlv import Dependency
from otakit.image.trailer import DEFAULT_MAX_SECTORS, VALID_WRITE_ALIGNS, trailer_size
from otakit.image.verify import verify_image

ERASED_BYTE = 0xFF


@dataclass(frozen=True)
class SignOptions:
    """What ``imgtool sign`` calls its options; the defaults are imgtool's."""

    version: ImageVersion
    header_size: int = HEADER_SIZE
    pad_header: bool = False
    align: int = 1
    slot_size: int = 0
    pad: bool = False
    confirm: bool = False
    overwrite_only: bool = False
    max_sectors: int = DEFAULT_MAX_SECTORS
    security_counter: int | Literal["auto"] | None = None
    dependencies: tuple[Dependency, ...] = ()
    load_addr: int = 0
    public_key_format: Literal["hash", "full"] = "hash"

    def __post_init__(self) -> None:
        if not HEADER_SIZE <= self.header_size <= 0xFFFF:
            raise SigningError(
                f"header size {self.header_size} must be between {HEADER_SIZE} and 65535",
                value=self.header_size,
            )
        if self.align not in VALID_WRITE_ALIGNS:
            raise SigningError(
                f"alignment {self.align} must be one of {', '.join(map(str, VALID_WRITE_ALIGNS))}",
                value=self.align,
            )
        if self.slot_size < 0:
            raise SigningError(f"slot size {self.slot_size} is negative", value=self.slot_size)
        if self.padded and self.slot_size == 0:
            raise SigningError("--pad and --confirm need the slot size (--slot-size)")
        if isinstance(self.security_counter, int) and not 0 <= self.security_counter < 2**32:
            raise SigningError(
                f"security counter {self.security_counter} does not fit in 32 bits",
                value=self.security_counter,
            )
        if not 1 <= self.max_sectors <= 0xFFFF:
            raise SigningError(
                f"max sectors {self.max_sectors} out of range", value=self.max_sectors
            )

    @property
    def padded(self) -> bool:
        """A confirmed image is always padded to the slot (it needs the trailer)."""
        return self.pad or self.confirm

    @property
    def trailer_size(self) -> int:
        return trailer_size(self.align, self.max_sectors, overwrite_only=self.overwrite_only)


_IMGTOOL_KEY_CLASSES: dict[KeyType, Any] = {
    KeyType.ECDSA_P256: imgtool_keys.ECDSA256P1,
    KeyType.ECDSA_P384: imgtool_keys.ECDSA384P1,
    KeyType.ED25519: imgtool_keys.Ed25519,
    KeyType.RSA_2048: imgtool_keys.RSA,
    KeyType.RSA_3072: imgtool_keys.RSA,
}


def _semver(v: ImageVersion) -> SemiSemVersion:
    return SemiSemVersion(v.major, v.minor, v.revision, v.build)


def sign_image(payload: bytes, key: SigningKey | None, options: SignOptions) -> bytes:
    """Return the MCUboot image of ``payload``, signed with ``key`` (``None``: hash only).

    Raises :class:`~otakit.errors.SigningError` when the image cannot be built as asked
    (header area not free, image plus trailer larger than the slot, ...).
    """
    if not options.pad_header and any(payload[: options.header_size]):
        raise SigningError(
            f"the first {options.header_size} bytes of the payload are not zero, so there is no "
            "room for the image header; use --pad-header to prepend one",
            value=options.header_size,
        )
    if not options.pad_header and len(payload) < options.header_size:
        raise SigningError(
            f"payload of {len(payload)} bytes is shorter than the {options.header_size}-byte "
            "header it should start with; use --pad-header",
            value=len(payload),
        )
    img = imgtool_image.Image(
        version=_semver(options.version),
        header_size=options.header_size,
        pad_header=options.pad_header,
        pad=options.padded,
        confirm=options.confirm,
        align=options.align,
        slot_size=options.slot_size,
        max_sectors=options.max_sectors,
        overwrite_only=options.overwrite_only,
        load_addr=options.load_addr,
        security_counter=options.security_counter,
    )
    # What Image.load() does for a binary file, without the file.
    img.infile_data = payload
    img.payload = (
        bytes([ERASED_BYTE]) * options.header_size if options.pad_header else b""
    ) + payload
    img.image_size = len(img.payload) - options.header_size
    dependencies = None
    if options.dependencies:
        dependencies = {
            imgtool_image.DEP_IMAGES_KEY: [str(d.image_id) for d in options.dependencies],
            imgtool_image.DEP_VERSIONS_KEY: [_semver(d.min_version) for d in options.dependencies],
        }
    imgtool_key = _IMGTOOL_KEY_CLASSES[key.type](key.private_key) if key is not None else None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            img.create(imgtool_key, options.public_key_format, None, dependencies)
            if options.padded:
                img.pad_to(options.slot_size)
    except click.ClickException as exc:
        raise SigningError(_imgtool_message(exc.format_message())) from None
    except (ValueError, struct.error, OverflowError) as exc:
        raise SigningError(f"cannot build the image: {exc}") from None
    image = bytes(img.payload)
    try:
        verify_image(image, [key.public_key] if key is not None else None)
    except OtakitError as exc:  # pragma: no cover - would be a bug in the imgtool wrapper
        raise SigningError(f"the signed image does not verify: {exc}") from exc
    return image


def _imgtool_message(message: str) -> str:
    """imgtool's messages mention its own flags; say them in otakit's words."""
    message = message.replace("requested size", "slot size").strip()
    return message[:1].lower() + message[1:]
