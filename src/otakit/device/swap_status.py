"""MCUboot's swap-using-status mode (Infineon ``cypress`` branch), operation for operation.

Infineon's MCUBootApp for PSoC 6 builds MCUboot's swap-using-scratch algorithm with
``MCUBOOT_SWAP_USING_STATUS``: no trailer lives in the slots; the swap progress and every
trailer field (magic, swap_info, swap_size, copy_done, image_ok) are kept in a separate *swap
status partition*. This module ports that code (``swap_status.h``, ``swap_status_part.c``,
``swap_status_misc.c``, ``swap_status.c``, the status variant of ``swap_scratch.c`` and the
flash-only boot path of its ``loader.c``, ``bootutil_public.c`` and ``bootutil_misc.c``) so that
for the same flash contents it performs the same flash operations in the same order as
``mcuboot-host-swap-status`` and leaves the same bytes.

Status partition
----------------
``R`` is the record (row) size (``MEMORY_ALIGN``, 0x200 on PSoC 6), ``P = R - 12`` the payload
of one record, ``M`` is ``MCUBOOT_MAX_IMG_SECTORS``.

- Three *sub-areas* of equal size follow each other: the primary slot's, the secondary slot's
  and the scratch area's (``swap_status_init_offset``).
- A sub-area holds two *copies* of ``rows = ceil(M / P) + ceil(64 / P)`` records each; a copy is
  ``rows * R`` bytes, a sub-area ``2 * rows * R`` (for R = 0x200 and M <= 500: 2 KiB, so the
  partition is 6 KiB).
- A record is ``P`` payload bytes, the record magic ``0xDEADBEEF``, a counter and a CRC-32C of
  the preceding ``R - 4`` bytes (all three little-endian u32).
- The payloads of record 0, 1, ... of one copy form one logical table of ``rows * P`` bytes:
  status entry ``i`` (one byte: the last completed step, 1..3, of swap operation ``i``) at
  offset ``i``; at the end swap_size (u32), swap_info, copy_done, image_ok and the 16-byte
  boot magic.
- Changing any byte rewrites its whole record: read the copy with the highest counter among
  those with a good magic and CRC (a copy with a good magic and a bad CRC is erased on the
  way), then erase the *other* copy, write the record there with the counter plus one, and
  erase the copy read. Each record update is therefore three flash operations.

Slots
-----
A swap only keeps data in the slots, except two things: a secondary slot may arrive with the
magic (and image_ok) that ``imgtool --pad``/``--confirm`` writes at its end; reading its state
moves them into the status partition and erases that last sector. And before copy_done is set
in the primary's status, the primary slot's last row receives an ordinary MCUboot trailer
(swap_size, swap_info, copy_done set, image_ok, magic) built from the status partition
(``swap_status_to_image_trailer``).

That row write sends a whole ``MEMORY_ALIGN``-sized buffer of which only the last 48 bytes are
initialised in MCUboot (the rest is whatever its stack held); otakit fills that part with the
erased value. Those bytes (``[size - R, size - 48)`` of the primary slot after a copy_done
write) are the only ones that can differ from MCUboot's.

Quirks of the Infineon code that this port keeps on purpose, because MCUboot behaves so:
the image-size check erases a slot whose image reaches the last ``BOOT_WRITE_SZ`` bytes of
``BOOT_WRITE_SZ * sectors``; a scratch status area has a single entry, which never yields a
resume point, so a swap found only in the scratch status restarts from the beginning;
``boot_find_status`` tests ``memcmp() < 0``, so a primary magic that compares greater than
MCUboot's leaves swap_size at 0.

The flash is reached through the otakit :class:`~otakit.device.flash.Flash` API (absolute
offsets); erases that do not cover whole sectors are widened to the sectors they touch, as the
Infineon internal-flash driver (and the harness) do. One write call = one operation, one erased
sector = one operation.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from otakit.device.boot_status import (
    BOOT_MAX_ALIGN,
    AreaKind,
    AreaRef,
    BootStatus,
    Flag,
    Magic,
    SwapState,
    TrailerStore,
    is_upgrade,
)
from otakit.device.boot_status import BOOT_STATUS_IDX_0 as IDX_0
from otakit.device.boot_status import BOOT_STATUS_STATE_0 as STATE_0
from otakit.device.boot_status import BOOT_STATUS_STATE_1 as STATE_1
from otakit.device.boot_status import BOOT_STATUS_STATE_2 as STATE_2
from otakit.device.boot_status import BootSwapType as SwapType
from otakit.device.boot_status import StatusSource as Source
from otakit.device.swap_mode import (
    HEADER_SIZE,
    IMAGE_F_NON_BOOTABLE,
    IMAGE_TLV_INFO_MAGIC,
    IMAGE_TLV_PROT_INFO_MAGIC,
    RawHeader,
    SwapMode,
)
from otakit.errors import OtakitError
from otakit.image.header import IMAGE_MAGIC
from otakit.image.keys import PublicKey
from otakit.image.source import ByteSource
from otakit.image.trailer import BOOT_MAGIC, swap_status_area_size, swap_status_rows
from otakit.image.trailer import BOOT_MAGIC_SIZE as BOOT_MAGIC_SZ
from otakit.image.trailer import SWAP_STATUS_COPIES as COPIES
from otakit.image.trailer import SWAP_STATUS_MAX_SECTORS as MAX_STATUS_SECTORS
from otakit.image.trailer import SWAP_STATUS_RECORD_OVERHEAD as RECORD_TAIL
from otakit.image.trailer import SWAP_STATUS_ROW_SIZE as ROW_SIZE
from otakit.image.trailer import SWAP_STATUS_TRAILER_BYTES as STATUS_TRAILER_SIZE

__all__ = [
    "BOOT_MAGIC",
    "AreaId",
    "BootOutcome",
    "Flag",
    "Magic",
    "McubootAbort",
    "Region",
    "StatusGeometry",
    "SwapStatusBoot",
    "SwapStatusLayout",
    "SwapStatusMode",
    "SwapStatusStore",
    "SwapType",
    "crc32c",
    "key_check",
    "status_partition_size",
]

# --- build constants (PSoC 6 values, boot/cypress/platforms/PSOC6.mk) ---------------------------
# (the status partition's row size, copies, trailer size and sector limit are
# otakit.image.trailer's SWAP_STATUS_* constants, shared with the flash map's size checks)

CHUNK_SIZE = 512  # MCUBOOT_PLATFORM_CHUNK_SIZE: boot_copy_region's buffer
MAX_TRAILER_PAGE = 0x200  # PLATFORM_MAX_TRAILER_PAGE_SIZE
RECORD_MAGIC = (0xDEADBEEF).to_bytes(4, "little")
STATE_COUNT = 3  # BOOT_STATUS_STATE_COUNT (swap-scratch's three steps)


class AreaId(IntEnum):
    """Flash area ids of the Infineon sysflash.h (one image)."""

    PRIMARY = 1
    SECONDARY = 2
    SCRATCH = 3

    @property
    def status_index(self) -> int:
        """Position of the area's sub-area in the status partition."""
        return self.value - 1


