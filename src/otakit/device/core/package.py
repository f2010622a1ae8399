"""A multi-image TAR package (protocols.md §6) demultiplexed as it arrives, without I/O.

:class:`PackageStream` takes the bytes of a package in order, in pieces of any size (an HTTP
range, a 64-byte MQTT chunk, one byte), and says what to do with them: the data of each
component goes to its image's secondary slot (``NSPE`` image 0, ``SPE`` image 1) at an offset
in that slot (:class:`SlotWrite`); everything else (member headers, components.json, padding,
the end-of-archive blocks and the zeros after them) is kept, so that the SHA-256 of the whole
file can be computed again from the slots and :meth:`PackageStream.segments` after a resume.

The archive is checked with the rules of :mod:`otakit.image.package` (the same header parser,
manifest parser and member checks as :class:`~otakit.image.package.PackageReader`), plus what a
device needs: every component names an image this device has, and fits in its slot's maximum
image size (checked when components.json has arrived, before any component byte is written).

The state (:meth:`PackageStream.to_dict`) is small JSON, saved in the resume journal with each
commit; :meth:`PackageStream.from_dict` restores it, so a download resumes at any byte: a header
or components.json that was arriving is part of the state.

Raises (from :meth:`PackageStream.feed` and :meth:`PackageStream.finish`):
:class:`~otakit.errors.PackageFormatError` (broken ustar header, checksum, a lone end block,
non-zero bytes after the archive, a truncated package, bytes past the announced size),
:class:`~otakit.errors.UnsafeMemberError` (a link, folder, extension header, a path),
:class:`~otakit.errors.ManifestError` (components.json missing, not first, invalid, a member not
listed or of another size, a listed member missing, a component for an image this device does
not have), :class:`~otakit.errors.PackageLimitError` (more than 8 files, too large) and
:class:`~otakit.errors.ImageTooLargeError` (a component larger than its slot's maximum image
size). After an error the stream raises the same error again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otakit.errors import (
    ImageTooLargeError,
    ManifestError,
    OtakitError,
    PackageFormatError,
)
from otakit.image.package import (
    BLOCK_SIZE,
    DEFAULT_MAX_MEMBER_SIZE,
    MANIFEST_NAME,
    MAX_FILES,
    PackageManifest,
    check_complete,
    check_first_member,
    check_member,
    check_second_end_block,
    is_zero_block,
    padding,
    parse_header,
    parse_manifest,
)

__all__ = ["MIN_PACKAGE_SIZE", "PackageStream", "Segment", "SlotWrite"]

# components.json's header and data block, and the two end blocks: no package is smaller
MIN_PACKAGE_SIZE = 4 * BLOCK_SIZE
_STATE_VERSION = 1

_HEADER = "header"  # collecting a 512-byte member header (or the first end block)
_MANIFEST = "manifest"  # collecting components.json
_DATA = "data"  # a component's data, to its slot
_PADDING = "padding"  # to the next 512-byte boundary
_END = "end"  # collecting the second end-of-archive block
_TAIL = "tail"  # zeros after the archive (tarfile pads to a 10 KiB record)
_PHASES = (_HEADER, _MANIFEST, _DATA, _PADDING, _END, _TAIL)
_ZERO_RUN = re.compile(rb"\x00{16,}")


@dataclass(frozen=True)
class SlotWrite:
    """``data`` goes to the secondary slot of image ``image`` at ``offset`` in that slot."""

    image: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Segment:
    """A stretch of the package file: ``length`` bytes of image ``image``'s secondary slot from
    ``start``, or (``image`` None) the bytes ``data`` kept by the stream."""

    image: int | None
    start: int
    length: int
    data: bytes = b""


class PackageStream:
    """The demultiplexer of one package of ``total`` bytes.

    ``slots`` maps each image this device has to the largest component it takes (the slot's
    maximum image size). :meth:`feed` returns, in order, the manifest (once, when components.json
    is complete and checked: the caller erases the slots it names before writing) and the slot
    writes.
    """

    def __init__(
        self,
        total: int,
        *,
        slots: Mapping[int, int],
        max_files: int = MAX_FILES,
        max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
    ) -> None:
        self.total = total
        self.slots = dict(slots)
        self.max_files = max_files
        self.max_member_size = max_member_size
        self.position = 0  # bytes consumed
        self.manifest: PackageManifest | None = None
        self._manifest_bytes = b""
        self._phase = _HEADER
        self._buf = bytearray()  # the header, end block or components.json being collected
        self._remaining = 0  # bytes of the current member's data or padding still to come
        self._image = 0  # the image of the member whose data is arriving
        self._written = 0  # of that member's data
        self._seen: list[str] = []  # member names so far, components.json included
        self._segments: list[Segment] = []
        self._error: OtakitError | None = None

    # --- feeding -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """The whole archive, its end blocks and every byte up to ``total`` have arrived."""
        return self._error is None and self._phase == _TAIL and self.position == self.total

    def feed(self, data: bytes) -> list[PackageManifest | SlotWrite]:
        """Consume the next bytes of the package; return what to do, in order. Raises what the
        module docstring lists."""
        if self._error is not None:
            raise self._error
        try:
            if self.position + len(data) > self.total:
                raise PackageFormatError(
                    f"the package has more than the announced {self.total} bytes",
                    value=self.position + len(data),
                )
            out: list[PackageManifest | SlotWrite] = []
            view = memoryview(data)
            while view:
                used = self._step(view, out)
                self.position += used
                view = view[used:]
            return out
        except OtakitError as exc:
            self._error = exc
            raise

    def finish(self) -> PackageManifest:
        """The checked manifest, once every byte has arrived; raises PackageFormatError
        (truncated) or the stream's earlier error."""
        if self._error is not None:
            raise self._error
        if not self.done or self.manifest is None:
            raise PackageFormatError(
                f"the package is truncated: it ends at byte {self.position}, inside "
                f"{self._where()}",
                value=self.position,
            )
        return self.manifest

    def _where(self) -> str:
        return {
            _HEADER: "a member header",
            _MANIFEST: MANIFEST_NAME,
            _DATA: "member data",
            _PADDING: "member padding",
            _END: "the end-of-archive marker",
            _TAIL: "the archive's end",
        }[self._phase]

    def _step(self, view: memoryview, out: list[PackageManifest | SlotWrite]) -> int:
        """Consume a prefix of ``view`` in the current phase; return its length."""
        if self._phase in (_HEADER, _END):
            used = min(len(view), BLOCK_SIZE - len(self._buf))
            self._buf += view[:used]
            self._keep(bytes(view[:used]))
            if len(self._buf) == BLOCK_SIZE:
                block, self._buf = bytes(self._buf), bytearray()
                start = self.position + used - BLOCK_SIZE
                if self._phase == _END:
                    self._end_block(block, start)
                else:
                    self._header(block, start, out)
            return used
        if self._phase == _MANIFEST:
            used = min(len(view), self._remaining)
            self._buf += view[:used]
            self._keep(bytes(view[:used]))
            self._remaining -= used
            if self._remaining == 0:
                out.append(self._manifest_done(bytes(self._buf)))
                self._buf = bytearray()
            return used
        if self._phase == _DATA:
            used = min(len(view), self._remaining)
            piece = bytes(view[:used])
            out.append(SlotWrite(self._image, self._written, piece))
            self._keep_slot(self._image, self._written, used)
            self._written += used
            self._remaining -= used
            if self._remaining == 0:
                self._after_member(self._written)
            return used
        if self._phase == _PADDING:
            used = min(len(view), self._remaining)
            self._keep(bytes(view[:used]))
            self._remaining -= used
            if self._remaining == 0:
                self._phase = _HEADER
            return used
        # _TAIL: tarfile pads the archive to whole records with zeros; anything else would be
        # bytes outside the archive that nothing checks
        piece = bytes(view)
        if piece.count(0) != len(piece):
            first = next(i for i, b in enumerate(piece) if b)
            raise PackageFormatError(
                f"byte {self.position + first} after the end of the archive is not zero",
                value=self.position + first,
            )
        self._keep(piece)
        return len(piece)

    def _header(self, block: bytes, start: int, out: list[PackageManifest | SlotWrite]) -> None:
        if is_zero_block(block):
            if self.manifest is None:
                check_first_member(None, self.max_member_size)
            self._phase = _END
            return
        member = parse_header(block, start)
        if self.manifest is None:
            member = check_first_member(member, self.max_member_size)
            self._seen.append(member.name)
            self._phase, self._remaining = _MANIFEST, member.size
            if member.size == 0:
                out.append(self._manifest_done(b""))
            return
        component = check_member(
            member,
            self.manifest,
            self._seen,
            max_files=self.max_files,
            max_member_size=self.max_member_size,
        )
        self._seen.append(member.name)
        self._phase, self._image = _DATA, component.image_index
        self._remaining, self._written = member.size, 0
        if member.size == 0:
            self._after_member(0)

    def _after_member(self, size: int) -> None:
        self._remaining = padding(size)
        self._phase = _PADDING if self._remaining else _HEADER

    def _manifest_done(self, data: bytes) -> PackageManifest:
        manifest = self._check_manifest(data)
        self.manifest, self._manifest_bytes = manifest, data
        self._after_member(len(data))
        return manifest

    def _check_manifest(self, data: bytes) -> PackageManifest:
        manifest = parse_manifest(
            data, max_member_size=self.max_member_size, max_files=self.max_files
        )
        for component in manifest.components:
            limit = self.slots.get(component.image_index)
            if limit is None:
                raise ManifestError(
                    f"{MANIFEST_NAME} lists {component.name!r} ({component.file_type}) for image "
                    f"{component.image_index}, which this device does not have",
                    value=component.file_type,
                )
            if component.size > limit:
                raise ImageTooLargeError(
                    f"{component.name!r} ({component.file_type}) is {component.size} bytes, "
                    f"more than the {limit} bytes image {component.image_index}'s slot takes",
                    value=component.size,
                )
        return manifest

    def _end_block(self, block: bytes, start: int) -> None:
        check_second_end_block(block, start - BLOCK_SIZE)
        assert self.manifest is not None  # a first zero block before it raised
        check_complete(self.manifest, self._seen)
        self._phase = _TAIL

    # --- what the file was made of --------------------------------------------------------------

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        last = self._segments[-1] if self._segments else None
        if last is not None and last.image is None:
            joined = last.data + data
            self._segments[-1] = Segment(None, 0, len(joined), joined)
        else:
            self._segments.append(Segment(None, 0, len(data), data))

    def _keep_slot(self, image: int, start: int, length: int) -> None:
        last = self._segments[-1] if self._segments else None
        if last is not None and last.image == image and last.start + last.length == start:
            self._segments[-1] = Segment(image, last.start, last.length + length)
        else:
            self._segments.append(Segment(image, start, length))

    def segments(self) -> tuple[Segment, ...]:
        """The bytes consumed so far, in file order: slot ranges and kept bytes."""
        return tuple(self._segments)

    def images(self) -> tuple[int, ...]:
        """The images the package writes (empty until components.json has arrived)."""
        if self.manifest is None:
            return ()
        return tuple(sorted(c.image_index for c in self.manifest.components))

    # --- state for the resume journal -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-ready data (bytes hex-encoded, runs of zeros as counts)."""
        return {
            "v": _STATE_VERSION,
            "position": self.position,
            "phase": self._phase,
            "buf": _encode(bytes(self._buf)),
            "remaining": self._remaining,
            "image": self._image,
            "written": self._written,
            "seen": list(self._seen),
            "manifest": None if self.manifest is None else _encode(self._manifest_bytes),
            "segments": [
                {"kept": _encode(s.data)}
                if s.image is None
                else {"image": s.image, "start": s.start, "length": s.length}
                for s in self._segments
            ],
        }

    @classmethod
    def from_dict(
        cls,
        data: object,
        total: int,
        *,
        slots: Mapping[int, int],
        max_files: int = MAX_FILES,
        max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
    ) -> PackageStream:
        """A stream in the state ``data`` (from :meth:`to_dict`). Raises PackageFormatError when
        ``data`` is not such a state, and what the manifest check raises when the slots
        changed so that the package no longer fits."""
        stream = cls(total, slots=slots, max_files=max_files, max_member_size=max_member_size)
        try:
            if not isinstance(data, dict) or data.get("v") != _STATE_VERSION:
                raise ValueError("version")
            stream.position = _int(data["position"])
            phase = data["phase"]
            if phase not in _PHASES:
                raise ValueError("phase")
            stream._phase = phase
            stream._buf = bytearray(_decode(data["buf"]))
            stream._remaining = _int(data["remaining"])
            stream._image = _int(data["image"])
            stream._written = _int(data["written"])
            seen = data["seen"]
            if not isinstance(seen, list) or not all(isinstance(n, str) for n in seen):
                raise ValueError("seen")
            stream._seen = list(seen)
            segments = data["segments"]
            if not isinstance(segments, list):
                raise ValueError("segments")
            for item in segments:
                if not isinstance(item, dict):
                    raise ValueError("segment")
                if "kept" in item:
                    kept = _decode(item["kept"])
                    stream._segments.append(Segment(None, 0, len(kept), kept))
                else:
                    stream._segments.append(
                        Segment(_int(item["image"]), _int(item["start"]), _int(item["length"]))
                    )
            consumed = sum(s.length for s in stream._segments)
            if consumed != stream.position or stream.position > total:
                raise ValueError("position")
            manifest = data["manifest"]
        except (KeyError, TypeError, ValueError):
            raise PackageFormatError(
                "the saved state of the package download is not valid", value=None
            ) from None
        if manifest is not None:
            raw = _decode(manifest)
            stream.manifest, stream._manifest_bytes = stream._check_manifest(raw), raw
        return stream


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


def _encode(data: bytes) -> list[str | int]:
    """Hex strings for the bytes, a count for each run of 16 or more zeros."""
    out: list[str | int] = []
    pos = 0
    for match in _ZERO_RUN.finditer(data):
        if match.start() > pos:
            out.append(data[pos : match.start()].hex())
        out.append(match.end() - match.start())
        pos = match.end()
    if pos < len(data):
        out.append(data[pos:].hex())
    return out


def _decode(value: object) -> bytes:
    if not isinstance(value, list):
        raise ValueError(value)
    parts = []
    for item in value:
        if isinstance(item, str):
            parts.append(bytes.fromhex(item))
        else:
            parts.append(bytes(_int(item)))
    return b"".join(parts)
