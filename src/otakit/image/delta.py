"""Binary deltas between two MCUboot images: made where both images are (the server, a build
machine), applied on a device while streaming, from the image it runs to the new one.

A delta is otakit's small header followed by a detools *sequential* patch (bsdiff's diff and
extra blocks, then compressed). The header names the exact base (size and SHA-256 of the bytes
the patch reads) and the exact result, and carries a digest of the whole file, so a device
checks everything it can before it writes a byte: a patch for another base, a corrupt or a
truncated one is refused while the secondary slot is still as it was.

Byte layout (little-endian; :data:`HEADER` is the one definition)::

    offset  size  field
    0       4     magic b"OTKD"
    4       1     format version: 1
    5       1     patch type: 0 = detools sequential patch
    6       2     header size: where the detools patch starts (116 in version 1; a later
                  version may append fields, which a reader of version 1 skips)
    8       4     base size: the bytes of the base image the patch reads
    12      4     new size: the bytes the patch produces
    16      4     body size: the bytes of the detools patch after the header
    20      32    base SHA-256: of the base's first ``base size`` bytes
    52      32    new SHA-256: of the result
    84      32    digest: SHA-256 of every byte of the file except these 32
    116     ...   the detools patch: one byte (patch type in bits 4-6, compression in bits 0-3),
                  the new size again as detools' variable-length integer, then the compressed
                  patch data

The base and the result are MCUboot images *proper*: the header to the end of the TLV area
(:attr:`ImageLayout.end <otakit.image.layout.ImageLayout.end>`), without the padding and
trailer of an ``imgtool --pad`` file, because that is what sits in a slot once the image runs
(the trailer there is the bootloader's own). :func:`image_digest` gives that identity, once,
for the server that offers a delta and the device that reports what it runs.

Applying is streaming and bounded in memory: the base is read from any
:class:`~otakit.image.source.ByteSource` (a device's primary slot) at most 4 KiB at a time,
forwards with relative seeks; the result goes to a :class:`DeltaTarget` (``write(offset,
data)``, as a device's :class:`~otakit.device.storage.Storage` has it) in blocks. detools'
decoder state cannot be saved, so an apply interrupted by a power cut starts again from byte 0
of the patch: the base is untouched (the patch only reads it), the decoder is deterministic, so
the same bytes come out again and rewriting them is harmless on NOR flash; ``written`` skips
the blocks a durable record says are already at the target.

Decompressor memory: ``heatshrink`` keeps a 256-byte window (detools' default
``window_sz2=8``), ``lzma`` the dictionary its stream names (detools' own ``lzma`` names the
preset's 8 MiB; otakit writes the same stream format with at most 64 KiB, see :func:`_lzma`).
``zstd`` is not offered: detools' zstd decoder keeps everything it decoded in memory (about
the new image's size). ``heatshrink`` suits the smallest device.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import lzma
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from otakit.errors import DeltaError, ImageFormatError, MissingExtraError, UsageError
from otakit.image.layout import read_layout
from otakit.image.source import ByteSource, SliceSource, SourceLike, iter_range, open_source

MAGIC = b"OTKD"
FORMAT_VERSION = 1
PATCH_SEQUENTIAL = 0  # detools' number for a sequential patch

HEADER = struct.Struct("<4sBBHIII32s32s32s")
"""magic, version, patch type, header size, base size, new size, body size, base SHA-256,
new SHA-256, digest (module docstring)."""
DIGEST_OFFSET = HEADER.size - 32  # the digest covers the file except these 32 bytes

# detools' compression numbers (the low 4 bits of its first byte) for the ones otakit makes and
# applies, in bounded memory; detools knows a few more (crle, bz2, zstd, lz4), which otakit
# refuses as UNSUPPORTED (zstd: detools' decoder keeps all it decoded in memory).
COMPRESSIONS: dict[str, int] = {"lzma": 1, "heatshrink": 4, "none": 0}
DEFAULT_COMPRESSION = "lzma"

LZMA_DICT_MAX = 64 * 1024  # the largest lzma dictionary otakit names (see _lzma)
BLOCK = 4096  # bytes per write to the target (the last one may be shorter)
_MAX_READ = 64 * 1024  # the most one detools read may ask for (it asks for 4 KiB)

Progress = Callable[[int, int], None]
"""``progress(done, total)``: bytes of the result now at the target, and the result's size."""


