"""Build signed MCUboot images, with imgtool (the reference implementation) doing the work.

imgtool's ``Image`` class is file-path oriented, prints as it goes and raises ``click``
exceptions. :func:`sign_image` feeds it bytes, silences it, turns its exceptions into
:class:`~otakit.errors.SigningError` and checks the result with otakit's own verifier before
returning it.

:func:`sign_image_hex` writes the same image as Intel HEX the way ``imgtool sign ... OUT.hex``
does: the image at its address and, for a padded image, only the trailer's magic (and image_ok)
at the end of the slot, with no filler in between.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from otakit.errors import ImageTooLargeError, OtakitError, SigningError
from otakit.image.header import HEADER_SIZE, ImageVersion
from otakit.image.hexfile import format_hex
from otakit.image.keys import KeyType, SigningKey
from otakit.image.tlv import Dependency
from otakit.image.trailer import (
    DEFAULT_MAX_SECTORS,
    VALID_MAX_ALIGNS,
    VALID_WRITE_ALIGNS,
    TrailerLayout,
    default_max_align,
    trailer_size,
)
from otakit.image.verify import verify_image

if TYPE_CHECKING:
    from imgtool.version import SemiSemVersion

# imgtool (and click, which it raises) is imported by the functions that sign, not with this
# module: every `otakit` command imports it, the device agent among them, which never signs.


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
    max_align: int | None = None  # None: imgtool's max(8, align)
    erased_value: int = 0xFF  # imgtool -R: fills the header padding and the --pad padding
    # the largest image (header to the end of the TLVs) the target bootloader accepts, e.g.
    # FlashMap.max_image_size(); None: only imgtool's check against the slot size
    max_image_size: int | None = None

    def __post_init__(self) -> None:
        if self.erased_value not in (0x00, 0xFF):
            raise SigningError(
                f"erased value 0x{self.erased_value:x} must be 0xff or 0x00",
                value=self.erased_value,
            )
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
        if self.max_align is not None and self.max_align not in VALID_MAX_ALIGNS:
            raise SigningError(
                f"max alignment {self.max_align} must be one of "
                f"{', '.join(map(str, VALID_MAX_ALIGNS))}",
                value=self.max_align,
            )
        if self.max_align is not None and self.max_align < self.align:
            raise SigningError(
                f"max alignment {self.max_align} is smaller than the write alignment "
                f"{self.align}: the bootloader's BOOT_MAX_ALIGN must be at least --align",
                value=self.max_align,
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
    def trailer_layout(self) -> TrailerLayout:
        """Where the trailer's magic and flags go (``max_align``, imgtool's default if unset)."""
        return TrailerLayout(
            default_max_align(self.align) if self.max_align is None else self.max_align
        )

    @property
    def trailer_size(self) -> int:
        return trailer_size(
            self.align,
            self.max_sectors,
            overwrite_only=self.overwrite_only,
            max_align=self.trailer_layout.max_align,
        )


def _imgtool_key(key: SigningKey) -> Any:
    """imgtool's key object for ``key``."""
    from imgtool import keys as imgtool_keys

    classes: dict[KeyType, Any] = {
        KeyType.ECDSA_P256: imgtool_keys.ECDSA256P1,
        KeyType.ECDSA_P384: imgtool_keys.ECDSA384P1,
        KeyType.ED25519: imgtool_keys.Ed25519,
        KeyType.RSA_2048: imgtool_keys.RSA,
        KeyType.RSA_3072: imgtool_keys.RSA,
    }
    return classes[key.type](key.private_key)


def _semver(v: ImageVersion) -> SemiSemVersion:
    from imgtool.version import SemiSemVersion

    return SemiSemVersion(v.major, v.minor, v.revision, v.build)


def sign_image(payload: bytes, key: SigningKey | None, options: SignOptions) -> bytes:
    """Return the MCUboot image of ``payload``, signed with ``key`` (``None``: hash only).

    A padded image (``options.padded``) fills the slot and ends with the trailer.

    Raises :class:`~otakit.errors.SigningError` when the image cannot be built as asked
    (header area not free, image plus trailer larger than the slot, ...).
    """
    img = _create(payload, key, options)
    _check_size(len(img.payload), options)
    if options.padded:
        with _imgtool_errors():
            img.pad_to(options.slot_size)
    image = bytes(img.payload)
    _check(image, key)
    return image


