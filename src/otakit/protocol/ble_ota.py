"""The BLE OTA push protocol (protocols.md §4) and otakit's loopback link that carries it.

The device is the GATT server of the OTA service; the host (the GATT client) writes commands to
the control point, image bytes to the data characteristic, and reads one-byte replies that the
device notifies (or indicates) on the control point::

    service        ae5d1e47-5c13-43a0-8635-82ad38a1381f   (secure variant c7261110-...-9d7246768bd8)
    control point  a3dd50bf-f7a7-4e99-838e-570a086c661b   write, notify, indicate
    data           a2e86c7a-d961-4091-b74f-2409e72efe26   write

Control point writes, integers little-endian::

    01                  PREPARE_DOWNLOAD  start a transfer (storage opened and erased)
    02 <u32 size>       DOWNLOAD          the image has ``size`` bytes
    03 <u32 crc>        VERIFY            CRC-32 (zlib.crc32) of the whole image
    04  (or 07)         ABORT             forget the transfer, leave storage clean

Replies: one byte, ``00`` OK, ``01`` failure, ``03`` verification failed. Data: the image's
bytes in order, at most MTU-3 bytes per write.

Loopback link (otakit's own, for simulated devices): TCP carrying one frame per ATT operation.
Opcodes are the Bluetooth Core ATT opcodes; an attribute is named by its 128-bit UUID, so no
discovery is needed. Frame (struct ``<B16sH``, then the value)::

    offset  size  field
     0      1     opcode (see :class:`Op`)
     1      16    UUID of the characteristic, in Bluetooth order (little-endian: the 16 bytes of
                  the canonical form reversed); all zeros for MTU frames
    17      2     length of the value (u16)
    19      n     value

``MTU_REQ``/``MTU_RSP`` carry a u16 receive MTU; ``ERROR_RSP`` carries the request opcode (u8)
and an ATT error code (u8); a write to the CCCD UUID (0x2902) subscribes to the control point's
replies (u16: 1 notify, 2 indicate), the only characteristic of the service that has one.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from enum import IntEnum

from otakit.errors import (
    ControlPointError,
    FrameError,
)

SERVICE_UUID = "ae5d1e47-5c13-43a0-8635-82ad38a1381f"
SECURE_SERVICE_UUID = "c7261110-f425-447a-a1bd-9d7246768bd8"
CONTROL_POINT_UUID = "a3dd50bf-f7a7-4e99-838e-570a086c661b"
DATA_UUID = "a2e86c7a-d961-4091-b74f-2409e72efe26"
CCCD_UUID = "00002902-0000-1000-8000-00805f9b34fb"  # Client Characteristic Configuration

# ATT MTU (Bluetooth Core Vol 3 Part F): 23 until exchanged, at most 517; a write carries the
# value after a 3-byte header (opcode and handle).
DEFAULT_MTU = 23
MAX_MTU = 517
WRITE_OVERHEAD = 3

U32 = struct.Struct("<I")
COMMAND_WITH_VALUE = struct.Struct("<BI")


class Command(IntEnum):
    PREPARE_DOWNLOAD = 1
    DOWNLOAD = 2
    VERIFY = 3
    ABORT = 4
    ABORT_ALT = 7  # other vendor tables use 7 for abort; both are accepted


class Reply(IntEnum):
    OK = 0
    FAILURE = 1
    VERIFY_FAILED = 3


ABORTS = frozenset({Command.ABORT, Command.ABORT_ALT})
_WITH_VALUE = frozenset({Command.DOWNLOAD, Command.VERIFY})


@dataclass(frozen=True)
class ControlPointWrite:
    """One command; ``value`` is the size (DOWNLOAD) or the CRC-32 (VERIFY), else None."""

    command: Command
    value: int | None = None

    def pack(self) -> bytes:
        if self.command in _WITH_VALUE:
            if self.value is None or not 0 <= self.value <= 0xFFFFFFFF:
                raise ControlPointError(
                    f"{self.command.name} needs a u32 value, not {self.value!r}", value=self.value
                )
            return COMMAND_WITH_VALUE.pack(self.command, self.value)
        if self.value is not None:
            raise ControlPointError(
                f"{self.command.name} takes no value, got {self.value!r}", value=self.value
            )
        return bytes([self.command])


def prepare_download() -> bytes:
    return ControlPointWrite(Command.PREPARE_DOWNLOAD).pack()


def download(size: int) -> bytes:
    return ControlPointWrite(Command.DOWNLOAD, size).pack()


def verify(crc: int) -> bytes:
    return ControlPointWrite(Command.VERIFY, crc).pack()


def abort() -> bytes:
    return ControlPointWrite(Command.ABORT).pack()


def parse_command(data: bytes | bytearray | memoryview) -> ControlPointWrite:
    """The command written to the control point.

    Raises :class:`ControlPointError` for an empty write, an unknown command code, or a length
    that does not match the command (5 bytes for DOWNLOAD and VERIFY, 1 for the others).
    """
    raw = bytes(data)
    if not raw:
        raise ControlPointError("empty control-point write", value=raw)
    try:
        command = Command(raw[0])
    except ValueError:
        raise ControlPointError(
            f"unknown control-point command 0x{raw[0]:02x}", value=raw[0]
        ) from None
    if command in _WITH_VALUE:
        if len(raw) != COMMAND_WITH_VALUE.size:
            raise ControlPointError(
                f"{command.name} is {len(raw)} bytes, not {COMMAND_WITH_VALUE.size} "
                "(command and a little-endian u32)",
                value=raw.hex(),
            )
        return ControlPointWrite(command, U32.unpack_from(raw, 1)[0])
    if len(raw) != 1:
        raise ControlPointError(
            f"{command.name} is {len(raw)} bytes, not 1 (it takes no value)", value=raw.hex()
        )
    return ControlPointWrite(command)


def pack_reply(reply: Reply) -> bytes:
    return bytes([reply])


def parse_reply(data: bytes | bytearray | memoryview) -> Reply:
    """A reply notified on the control point; raises :class:`ControlPointError`."""
    raw = bytes(data)
    if len(raw) != 1:
        raise ControlPointError(f"a reply is 1 byte, not {len(raw)}", value=raw.hex())
    try:
        return Reply(raw[0])
    except ValueError:
        raise ControlPointError(f"unknown reply code {raw[0]}", value=raw[0]) from None


def image_crc(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32 as VERIFY carries it (the standard reflected CRC, ``zlib.crc32``); pass the
    previous value as ``crc`` to continue over the next bytes."""
    return zlib.crc32(data, crc) & 0xFFFFFFFF


