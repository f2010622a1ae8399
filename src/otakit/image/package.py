"""Multi-image TAR packages (protocols.md §6): build, stream-read, inspect and unpack.

A package is a ustar archive whose first member is ``components.json``::

    {"numberOfComponents":"2","version":"1.2.3","files":[
      {"fileName":"components.json","fileType":"component_list"},
      {"fileName":"app.bin","fileType":"NSPE","fileSize":"1234"}]}

``numberOfComponents`` counts ``components.json`` too and every value is a JSON string. Each
other member is listed once, with its tar size equal to ``fileSize``; an ``NSPE`` file is image 0
(the application), an ``SPE`` file image 1 (the secure image). At most :data:`MAX_FILES` files.

Packages are built with the stdlib :mod:`tarfile`, but read by :class:`PackageReader`, a
sequential reader of our own: the input is hostile and may be a download that cannot seek, so
headers are read one 512-byte block at a time, sizes are checked against limits before any data
is read, and member data is handed out in chunks. Only regular files with plain names are
accepted; links, devices, folders, paths and pax/GNU extension headers are refused.

A ustar header block (512 bytes; numbers are octal ASCII ended by NUL or space)::

    0    100  name       NUL-terminated unless it fills the field
    100  8    mode
    108  8    uid
    116  8    gid
    124  12   size       member data size; the data follows, padded to a 512-byte boundary
    136  12   mtime
    148  8    chksum     sum of the 512 header bytes, counting this field as 8 spaces
    156  1    typeflag   '0' or NUL regular file, '1' hard link, '2' symlink, '3'/'4' device,
                         '5' folder, '6' fifo, 'x'/'g' pax, 'L'/'K' GNU long name/link
    157  100  linkname
    257  6    magic      "ustar\\0" (POSIX) or "ustar " (GNU)
    263  2    version    "00" (POSIX) or " \\0" (GNU)
    265  32   uname
    297  32   gname
    329  8    devmajor
    337  8    devminor
    345  155  prefix     path prefix, joined to name with '/'
    500  12   (padding)

The archive ends with two all-zero blocks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import tarfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from otakit.errors import (
    InputFileError,
    ManifestError,
    OtakitError,
    PackageFormatError,
    PackageLimitError,
    UnsafeMemberError,
    UsageError,
    VersionFormatError,
)
from otakit.files import fsync_dir, write_temp
from otakit.image.header import ImageVersion
from otakit.image.source import CHUNK, ByteSource, SourceLike, open_source

BLOCK_SIZE = 512
USTAR_STRUCT = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")  # 512 bytes
MAGIC_OFFSET = 257
_CHKSUM_OFFSET = 148
_CHKSUM_SIZE = 8
_MAGICS = {(b"ustar\x00", b"00"), (b"ustar ", b" \x00")}
_SIGNED_BYTES = struct.Struct(f"{BLOCK_SIZE}b")


class _UstarFields(NamedTuple):
    name: bytes
    mode: bytes
    uid: bytes
    gid: bytes
    size: bytes
    mtime: bytes
    chksum: bytes
    typeflag: bytes
    linkname: bytes
    magic: bytes
    version: bytes
    uname: bytes
    gname: bytes
    devmajor: bytes
    devminor: bytes
    prefix: bytes


MANIFEST_NAME = "components.json"
MANIFEST_TYPE = "component_list"
COMPONENT_TYPES = {"NSPE": 0, "SPE": 1}  # fileType -> image index
MAX_FILES = 8  # files in a package, components.json included
DEFAULT_MAX_MEMBER_SIZE = 16 * 1024 * 1024
MAX_MANIFEST_SIZE = 64 * 1024
_MAX_NAME_BYTES = 100  # the ustar name field; we never use the prefix

_REGULAR = (b"0", b"\x00")
_LINKS = {b"1": "a hard link", b"2": "a symbolic link"}
_SPECIAL = {
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a folder",
    b"6": "a fifo",
    b"7": "a contiguous file",
}
_EXTENSIONS = {
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name header",
    b"K": "GNU long link name header",
}
_OCTAL_RE = re.compile(rb"[0-7]+")
_DIGITS_RE = re.compile(r"[0-9]{1,20}")
_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
_TOP_KEYS = ("numberOfComponents", "version", "files")
_FILE_KEYS = ("fileName", "fileType", "fileSize")


def is_package(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a download) starts a TAR package, not an image."""
    return head[MAGIC_OFFSET : MAGIC_OFFSET + 5] == b"ustar"