# --- errors --------------------------------------------------------------------------------------


class McubootAbort(OtakitError):
    """MCUboot would stop here: an ``assert()`` fails (the program aborts) or it panics (loops
    forever). Only reachable from flash states that no single power cut produces."""

    code = "MCUBOOT_PANIC"


# --- CRC-32C (crc32c.c: reflected Castagnoli, initial and final XOR 0xFFFFFFFF) ---------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


# --- geometry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusGeometry:
    """The sizes ``swap_status.h`` derives from MEMORY_ALIGN and MCUBOOT_MAX_IMG_SECTORS."""

    max_sectors: int
    row_size: int = ROW_SIZE

    def __post_init__(self) -> None:
        if self.row_size < 16 or self.row_size % 16:
            raise ValueError(f"status row size {self.row_size} must be a multiple of 16")
        if self.max_sectors < 1:
            raise ValueError(f"max sectors {self.max_sectors} must be positive")

    @property
    def payload_size(self) -> int:
        """BOOT_SWAP_STATUS_PAYLD_SZ."""
        return self.row_size - RECORD_TAIL

    @property
    def rows(self) -> int:
        """Rows of one copy: the status entries', then the trailer fields'."""
        return swap_status_rows(self.max_sectors, self.row_size)

    @property
    def copy_size(self) -> int:
        """BOOT_SWAP_STATUS_D_SIZE: one copy of a sub-area."""
        return self.row_size * self.rows

    @property
    def table_size(self) -> int:
        """BOOT_SWAP_STATUS_D_SIZE_RAW: the logical table of a sub-area."""
        return self.payload_size * self.rows

    @property
    def area_size(self) -> int:
        """BOOT_SWAP_STATUS_SIZE: one sub-area (both copies)."""
        return COPIES * self.copy_size

    def partition_size(self, images: int = 1) -> int:
        """The smallest status partition: primary, secondary and scratch sub-areas of image 0,
        then primary and secondary of each further image."""
        return swap_status_area_size(self.max_sectors, images, self.row_size)

    # field offsets in the logical table (swap_status_misc.c)
    @property
    def magic_off(self) -> int:
        return self.table_size - BOOT_MAGIC_SZ

    @property
    def image_ok_off(self) -> int:
        return self.magic_off - 1

    @property
    def copy_done_off(self) -> int:
        return self.image_ok_off - 1

    @property
    def swap_info_off(self) -> int:
        return self.copy_done_off - 1

    @property
    def swap_size_off(self) -> int:
        return self.swap_info_off - 4


def status_partition_size(max_sectors: int, row_size: int = ROW_SIZE, images: int = 1) -> int:
    """Bytes the swap status partition needs (``swap_status.h``): ``3 * 2 * rows * R``."""
    return StatusGeometry(max_sectors, row_size).partition_size(images)


# --- flash access -------------------------------------------------------------------------------


class FlashLike(Protocol):
    """What this module needs of :class:`otakit.device.flash.Flash`."""

    size: int
    sector_size: int
    write_align: int
    erased_value: int

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def erase(self, offset: int, length: int) -> None: ...


@dataclass(frozen=True)
class Region:
    """An area of the flash: absolute ``offset`` and ``size``."""

    offset: int
    size: int


