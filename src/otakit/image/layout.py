"""Where the parts of an MCUboot image sit, read with bounds checks from a :class:`ByteSource`.

::

    0                         header (hdr_size bytes, the first 32 are ImageHeader)
    hdr_size                  payload (img_size bytes)
    hdr_size + img_size       protected TLV area (protect_tlv_size bytes, may be absent)
    ... + protect_tlv_size    TLV area (its own length in its info header)
    end                       padding up to the trailer, when the image fills a slot

Only the header and the TLV areas (each at most 64 KiB by format) are read into memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from otakit.errors import (
    ImageFormatError,
    ImageTooLargeError,
    TlvError,
    TrailingDataError,
    TruncatedImageError,
)
from otakit.image.header import HEADER_SIZE, ImageHeader
from otakit.image.source import ByteSource, iter_range
from otakit.image.tlv import (
    ENCRYPTION_TLVS,
    SEC_CNT_STRUCT,
    TLV_INFO_SIZE,
    Dependency,
    Tlv,
    TlvType,
    check_tlv_placement,
    parse_tlv_area,
    parse_tlv_info,
)


@dataclass(frozen=True)
class ImageLayout:
    """A parsed image: header, TLVs and the offsets that delimit them."""

    header: ImageHeader
    protected_tlvs: tuple[Tlv, ...]
    tlvs: tuple[Tlv, ...]
    end: int  # one past the last byte of the unprotected TLV area
    source_size: int  # size of what was read (a padded image or a slot is larger than end)

    @property
    def payload_offset(self) -> int:
        return self.header.hdr_size

    @property
    def tlv_offset(self) -> int:
        """Start of the protected TLV area (or of the TLV area when there is none)."""
        return self.header.hdr_size + self.header.img_size

    @property
    def hashed_size(self) -> int:
        """Bytes covered by the image hash: header, payload and protected TLVs."""
        return self.tlv_offset + self.header.protect_tlv_size

    def all_tlvs(self) -> tuple[Tlv, ...]:
        return self.protected_tlvs + self.tlvs

    def find(self, kind: int) -> Tlv | None:
        return next((t for t in self.all_tlvs() if t.kind == kind), None)

    @property
    def security_counter(self) -> int | None:
        tlv = self.find(TlvType.SEC_CNT)
        if tlv is None:
            return None
        if len(tlv.value) != SEC_CNT_STRUCT.size:
            raise TlvError(
                f"SEC_CNT TLV is {len(tlv.value)} bytes, expected {SEC_CNT_STRUCT.size}",
                value=len(tlv.value),
            )
        return int(SEC_CNT_STRUCT.unpack(tlv.value)[0])

    @property
    def encryption_tlv(self) -> Tlv | None:
        """The TLV holding the image's wrapped AES key (imgtool ``-E``), if any."""
        return next((t for t in self.all_tlvs() if t.kind in ENCRYPTION_TLVS), None)

    @property
    def dependencies(self) -> list[Dependency]:
        return [Dependency.unpack(t.value) for t in self.all_tlvs() if t.kind == TlvType.DEPENDENCY]


def _read_exact(source: ByteSource, offset: int, length: int, what: str) -> bytes:
    data = source.read_at(offset, length)
    if len(data) != length:
        raise TruncatedImageError(
            f"image ends at byte {offset + len(data)}, inside the {what} "
            f"({offset}..{offset + length})",
            value=offset + len(data),
        )
    return data


def read_layout(source: ByteSource, *, max_size: int | None = None) -> ImageLayout:
    """Parse header and TLV areas; raise an :class:`~otakit.errors.ImageFormatError` subclass.

    ``max_size`` bounds the image (header, payload and TLVs), e.g. the slot size minus the trailer.
    """
    size = source.size
    header = ImageHeader.unpack(_read_exact(source, 0, min(size, HEADER_SIZE), "image header"))
    if header.hdr_size < HEADER_SIZE:
        raise ImageFormatError(
            f"header size {header.hdr_size} is smaller than the {HEADER_SIZE}-byte header",
            value=header.hdr_size,
        )
    if header.protect_tlv_size and header.protect_tlv_size < TLV_INFO_SIZE:
        raise TlvError(
            f"protected TLV size {header.protect_tlv_size} is smaller than a TLV info header",
            value=header.protect_tlv_size,
        )
    tlv_off = header.hdr_size + header.img_size
    if max_size is not None and tlv_off + header.protect_tlv_size + TLV_INFO_SIZE > max_size:
        raise ImageTooLargeError(
            f"image does not fit in {max_size} bytes: its payload alone ends at byte {tlv_off}",
            value=tlv_off,
        )
    if tlv_off > size:
        raise TruncatedImageError(
            f"header announces a {header.img_size}-byte payload ending at byte {tlv_off}, "
            f"but the image has only {size} bytes",
            value=size,
        )

    protected: list[Tlv] = []
    off = tlv_off
    if header.protect_tlv_size:
        info = _read_exact(source, off, TLV_INFO_SIZE, "protected TLV info")
        total = parse_tlv_info(info, offset=off, protected=True)
        if total != header.protect_tlv_size:
            raise TlvError(
                f"protected TLV area is {total} bytes but the header says "
                f"{header.protect_tlv_size}",
                value=total,
            )
        area = _read_exact(source, off, total, "protected TLV area")
        protected = parse_tlv_area(area, offset=off, protected=True)
        off += total

    info = _read_exact(source, off, TLV_INFO_SIZE, "TLV info")
    total = parse_tlv_info(info, offset=off, protected=False)
    end = off + total
    if max_size is not None and end > max_size:
        raise ImageTooLargeError(
            f"image of {end} bytes does not fit in {max_size} bytes", value=end
        )
    area = _read_exact(source, off, total, "TLV area")
    tlvs = parse_tlv_area(area, offset=off, protected=False)
    check_tlv_placement(protected, tlvs)
    return ImageLayout(header, tuple(protected), tuple(tlvs), end, size)


def check_erased_after(
    source: ByteSource, layout: ImageLayout, end: int, erased: int = 0xFF
) -> None:
    """Raise TrailingDataError unless every byte from the end of the image's TLVs up to ``end``
    (where the slot's trailer starts, or the download ends) is ``erased``, or every one is 0xFF:
    nothing signs those bytes, so anything else there was added after signing. An
    ``imgtool --pad`` image has only its ``-R`` erased value there, 0xFF unless told otherwise
    (also for a flash that erases to 0x00)."""
    offset = layout.end
    fill = erased
    if end > layout.end and source.read_at(layout.end, 1) == b"\xff":
        fill = 0xFF
    for chunk in iter_range(source, layout.end, end):
        rest = chunk.lstrip(bytes([fill]))
        if rest:
            at = offset + len(chunk) - len(rest)
            raise TrailingDataError(
                f"byte {at} after the image's TLV area (which ends at byte {layout.end}) is not "
                "erased: unsigned data follows the signed image",
                value=at,
            )
        offset += len(chunk)
