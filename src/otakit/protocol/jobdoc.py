"""The JSON job document (protocols.md §1); the MQTT JSON messages (§3) have the same shape.

Wire form: one JSON object of at most 1024 bytes (UTF-8) whose values are all JSON strings.
Keys are matched case-insensitively (ASCII only, like the original's ``strncasecmp``).
:func:`to_json` writes the keys in this order, compact, never escaping non-ASCII::

    key              buffer HTTP(S) job          MQTT job              No Update / others
    Message            32   "Update Available"   "Update Available"    required
    Manufacturer       64   if set               if set                if set
    ManufacturerId     16   if set               if set                if set   (read: also ...ID)
    Product            64   if set               if set                if set
    SerialNumber       32   if set               if set                if set
    Version            16   required  a.b.c      required  a.b.c       if set (must be a.b.c)
    Board              48   required             required              if set
    Connection          8   "HTTP" / "HTTPS"     "MQTT"                if set (must be one of them)
    Port                8   always ("" = same)   always ("" = same)    if set (must be 1-65535)
    Server            256   always ("" = same)   if set                if set
    File              256   required             if set                if set
    Broker            256   if set               always ("" = same)    if set
    UniqueTopicName   256   if set               if set (see below)    if set
    DeltaFile ...       -   -                    only for otakit agents that asked (below)
    any other key       -   kept in ``extra``, written after the known keys, in the order seen

The buffer column is the original device's buffer for the field, its NUL terminator included
(``CY_OTA_JOB_*_LEN``; Connection and Port are otakit's bounds): a value may be at most one byte
less (:data:`MAX_VALUE_BYTES`), counted in UTF-8 bytes of the decoded value. The device copies a
value of exactly the buffer's size without a terminator, and then compares or prints past it.
An empty Server/Broker/Port means "the server (or broker, or port) the job came from".
For MQTT an empty UniqueTopicName is allowed: the device then uses the direct flow topic
``COMPANY/BOARD/OTAImage`` (§3); ``"replace"`` is the publisher's placeholder for the device's
unique topic and is kept as is.

Where the original device is lax (it ignores non-string values, truncates over-long fields and
copies every duplicate key over the previous one), otakit refuses: non-string values, over-long
fields, duplicate keys (also ``ManufacturerId`` next to ``ManufacturerID``), values containing
NUL (the device would cut them there) and strings that are not valid Unicode (lone surrogates).
The ``Connection`` value is matched case-insensitively like the original and stored upper-case.

Delta updates (otakit agents over MQTT only): an agent that can apply a delta sends
``ImageSHA256`` (the image digest of what it runs) and ``Delta`` (the compressions it applies,
comma-separated) in its "Update Availability" request; those stay in ``extra``. The publisher's
"Update Available" answer may then carry six more keys, all or none, written after
UniqueTopicName and only when set, so a document without them is byte for byte what it was::

    key               longest  value
    DeltaFile           255    the patch's name for "Request Data Chunk" (``Filename``)
    DeltaSize            10    the patch's size in bytes, decimal, 1 to 4294967295
    DeltaSHA256          64    SHA-256 of the patch file, lowercase hex
    DeltaBase            64    image digest of the base the patch applies to, lowercase hex
    DeltaNew             64    image digest of the image it makes, lowercase hex
    DeltaCompression     16    e.g. "lzma" (one of what the agent sent in ``Delta``)

The whole document, these keys included, must still fit in :data:`MAX_DOCUMENT_BYTES`; a
publisher that cannot fit them offers the full image alone.

Values a server keeps to write into documents later (serial numbers, product and board names,
manufacturers) are checked when they are set, with :func:`check_stored_value`: besides the
limit they must be printable and hold no ``"`` or ``\\``, so JSON writes each as its own bytes
and any document built from them fits in :data:`MAX_DOCUMENT_BYTES` (every field of an HTTP(S)
job at its longest, Server and File included, comes to 925 bytes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from otakit.errors import MalformedJobDocError, NotAJobDocError
from otakit.protocol.version import FirmwareVersion, job_version

UPDATE_AVAILABLE = "Update Available"
NO_UPDATE_AVAILABLE = "No Update Available"
RESULT_RECEIVED = "Result Received"

CONNECTIONS = ("MQTT", "HTTP", "HTTPS")
MAX_DOCUMENT_BYTES = 1024

# (attribute, JSON key, buffer size in bytes with the NUL), in to_json's key order.
_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("message", "Message", 32),
    ("manufacturer", "Manufacturer", 64),
    ("manufacturer_id", "ManufacturerId", 16),
    ("product", "Product", 64),
    ("serial_number", "SerialNumber", 32),
    ("version", "Version", 16),
    ("board", "Board", 48),
    ("connection", "Connection", 8),
    ("port", "Port", 8),
    ("server", "Server", 256),
    ("file", "File", 256),
    ("broker", "Broker", 256),
    ("unique_topic_name", "UniqueTopicName", 256),
)

FIELD_LIMITS: Mapping[str, int] = MappingProxyType({key: limit for _, key, limit in _FIELDS})
"""The original device's buffer for each known key, in bytes, its NUL terminator included."""