class _Area:
    """``struct flash_area`` with the harness's checks (``host_flash.c``): reads and writes
    outside the area fail, writes must be aligned, erases are widened to whole sectors.
    A failed call does no flash operation and returns False / None."""

    def __init__(self, flash: FlashLike, region: Region, area_id: int) -> None:
        self.flash = flash
        self.offset = region.offset
        self.size = region.size
        self.id = area_id

    @property
    def erased(self) -> int:
        return self.flash.erased_value

    def _inside(self, off: int, length: int) -> bool:
        return 0 <= off <= self.size and 0 <= length <= self.size - off

    def read(self, off: int, length: int) -> bytes | None:
        if not self._inside(off, length):
            return None
        return self.flash.read(self.offset + off, length)

    def write(self, off: int, data: bytes) -> bool:
        align = self.flash.write_align
        if not self._inside(off, len(data)):
            return False
        if (self.offset + off) % align or len(data) % align:
            return False
        self.flash.write(self.offset + off, bytes(data))
        return True

    def erase(self, off: int, length: int) -> bool:
        if not self._inside(off, length) or length == 0:
            return False
        sector = self.flash.sector_size
        start = (self.offset + off) // sector * sector
        end = -(-(self.offset + off + length) // sector) * sector
        self.flash.erase(start, end - start)
        return True

    @property
    def num_sectors(self) -> int:
        return self.size // self.flash.sector_size


# --- the status partition (swap_status_part.c) --------------------------------------------------


class StatusReadError(Exception):
    """Neither copy of a record has a good CRC (``swap_status_read_record`` returns -1)."""


class StatusPartition:
    """Records, copies and counters of the swap status partition."""

    def __init__(
        self, flash: FlashLike, region: Region, geometry: StatusGeometry, *, read_only: bool = False
    ) -> None:
        self.fa = _Area(flash, region, 7)
        self.geometry = geometry
        self.read_only = read_only  # reads leave a copy with a bad CRC alone; writes refused

    def sub_area_offset(self, area: AreaId) -> int:
        """``swap_status_init_offset``."""
        return area.status_index * self.geometry.area_size

    def _read_record(self, rec_off: int, copy_num: int) -> tuple[bytes, int, int]:
        """``swap_status_read_record``: (payload, counter, copy index)."""
        g, fa = self.geometry, self.fa
        payload_sz = g.payload_size
        crc_fail = magic_fail = 0
        max_cnt = 0
        data_off = 0
        for i in range(COPIES):
            fin = rec_off + i * g.copy_size
            if fa.read(fin + payload_sz, 4) == RECORD_MAGIC:
                record = fa.read(fin, g.row_size) or b""
                crc = int.from_bytes(record[-4:], "little")
                if crc == crc32c(record[:-4]):
                    counter = int.from_bytes(record[-8:-4], "little")
                    if counter >= max_cnt:
                        max_cnt = counter
                        copy_num = i
                        data_off = fin
                else:
                    if not self.read_only:
                        fa.erase(fin, g.row_size)
                    crc_fail += 1
            else:
                magic_fail += 1
        if magic_fail == COPIES:
            return bytes([fa.erased]) * payload_sz, 0, COPIES - 1
        if crc_fail == COPIES:
            raise StatusReadError(f"no valid copy of the status record at 0x{rec_off:x}")
        # One copy without magic and one with a bad CRC leaves data_off at 0: MCUboot then
        # reads the payload at the start of the partition, and so does this port.
        return fa.read(data_off, payload_sz) or b"", max_cnt, copy_num

    def _write_record(self, rec_off: int, copy_num: int, counter: int, payload: bytes) -> bool:
        """``swap_status_write_record``."""
        if self.read_only:
            raise RuntimeError("a read-only view of the swap status partition cannot be written")
        g, fa = self.geometry, self.fa
        body = bytes(payload) + RECORD_MAGIC + ((counter + 1) & 0xFFFFFFFF).to_bytes(4, "little")
        record = body + crc32c(body).to_bytes(4, "little")
        prev = copy_num
        copy_num = 0 if copy_num == COPIES - 1 else copy_num + 1
        if not fa.erase(rec_off + copy_num * g.copy_size, g.row_size):
            return False
        if not fa.write(rec_off + copy_num * g.copy_size, record):
            return False
        return fa.erase(rec_off + prev * g.copy_size, g.row_size)

    def _walk(self, area: AreaId, off: int, length: int) -> tuple[int, int]:
        if off + length > self.geometry.table_size:
            raise ValueError(f"status table access at {off}+{length} is outside the table")
        g = self.geometry
        return self.sub_area_offset(area) + g.row_size * (
            off // g.payload_size
        ), off % g.payload_size

    def update(self, area: AreaId, off: int, data: bytes) -> bool:
        """``swap_status_update``: store ``data`` at ``off`` of ``area``'s table."""
        g = self.geometry
        payload_sz = g.payload_size
        rec_off, buff_idx = self._walk(area, off, len(data))
        length = len(data)
        copy_num = 0
        data_idx = 0
        ok = True
        while length:
            payload, counter, copy_num = self._read_record(rec_off, copy_num)
            copy_sz = payload_sz - buff_idx if length > payload_sz else length
            if buff_idx + copy_sz > payload_sz:
                raise ValueError("a status field may not cross a record boundary")
            buf = bytearray(payload)
            buf[buff_idx : buff_idx + copy_sz] = data[data_idx : data_idx + copy_sz]
            buff_idx = 0
            ok = self._write_record(rec_off, copy_num, counter, bytes(buf))
            if not ok:
                break
            if length < payload_sz:
                length = 0
            else:
                length -= payload_sz
                rec_off += g.row_size
                data_idx += payload_sz
        return ok

    def retrieve(self, area: AreaId, off: int, length: int) -> bytes:
        """``swap_status_retrieve``: ``length`` bytes at ``off`` of ``area``'s table."""
        g = self.geometry
        payload_sz = g.payload_size
        rec_off, buff_idx = self._walk(area, off, length)
        out = bytearray(length)
        copy_num = 0
        data_idx = 0
        while length:
            payload, _counter, copy_num = self._read_record(rec_off, copy_num)
            copy_sz = payload_sz - buff_idx if length > payload_sz else length
            if buff_idx + copy_sz > payload_sz:
                raise ValueError("a status field may not cross a record boundary")
            out[data_idx : data_idx + copy_sz] = payload[buff_idx : buff_idx + copy_sz]
            buff_idx = 0
            if length < payload_sz:
                length = 0
            else:
                length -= payload_sz
                rec_off += g.row_size
                data_idx += payload_sz
        return bytes(out)

    def erase_sub_area(self, area: AreaId) -> bool:
        if self.read_only:
            raise RuntimeError("a read-only view of the swap status partition cannot be erased")
        return self.fa.erase(self.sub_area_offset(area), self.geometry.area_size)

    def table(self, area: AreaId) -> bytes:
        """The whole logical table of ``area`` (may erase a copy with a bad CRC, as any read)."""
        return self.retrieve(area, 0, self.geometry.table_size)


# --- trailer state in the status partition (swap_status_misc.c) ---------------------------------


def _flag(value: int) -> Flag:
    return Flag.SET if value == 1 else Flag.BAD


def _memcmp_sign(a: bytes, b: bytes) -> int:
    for x, y in zip(a, b, strict=True):
        if x != y:
            return -1 if x < y else 1
    return 0


@dataclass(frozen=True)
class SwapStatusLayout:
    """The areas of one image in swap-status mode and the build constants."""

    primary: Region
    secondary: Region
    scratch: Region
    status: Region
    max_sectors: int
    row_size: int = ROW_SIZE
    chunk_size: int = CHUNK_SIZE
    max_trailer_page: int = MAX_TRAILER_PAGE

    @property
    def geometry(self) -> StatusGeometry:
        return StatusGeometry(self.max_sectors, self.row_size)


class SwapStatusStore:
    """Trailer fields and status entries of one image, kept in the status partition."""

    def __init__(
        self, flash: FlashLike, layout: SwapStatusLayout, *, read_only: bool = False
    ) -> None:
        self.flash = flash
        self.layout = layout
        self.geometry = layout.geometry
        self.read_only = read_only
        self.part = StatusPartition(flash, layout.status, self.geometry, read_only=read_only)
        self.areas = {
            AreaId.PRIMARY: _Area(flash, layout.primary, AreaId.PRIMARY),
            AreaId.SECONDARY: _Area(flash, layout.secondary, AreaId.SECONDARY),
            AreaId.SCRATCH: _Area(flash, layout.scratch, AreaId.SCRATCH),
        }

    @property
    def erased(self) -> int:
        return self.flash.erased_value

    def _is_erased(self, data: bytes) -> bool:
        return len(data) > 0 and data.count(self.erased) == len(data)

    # -- reads --

    def read_swap_state(self, area: AreaId) -> SwapState:
        """``boot_read_swap_state``. Reading the secondary's state moves a magic/image_ok
        found at the end of the slot (``imgtool --pad``) into the status partition and erases
        the slot's last sector; the primary's image_ok is likewise picked up from the slot
        trailer once copy_done is set. A read-only store reports the same state without those
        writes."""
        g, part = self.geometry, self.part
        write = not self.read_only
        fa = self.areas[area]
        magic_bytes = part.retrieve(area, g.magic_off, BOOT_MAGIC_SZ)
        erase_trailer = False
        trailer_off = 0
        if self._is_erased(magic_bytes):
            magic = Magic.UNSET
            if area is AreaId.SECONDARY:
                trailer_off = fa.size - BOOT_MAGIC_SZ
                slot_magic = fa.read(trailer_off, BOOT_MAGIC_SZ) or b""
                if not self._is_erased(slot_magic):
                    magic = Magic.GOOD if slot_magic == BOOT_MAGIC else Magic.BAD
                    if magic is Magic.GOOD and write:
                        part.update(area, g.magic_off, slot_magic)
                    erase_trailer = True
        else:
            magic = Magic.GOOD if magic_bytes == BOOT_MAGIC else Magic.BAD
        info = part.retrieve(area, g.swap_info_off, 1)[0]
        if info == self.erased:
            swap_type, image_num = int(SwapType.NONE), 0
        else:
            swap_type, image_num = info & 0x0F, info >> 4
        raw = part.retrieve(area, g.copy_done_off, 1)[0]
        copy_done = Flag.UNSET if raw == self.erased else _flag(raw)
        raw = part.retrieve(area, g.image_ok_off, 1)[0]
        if raw == self.erased:
            image_ok = Flag.UNSET
            process = copy_done is Flag.SET
            if area is AreaId.SECONDARY:
                process = True
            if process:
                trailer_off = fa.size - BOOT_MAGIC_SZ - BOOT_MAX_ALIGN
                slot_ok = (fa.read(trailer_off, 1) or b"\0")[0]
                if slot_ok != self.erased:
                    image_ok = _flag(slot_ok)
                    if image_ok is not Flag.BAD and write:
                        part.update(area, g.image_ok_off, bytes([slot_ok]))
                    erase_trailer = False
        else:
            image_ok = _flag(raw)
        if erase_trailer and area is not AreaId.SCRATCH and write:
            fa.erase(trailer_off, BOOT_MAGIC_SZ)
        return SwapState(magic, swap_type, image_num, copy_done, image_ok)

    def find_status(self) -> int:
        """``boot_find_status``: memcmp of the primary's magic with MCUboot's (0: found)."""
        magic = self.part.retrieve(AreaId.PRIMARY, self.geometry.magic_off, BOOT_MAGIC_SZ)
        return _memcmp_sign(magic, BOOT_MAGIC)

    def read_swap_size(self) -> tuple[int, int]:
        """``boot_read_swap_size``: (rc, swap_size); rc is find_status's when not 0."""
        rc = self.find_status()
        if rc != 0:
            return rc, 0
        raw = self.part.retrieve(AreaId.PRIMARY, self.geometry.swap_size_off, 4)
        return 0, int.from_bytes(raw, "little")

    def read_swap_info(self, area: AreaId) -> int | None:
        info = self.part.retrieve(area, self.geometry.swap_info_off, 1)[0]
        return None if info == self.erased else info

    def read_status_byte(self, area: AreaId, index: int) -> int:
        return self.part.retrieve(area, index, 1)[0]

    # -- writes --

    def write_trailer(self, area: AreaId, off: int, data: bytes) -> bool:
        """``boot_write_trailer``; writing copy_done of the primary first copies the trailer
        into the primary slot's last row (``swap_status_to_image_trailer``)."""
        copy_done = off == self.geometry.copy_done_off and len(data) == 1
        if copy_done and area is AreaId.PRIMARY and not self.to_image_trailer():
            return False
        return self.part.update(area, off, data)

    def write_magic(self, area: AreaId) -> bool:
        return self.part.update(area, self.geometry.magic_off, BOOT_MAGIC)

    def write_image_ok(self, area: AreaId) -> bool:
        return self.write_trailer(area, self.geometry.image_ok_off, b"\x01")

    def write_copy_done(self, area: AreaId) -> bool:
        return self.write_trailer(area, self.geometry.copy_done_off, b"\x01")

    def write_swap_info(self, area: AreaId, swap_type: int, image_num: int = 0) -> bool:
        info = ((image_num << 4) | swap_type) & 0xFF
        return self.write_trailer(area, self.geometry.swap_info_off, bytes([info]))

    def write_swap_size(self, area: AreaId, swap_size: int) -> bool:
        data = (swap_size & 0xFFFFFFFF).to_bytes(4, "little")
        return self.write_trailer(area, self.geometry.swap_size_off, data)

    def write_status(self, bs: BootStatus) -> bool:
        """``boot_write_status``: the step byte of swap operation ``bs.idx``."""
        if bs.idx < IDX_0:
            return False
        area = AreaId.SCRATCH if bs.use_scratch else AreaId.PRIMARY
        return self.part.update(area, bs.idx - IDX_0, bytes([bs.state]))

    def to_image_trailer(self) -> bool:
        """``swap_status_to_image_trailer``: an MCUboot trailer in the primary slot's last
        row(s), built from the primary's status fields, with copy_done set."""
        g = self.geometry
        fa = self.areas[AreaId.PRIMARY]
        fields = self.part.retrieve(AreaId.PRIMARY, g.swap_size_off, 23)
        if fields[-BOOT_MAGIC_SZ:] != BOOT_MAGIC:
            return False
        trailer_sz = BOOT_MAX_ALIGN * 4 + BOOT_MAGIC_SZ  # boot_trailer_sz(0)
        align = self.flash.write_align
        if align > self.layout.max_trailer_page or align == 0:
            return False
        buf_sz = align
        while buf_sz < trailer_sz:
            buf_sz += align
        if buf_sz > self.layout.max_trailer_page:
            return False
        if not fa.erase(fa.size - buf_sz, buf_sz):
            return False
        # MCUboot leaves the bytes before the trailer uninitialised; otakit writes erased ones.
        buf = bytearray([self.erased]) * buf_sz
        pos = buf_sz - BOOT_MAGIC_SZ
        buf[pos:] = fields[-BOOT_MAGIC_SZ:]
        pos -= BOOT_MAX_ALIGN
        buf[pos] = fields[6]  # image_ok
        pos -= BOOT_MAX_ALIGN
        buf[pos] = 1  # copy_done
        pos -= BOOT_MAX_ALIGN
        buf[pos] = fields[4]  # swap_info
        pos -= BOOT_MAX_ALIGN
        buf[pos : pos + 4] = fields[0:4]  # swap_size
        return fa.write(fa.size - buf_sz, bytes(buf))

    def erase_trailer_sectors(self, area: AreaId) -> bool:
        """``swap_erase_trailer_sectors``: the area's status sub-area, then (slots only) the
        slot's last ``BOOT_SWAP_STATUS_TRAILER_SIZE`` bytes, widened to its last sector."""
        if not self.part.erase_sub_area(area):
            return False
        if area is not AreaId.SCRATCH:
            fa = self.areas[area]
            return fa.erase(fa.size - STATUS_TRAILER_SIZE, STATUS_TRAILER_SIZE)
        return True

    def status_init(self, area: AreaId, bs: BootStatus) -> None:
        """``swap_status_init``."""
        secondary = self.read_swap_state(AreaId.SECONDARY)
        if bs.swap_type != SwapType.NONE:
            self.write_swap_info(area, bs.swap_type, 0)
        if secondary.image_ok is Flag.SET:
            self.write_image_ok(area)
        self.write_swap_size(area, bs.swap_size)
        self.write_magic(area)

    # -- application side (bootutil_public.c) --

    def set_pending(self, permanent: bool = False) -> int:
        """``boot_set_pending_multi``: 0, or MCUboot's error code (BOOT_EBADIMAGE = 3)."""
        state = self.read_swap_state(AreaId.SECONDARY)
        if state.magic is Magic.GOOD:
            return 0
        if state.magic is Magic.UNSET:
            ok = self.write_magic(AreaId.SECONDARY)
            if ok and permanent:
                ok = self.write_image_ok(AreaId.SECONDARY)
            if ok:
                swap_type = SwapType.PERM if permanent else SwapType.TEST
                ok = self.write_swap_info(AreaId.SECONDARY, swap_type, 0)
            return 0 if ok else -1
        fa = self.areas[AreaId.SECONDARY]
        fa.erase(0, fa.size)
        return 3

    def set_confirmed(self) -> int:
        """``boot_set_confirmed_multi``: 0, or BOOT_EBADVECT (7) for a bad magic."""
        state = self.read_swap_state(AreaId.PRIMARY)
        if state.magic is Magic.UNSET:
            return 0
        if state.magic is Magic.BAD:
            return 7
        if state.image_ok is not Flag.UNSET:
            return 0
        return 0 if self.write_image_ok(AreaId.PRIMARY) else -1

    def swap_type(self) -> int:
        """``boot_swap_type_multi`` (reading the states may migrate a padded magic)."""
        primary = self.read_swap_state(AreaId.PRIMARY)
        secondary = self.read_swap_state(AreaId.SECONDARY)
        return swap_type_from_states(primary, secondary)


def swap_type_from_states(primary: SwapState, secondary: SwapState) -> int:
    """``boot_swap_tables``."""
    if secondary.magic is Magic.GOOD:
        if secondary.image_ok is Flag.UNSET:
            return SwapType.TEST
        if secondary.image_ok is Flag.SET:
            return SwapType.PERM
    if (
        primary.magic is Magic.GOOD
        and secondary.magic is Magic.UNSET
        and primary.image_ok is Flag.UNSET
        and primary.copy_done is Flag.SET
    ):
        return SwapType.REVERT
    return SwapType.NONE


# --- image headers --------------------------------------------------------------------------------


def _version_text(hdr: RawHeader) -> str | None:
    """The version of a header as the harness prints it (``1.2.3+4``); None without a magic."""
    if hdr.magic != IMAGE_MAGIC:
        return None
    major, minor, rev, build = hdr.version
    return f"{major}.{minor}.{rev}+{build}"


_EMPTY_HEADER = RawHeader.parse(bytes(HEADER_SIZE))


# --- image validation -----------------------------------------------------------------------------


class _AreaSource:
    """A flash area as a :class:`~otakit.image.source.ByteSource`."""

    def __init__(self, fa: _Area) -> None:
        self._fa = fa

    @property
    def size(self) -> int:
        return self._fa.size

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._fa.size - offset))
        return self._fa.read(offset, length) or b""


