"""The MCUboot image header and image version.

On-flash layout (little-endian, 32 bytes; ``bootutil/image.h`` ``struct image_header``)::

    0   u32  magic            0x96f3b83d
    4   u32  load_addr
    8   u16  hdr_size         header size; the payload starts here (>= 32)
    10  u16  protect_tlv_size size of the protected TLV area, 0 if none
    12  u32  img_size         payload size (without header)
    16  u32  flags            IMAGE_F_*
    20  u8   version.major
    21  u8   version.minor
    22  u16  version.revision
    24  u32  version.build
    28  u32  pad
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntFlag
from functools import total_ordering

from otakit.errors import BadMagicError, TruncatedImageError, VersionFormatError

IMAGE_MAGIC = 0x96F3B83D
HEADER_STRUCT = struct.Struct("<IIHHIIBBHII")
HEADER_SIZE = HEADER_STRUCT.size  # 32


class ImageFlags(IntFlag):
    """IMAGE_F_* header flags."""

    PIC = 0x0000001
    ENCRYPTED_AES128 = 0x0000004
    ENCRYPTED_AES256 = 0x0000008
    NON_BOOTABLE = 0x0000010
    RAM_LOAD = 0x0000020
    ROM_FIXED = 0x0000100
    COMPRESSED_LZMA1 = 0x0000200
    COMPRESSED_LZMA2 = 0x0000400
    COMPRESSED_ARM_THUMB = 0x0000800


_VERSION_RE = re.compile(r"^(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\+(0|[1-9]\d*))?)?)?$")


@total_ordering
@dataclass(frozen=True)
class ImageVersion:
    """``major.minor.revision+build`` as MCUboot stores it (u8, u8, u16, u32).

    Ordering follows MCUboot's downgrade prevention: major, minor, revision, then build.
    """

    major: int
    minor: int = 0
    revision: int = 0
    build: int = 0

    def __post_init__(self) -> None:
        for name, value, bits in (
            ("major", self.major, 8),
            ("minor", self.minor, 8),
            ("revision", self.revision, 16),
            ("build", self.build, 32),
        ):
            if not 0 <= value < (1 << bits):
                raise VersionFormatError(
                    f"version {name} {value} does not fit in {bits} bits", value=value
                )

    @classmethod
    def parse(cls, text: str) -> ImageVersion:
        """Parse ``maj[.min[.rev[+build]]]`` (imgtool's syntax); raise VersionFormatError."""
        match = _VERSION_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise VersionFormatError(
                f"invalid version {text!r}: expected major.minor.revision+build, "
                "later parts optional (e.g. 1.2.3+4)",
                value=text,
            )
        return cls(*(int(g) if g is not None else 0 for g in match.groups()))

    def _key(self) -> tuple[int, int, int, int]:
        return (self.major, self.minor, self.revision, self.build)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, ImageVersion):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}+{self.build}"

    @property
    def short(self) -> str:
        """``major.minor.revision``, the form job documents and packages use."""
        return f"{self.major}.{self.minor}.{self.revision}"


@dataclass(frozen=True)
class ImageHeader:
    """A decoded image header."""

    load_addr: int
    hdr_size: int
    protect_tlv_size: int
    img_size: int
    flags: int
    version: ImageVersion

    @classmethod
    def unpack(cls, data: bytes) -> ImageHeader:
        """Decode the first 32 bytes of an image; raise BadMagicError or TruncatedImageError."""
        if len(data) < HEADER_SIZE:
            raise TruncatedImageError(
                f"image is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header",
                value=len(data),
            )
        magic, load_addr, hdr_size, prot, img_size, flags, major, minor, rev, build, _pad = (
            HEADER_STRUCT.unpack_from(data)
        )
        if magic != IMAGE_MAGIC:
            hint = "is this an MCUboot image?"
            if _looks_like_intel_hex(data):
                hint = "this looks like Intel HEX text: give the file a .hex name"
            raise BadMagicError(
                f"bad image magic 0x{magic:08x} (expected 0x{IMAGE_MAGIC:08x}); {hint}",
                value=magic,
            )
        return cls(
            load_addr, hdr_size, prot, img_size, flags, ImageVersion(major, minor, rev, build)
        )

    def pack(self) -> bytes:
        v = self.version
        return HEADER_STRUCT.pack(
            IMAGE_MAGIC,
            self.load_addr,
            self.hdr_size,
            self.protect_tlv_size,
            self.img_size,
            self.flags,
            v.major,
            v.minor,
            v.revision,
            v.build,
            0,
        )

    @property
    def flag_names(self) -> list[str]:
        return [f.name for f in ImageFlags if f.name and self.flags & f]

    @property
    def encrypted(self) -> bool:
        """IMAGE_F_ENCRYPTED_AES128/256: MCUboot decrypts the payload in the secondary slot.
        ``imgtool sign -E KEY --clear`` sets it too, with the payload left in clear."""
        return bool(self.flags & ENCRYPTED_FLAGS)


ENCRYPTED_FLAGS = ImageFlags.ENCRYPTED_AES128 | ImageFlags.ENCRYPTED_AES256
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def _looks_like_intel_hex(data: bytes) -> bool:
    """An Intel HEX record starts with ':' and hex digits (imgtool reads .hex by name only)."""
    first = data[1:HEADER_SIZE].split(b"\n", 1)[0].rstrip(b"\r")
    return data[:1] == b":" and len(first) >= 10 and all(c in _HEX_DIGITS for c in first)