MAX_VALUE_BYTES: Mapping[str, int] = MappingProxyType(
    {key: limit - 1 for key, limit in FIELD_LIMITS.items()}
)
"""Longest value, in UTF-8 bytes, of each known key: its buffer less the terminator."""

# Lower-cased key -> attribute; lower() only on ASCII keys, so "BRO\u212aER" is not "Broker".
_ATTR_BY_KEY: Mapping[str, str] = MappingProxyType({key.lower(): attr for attr, key, _ in _FIELDS})
_KEY_BY_ATTR: Mapping[str, str] = MappingProxyType({attr: key for attr, key, _ in _FIELDS})

_PORT_RE = re.compile(r"[0-9]{1,5}")

# The delta keys (module docstring): (attribute, JSON key, longest value in UTF-8 bytes).
_DELTA_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("delta_file", "DeltaFile", 255),
    ("delta_size", "DeltaSize", 10),
    ("delta_sha256", "DeltaSHA256", 64),
    ("delta_base", "DeltaBase", 64),
    ("delta_new", "DeltaNew", 64),
    ("delta_compression", "DeltaCompression", 16),
)
DELTA_KEYS: tuple[str, ...] = tuple(key for _, key, _ in _DELTA_FIELDS)
"""The keys of a delta offer, in the order :func:`to_json` writes them."""

_DELTA_ATTR_BY_KEY: Mapping[str, str] = MappingProxyType(
    {key.lower(): attr for attr, key, _ in _DELTA_FIELDS}
)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_DELTA_SIZE_RE = re.compile(r"[1-9][0-9]{0,9}")
_COMPRESSION_RE = re.compile(r"[a-z0-9_-]{1,16}")


def _fold(key: str) -> str:
    """The key as the original device compares it: ASCII case-insensitively."""
    return key.lower() if key.isascii() else key


@dataclass(frozen=True)
class JobDocument:
    """A job document or MQTT message; every field is the JSON string ("" when absent).

    Build one directly, with :func:`update_available`, :func:`no_update` or
    :func:`result_received`, or read one with :func:`parse_job_document`. Construction does not
    validate; :func:`to_json` and :func:`parse_job_document` apply the same rules.
    """

    message: str = ""
    manufacturer: str = ""
    manufacturer_id: str = ""
    product: str = ""
    serial_number: str = ""
    version: str = ""
    board: str = ""
    connection: str = ""
    server: str = ""
    port: str = ""
    file: str = ""
    broker: str = ""
    unique_topic_name: str = ""
    extra: tuple[tuple[str, str], ...] = ()
    # a delta offer to an otakit agent (module docstring): all six or none
    delta_file: str = ""
    delta_size: str = ""
    delta_sha256: str = ""
    delta_base: str = ""
    delta_new: str = ""
    delta_compression: str = ""

    def to_json(self) -> bytes:
        """Same as :func:`to_json`."""
        return to_json(self)

    def get(self, key: str, default: str = "") -> str:
        """The value of any key, known or extra, matched case-insensitively (e.g. ``"Offset"``)."""
        folded = _fold(key)
        attr = _ATTR_BY_KEY.get(folded) or _DELTA_ATTR_BY_KEY.get(folded)
        if attr is not None:
            value: str = getattr(self, attr)
            return value or default
        for extra_key, value in self.extra:
            if _fold(extra_key) == folded:
                return value or default
        return default

    @property
    def firmware_version(self) -> FirmwareVersion:
        """``Version`` as a comparable version; MalformedJobDocError if absent or malformed."""
        return job_version(self.version)

    @property
    def port_number(self) -> int | None:
        """``Port`` as an int, or None when empty (use the port the job came from)."""
        _check_port(self.port)
        return int(self.port) if self.port else None

    @property
    def has_delta(self) -> bool:
        """Whether the document offers a delta (the six Delta keys)."""
        return bool(self.delta_file)

    @property
    def host(self) -> str:
        """Where the image is: ``Broker`` for MQTT, else ``Server``; "" = where the job came from."""
        return self.broker if self.connection == "MQTT" else self.server