ImageCheck = Callable[[ByteSource, int], str | None]
"""``bootutil_img_validate`` for the image in a slot (0 primary, 1 secondary): None when it
passes, else the reason it does not."""

DowngradeCheck = Callable[[ByteSource, ByteSource], str | None]
"""otakit's optional downgrade prevention, given the primary and the secondary slot before a
TEST or PERM swap: None to go on, else why the candidate is refused (see
:meth:`SwapStatusBoot.boot`)."""


def key_check(keys: Sequence[PublicKey] | None) -> ImageCheck:
    """An :data:`ImageCheck` verifying hash and signature (``keys=None``: hash only) with
    otakit's verifier."""
    from otakit.image.verify import verify_image

    def check(source: ByteSource, slot: int) -> str | None:
        try:
            verify_image(source, keys)
        except OtakitError as exc:
            return str(exc)
        return None

    return check


# --- the boot (cypress loader.c + swap_scratch.c with MCUBOOT_SWAP_USING_STATUS) ------------------


@dataclass
class BootOutcome:
    """What one ``boot_go()`` did."""

    booted: bool
    image_off: int | None  # flash offset of the image that runs
    version: str | None
    swap_type: int  # the swap done (or attempted) at this boot: a SwapType value
    resumed: bool  # an interrupted swap was completed first
    resumed_swap_type: int = SwapType.NONE
    rejected: str | None = None  # why the secondary image was refused
    invalid_primary: str | None = None  # why the primary image cannot run
    erased_slots: list[str] = field(default_factory=list)  # slots erased by the size check