class DeltaTarget(Protocol):
    """Where the result goes: bytes written at offsets (a device's Storage has this method)."""

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class ImageDigest:
    """What an image is as a delta's base or result: its size and SHA-256 (header to the end of
    the TLVs)."""

    size: int
    sha256: bytes


@dataclass(frozen=True)
class DeltaHeader:
    """The header of a delta (module docstring); ``compression`` comes from the detools patch."""

    base_size: int
    new_size: int
    body_size: int
    base_sha256: bytes
    new_sha256: bytes
    digest: bytes
    compression: str
    header_size: int = HEADER.size

    @property
    def size(self) -> int:
        """The whole file: header and detools patch."""
        return self.header_size + self.body_size

    def pack_fields(self) -> bytes:
        """The header's bytes up to the digest (what the digest covers first)."""
        return HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            PATCH_SEQUENTIAL,
            self.header_size,
            self.base_size,
            self.new_size,
            self.body_size,
            self.base_sha256,
            self.new_sha256,
            bytes(32),
        )[:DIGEST_OFFSET]


# --- identity --------------------------------------------------------------------------------


def image_digest(image: SourceLike) -> ImageDigest:
    """Size and SHA-256 of an MCUboot image proper (header to the end of its TLVs), read from
    bytes, a path, a file or a :class:`ByteSource` such as a slot (which is larger than the
    image). Raises an :class:`~otakit.errors.ImageFormatError` when it is not an image."""
    with open_source(image) as src:
        end = read_layout(src).end
        return ImageDigest(end, _sha256(src, 0, end))


def _sha256(source: ByteSource, start: int, end: int) -> bytes:
    hasher = hashlib.sha256()
    for chunk in iter_range(source, start, end):
        hasher.update(chunk)
    return hasher.digest()


# --- create ----------------------------------------------------------------------------------


def create_delta(
    base: SourceLike,
    new: SourceLike,
    *,
    compression: str = DEFAULT_COMPRESSION,
    whole_files: bool = False,
) -> bytes:
    """The delta that turns ``base`` into ``new`` (bytes or paths), with otakit's header.

    Both are MCUboot images, each taken from its header to the end of its TLVs (padding and
    trailer of an ``imgtool --pad`` file are left out: they are not what a slot holds); with
    ``whole_files`` they are any bytes, taken whole. Both are held in memory (detools needs
    them whole to find matches).

    Raises:
        UsageError: ``compression`` is not one of :data:`COMPRESSIONS`.
        ImageFormatError: an input is not an MCUboot image (the message says which).
        MissingExtraError: detools is not installed.
    """
    if compression not in COMPRESSIONS:
        raise UsageError(
            f"compression {compression!r} must be one of {', '.join(COMPRESSIONS)}",
            value=compression,
        )
    base_bytes = _image_bytes(base, "base", whole_files)
    new_bytes = _image_bytes(new, "new", whole_files)
    detools = _detools()
    out = io.BytesIO()
    detools.create_patch(
        io.BytesIO(base_bytes),
        io.BytesIO(new_bytes),
        out,
        compression="none" if compression == "lzma" else compression,
        patch_type="sequential",
    )
    body = _lzma(out.getvalue()) if compression == "lzma" else out.getvalue()
    header = DeltaHeader(
        base_size=len(base_bytes),
        new_size=len(new_bytes),
        body_size=len(body),
        base_sha256=hashlib.sha256(base_bytes).digest(),
        new_sha256=hashlib.sha256(new_bytes).digest(),
        digest=b"",
        compression=compression,
    )
    fields = header.pack_fields()
    digest = hashlib.sha256(fields)
    digest.update(body)
    return fields + digest.digest() + body


def _lzma(patch: bytes) -> bytes:
    """An uncompressed detools patch compressed with lzma as detools' own ``lzma`` (an .lzma
    stream, which detools' decoder reads whatever its dictionary size), but with a dictionary
    of at most :data:`LZMA_DICT_MAX` (64 KiB; less for less data) instead of the preset's
    8 MiB: the decoder allocates the dictionary the stream names. A patch is mostly zero diff
    bytes and short runs of new code, which a small window compresses as well (measured:
    the same size to a few bytes for a 100 KiB firmware and a 4 MiB image)."""
    found = _detools_size(patch[1:])
    assert found is not None, "detools wrote a sequential patch"
    start = 1 + found[1]
    data = patch[start:]
    dict_size = min(max(4096, 1 << max(len(data) - 1, 1).bit_length()), LZMA_DICT_MAX)
    packed = lzma.compress(
        data,
        format=lzma.FORMAT_ALONE,
        filters=[{"id": lzma.FILTER_LZMA1, "preset": 6, "dict_size": dict_size}],
    )
    return bytes([(patch[0] & 0xF0) | COMPRESSIONS["lzma"]]) + patch[1:start] + packed