def sign_image_hex(
    payload: bytes, key: SigningKey | None, options: SignOptions, *, address: int
) -> bytes:
    """Return the image of ``payload`` as Intel HEX text, starting at ``address``.

    As imgtool writes a ``.hex`` output: a padded image is not filled up to the slot; only the
    trailer's magic goes at the end of the slot (``address + slot_size``), and for a confirmed
    image the image_ok flag (one ``max_align`` unit) before it.
    """
    img = _create(payload, key, options)
    image = bytes(img.payload)
    _check_size(len(image), options)
    _check(image, key)
    chunks = [(address, image)]
    if options.padded:
        layout = options.trailer_layout
        slot_end = address + options.slot_size
        if options.confirm and not options.overwrite_only:
            chunks.append(
                (slot_end - layout.image_ok_off, layout.flag(erased_value=options.erased_value))
            )
        chunks.append((slot_end - layout.magic_off, layout.magic))
    return format_hex(chunks)


def _check_size(size: int, options: SignOptions) -> None:
    limit = options.max_image_size
    if limit is not None and size > limit:
        raise ImageTooLargeError(
            f"the image is {size} bytes; the bootloader accepts at most {limit}", value=size
        )


def hex_address(
    input_address: int | None, options: SignOptions, hex_addr: int | None = None
) -> int | None:
    """Where a ``.hex`` output starts, by imgtool's rule: ``--hex-addr`` when given, else the
    lowest address of a ``.hex`` input, moved down by the header size with ``--pad-header``
    (imgtool leaves an input at address 0 where it is). None: no address is known."""
    if hex_addr is not None:
        return hex_addr
    if input_address is None:
        return None
    if options.pad_header and input_address:
        if input_address < options.header_size:
            raise SigningError(
                f"the .hex input starts at 0x{input_address:x}, so a {options.header_size}-byte "
                "header prepended with --pad-header would start below address 0; "
                "give the image's address with --hex-addr",
                value=input_address,
            )
        return input_address - options.header_size
    return input_address


def _create(payload: bytes, key: SigningKey | None, options: SignOptions) -> Any:
    """imgtool's ``Image`` after ``create``: header, payload and TLVs, not padded."""
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
    from imgtool import image as imgtool_image

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
        max_align=options.max_align,
        erased_val=hex(options.erased_value),
    )
    # What Image.load() does for a binary file, without the file.
    img.infile_data = payload
    img.payload = (
        bytes([options.erased_value]) * options.header_size if options.pad_header else b""
    ) + payload
    img.image_size = len(img.payload) - options.header_size
    dependencies = None
    if options.dependencies:
        dependencies = {
            imgtool_image.DEP_IMAGES_KEY: [str(d.image_id) for d in options.dependencies],
            imgtool_image.DEP_VERSIONS_KEY: [_semver(d.min_version) for d in options.dependencies],
        }
    imgtool_key = _imgtool_key(key) if key is not None else None
    with _imgtool_errors():
        img.create(imgtool_key, options.public_key_format, None, dependencies)
    return img


@contextlib.contextmanager
def _imgtool_errors() -> Iterator[None]:
    """Silence imgtool and turn its exceptions into SigningError."""
    import click

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except click.ClickException as exc:
        raise SigningError(_imgtool_message(exc.format_message())) from None
    except (ValueError, struct.error, OverflowError) as exc:
        raise SigningError(f"cannot build the image: {exc}") from None


def _check(image: bytes, key: SigningKey | None) -> None:
    try:
        verify_image(image, [key.public_key] if key is not None else None)
    except OtakitError as exc:  # pragma: no cover - would be a bug in the imgtool wrapper
        raise SigningError(f"the signed image does not verify: {exc}") from exc


def _imgtool_message(message: str) -> str:
    """imgtool's messages mention its own flags; say them in otakit's words."""
    message = message.replace("requested size", "slot size").strip()
    return message[:1].lower() + message[1:]