class SwapStatusBoot:
    """``context_boot_go_flash`` of the Infineon loader for one image in swap-status mode."""

    def __init__(
        self,
        flash: FlashLike,
        layout: SwapStatusLayout,
        check: ImageCheck | None = None,
        *,
        downgrade: DowngradeCheck | None = None,
        store: SwapStatusStore | None = None,
    ) -> None:
        self.flash = flash
        self.layout = layout
        self.store = store if store is not None else SwapStatusStore(flash, layout)
        self.check = check if check is not None else key_check(None)
        self.downgrade = downgrade
        self.areas = self.store.areas
        self.write_sz = flash.write_align  # BOOT_WRITE_SZ: max(align(primary), align(scratch))
        self.headers = [_EMPTY_HEADER, _EMPTY_HEADER]
        self.swap_type = int(SwapType.NONE)
        self.secondary_sectors_ok = True

    # -- helpers --

    def _sector_size(self) -> int:
        return self.flash.sector_size

    def _num_sectors(self, slot: int) -> int:
        return self.areas[AreaId.PRIMARY if slot == 0 else AreaId.SECONDARY].num_sectors

    def _slot_area(self, slot: int) -> _Area:
        return self.areas[(AreaId.PRIMARY, AreaId.SECONDARY, AreaId.SCRATCH)[slot]]

    def read_sectors(self) -> tuple[bool, bool]:
        """``boot_read_sectors``: (primary, status and scratch readable; secondary readable)."""
        cap = self.layout.max_sectors
        status_sectors = self.layout.status.size // self._sector_size()
        primary_ok = self.areas[AreaId.PRIMARY].num_sectors <= cap
        secondary_ok = self.areas[AreaId.SECONDARY].num_sectors <= cap
        status_ok = status_sectors <= min(cap, MAX_STATUS_SECTORS)
        scratch_ok = self.areas[AreaId.SCRATCH].num_sectors <= cap
        if not primary_ok:
            return False, secondary_ok
        if not secondary_ok:
            return status_ok and scratch_ok, False
        return status_ok and scratch_ok, True

    def read_image_header(self, slot: int, bs: BootStatus | None) -> tuple[int, RawHeader]:
        """``boot_read_image_header`` of swap_scratch.c (status variant)."""
        saved = slot
        if bs is not None:
            if bs.state == STATE_1:
                if slot == 1:
                    slot = 2
            elif bs.state == STATE_2:
                if slot == 0:
                    proc = self.layout.scratch.size * bs.idx
                    pri = self.headers[0].img_size
                    sec = self.headers[1].img_size
                    slot = 2
                    if sec >= pri and sec - pri < proc:
                        slot = 1
                else:
                    slot = 2
        raw = self._slot_area(slot).read(0, HEADER_SIZE)
        if raw is None:
            return 1, _EMPTY_HEADER
        hdr = RawHeader.parse(raw)
        if bs is not None and hdr.magic != IMAGE_MAGIC and bs.state != STATE_0:
            raw = self._slot_area(saved).read(0, HEADER_SIZE)
            if raw is None:
                return 1, hdr
            hdr = RawHeader.parse(raw)
            if hdr.magic != IMAGE_MAGIC:
                return -1, hdr
        return 0, hdr

    def read_image_headers(self, require_all: bool, bs: BootStatus | None) -> int:
        for i in range(2):
            rc, hdr = self.read_image_header(i, bs)
            self.headers[i] = hdr
            if rc != 0:
                if i > 0 and not require_all:
                    return 0
                return rc
        return 0

    def read_image_size(self, slot: int) -> int | None:
        """``boot_read_image_size``: header + payload + TLVs, or None (BOOT_EFLASH/EBADIMAGE)."""
        fa = self._slot_area(slot)
        hdr = self.headers[slot]
        off = hdr.hdr_size + hdr.img_size
        info = fa.read(off, 4)
        if info is None:
            return None
        magic, tot = struct.unpack("<HH", info)
        protect = hdr.protect_tlv_size
        if magic == IMAGE_TLV_PROT_INFO_MAGIC:
            if protect != tot:
                return None
            info = fa.read(off + tot, 4)
            if info is None:
                return None
            magic, tot = struct.unpack("<HH", info)
        elif protect != 0:
            return None
        if magic != IMAGE_TLV_INFO_MAGIC:
            return None
        return int(off + protect + tot) & 0xFFFFFFFF

    def slots_compatible(self) -> bool:
        """``boot_slots_compatible`` (uniform sectors)."""
        n_pri, n_sec = self._num_sectors(0), self._num_sectors(1)
        if n_sec == 0 or not self.secondary_sectors_ok:
            return False
        if n_pri > self.layout.max_sectors or n_sec > self.layout.max_sectors:
            return False
        sector = self._sector_size()
        if sector > self.layout.scratch.size:
            return False
        return n_pri == n_sec

    def _header_erased(self, slot: int) -> bool:
        return self.headers[slot].raw[:4] == bytes([self.flash.erased_value]) * 4

    def validate_slot(self, slot: int, outcome: BootOutcome) -> bool:
        """``boot_validate_slot``: True when the image is valid (FIH_SUCCESS)."""
        fa = self._slot_area(slot)
        hdr = self.headers[slot]
        if self._header_erased(slot) or hdr.flags & IMAGE_F_NON_BOOTABLE:
            if slot != 0:
                self.store.erase_trailer_sectors(AreaId.SECONDARY)
            if slot == 0:
                outcome.invalid_primary = "no image in the primary slot"
            else:
                outcome.rejected = "no image in the secondary slot"
            return False
        reason = self.check(_AreaSource(fa), slot)
        size = hdr.img_size + hdr.hdr_size
        header_ok = hdr.magic == IMAGE_MAGIC and size <= 0xFFFFFFFF and size < fa.size
        if not header_ok or reason is not None:
            if reason is None:
                reason = "image header does not fit the slot"
            if slot != 0:
                fa.erase(0, fa.size)
                outcome.rejected = reason
            else:
                outcome.invalid_primary = reason
            return False
        return True

    # -- reading the status (swap_scratch.c / swap_status_misc.c) --

    def status_source(self) -> int:
        """``swap_status_source``."""
        primary = self.store.read_swap_state(AreaId.PRIMARY)
        scratch = self.store.read_swap_state(AreaId.SCRATCH)
        if primary.magic is Magic.GOOD and scratch.magic is not Magic.GOOD:
            if primary.copy_done is Flag.SET:
                return Source.NONE
            if primary.copy_done is Flag.UNSET:
                return Source.PRIMARY_SLOT
        if scratch.magic is Magic.GOOD:
            return Source.SCRATCH
        if primary.magic is Magic.UNSET and primary.copy_done is Flag.UNSET:
            return Source.PRIMARY_SLOT
        return Source.NONE

    def read_status_bytes(self, area: AreaId, bs: BootStatus) -> int:
        """``swap_read_status_bytes`` (status variant)."""
        max_entries = 1 if area is AreaId.SCRATCH else self.layout.max_sectors
        erased = self.flash.erased_value
        found = False
        found_idx = -1
        last_status = erased
        for i in range(max_entries):
            status = self.store.read_status_byte(area, i)
            if status == erased:
                if found and found_idx == -1:
                    found_idx = i
            else:
                last_status = status
                if not found:
                    found = True
                elif found_idx > 0:
                    break  # inconsistent status: MCUboot logs it and goes on
        if found_idx != -1:
            rc, size = self.store.read_swap_size()
            if rc < 0:
                return -1
            if rc == 0:
                bs.swap_size = size
            last_status = (last_status + 1) & 0xFF
            if last_status > STATE_COUNT:
                last_status = STATE_0
                found_idx += 1
            bs.op = 2  # BOOT_STATUS_OP_SWAP
            bs.idx = found_idx
            bs.state = last_status
        return 0

    def read_status(self, bs: BootStatus) -> int:
        """``swap_read_status`` (status variant)."""
        bs.source = self.status_source()
        if bs.source == Source.NONE:
            return 0
        area = AreaId.PRIMARY if bs.source == Source.PRIMARY_SLOT else AreaId.SCRATCH
        rc = self.read_status_bytes(area, bs)
        if rc == 0:
            info = self.store.read_swap_info(area)
            bs.swap_type = (info if info is not None else SwapType.NONE) & 0x0F
        return rc

    # -- the swap (swap_scratch.c) --

    def copy_region(self, src: _Area, dst: _Area, off_src: int, off_dst: int, size: int) -> bool:
        """``boot_copy_region``: reads and writes of MCUBOOT_PLATFORM_CHUNK_SIZE bytes."""
        done = 0
        chunk = self.layout.chunk_size
        while done < size:
            n = min(chunk, size - done)
            data = src.read(off_src + done, n)
            if data is None:
                return False
            if not dst.write(off_dst + done, data):
                return False
            done += n
        return True

    def _must(self, ok: bool, what: str) -> None:
        if not ok:
            raise McubootAbort(f"MCUboot asserts here: {what} failed")

    def copy_sz(self, last_sector_idx: int) -> tuple[int, int]:
        """``boot_copy_sz``: (bytes, first sector index) of the group ending at the sector."""
        scratch_sz = self.layout.scratch.size
        sector = self._sector_size()
        size = 0
        i = last_sector_idx
        while i >= 0:
            if size + sector > scratch_sz:
                break
            size += sector
            i -= 1
        return size, i + 1

    def swap_sectors(self, idx: int, sz: int, bs: BootStatus) -> None:
        """``boot_swap_sectors`` (status variant)."""
        store = self.store
        primary = self.areas[AreaId.PRIMARY]
        secondary = self.areas[AreaId.SECONDARY]
        scratch = self.areas[AreaId.SCRATCH]
        sector = self._sector_size()
        img_off = idx * sector
        copy_sz = sz
        trailer_sz = self.write_sz
        last_sector = primary.num_sectors - 1
        sector_sz = sector
        if sector_sz < trailer_sz:
            total = sector_sz
            while total < trailer_sz:
                last_sector -= 1
                total += sector
        if img_off + sz > last_sector * sector:
            copy_sz -= trailer_sz
        bs.use_scratch = bs.idx == IDX_0 and copy_sz != sz

        if bs.state == STATE_0:
            self._must(scratch.erase(0, scratch.size), "erasing the scratch area")
            if bs.idx == IDX_0:
                store.status_init(AreaId.SCRATCH, bs)
                if not bs.use_scratch:
                    store.erase_trailer_sectors(AreaId.PRIMARY)
                    store.status_init(AreaId.PRIMARY, bs)
                    store.erase_trailer_sectors(AreaId.SCRATCH)
            self._must(self.copy_region(secondary, scratch, img_off, 0, copy_sz), "copy")
            store.write_status(bs)
            bs.state = STATE_1

        if bs.state == STATE_1:
            self._must(secondary.erase(img_off, sz), "erasing the secondary slot")
            self._must(self.copy_region(primary, secondary, img_off, img_off, copy_sz), "copy")
            if bs.idx == IDX_0 and not bs.use_scratch:
                store.erase_trailer_sectors(AreaId.SECONDARY)
            store.write_status(bs)
            bs.state = STATE_2

        if bs.state == STATE_2:
            self._must(primary.erase(img_off, sz), "erasing the primary slot")
            self._must(self.copy_region(scratch, primary, 0, img_off, copy_sz), "copy")
            if bs.use_scratch:
                self.copy_region(
                    scratch, primary, 0, img_off + copy_sz, (STATE_COUNT - 1) * self.write_sz
                )
                scratch_state = store.read_swap_state(AreaId.SCRATCH)
                if scratch_state.image_ok is Flag.SET:
                    store.write_image_ok(AreaId.PRIMARY)
                if scratch_state.swap_type != SwapType.NONE:
                    store.write_swap_info(AreaId.PRIMARY, scratch_state.swap_type, 0)
                store.write_swap_size(AreaId.PRIMARY, bs.swap_size)
                store.write_magic(AreaId.PRIMARY)
            erase_scratch = bs.use_scratch
            bs.use_scratch = False
            store.write_status(bs)
            bs.idx += 1
            bs.state = STATE_0
            if erase_scratch:
                store.erase_trailer_sectors(AreaId.SCRATCH)
                store.erase_trailer_sectors(AreaId.SECONDARY)

    def swap_run(self, bs: BootStatus, copy_size: int) -> None:
        """``swap_run`` (swap_scratch.c)."""
        sector = self._sector_size()
        n = self._num_sectors(0)
        pri = sec = 0
        last_idx = 0
        while True:
            if pri < copy_size or pri < sec:
                pri += sector
            if sec < copy_size or sec < pri:
                sec += sector
            if pri >= copy_size and sec >= copy_size and pri == sec:
                break
            last_idx += 1
            if last_idx >= n:
                raise McubootAbort("swap size larger than the slot")
        bs.op = 2
        swap_idx = 0
        while last_idx >= 0:
            size, first = self.copy_sz(last_idx)
            if swap_idx >= bs.idx - IDX_0:
                self.swap_sectors(first, size, bs)
            last_idx = first - 1
            swap_idx += 1

    def swap_image(self, bs: BootStatus) -> None:
        """``boot_swap_image``."""
        if bs.is_reset():
            copy_size = 0
            if self.headers[0].magic == IMAGE_MAGIC:
                size = self.read_image_size(0)
                self._must(size is not None, "reading the primary image size")
                copy_size = size or 0
            if self.headers[1].magic == IMAGE_MAGIC:
                size = self.read_image_size(1)
                self._must(size is not None, "reading the secondary image size")
                copy_size = max(copy_size, size or 0)
            bs.swap_size = copy_size
        else:
            rc, size = self.store.read_swap_size()
            self._must(rc == 0, "reading swap_size")
            bs.swap_size = size
            copy_size = size
        self.swap_run(bs, copy_size)

    def set_image_ok(self) -> bool:
        """``swap_set_image_ok``."""
        state = self.store.read_swap_state(AreaId.PRIMARY)
        if state.image_ok is Flag.UNSET:
            return self.store.write_image_ok(AreaId.PRIMARY)
        return True

    def _finish(self, swap_type: int) -> None:
        ok = True
        if swap_type in (SwapType.REVERT, SwapType.PERM):
            ok = self.set_image_ok()
        if ok and is_upgrade(swap_type):
            ok = self.store.write_copy_done(AreaId.PRIMARY)
        if not ok:
            raise McubootAbort("MCUboot panics: the swap could not be completed")

    # -- the boot --

    def _check_image_sizes(self, outcome: BootOutcome) -> None:
        """The Infineon check that an image does not reach the slot's last write unit."""
        for slot in (0, 1):
            if self.headers[slot].magic != IMAGE_MAGIC:
                continue
            size = self.read_image_size(slot)
            if size is None:
                continue
            fa = self._slot_area(slot)
            limit = self.write_sz * fa.num_sectors - self.write_sz
            if size > limit:
                fa.erase(0, fa.size)
                outcome.erased_slots.append("primary" if slot == 0 else "secondary")

    def prepare(self, bs: BootStatus, outcome: BootOutcome) -> None:
        """``boot_prepare_image_for_update``."""
        main_ok, secondary_ok = self.read_sectors()
        self.secondary_sectors_ok = secondary_ok
        if not main_ok:
            self.swap_type = SwapType.NONE
            return
        if self.read_image_headers(False, None) != 0:
            self.swap_type = SwapType.NONE
            return
        if not self.slots_compatible():
            self.swap_type = SwapType.NONE
            return
        bs.reset()
        self._check_image_sizes(outcome)
        if self.read_status(bs) != 0:
            self.swap_type = SwapType.NONE
            return
        if self.read_image_headers(not bs.is_reset(), bs) != 0:
            self.swap_type = SwapType.NONE
            return
        if not bs.is_reset():
            outcome.resumed = True
            outcome.resumed_swap_type = bs.swap_type
            self.swap_image(bs)
            self.swap_type = bs.swap_type
            self._finish(bs.swap_type)
            self._must(self.read_image_headers(False, bs) == 0, "re-reading the headers")
            self.swap_type = SwapType.NONE
            return
        if bs.swap_type == SwapType.NONE:
            swap_type = self.store.swap_type()
            if is_upgrade(swap_type) and not self.validate_slot(1, outcome):
                swap_type = SwapType.NONE
            self.swap_type = swap_type
        elif not self.validate_slot(1, outcome):
            self.swap_type = SwapType.FAIL
        else:
            self.swap_type = bs.swap_type

    def boot(self) -> BootOutcome:
        """``boot_go()``: complete or start a swap as MCUboot does, then validate the primary.

        With a :attr:`downgrade` check (otakit's extra: the Infineon loader has none), a TEST
        or PERM swap of a validated candidate is first put to it, where upstream MCUboot calls
        ``check_downgrade_prevention``; a refused candidate is erased as this loader erases an
        invalid one (the whole secondary slot) and nothing is swapped."""
        outcome = BootOutcome(False, None, None, SwapType.NONE, False)
        bs = BootStatus()
        self.swap_type = SwapType.NONE
        self.prepare(bs, outcome)
        swap_type = self.swap_type
        if swap_type in (SwapType.TEST, SwapType.PERM) and self.downgrade is not None:
            secondary = self.areas[AreaId.SECONDARY]
            reason = self.downgrade(_AreaSource(self.areas[AreaId.PRIMARY]), _AreaSource(secondary))
            if reason is not None:
                secondary.erase(0, secondary.size)
                outcome.rejected = reason
                swap_type = self.swap_type = SwapType.NONE
        bs.swap_type = swap_type
        outcome.swap_type = swap_type
        if is_upgrade(swap_type):
            self.swap_image(bs)
            self._finish(swap_type)
        elif swap_type == SwapType.FAIL:
            if not self.set_image_ok():
                raise McubootAbort("MCUboot panics: image_ok could not be set")
        elif swap_type != SwapType.NONE:
            raise McubootAbort(f"MCUboot panics on swap type {swap_type}")
        if swap_type != SwapType.NONE and self.read_image_headers(False, bs) != 0:
            return outcome
        if not self.validate_slot(0, outcome):
            return outcome
        outcome.booted = True
        outcome.image_off = self.layout.primary.offset
        outcome.version = _version_text(self.headers[0])
        return outcome