def _image_bytes(source: SourceLike, what: str, whole: bool) -> bytes:
    with open_source(source) as src:
        end = src.size
        if not whole:
            try:
                end = read_layout(src).end
            except ImageFormatError as exc:
                raise type(exc)(f"{what} image: {exc.message}", value=exc.value) from None
        return b"".join(iter_range(src, 0, end))


# --- read and check --------------------------------------------------------------------------


def read_delta_header(patch: SourceLike) -> DeltaHeader:
    """Parse and check a delta's header against the patch's size and its detools header (the
    patch's digest is checked by :func:`check_delta`).

    Raises:
        DeltaError: ``NOT_A_DELTA``, ``UNSUPPORTED``, ``TRUNCATED`` or ``CORRUPT``.
    """
    with open_source(patch) as src:
        return _read_header(src)


def _read_header(src: ByteSource) -> DeltaHeader:
    raw = src.read_at(0, HEADER.size)
    if raw[: len(MAGIC)] != MAGIC:
        raise DeltaError(
            "not an otakit delta (no OTKD magic at byte 0)", reason="NOT_A_DELTA", value=raw[:4]
        )
    if len(raw) < HEADER.size:
        raise DeltaError(
            f"the delta ends inside its header ({len(raw)} of {HEADER.size} bytes)",
            reason="TRUNCATED",
            value=len(raw),
        )
    (_, version, patch_type, header_size, base_size, new_size, body_size, base_sha, new_sha,
     digest) = HEADER.unpack(raw)  # fmt: skip
    if version != FORMAT_VERSION or patch_type != PATCH_SEQUENTIAL:
        raise DeltaError(
            f"delta format {version}, patch type {patch_type}: this otakit applies format "
            f"{FORMAT_VERSION}, type {PATCH_SEQUENTIAL} (detools sequential)",
            reason="UNSUPPORTED",
            value=(version, patch_type),
        )
    if header_size < HEADER.size:
        raise DeltaError(
            f"delta header size {header_size} is smaller than {HEADER.size}",
            reason="CORRUPT",
            value=header_size,
        )
    size = header_size + body_size
    if src.size < size:
        raise DeltaError(
            f"the delta is truncated: {src.size} of {size} bytes",
            reason="TRUNCATED",
            value=src.size,
        )
    if src.size > size:
        raise DeltaError(
            f"the delta has {src.size - size} bytes after its end (byte {size})",
            reason="CORRUPT",
            value=src.size,
        )
    compression = _check_detools_header(src.read_at(header_size, 11), new_size)
    return DeltaHeader(
        base_size, new_size, body_size, base_sha, new_sha, digest, compression, header_size
    )


def _check_detools_header(head: bytes, new_size: int) -> str:
    """The compression named by the detools patch's first byte; its size must be ``new_size``."""
    if not head:
        raise DeltaError("the delta has no detools patch", reason="TRUNCATED", value=0)
    patch_type, number = (head[0] >> 4) & 0x7, head[0] & 0xF
    names = {n: name for name, n in COMPRESSIONS.items()}
    if patch_type != PATCH_SEQUENTIAL or number not in names:
        raise DeltaError(
            f"detools patch type {patch_type}, compression {number}: otakit applies sequential "
            f"patches compressed with {', '.join(COMPRESSIONS)}",
            reason="UNSUPPORTED",
            value=(patch_type, number),
        )
    found = _detools_size(head[1:])
    size = None if found is None else found[0]
    if size != new_size:
        raise DeltaError(
            f"the detools patch makes {size} bytes, the header says {new_size}",
            reason="CORRUPT",
            value=size,
        )
    return names[number]


def _detools_size(data: bytes) -> tuple[int, int] | None:
    """detools' size integer at the start of ``data`` and its length in bytes: 6 bits and a
    sign bit in the first byte, then 7 bits a byte, the top bit of each byte saying another
    follows. None when ``data`` ends first."""
    value, shift = 0, 0
    for i, byte in enumerate(data):
        if i == 0:
            negative, value, shift = bool(byte & 0x40), byte & 0x3F, 6
        else:
            value |= (byte & 0x7F) << shift
            shift += 7
        if not byte & 0x80:
            return (-value if negative else value), i + 1
    return None