def max_write(mtu: int) -> int:
    """How many value bytes one write carries with ATT MTU ``mtu``."""
    return mtu - WRITE_OVERHEAD


# --- loopback link -----------------------------------------------------------------------------


class Op(IntEnum):
    """Frame opcodes: the ATT opcodes of the operations the OTA service uses."""

    ERROR_RSP = 0x01
    MTU_REQ = 0x02
    MTU_RSP = 0x03
    WRITE_REQ = 0x12  # write with response
    WRITE_RSP = 0x13
    NOTIFY = 0x1B  # handle value notification
    INDICATE = 0x1D  # handle value indication
    CONFIRM = 0x1E  # handle value confirmation (answers an indication)
    WRITE_CMD = 0x52  # write without response


class AttError(IntEnum):
    """ATT error codes in ERROR_RSP; 0x80-0x9F are application errors of the OTA service."""

    REQUEST_NOT_SUPPORTED = 0x06
    ATTRIBUTE_NOT_FOUND = 0x0A
    INVALID_ATTRIBUTE_VALUE_LENGTH = 0x0D
    UNLIKELY_ERROR = 0x0E
    NOT_DOWNLOADING = 0x80  # data written outside a transfer (no DOWNLOAD, or it failed)
    BEYOND_IMAGE_SIZE = 0x81  # more data than DOWNLOAD announced
    STORAGE_FAILED = 0x82  # writing to storage failed; the transfer is abandoned


class Subscription(IntEnum):
    """CCCD values."""

    NONE = 0
    NOTIFY = 1
    INDICATE = 2


FRAME_HEADER = struct.Struct("<B16sH")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 19
MAX_FRAME_VALUE = MAX_MTU  # no ATT PDU is longer
U16 = struct.Struct("<H")
ERROR_VALUE = struct.Struct("<BB")
_NO_UUID = bytes(16)