# --- otakit's per-mode interface (otakit.device.swap_mode) --------------------------------------


def _area_id(ref: AreaRef) -> AreaId:
    if ref.kind is AreaKind.PRIMARY:
        return AreaId.PRIMARY
    if ref.kind is AreaKind.SECONDARY:
        return AreaId.SECONDARY
    return AreaId.SCRATCH


class StatusTrailerStore(TrailerStore):
    """The :class:`~otakit.device.boot_status.TrailerStore` of swap-status: every field and
    status entry in the status partition (:class:`SwapStatusStore`)."""

    def __init__(self, inner: SwapStatusStore) -> None:
        self.inner = inner

    def read_swap_state(self, area: AreaRef) -> SwapState:
        return self.inner.read_swap_state(_area_id(area))

    def magic_good(self, area: AreaRef) -> bool:
        off = self.inner.geometry.magic_off
        return self.inner.part.retrieve(_area_id(area), off, BOOT_MAGIC_SZ) == BOOT_MAGIC

    def write_magic(self, area: AreaRef) -> None:
        self.inner.write_magic(_area_id(area))

    def write_image_ok(self, area: AreaRef) -> None:
        self.inner.write_image_ok(_area_id(area))

    def write_copy_done(self, area: AreaRef) -> None:
        self.inner.write_copy_done(_area_id(area))

    def write_swap_info(self, area: AreaRef, swap_type: int, image_num: int) -> None:
        self.inner.write_swap_info(_area_id(area), swap_type, image_num)

    def write_swap_size(self, area: AreaRef, swap_size: int) -> None:
        self.inner.write_swap_size(_area_id(area), swap_size)

    def read_swap_size(self, area: AreaRef) -> int:
        raw = self.inner.part.retrieve(_area_id(area), self.inner.geometry.swap_size_off, 4)
        return int.from_bytes(raw, "little")

    def read_swap_info_raw(self, area: AreaRef) -> int | None:
        return self.inner.read_swap_info(_area_id(area))

    def status_entries(self, area: AreaRef) -> int:
        return 1 if area.is_scratch else self.inner.geometry.max_sectors

    def status_entry_erased(self, area: AreaRef, index: int) -> bool:
        return self.inner.read_status_byte(_area_id(area), index) == self.inner.erased

    def write_status(self, area: AreaRef, internal_off: int, state: int) -> None:
        self.inner.part.update(_area_id(area), internal_off, bytes([state]))