def check_delta(patch: SourceLike) -> DeltaHeader:
    """:func:`read_delta_header`, then the digest of the whole patch (one streaming pass).

    Raises:
        DeltaError: as :func:`read_delta_header`, or ``CORRUPT`` when the digest differs.
    """
    with open_source(patch) as src:
        return _check(src)


def _check(src: ByteSource) -> DeltaHeader:
    header = _read_header(src)
    hasher = hashlib.sha256()
    for chunk in iter_range(src, 0, DIGEST_OFFSET):
        hasher.update(chunk)
    for chunk in iter_range(src, HEADER.size, header.size):
        hasher.update(chunk)
    if not hmac.compare_digest(hasher.digest(), header.digest):
        raise DeltaError(
            "the delta is corrupt: its SHA-256 digest does not match its contents",
            reason="CORRUPT",
            value=hasher.hexdigest(),
        )
    return header


def check_base(header: DeltaHeader, base: SourceLike) -> None:
    """Raise :class:`DeltaError` ``WRONG_BASE`` unless ``base`` starts with the exact image the
    delta was made from (a slot is larger than its image: only ``base_size`` bytes count)."""
    with open_source(base) as src:
        _check_base(header, src)


def _check_base(header: DeltaHeader, src: ByteSource) -> None:
    if src.size < header.base_size:
        raise DeltaError(
            f"the delta needs a {header.base_size}-byte base; this one has {src.size} bytes",
            reason="WRONG_BASE",
            value=src.size,
        )
    found = _sha256(src, 0, header.base_size)
    if not hmac.compare_digest(found, header.base_sha256):
        raise DeltaError(
            f"the delta was made for another base image (SHA-256 {header.base_sha256.hex()[:16]}"
            f"..., this one is {found.hex()[:16]}...)",
            reason="WRONG_BASE",
            value=found.hex(),
        )


# --- apply -----------------------------------------------------------------------------------


def apply_delta(
    base: SourceLike,
    patch: SourceLike,
    target: DeltaTarget,
    *,
    progress: Progress | None = None,
    written: int = 0,
    block: int = BLOCK,
) -> DeltaHeader:
    """Apply ``patch`` to ``base`` (e.g. the primary slot), writing the result to ``target``
    (e.g. the secondary slot's Storage) in ``block``-byte writes at increasing offsets.

    Before anything is written: the header, the patch's digest and the base's SHA-256 are
    checked. While writing: the result may not grow past its announced size. After: its size
    and SHA-256 must be the announced ones (the caller then verifies the image as any other:
    hash and signature). ``progress(done, total)`` follows every block; bytes ``[0, done)`` are
    then at the target, so a driver may record ``done`` as a durable point and, after a power
    cut, call again from byte 0 of the patch with ``written=done`` (only for the same patch,
    same digest, onto the same target): blocks wholly below ``written`` are decoded but not
    written again. Memory stays bounded: the base is read 4 KiB
    at a time and the result leaves in blocks.

    Errors of the base, the patch or the target (a flash error, a power cut) propagate as they
    are raised.

    Raises:
        DeltaError: ``NOT_A_DELTA``, ``UNSUPPORTED``, ``TRUNCATED``, ``CORRUPT`` or
            ``WRONG_BASE`` before anything is written; ``CORRUPT`` or ``RESULT`` after.
        MissingExtraError: detools is not installed.
    """
    if block <= 0:
        raise UsageError(f"block size {block} must be positive", value=block)
    detools = _detools()
    with open_source(patch) as patch_src, open_source(base) as base_src:
        header = _check(patch_src)
        _check_base(header, base_src)
        _check_plain(patch_src, header)
        out = _Writer(target, header.new_size, written, block, progress)
        try:
            detools.apply_patch(
                _Reader(base_src, 0, header.base_size),
                _Reader(patch_src, header.header_size, header.body_size),
                out,
            )
        except _IoFailed as exc:
            raise exc.error from None
        except DeltaError:
            raise
        except Exception as exc:  # detools' Error, its C module's ValueError, a decoder's error
            raise DeltaError(
                f"the delta does not apply: {exc or type(exc).__name__}",
                reason="CORRUPT",
                value=out.produced,
            ) from None
        try:
            out.finish()
        except _IoFailed as exc:
            raise exc.error from None
        if out.produced != header.new_size or out.hasher.digest() != header.new_sha256:
            raise DeltaError(
                f"the delta produced {out.produced} bytes (SHA-256 {out.hasher.hexdigest()[:16]}"
                f"...), not the announced {header.new_size}-byte image",
                reason="RESULT",
                value=out.hasher.hexdigest(),
            )
    return header