def uuid_to_wire(text: str | None) -> bytes:
    """A UUID in Bluetooth order (all zeros for None)."""
    return _NO_UUID if text is None else uuid.UUID(text).bytes[::-1]


def uuid_from_wire(raw: bytes) -> str | None:
    return None if raw == _NO_UUID else str(uuid.UUID(bytes=raw[::-1]))


@dataclass(frozen=True)
class Frame:
    op: Op
    characteristic: str | None = None  # canonical lower-case UUID, None for MTU frames
    value: bytes = b""

    def pack(self) -> bytes:
        if len(self.value) > MAX_FRAME_VALUE:
            raise FrameError(
                f"a frame value is at most {MAX_FRAME_VALUE} bytes, not {len(self.value)}",
                value=len(self.value),
            )
        header = FRAME_HEADER.pack(self.op, uuid_to_wire(self.characteristic), len(self.value))
        return header + self.value


def parse_frame_header(header: bytes) -> tuple[Op, str | None, int]:
    """Opcode, characteristic and value length of a frame's 19-byte header.

    Raises :class:`FrameError` for a short header, an unknown opcode or a value longer than any
    ATT PDU.
    """
    if len(header) != FRAME_HEADER_SIZE:
        raise FrameError(
            f"a frame header is {FRAME_HEADER_SIZE} bytes, not {len(header)}", value=len(header)
        )
    code, raw_uuid, length = FRAME_HEADER.unpack(header)
    try:
        op = Op(code)
    except ValueError:
        raise FrameError(f"unknown frame opcode 0x{code:02x}", value=code) from None
    if length > MAX_FRAME_VALUE:
        raise FrameError(
            f"frame value of {length} bytes is longer than the largest ATT PDU ({MAX_FRAME_VALUE})",
            value=length,
        )
    return op, uuid_from_wire(raw_uuid), length


def parse_frame(data: bytes) -> Frame:
    """A whole frame (header and value)."""
    op, characteristic, length = parse_frame_header(data[:FRAME_HEADER_SIZE])
    value = data[FRAME_HEADER_SIZE:]
    if len(value) != length:
        raise FrameError(
            f"frame announces {length} value bytes but carries {len(value)}", value=len(value)
        )
    return Frame(op, characteristic, value)


def mtu_request(mtu: int) -> Frame:
    return Frame(Op.MTU_REQ, None, U16.pack(mtu))


def mtu_response(mtu: int) -> Frame:
    return Frame(Op.MTU_RSP, None, U16.pack(mtu))


def parse_mtu(frame: Frame) -> int:
    """The MTU of an MTU_REQ/MTU_RSP frame; below 23 counts as 23 (ATT)."""
    if len(frame.value) != U16.size:
        raise FrameError(
            f"{frame.op.name} carries {len(frame.value)} bytes, not a u16 MTU",
            value=frame.value.hex(),
        )
    mtu: int = U16.unpack(frame.value)[0]
    return max(DEFAULT_MTU, mtu)


def error_response(request: Op, characteristic: str | None, error: AttError) -> Frame:
    return Frame(Op.ERROR_RSP, characteristic, ERROR_VALUE.pack(request, error))


def parse_error(frame: Frame) -> tuple[int, int]:
    """(request opcode, ATT error code) of an ERROR_RSP frame."""
    if len(frame.value) != ERROR_VALUE.size:
        raise FrameError(
            f"ERROR_RSP carries {len(frame.value)} bytes, not 2", value=frame.value.hex()
        )
    request, error = ERROR_VALUE.unpack(frame.value)
    return request, error


def subscribe(subscription: Subscription) -> Frame:
    """The write request that subscribes to the control point's replies."""
    return Frame(Op.WRITE_REQ, CCCD_UUID, U16.pack(subscription))


def parse_subscription(value: bytes) -> Subscription:
    if len(value) != U16.size:
        raise FrameError(f"a CCCD value is 2 bytes, not {len(value)}", value=value.hex())
    bits = U16.unpack(value)[0]
    if bits & Subscription.INDICATE:
        return Subscription.INDICATE
    return Subscription.NOTIFY if bits & Subscription.NOTIFY else Subscription.NONE


def att_error_name(code: int) -> str:
    try:
        return AttError(code).name
    except ValueError:
        return f"0x{code:02x}"