# --- validation --------------------------------------------------------------------------------


def _check_string(what: str, value: str) -> int:
    """Return the UTF-8 size of a value or key name; refuse NUL and lone surrogates."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedJobDocError(
            f"job document {what} is not valid Unicode (lone surrogate)", value=value
        ) from None
    if "\x00" in value:
        raise MalformedJobDocError(f"job document {what} holds a NUL character", value=value)
    return size


def _check_size(key: str, value: str) -> None:
    size = _check_string(key, value)
    longest = MAX_VALUE_BYTES[key]
    if size > longest:
        raise MalformedJobDocError(
            f"job document {key} is {size} bytes, more than the {longest} the device accepts "
            f"(its {FIELD_LIMITS[key]}-byte buffer holds the terminating NUL too)",
            value=value,
        )


def check_value(key: str, value: str) -> None:
    """Refuse ``value`` as the known key ``key`` (e.g. ``"SerialNumber"``) of a job document.

    Raises :class:`~otakit.errors.MalformedJobDocError` if it is longer than
    :data:`MAX_VALUE_BYTES` allows, holds NUL or is not valid Unicode; :exc:`KeyError` if
    ``key`` is not a known key.
    """
    if not isinstance(value, str):
        raise MalformedJobDocError(
            f"job document {key} must be a string, not {type(value).__name__}", value=value
        )
    _check_size(key, value)


def check_stored_value(key: str, value: str) -> None:
    """Refuse ``value`` as one a server keeps to write as ``key`` into job documents later.

    Raises :class:`~otakit.errors.MalformedJobDocError` as :func:`check_value` does, and also
    when the value holds a control character, ``"`` or ``\\`` (see the module docstring).
    """
    check_value(key, value)
    if not value.isprintable() or '"' in value or "\\" in value:
        raise MalformedJobDocError(
            f"{key} {value!r} holds a control character, a quote or a backslash; "
            'only printable characters other than " and \\ are kept for job documents',
            value=value,
        )


def _check_port(port: str) -> None:
    if port and (_PORT_RE.fullmatch(port) is None or not 1 <= int(port) <= 65535):
        raise MalformedJobDocError(
            f"job document Port {port!r} is not a port number from 1 to 65535 (or empty)",
            value=port,
        )


def _validate(doc: JobDocument) -> None:
    """Apply the rules in the module docstring; raise MalformedJobDocError."""
    for attr, key, _ in _FIELDS:
        check_value(key, getattr(doc, attr))
    _validate_delta(doc)
    seen = set(_ATTR_BY_KEY) | set(_DELTA_ATTR_BY_KEY)
    if not isinstance(doc.extra, tuple):
        raise MalformedJobDocError("job document extra keys must be a tuple of pairs")
    for pair in doc.extra:
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], str)
        ):
            raise MalformedJobDocError(
                f"job document extra entry {pair!r} is not a (key, value) pair of strings",
                value=pair,
            )
        key, value = pair
        _check_string("key name", key)
        _check_string(f"key {key!r}", value)
        folded = _fold(key)
        if folded in seen:
            raise MalformedJobDocError(f"job document key {key!r} appears twice", value=key)
        seen.add(folded)

    if not doc.message:
        raise MalformedJobDocError("job document has no Message")
    if doc.version:
        job_version(doc.version)
    if doc.connection and doc.connection not in CONNECTIONS:
        raise MalformedJobDocError(
            f"job document Connection {doc.connection!r} is not one of {', '.join(CONNECTIONS)}",
            value=doc.connection,
        )
    _check_port(doc.port)
    if doc.message == UPDATE_AVAILABLE:
        for attr in ("version", "board", "connection"):
            if not getattr(doc, attr):
                raise MalformedJobDocError(
                    f"job document says {UPDATE_AVAILABLE!r} but has no {_KEY_BY_ATTR[attr]}"
                )
        if doc.connection in ("HTTP", "HTTPS") and not doc.file:
            raise MalformedJobDocError(
                f"job document says {UPDATE_AVAILABLE!r} over {doc.connection} but has no File"
            )


def _validate_delta(doc: JobDocument) -> None:
    """The delta keys: all or none, each well-formed, only in an "Update Available" job."""
    values = {key: getattr(doc, attr) for attr, key, _ in _DELTA_FIELDS}
    for _, key, longest in _DELTA_FIELDS:
        value = values[key]
        if not isinstance(value, str):
            raise MalformedJobDocError(
                f"job document {key} must be a string, not {type(value).__name__}", value=value
            )
        size = _check_string(key, value)
        if size > longest:
            raise MalformedJobDocError(
                f"job document {key} is {size} bytes, more than the {longest} allowed",
                value=value,
            )
    present = [key for key, value in values.items() if value]
    if not present:
        return
    if len(present) != len(values):
        missing = ", ".join(key for key, value in values.items() if not value)
        raise MalformedJobDocError(
            f"job document offers a delta without {missing} (all six Delta keys or none)",
            value=missing,
        )
    if doc.message != UPDATE_AVAILABLE:
        raise MalformedJobDocError(
            f"job document {doc.message!r} offers a delta; only {UPDATE_AVAILABLE!r} may",
            value=doc.message,
        )
    if _DELTA_SIZE_RE.fullmatch(values["DeltaSize"]) is None or int(values["DeltaSize"]) > (
        0xFFFFFFFF
    ):
        raise MalformedJobDocError(
            f"job document DeltaSize {values['DeltaSize']!r} is not a size from 1 to 4294967295",
            value=values["DeltaSize"],
        )
    for key in ("DeltaSHA256", "DeltaBase", "DeltaNew"):
        if _HEX64_RE.fullmatch(values[key]) is None:
            raise MalformedJobDocError(
                f"job document {key} is not a SHA-256 in 64 lowercase hex digits",
                value=values[key],
            )
    if _COMPRESSION_RE.fullmatch(values["DeltaCompression"]) is None:
        raise MalformedJobDocError(
            f"job document DeltaCompression {values['DeltaCompression']!r} is not a "
            "compression name",
            value=values["DeltaCompression"],
        )


# --- writing -----------------------------------------------------------------------------------


def _present(doc: JobDocument, attr: str) -> bool:
    """Whether to_json writes this key: when set, or when the original device expects it."""
    if getattr(doc, attr) or attr == "message":
        return True
    if attr == "port":
        return bool(doc.connection)
    if attr == "server":
        return doc.connection in ("HTTP", "HTTPS")
    if attr == "broker":
        return doc.connection == "MQTT"
    return False


def to_json(doc: JobDocument) -> bytes:
    """The document as compact UTF-8 JSON, keys in a fixed order (see the module docstring).

    Raises :class:`~otakit.errors.MalformedJobDocError` if the document breaks a rule
    :func:`parse_job_document` enforces: a field over its limit, a missing required field, a bad
    Version/Connection/Port, a duplicate extra key, or more than :data:`MAX_DOCUMENT_BYTES` bytes
    in all.
    """
    _validate(doc)
    obj = {key: getattr(doc, attr) for attr, key, _ in _FIELDS if _present(doc, attr)}
    if doc.delta_file:
        obj.update((key, getattr(doc, attr)) for attr, key, _ in _DELTA_FIELDS)
    obj.update(doc.extra)
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise MalformedJobDocError(
            f"job document is {len(data)} bytes, more than the {MAX_DOCUMENT_BYTES} "
            "the device accepts",
            value=len(data),
        )
    return data


# --- reading -----------------------------------------------------------------------------------


class _Pairs(list[tuple[str, object]]):
    """A JSON object as read, before any key is trusted."""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, _Pairs):
        return "an object"
    return "an array"


def parse_job_document(data: bytes | bytearray | memoryview | str) -> JobDocument:
    """Read a job document or MQTT message; strict and safe on hostile input.

    Raises :class:`~otakit.errors.NotAJobDocError` if the bytes are not UTF-8 JSON or not a JSON
    object, and :class:`~otakit.errors.MalformedJobDocError` if the document is larger than
    :data:`MAX_DOCUMENT_BYTES`, holds a non-string value or a duplicate key, or breaks a rule of
    the module docstring. No other exception escapes.
    """
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise NotAJobDocError("job document is not valid Unicode text") from None
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise NotAJobDocError(
            f"job document must be bytes or text, not {type(data).__name__}", value=data
        )
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise MalformedJobDocError(
            f"job document is {len(raw)} bytes, more than the {MAX_DOCUMENT_BYTES} "
            "the device accepts",
            value=len(raw),
        )
    try:
        obj = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_Pairs, parse_constant=_reject_constant
        )
    except UnicodeDecodeError:
        raise NotAJobDocError("job document is not UTF-8 text", value=raw) from None
    except json.JSONDecodeError as exc:
        raise NotAJobDocError(
            f"job document is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            value=raw,
        ) from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, or arrays nested too deeply
        reason = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise NotAJobDocError(f"job document is not JSON: {reason}", value=raw) from None
    if not isinstance(obj, _Pairs):
        raise NotAJobDocError(f"job document is {_json_type(obj)}, not a JSON object", value=raw)

    known: dict[str, str] = {}
    extra: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in obj:
        if not isinstance(value, str):
            raise MalformedJobDocError(
                f"job document key {key!r} holds {_json_type(value)}; every value must be "
                "a JSON string",
                value=value,
            )
        folded = _fold(key)  # so ManufacturerID, as devices send it (§3), is ManufacturerId
        if folded in seen:
            raise MalformedJobDocError(f"job document key {key!r} appears twice", value=key)
        seen.add(folded)
        attr = _ATTR_BY_KEY.get(folded) or _DELTA_ATTR_BY_KEY.get(folded)
        if attr is None:
            extra.append((key, value))
        else:
            known[attr] = value

    if known.get("connection"):
        upper = known["connection"].upper()
        if upper in CONNECTIONS:
            known["connection"] = upper
    doc = JobDocument(**known, extra=tuple(extra))
    _validate(doc)
    return doc


# --- constructors ------------------------------------------------------------------------------


def no_update(
    *,
    manufacturer: str = "",
    manufacturer_id: str = "",
    product: str = "",
    serial_number: str = "",
    version: str = "",
    board: str = "",
    unique_topic_name: str = "",
) -> JobDocument:
    """A "No Update Available" answer, repeating the asking device's identity."""
    return JobDocument(
        message=NO_UPDATE_AVAILABLE,
        manufacturer=manufacturer,
        manufacturer_id=manufacturer_id,
        product=product,
        serial_number=serial_number,
        version=version,
        board=board,
        unique_topic_name=unique_topic_name,
    )