class SwapStatusMode(SwapMode):
    """swap-status for :func:`otakit.device.swap_mode.mode_class`.

    The Infineon ``loader.c`` differs from upstream's in ways that change flash operations
    (the image-size erase, ``flash_area_erase`` of a refused slot instead of scrambling,
    ``boot_read_image_header``'s own redirection, 512-byte copy chunks, ``boot_find_status``'s
    ``memcmp`` test, resume from the status partition). The exact boot is therefore
    :meth:`boot_go` (:class:`SwapStatusBoot`); a loader calls it for this strategy instead of
    its own flow. The other methods serve code that reads or requests (status, set_pending,
    confirm) through the common interface, with the same flash operations as MCUboot (or
    none at all through a read-only store, see :meth:`make_store`).
    """

    strategy = "swap-status"
    needs_scratch = True

    def layout(self) -> SwapStatusLayout:
        ctx = self.ctx
        if ctx.scratch is None or ctx.status is None:
            raise McubootAbort("swap-status needs a scratch area and a status partition")
        return SwapStatusLayout(
            primary=Region(ctx.primary.area.offset, ctx.primary.size),
            secondary=Region(ctx.secondary.area.offset, ctx.secondary.size),
            scratch=Region(ctx.scratch.area.offset, ctx.scratch.size),
            status=Region(ctx.status.area.offset, ctx.status.size),
            max_sectors=ctx.geometry.max_sectors,
        )

    def make_store(self, read_only: bool = False) -> TrailerStore:
        """The status partition's store; ``read_only``: reads neither migrate an ``imgtool
        --pad`` trailer nor erase a record copy with a bad CRC (and writes are refused)."""
        return StatusTrailerStore(
            SwapStatusStore(self.ctx.flash, self.layout(), read_only=read_only)
        )

    def status_store(self) -> SwapStatusStore:
        """The :class:`SwapStatusStore` behind :attr:`store`."""
        store = self.ctx.store
        if not isinstance(store, StatusTrailerStore):
            raise McubootAbort("a swap-status mode needs its own trailer store")
        return store.inner

    def engine(
        self, check: ImageCheck | None = None, downgrade: DowngradeCheck | None = None
    ) -> SwapStatusBoot:
        return SwapStatusBoot(
            self.ctx.flash, self.layout(), check, downgrade=downgrade, store=self.status_store()
        )

    def boot_go(
        self, check: ImageCheck | None = None, downgrade: DowngradeCheck | None = None
    ) -> BootOutcome:
        """The whole ``boot_go()`` of the Infineon loader for this image."""
        return self.engine(check, downgrade).boot()

    def set_pending(self, permanent: bool = False) -> int:
        """``boot_set_pending_multi`` (0 or MCUboot's error code)."""
        return self.status_store().set_pending(permanent)

    def set_confirmed(self) -> int:
        """``boot_set_confirmed_multi`` (0 or MCUboot's error code)."""
        return self.status_store().set_confirmed()

    def decide_swap_type(self, primary: SwapState, secondary: SwapState) -> int:
        """The Infineon ``boot_swap_tables`` (a revert needs the secondary's magic unset)."""
        return swap_type_from_states(primary, secondary)

    def slots_compatible(self) -> bool:
        engine = self.engine()
        ok, secondary_ok = engine.read_sectors()
        engine.secondary_sectors_ok = secondary_ok
        return ok and engine.slots_compatible()

    def app_max_size(self) -> int:
        """The Infineon size check: header + payload + TLVs up to ``BOOT_WRITE_SZ * (sectors
        - 1)``; a larger image is erased before any swap."""
        write_sz = self.ctx.flash.write_align
        sectors = self.ctx.primary.size // self.ctx.flash.sector_size
        return write_sz * sectors - write_sz

    def read_status(self, bs: BootStatus) -> None:
        """``swap_read_status`` of this loader (a status it cannot read leaves ``bs`` reset, as
        the loader then does no swap)."""
        if self.engine().read_status(bs) != 0:
            bs.reset(self.reset_op)

    def read_status_bytes(self, area: AreaRef, bs: BootStatus) -> None:
        self.engine().read_status_bytes(_area_id(area), bs)

    def run(self, bs: BootStatus, copy_size: int) -> None:
        self.engine().swap_run(bs, copy_size)
        bs.use_scratch = False