def _check_plain(src: ByteSource, header: DeltaHeader) -> None:
    """Refuse (``UNSUPPORTED``) a patch that uses a detools data format, before decoding it:
    detools would decompress that part whole into memory (its size comes from the patch) and
    read the base whole. otakit never makes one; the patch's first decoded size is then 0.
    Decodes a few bytes with detools' own patch reader."""
    if header.new_size == 0:
        return  # detools reads nothing past its header
    from detools.apply import PatchReader  # type: ignore[import-untyped]
    from detools.common import unpack_size  # type: ignore[import-untyped]

    head = _detools_size(src.read_at(header.header_size + 1, 10))
    assert head is not None, "checked by _read_header"
    body = _Reader(src, header.header_size, header.body_size)
    body.seek(1 + head[1])
    try:
        size = unpack_size(PatchReader(body, header.compression))
    except _IoFailed as exc:
        raise exc.error from None
    except Exception as exc:  # detools' Error, a decoder's error
        raise DeltaError(
            f"the delta does not decode: {exc or type(exc).__name__}", reason="CORRUPT"
        ) from None
    if size != 0:
        raise DeltaError(
            f"the delta uses a detools data format ({size} bytes): otakit applies only plain "
            "sequential patches",
            reason="UNSUPPORTED",
            value=size,
        )


class _IoFailed(Exception):
    """An error of a source or the target, carried through detools untouched."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Reader:
    """The file detools reads: ``[start, start + size)`` of a ByteSource, with read, seek and
    tell, at most :data:`_MAX_READ` bytes a read (a whole-file read is refused: it would take
    the whole base into memory, and only patches with a detools data format ask for it)."""

    def __init__(self, source: ByteSource, start: int, size: int) -> None:
        self._source = SliceSource(source, start, size)
        self._size = size
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > _MAX_READ:
            raise DeltaError(
                "the delta asks to read its base whole (a detools data format): otakit applies "
                "only plain sequential patches",
                reason="UNSUPPORTED",
                value=size,
            )
        length = min(size, self._size - self._pos)
        if length <= 0:
            return b""
        try:
            data = self._source.read_at(self._pos, length)
        except Exception as exc:
            raise _IoFailed(exc) from exc
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise DeltaError(
                f"the delta seeks to byte {base + offset} of its input",
                reason="CORRUPT",
                value=base + offset,
            )
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class _Writer:
    """The file detools writes: hashes the result, refuses more than ``total`` bytes, and hands
    it to the target in ``block``-byte writes (blocks wholly below ``skip`` are not written)."""

    def __init__(
        self, target: DeltaTarget, total: int, skip: int, block: int, progress: Progress | None
    ) -> None:
        self.target = target
        self.total = total
        self.skip = skip
        self.block = block
        self.progress = progress
        self.hasher = hashlib.sha256()
        self.produced = 0
        self.flushed = 0
        self._buffer = bytearray()

    def write(self, data: Any) -> int:
        size = len(data)
        if self.produced + size > self.total:
            raise DeltaError(
                f"the delta produces more than the announced {self.total} bytes",
                reason="CORRUPT",
                value=self.produced + size,
            )
        self.hasher.update(data)
        self._buffer += data
        self.produced += size
        while len(self._buffer) >= self.block:
            self._emit(self.block)
        return size

    def finish(self) -> None:
        if self._buffer:
            self._emit(len(self._buffer))

    def _emit(self, size: int) -> None:
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        start, end = self.flushed, self.flushed + size
        try:
            if end > self.skip:
                self.target.write(start, chunk)
            self.flushed = end
            if self.progress is not None:
                self.progress(end, self.total)
        except Exception as exc:
            raise _IoFailed(exc) from exc


def _detools() -> Any:
    """The detools module (imported on first use: it takes a tenth of a second)."""
    try:
        import detools  # type: ignore[import-untyped]
    except ImportError:
        raise MissingExtraError(
            "delta patches need detools, which the agent and server extras bring: "
            "pip install 'otakit[agent]'",
            value=["detools"],
        ) from None
    return detools