def update_available(
    *,
    version: str | FirmwareVersion,
    board: str,
    connection: str,
    file: str = "",
    server: str = "",
    port: str | int = "",
    broker: str = "",
    unique_topic_name: str = "",
    manufacturer: str = "",
    manufacturer_id: str = "",
    product: str = "",
    serial_number: str = "",
) -> JobDocument:
    """An "Update Available" job, validated; raise MalformedJobDocError if it breaks a rule.

    A :class:`FirmwareVersion` is written as its ``short`` form (a job carries no build number);
    an int port is written as its decimal string.
    """
    doc = JobDocument(
        message=UPDATE_AVAILABLE,
        manufacturer=manufacturer,
        manufacturer_id=manufacturer_id,
        product=product,
        serial_number=serial_number,
        version=version.short if isinstance(version, FirmwareVersion) else version,
        board=board,
        connection=connection,
        server=server,
        port=str(port) if isinstance(port, int) else port,
        file=file,
        broker=broker,
        unique_topic_name=unique_topic_name,
    )
    to_json(doc)  # validates, including the total size
    return doc


def result_received(*, unique_topic_name: str = "") -> JobDocument:
    """The publisher's answer to a device's Success/Failure message (§3)."""
    return JobDocument(message=RESULT_RECEIVED, unique_topic_name=unique_topic_name)


def with_delta(
    doc: JobDocument,
    *,
    file: str,
    size: int,
    sha256: str,
    base: str,
    new: str,
    compression: str,
) -> JobDocument:
    """``doc`` (an "Update Available" job) also offering a delta (module docstring), validated;
    raise MalformedJobDocError if it breaks a rule, the 1024 bytes in all included."""
    offered = replace(
        doc,
        delta_file=file,
        delta_size=str(size),
        delta_sha256=sha256,
        delta_base=base,
        delta_new=new,
        delta_compression=compression,
    )
    to_json(offered)  # validates, including the total size
    return offered