@dataclass(frozen=True)
class Component:
    """One image in a package."""

    name: str
    file_type: str  # "NSPE" or "SPE"
    size: int
    image_index: int  # 0 application, 1 secure image
    # Offset of the member data in the archive; None in a manifest read from components.json
    # alone, before the member has been reached.
    offset: int | None = None


@dataclass(frozen=True)
class PackageManifest:
    """The content of components.json: the package version and its components."""

    version: str
    components: tuple[Component, ...]

    def to_json(self) -> bytes:
        """components.json as the device expects it: fixed key order, every value a string."""
        files: list[dict[str, str]] = [{"fileName": MANIFEST_NAME, "fileType": MANIFEST_TYPE}]
        files += [
            {"fileName": c.name, "fileType": c.file_type, "fileSize": str(c.size)}
            for c in self.components
        ]
        document = {
            "numberOfComponents": str(len(files)),
            "version": self.version,
            "files": files,
        }
        return json.dumps(document, separators=(",", ":")).encode("utf-8")

    def component(self, image_index: int) -> Component | None:
        """The component for ``image_index`` (0 application, 1 secure image), if any."""
        return next((c for c in self.components if c.image_index == image_index), None)


# --- building ----------------------------------------------------------------------------------


def build_package(components: Sequence[tuple[str, str, bytes]], version: str) -> bytes:
    """Build a package from ``(file name, file type, data)`` triples and a package version.

    The output is deterministic: members are owned by uid/gid 0, have mode 0o644 and the mtime
    ``SOURCE_DATE_EPOCH`` (or 0).

    Raises :class:`~otakit.errors.UnsafeMemberError` for a name that is not a plain file name,
    :class:`~otakit.errors.ManifestError` for a duplicate or reserved name, an unknown or repeated
    file type or no component at all, :class:`~otakit.errors.PackageLimitError` for too many
    components or a name longer than 100 bytes, :class:`~otakit.errors.VersionFormatError` for a
    version that is not ``major.minor.revision`` and :class:`~otakit.errors.UsageError` for a
    malformed ``SOURCE_DATE_EPOCH``.
    """
    normalised = _normalise_version(version)
    if not components:
        raise ManifestError("a package needs at least one component", value=0)
    if len(components) > MAX_FILES - 1:
        raise PackageLimitError(
            f"{len(components)} components do not fit in a package: at most {MAX_FILES - 1} "
            f"besides {MANIFEST_NAME}",
            value=len(components),
        )
    entries: list[Component] = []
    names: set[str] = set()
    types: set[str] = set()
    for name, file_type, data in components:
        _check_name(name, "component")
        if name == MANIFEST_NAME:
            raise ManifestError(f"a component cannot be named {MANIFEST_NAME}", value=name)
        if name in names:
            raise ManifestError(f"component name {name!r} is used twice", value=name)
        if file_type not in COMPONENT_TYPES:
            raise ManifestError(
                f"unknown file type {file_type!r} for {name!r}: expected one of "
                f"{', '.join(COMPONENT_TYPES)}",
                value=file_type,
            )
        if file_type in types:
            raise ManifestError(
                f"file type {file_type} is given twice; a package holds one image per type",
                value=file_type,
            )
        names.add(name)
        types.add(file_type)
        entries.append(Component(name, file_type, len(data), COMPONENT_TYPES[file_type]))

    manifest = PackageManifest(normalised, tuple(entries))
    mtime = _source_date_epoch()
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"
    ) as tar:
        members = [(MANIFEST_NAME, manifest.to_json())]
        members += [(name, bytes(data)) for name, _type, data in components]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = mtime
            info.type = tarfile.REGTYPE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _normalise_version(version: str) -> str:
    if not isinstance(version, str) or "+" in version:
        raise VersionFormatError(
            f"invalid package version {version!r}: expected major.minor.revision (e.g. 1.2.3), "
            "without a build number",
            value=version,
        )
    return ImageVersion.parse(version).short


