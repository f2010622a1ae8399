"""MCUboot TLV areas: the metadata that follows an image's payload.

Layout (little-endian; ``bootutil/image.h``)::

    image_tlv_info   u16 magic (0x6908 protected, 0x6907 unprotected), u16 total length
                     (the total includes this 4-byte info header)
    image_tlv        u16 type, u16 len, then len bytes of value      (repeated)

The protected area, when present, comes first and is covered by the image hash; its size is the
header's ``protect_tlv_size``. The unprotected area follows and holds the hash, the key hash or
public key, and the signature(s).

Walking an area never reads outside it: an entry that overflows its area, an area whose total
does not end exactly on an entry boundary, or a length that disagrees with the header raises
:class:`~otakit.errors.TlvError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from otakit.errors import BadMagicError, TlvError, TruncatedImageError
from otakit.image.header import ImageVersion

TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_INFO_STRUCT = struct.Struct("<HH")
TLV_ENTRY_STRUCT = struct.Struct("<HH")
TLV_INFO_SIZE = TLV_INFO_STRUCT.size
TLV_ENTRY_SIZE = TLV_ENTRY_STRUCT.size

SEC_CNT_STRUCT = struct.Struct("<I")
# image_dependency: u8 image_id, u8 flags, u16 pad, then image_version (u8, u8, u16, u32)
DEPENDENCY_STRUCT = struct.Struct("<BBHBBHI")


class TlvType(IntEnum):
    """TLV types (``IMAGE_TLV_*``)."""

    KEYHASH = 0x01
    PUBKEY = 0x02
    SHA256 = 0x10
    SHA384 = 0x11
    SHA512 = 0x12
    RSA2048_PSS = 0x20
    ECDSA224 = 0x21
    ECDSA_SIG = 0x22
    RSA3072_PSS = 0x23
    ED25519 = 0x24
    SIG_PURE = 0x25
    ENC_RSA2048 = 0x30
    ENC_KW = 0x31
    ENC_EC256 = 0x32
    ENC_X25519 = 0x33
    ENC_X25519_SHA512 = 0x34
    DEPENDENCY = 0x40
    SEC_CNT = 0x50
    BOOT_RECORD = 0x60
    DECOMP_SIZE = 0x70
    DECOMP_SHA = 0x71
    DECOMP_SIGNATURE = 0x72
    COMP_DEC_SIZE = 0x73
    UUID_VID = 0x74
    UUID_CID = 0x75


HASH_TLVS = (TlvType.SHA256, TlvType.SHA384, TlvType.SHA512)
SIGNATURE_TLVS = (
    TlvType.RSA2048_PSS,
    TlvType.ECDSA_SIG,
    TlvType.RSA3072_PSS,
    TlvType.ED25519,
)
# The AES key of an encrypted image, wrapped for the device's key (imgtool -E).
ENCRYPTION_TLVS = (
    TlvType.ENC_RSA2048,
    TlvType.ENC_KW,
    TlvType.ENC_EC256,
    TlvType.ENC_X25519,
    TlvType.ENC_X25519_SHA512,
)
# Types that may appear at most once in an image.
_UNIQUE_TLVS = frozenset({*HASH_TLVS, TlvType.SEC_CNT, TlvType.SIG_PURE, TlvType.BOOT_RECORD})
# Types that MCUboot only accepts in the protected area.
PROTECTED_ONLY_TLVS = frozenset({TlvType.SEC_CNT, TlvType.DEPENDENCY, TlvType.BOOT_RECORD})


def tlv_name(kind: int) -> str:
    try:
        return TlvType(kind).name
    except ValueError:
        return f"0x{kind:04x}"


@dataclass(frozen=True)
class Tlv:
    """One TLV entry; ``offset`` is the position of its value in the image."""

    kind: int
    value: bytes
    offset: int
    protected: bool

    @property
    def name(self) -> str:
        return tlv_name(self.kind)


@dataclass(frozen=True)
class Dependency:
    """A DEPENDENCY TLV: this image needs image ``image_id`` at ``min_version`` or later."""

    image_id: int
    min_version: ImageVersion

    def pack(self) -> bytes:
        v = self.min_version
        return DEPENDENCY_STRUCT.pack(self.image_id, 0, 0, v.major, v.minor, v.revision, v.build)

    @classmethod
    def unpack(cls, value: bytes) -> Dependency:
        if len(value) != DEPENDENCY_STRUCT.size:
            raise TlvError(
                f"DEPENDENCY TLV is {len(value)} bytes, expected {DEPENDENCY_STRUCT.size}",
                value=len(value),
            )
        image_id, _flags, _pad, major, minor, rev, build = DEPENDENCY_STRUCT.unpack(value)
        return cls(image_id, ImageVersion(major, minor, rev, build))


def parse_tlv_info(data: bytes, *, offset: int, protected: bool) -> int:
    """Check a 4-byte TLV info header read at ``offset``; return the area's total length."""
    if len(data) < TLV_INFO_SIZE:
        raise TruncatedImageError(
            f"image ends inside the TLV info header at offset {offset}", value=offset
        )
    magic, total = TLV_INFO_STRUCT.unpack_from(data)
    expected = TLV_PROT_INFO_MAGIC if protected else TLV_INFO_MAGIC
    if magic != expected:
        area = "protected TLV" if protected else "TLV"
        raise BadMagicError(
            f"bad {area} info magic 0x{magic:04x} at offset {offset} (expected 0x{expected:04x})",
            value=magic,
        )
    if total < TLV_INFO_SIZE:
        raise TlvError(
            f"TLV area at offset {offset} claims {total} bytes, less than its own header",
            value=total,
        )
    return int(total)