def _source_date_epoch() -> int:
    text = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not text:
        return 0
    if not _DIGITS_RE.fullmatch(text) or int(text) >= 8**11:
        raise UsageError(
            f"SOURCE_DATE_EPOCH {text!r} is not a whole number of seconds since 1970",
            value=text,
        )
    return int(text)


def _check_name(name: object, what: str) -> str:
    """Return ``name`` if it is a plain file name; raise UnsafeMemberError or PackageLimitError."""
    if not isinstance(name, str) or not name:
        raise UnsafeMemberError(f"{what} name {name!r} is not a file name", value=name)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UnsafeMemberError(
            f"{what} name {name!r} is a path; only plain file names are allowed", value=name
        )
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise UnsafeMemberError(f"{what} name {name!r} contains control characters", value=name)
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeMemberError(f"{what} name {name!r} is not valid Unicode", value=name) from None
    if len(encoded) > _MAX_NAME_BYTES:
        raise PackageLimitError(
            f"{what} name {name!r} is longer than {_MAX_NAME_BYTES} bytes", value=name
        )
    return name


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    offset: int  # of the data


def _parse_octal(field: bytes, what: str, offset: int) -> int:
    digits = field.split(b"\x00", 1)[0].strip(b" ")
    if not _OCTAL_RE.fullmatch(digits):
        raise PackageFormatError(
            f"the {what} field of the header at byte {offset} is not an octal number: {field!r}",
            value=field,
        )
    return int(digits, 8)


def _parse_header(block: bytes, offset: int) -> _Member:
    """Decode and check one header block at ``offset`` (not an end-of-archive block)."""
    fields = _UstarFields._make(USTAR_STRUCT.unpack(block))
    stored = _parse_octal(fields.chksum, "checksum", offset)
    blank = b" " * _CHKSUM_SIZE
    unsigned = (
        sum(block[:_CHKSUM_OFFSET]) + sum(blank) + sum(block[_CHKSUM_OFFSET + _CHKSUM_SIZE :])
    )
    signed_bytes = _SIGNED_BYTES.unpack(
        block[:_CHKSUM_OFFSET] + blank + block[_CHKSUM_OFFSET + _CHKSUM_SIZE :]
    )
    if stored not in (unsigned, sum(signed_bytes)):
        raise PackageFormatError(
            f"bad checksum in the header at byte {offset}: stored {stored}, computed {unsigned}",
            value=stored,
        )
    if (fields.magic, fields.version) not in _MAGICS:
        raise PackageFormatError(
            f"the header at byte {offset} is not a ustar header (magic {fields.magic!r})",
            value=fields.magic,
        )

    raw_name = fields.name.split(b"\x00", 1)[0]
    prefix = fields.prefix.split(b"\x00", 1)[0]
    if prefix:
        raw_name = prefix + b"/" + raw_name
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeMemberError(
            f"member name {raw_name!r} at byte {offset} is not valid UTF-8", value=raw_name
        ) from None

    kind = fields.typeflag
    if kind in _LINKS:
        raise UnsafeMemberError(
            f"member {name!r} is {_LINKS[kind]}; only regular files are allowed", value=name
        )
    if kind in _SPECIAL:
        raise UnsafeMemberError(
            f"member {name!r} is {_SPECIAL[kind]}; only regular files are allowed", value=name
        )
    if kind in _EXTENSIONS:
        raise UnsafeMemberError(
            f"member {name!r} is a {_EXTENSIONS[kind]}, which packages do not support",
            value=name,
        )
    if kind not in _REGULAR:
        raise UnsafeMemberError(
            f"member {name!r} has the unsupported tar type {kind!r}", value=kind
        )
    _check_name(name, "member")
    size = _parse_octal(fields.size, "size", offset)
    return _Member(name, size, offset + BLOCK_SIZE)


def _padding(size: int) -> int:
    return -size % BLOCK_SIZE


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(
            f"{MANIFEST_NAME}: {what} must be a JSON string, not {json.dumps(value)[:40]}",
            value=value,
        )
    return value