def parse_tlv_area(area: bytes, *, offset: int, protected: bool) -> list[Tlv]:
    """Walk a whole TLV area (info header included) that starts at image ``offset``."""
    total = parse_tlv_info(area, offset=offset, protected=protected)
    if len(area) != total:
        raise TruncatedImageError(
            f"TLV area at offset {offset} announces {total} bytes but {len(area)} are present",
            value=total,
        )
    entries: list[Tlv] = []
    pos = TLV_INFO_SIZE
    while pos < total:
        if total - pos < TLV_ENTRY_SIZE:
            raise TlvError(
                f"TLV entry header at offset {offset + pos} overflows its area", value=offset + pos
            )
        kind, length = TLV_ENTRY_STRUCT.unpack_from(area, pos)
        start = pos + TLV_ENTRY_SIZE
        if length > total - start:
            raise TlvError(
                f"TLV {tlv_name(kind)} at offset {offset + pos} is {length} bytes long and "
                f"overflows its area by {length - (total - start)} bytes",
                value=length,
            )
        entries.append(Tlv(kind, bytes(area[start : start + length]), offset + start, protected))
        pos = start + length
    return entries


def check_tlv_placement(protected: list[Tlv], unprotected: list[Tlv]) -> None:
    """Reject duplicated singletons and protected-only types in the unprotected area."""
    seen: set[int] = set()
    for tlv in (*protected, *unprotected):
        if tlv.kind in _UNIQUE_TLVS:
            if tlv.kind in seen:
                raise TlvError(f"TLV {tlv.name} appears more than once", value=tlv.kind)
            seen.add(tlv.kind)
        if not tlv.protected and tlv.kind in PROTECTED_ONLY_TLVS:
            raise TlvError(
                f"TLV {tlv.name} at offset {tlv.offset} must be in the protected area",
                value=tlv.kind,
            )


def pack_tlv_area(entries: list[tuple[int, bytes]], *, protected: bool) -> bytes:
    """Encode a TLV area (used by tests and tools that build images by hand)."""
    body = b"".join(TLV_ENTRY_STRUCT.pack(kind, len(v)) + v for kind, v in entries)
    magic = TLV_PROT_INFO_MAGIC if protected else TLV_INFO_MAGIC
    return TLV_INFO_STRUCT.pack(magic, TLV_INFO_SIZE + len(body)) + body