def _number(value: object, what: str) -> int:
    text = _string(value, what)
    if not _DIGITS_RE.fullmatch(text):
        raise ManifestError(f"{MANIFEST_NAME}: {what} {text!r} is not a decimal number", value=text)
    return int(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ManifestError(f"{MANIFEST_NAME} repeats the key {key!r}", value=key)
        result[key] = value
    return result


def _check_keys(obj: object, allowed: tuple[str, ...], what: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise ManifestError(f"{MANIFEST_NAME}: {what} must be a JSON object", value=obj)
    unknown = [key for key in obj if key not in allowed]
    if unknown:
        raise ManifestError(
            f"{MANIFEST_NAME}: unknown key {unknown[0]!r} in {what}", value=unknown[0]
        )
    return obj


def parse_manifest(
    data: bytes, *, max_member_size: int = DEFAULT_MAX_MEMBER_SIZE, max_files: int = MAX_FILES
) -> PackageManifest:
    """Decode and check the bytes of components.json.

    Raises :class:`~otakit.errors.ManifestError` when it is not the JSON document of §6 (not
    UTF-8 JSON, a missing, unknown, repeated or non-string value, a count that disagrees, an
    unknown file type, an unsafe or repeated name), :class:`~otakit.errors.UnsafeMemberError`
    for a file name that is a path and :class:`~otakit.errors.PackageLimitError` for more than
    ``max_files`` files or a file larger than ``max_member_size``.
    """
    try:
        document: object = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ManifestError(f"{MANIFEST_NAME} is not UTF-8 text", value=None) from None
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON: {exc}", value=None) from None
    top = _check_keys(document, _TOP_KEYS, "the document")
    for key in _TOP_KEYS:
        if key not in top:
            raise ManifestError(f"{MANIFEST_NAME} has no {key!r} key", value=key)
    files = top["files"]
    if not isinstance(files, list):
        raise ManifestError(f"{MANIFEST_NAME}: 'files' must be a JSON array", value=files)
    if len(files) > max_files:
        raise PackageLimitError(
            f"{MANIFEST_NAME} lists {len(files)} files; at most {max_files} are allowed",
            value=len(files),
        )
    count = _number(top["numberOfComponents"], "numberOfComponents")
    if count != len(files):
        raise ManifestError(
            f"{MANIFEST_NAME}: numberOfComponents is {count} but {len(files)} files are listed",
            value=count,
        )
    version = _string(top["version"], "version")
    try:
        valid_version = bool(_VERSION_RE.fullmatch(version)) and (
            ImageVersion.parse(version).short == version
        )
    except VersionFormatError:
        valid_version = False
    if not valid_version:
        raise ManifestError(
            f"{MANIFEST_NAME}: version {version!r} is not major.minor.revision (e.g. 1.2.3)",
            value=version,
        )

    components: list[Component] = []
    names: set[str] = set()
    types: set[str] = set()
    for index, item in enumerate(files):
        entry = _check_keys(item, _FILE_KEYS, f"file entry {index}")
        for key in ("fileName", "fileType"):
            if key not in entry:
                raise ManifestError(
                    f"{MANIFEST_NAME}: file entry {index} has no {key!r}", value=key
                )
        name = _check_name(_string(entry["fileName"], "fileName"), "file")
        file_type = _string(entry["fileType"], f"the fileType of {name!r}")
        if name in names:
            raise ManifestError(f"{MANIFEST_NAME} lists {name!r} twice", value=name)
        names.add(name)
        if name == MANIFEST_NAME:
            if file_type != MANIFEST_TYPE:
                raise ManifestError(
                    f"{MANIFEST_NAME} lists itself with type {file_type!r}, "
                    f"expected {MANIFEST_TYPE!r}",
                    value=file_type,
                )
            if "fileSize" in entry:
                _number(entry["fileSize"], f"the fileSize of {name!r}")
            continue
        if file_type not in COMPONENT_TYPES:
            raise ManifestError(
                f"{MANIFEST_NAME}: unknown fileType {file_type!r} for {name!r}", value=file_type
            )
        if file_type in types:
            raise ManifestError(
                f"{MANIFEST_NAME} lists two {file_type} files; a package holds one per type",
                value=file_type,
            )
        types.add(file_type)
        if "fileSize" not in entry:
            raise ManifestError(f"{MANIFEST_NAME} gives no fileSize for {name!r}", value=name)
        size = _number(entry["fileSize"], f"the fileSize of {name!r}")
        if size > max_member_size:
            raise PackageLimitError(
                f"{name!r} is {size} bytes, more than the {max_member_size}-byte limit",
                value=size,
            )
        components.append(Component(name, file_type, size, COMPONENT_TYPES[file_type]))
    if MANIFEST_NAME not in names:
        raise ManifestError(f"{MANIFEST_NAME} does not list itself", value=None)
    if not components:
        raise ManifestError(f"{MANIFEST_NAME} lists no component", value=None)
    return PackageManifest(version, tuple(components))


# The rules below are shared by PackageReader and the device's streaming demultiplexer
# (otakit.device.core.package), which gets the bytes in pieces and cannot call read().

Member = _Member  # a member header as parse_header() decodes it
parse_header = _parse_header
padding = _padding


def is_zero_block(block: bytes) -> bool:
    """Whether a 512-byte block is all zero (an end-of-archive block, not a header)."""
    return block.count(0) == BLOCK_SIZE


def check_second_end_block(block: bytes, offset: int) -> None:
    """Raise PackageFormatError unless ``block``, following the zero block at ``offset``, is
    the second zero block that ends an archive."""
    if not is_zero_block(block):
        raise PackageFormatError(
            f"lone zero block at byte {offset}: the archive must end with two", value=offset
        )


def check_first_member(member: Member | None, max_member_size: int) -> Member:
    """The header of a package's first member, checked to be components.json of a size within
    the limit. Raises ManifestError (empty package, another member first) or
    PackageLimitError (too large)."""
    if member is None:
        raise ManifestError(
            f"the package is empty; {MANIFEST_NAME} must be its first member", value=None
        )
    if member.name != MANIFEST_NAME:
        raise ManifestError(
            f"the first member is {member.name!r}; {MANIFEST_NAME} must come first",
            value=member.name,
        )
    limit = min(MAX_MANIFEST_SIZE, max_member_size)
    if member.size > limit:
        raise PackageLimitError(
            f"{MANIFEST_NAME} is {member.size} bytes, more than the {limit}-byte limit",
            value=member.size,
        )
    return member


def check_member(
    member: Member,
    manifest: PackageManifest,
    seen: Collection[str],
    *,
    max_files: int = MAX_FILES,
    max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
) -> Component:
    """The manifest's component for a member header that follows components.json, ``seen``
    being the names of the members before it (components.json included). Raises
    PackageLimitError (one file too many, too large) or ManifestError (repeated, not listed,
    a size that disagrees with components.json)."""
    if len(seen) >= max_files:
        raise PackageLimitError(
            f"member {member.name!r} is one too many: a package has at most {max_files} files",
            value=member.name,
        )
    if member.name in seen:
        raise ManifestError(f"member {member.name!r} appears twice", value=member.name)
    listed = next((c for c in manifest.components if c.name == member.name), None)
    if listed is None:
        raise ManifestError(
            f"member {member.name!r} is not listed in {MANIFEST_NAME}", value=member.name
        )
    if member.size > max_member_size:
        raise PackageLimitError(
            f"member {member.name!r} is {member.size} bytes, more than the "
            f"{max_member_size}-byte limit",
            value=member.size,
        )
    if member.size != listed.size:
        raise ManifestError(
            f"member {member.name!r} is {member.size} bytes but {MANIFEST_NAME} says {listed.size}",
            value=member.size,
        )
    return listed


def check_complete(manifest: PackageManifest, seen: Collection[str]) -> None:
    """At the end of the archive: raise ManifestError when a listed component was missing."""
    missing = [c.name for c in manifest.components if c.name not in seen]
    if missing:
        raise ManifestError(
            f"{MANIFEST_NAME} lists {missing[0]!r}, but the package has no such member",
            value=missing[0],
        )


class PackageReader:
    """A sequential, bounded-memory reader of a package from a binary stream.

    Creating the reader reads and checks ``components.json`` (:attr:`manifest`, whose
    components have no offset yet). Iterating yields ``(component, chunks)`` for each member in
    archive order, ``chunks`` being an iterator over its data in pieces of at most
    ``chunk_size`` bytes; a member whose chunks are not consumed is skipped. The stream is read
    forward only, so it may be a download that cannot seek.

    The package is valid only once iteration has finished without an error: a listed file that
    is missing, or a broken end of archive, is found at the end. A device writing components
    straight to slots must not mark them for boot before that.

    Every check raises a :class:`~otakit.errors.PackageError` subclass:
    :class:`~otakit.errors.PackageFormatError` for a broken archive (bad checksum, not ustar,
    non-octal number, truncation), :class:`~otakit.errors.UnsafeMemberError` for a link, device,
    folder, extension header or a name that is a path, :class:`~otakit.errors.ManifestError` for
    a components.json that is missing, not first, invalid or disagrees with the members, and
    :class:`~otakit.errors.PackageLimitError` for more than ``max_files`` members or a member
    larger than ``max_member_size`` (checked before its data is read). A failed read of the
    stream itself is an :class:`~otakit.errors.InputFileError`. After an error the reader raises
    the same error again.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
        max_files: int = MAX_FILES,
        chunk_size: int = CHUNK,
    ) -> None:
        self._stream = stream
        self._max_member_size = max_member_size
        self._max_files = max_files
        self._chunk_size = max(chunk_size, 1)
        self._pos = 0  # bytes consumed from the stream
        self._error: OtakitError | None = None
        self._done = False
        self._member = 0  # number of the member whose data is being read
        self._remaining = 0  # data bytes of that member not yet read
        self._padding = 0
        self._seen = {MANIFEST_NAME}
        self.manifest = self._read_manifest()

    def __iter__(self) -> PackageReader:
        return self

    def __next__(self) -> tuple[Component, Iterator[bytes]]:
        if self._error is not None:
            raise self._error
        if self._done:
            raise StopIteration
        try:
            return self._next_member()
        except OtakitError as exc:
            self._error = exc
            raise

    # -- stream -------------------------------------------------------------------------------

    def _read(self, length: int, what: str) -> bytes:
        if self._error is not None:
            raise self._error
        parts: list[bytes] = []
        missing = length
        try:
            while missing > 0:
                try:
                    data = self._stream.read(missing)
                except OSError as exc:
                    raise InputFileError(
                        f"cannot read the package: {exc.strerror or exc}", value=self._pos
                    ) from None
                if not data:
                    raise PackageFormatError(
                        f"the package is truncated: it ends at byte {self._pos}, inside {what}",
                        value=self._pos,
                    )
                data = data[:missing]
                parts.append(data)
                missing -= len(data)
                self._pos += len(data)
        except OtakitError as exc:
            self._error = exc
            raise
        return b"".join(parts)

    def _skip(self, length: int, what: str) -> None:
        while length > 0:
            step = min(length, self._chunk_size)
            self._read(step, what)
            length -= step

    def _header(self) -> _Member | None:
        """The next member header, or None at a (checked) end of archive."""
        offset = self._pos
        block = self._read(BLOCK_SIZE, "a member header")
        if is_zero_block(block):
            check_second_end_block(self._read(BLOCK_SIZE, "the end-of-archive marker"), offset)
            return None
        return _parse_header(block, offset)

    # -- members ------------------------------------------------------------------------------

    def _read_manifest(self) -> PackageManifest:
        member = check_first_member(self._header(), self._max_member_size)
        data = self._read(member.size, MANIFEST_NAME)
        self._skip(_padding(member.size), f"the padding of {MANIFEST_NAME}")
        return parse_manifest(
            data, max_member_size=self._max_member_size, max_files=self._max_files
        )

    def _next_member(self) -> tuple[Component, Iterator[bytes]]:
        self._skip(self._remaining, "member data")
        self._remaining = 0
        self._skip(self._padding, "member padding")
        self._padding = 0
        member = self._header()
        if member is None:
            check_complete(self.manifest, self._seen)
            self._done = True
            raise StopIteration
        listed = check_member(
            member,
            self.manifest,
            self._seen,
            max_files=self._max_files,
            max_member_size=self._max_member_size,
        )
        self._seen.add(member.name)
        self._member += 1
        self._remaining = member.size
        self._padding = _padding(member.size)
        return replace(listed, offset=member.offset), self._chunks(self._member, member.name)

    def _chunks(self, number: int, name: str) -> Iterator[bytes]:
        while self._member == number and self._remaining > 0:
            step = min(self._remaining, self._chunk_size)
            data = self._read(step, f"the data of {name!r}")
            self._remaining -= step
            yield data


# --- whole packages ----------------------------------------------------------------------------


class _SourceStream(io.RawIOBase):
    """A forward-only stream over a :class:`ByteSource`."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read_at(self._pos, len(buffer))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


@contextlib.contextmanager
def _open_stream(source: SourceLike) -> Iterator[BinaryIO]:
    """A forward-only stream over ``source``; a stream is used as it is (it may not seek)."""
    if isinstance(source, bytes | bytearray | memoryview | str | os.PathLike | ByteSource):
        with open_source(source) as src:
            yield io.BufferedReader(_SourceStream(src))
    else:
        yield source


def _located(manifest: PackageManifest, found: dict[str, Component]) -> PackageManifest:
    return PackageManifest(manifest.version, tuple(found[c.name] for c in manifest.components))


def read_manifest(
    source: SourceLike,
    *,
    max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
    max_files: int = MAX_FILES,
) -> PackageManifest:
    """Read and check a whole package and return its manifest, with each member's offset.

    ``source`` is bytes, a path, a binary stream (read forward only) or a
    :class:`~otakit.image.source.ByteSource`; member data is read in chunks and dropped. Raises
    what :class:`PackageReader` raises, and :class:`~otakit.errors.InputFileError` when a path
    cannot be opened.
    """
    with _open_stream(source) as stream:
        reader = PackageReader(stream, max_member_size=max_member_size, max_files=max_files)
        found: dict[str, Component] = {}
        for component, chunks in reader:
            for _ in chunks:
                pass
            found[component.name] = component
        return _located(reader.manifest, found)


def unpack_package(
    source: SourceLike,
    dest_dir: str | os.PathLike[str],
    *,
    max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
    max_files: int = MAX_FILES,
) -> PackageManifest:
    """Extract each component of a package to ``dest_dir/<fileName>`` and return the manifest.

    ``dest_dir`` is created if needed. Components are written to temporary files in
    ``dest_dir`` and renamed into place only once the whole package has been checked; on any
    error, what this call wrote (temporary files, renamed files, folders it created) is removed.
    components.json itself is not written: its content is the returned manifest. Existing files
    with a component's name are replaced.

    Raises what :class:`PackageReader` raises, and :class:`~otakit.errors.InputFileError` when
    the source cannot be read or ``dest_dir`` cannot be written.
    """
    dest = Path(dest_dir)
    created = _make_dirs(dest)
    written: list[Path] = []  # temporary files, then final files, to remove on failure
    success = False
    try:
        with _open_stream(source) as stream:
            reader = PackageReader(stream, max_member_size=max_member_size, max_files=max_files)
            found: dict[str, Component] = {}
            staged: list[tuple[Path, Path]] = []
            for component, chunks in reader:
                tmp = write_temp(dest, component.name, chunks)
                written.append(tmp)
                staged.append((tmp, dest / component.name))
                found[component.name] = component
            manifest = _located(reader.manifest, found)
        for tmp, final in staged:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                raise InputFileError(
                    f"cannot write {final}: {exc.strerror or exc}", value=str(final)
                ) from None
            written.append(final)
        fsync_dir(dest)
        success = True
        return manifest
    finally:
        if not success:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _make_dirs(dest: Path) -> list[Path]:
    """Create ``dest`` and missing parents; return the folders created, outermost first."""
    missing: list[Path] = []
    folder = dest
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(
            f"cannot create folder {dest}: {exc.strerror or exc}", value=str(dest)
        ) from None
    return missing
