"""The gateway model (protocols.md §7): firmware for an external MCU, kept in littlefs.

A gateway downloads the image of the MCU attached to it into a file of a littlefs file system on
its own external flash, checks the file's SHA-256, then programs the MCU through a pluggable
:class:`ExternalProgrammer`. What the gateway keeps in littlefs::

    /firmware.bin    the image, appended to as it arrives; its size is the durable byte count
    /progress.json   {"Downloading": "<v>", ...} while downloading, {"Completed": "<v>", ...}
                     once the SHA-256 matched; absent when no update is in progress

A download that is a multi-image TAR package (protocols.md §6; ``ustar`` at byte 257) is kept
the same way. Once its SHA-256 matched, :meth:`GatewayStorage.verify` reads it back from
littlefs with the hostile-input :class:`~otakit.image.package.PackageReader` (streamed, never
the whole file in memory) and :meth:`GatewayStorage.set_pending` hands every component, with
its MCUboot image index (NSPE 0, SPE 1), to :meth:`PackageProgrammer.program_package`. A bad
package is deleted and reported as error / "MCU Download fail" before anything is programmed.

littlefs is power-loss resilient: a file's new size and contents become visible atomically at
``sync`` (or ``close``), and a file written whole replaces the old one atomically. So after a
power cut the file holds exactly the bytes of the last successful :meth:`GatewayStorage.commit`
(or more), and ``progress.json`` is either the old or the new record, never a torn one. No
separate journal is needed: the download resumes with ``Range: bytes=<file size>-``.

:class:`LittleFsStore` runs the real littlefs (littlefs-python) on an otakit
:class:`~otakit.device.flash.Flash`, one littlefs block per flash sector, so the power cuts of
the flash model (torn writes and erases included) hit littlefs itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

from littlefs import LittleFSError, UserContext, lfs

from otakit.device.flash import Flash
from otakit.device.journal import Download, JournalRecord
from otakit.errors import (
    DowngradeError,
    FileOperationError,
    HashMismatchError,
    ImageTooLargeError,
    McuProgramError,
    OtakitError,
    UsageError,
)
from otakit.image.package import BLOCK_SIZE, MAX_FILES, PackageManifest, is_package, read_manifest
from otakit.protocol.fwinfo import ERRORS, STATES, FwError, FwStatus, GatewayStatus
from otakit.protocol.version import FirmwareVersion

if TYPE_CHECKING:
    from littlefs.lfs import LFSConfig

log = logging.getLogger("otakit.storage")


# --- littlefs on the flash model ---------------------------------------------------------------

LFS_ERR_IO = -5
LFS_ATTR_MAX = 1022  # littlefs' limit on inline data (and custom attributes)
CACHE_SIZE = 256
RESERVED_BLOCKS = 2  # kept free: copy-on-write of a file's last block, metadata compaction


class FlashBlockDevice(UserContext):
    """littlefs' block device callbacks mapped onto a :class:`Flash`: block ``b`` is sector ``b``.

    littlefs-python swallows an exception raised in a callback (it prints it and goes on), so a
    failed flash access is recorded in :attr:`fault` and answered with ``LFS_ERR_IO`` (a read
    answers erased bytes; its callback cannot fail); every later access fails the same way
    without touching the flash. :class:`LittleFsStore` re-raises the fault after the call.
    """

    def __init__(self, flash: Flash) -> None:  # no buffer: the base class would allocate one
        self.flash = flash
        self.block_size = flash.sector_size
        self.in_size = flash.size
        self.fault: Exception | None = None

    def read(self, cfg: LFSConfig, block: int, off: int, size: int) -> bytearray:
        if self.fault is None:
            try:
                return bytearray(self.flash.read(block * self.block_size + off, size))
            except Exception as exc:
                self.fault = exc
        return bytearray(b"\xff" * size)

    def prog(self, cfg: LFSConfig, block: int, off: int, data: bytes) -> int:
        if self.fault is None:
            try:
                self.flash.write(block * self.block_size + off, bytes(data))
                return 0
            except Exception as exc:
                self.fault = exc
        return LFS_ERR_IO

    def erase(self, cfg: LFSConfig, block: int) -> int:
        if self.fault is None:
            try:
                self.flash.erase(block * self.block_size, self.block_size)
                return 0
            except Exception as exc:
                self.fault = exc
        return LFS_ERR_IO

    def sync(self, cfg: LFSConfig) -> int:
        if self.fault is None:
            try:
                self.flash.flush()
                return 0
            except Exception as exc:
                self.fault = exc
        return LFS_ERR_IO

    def check(self) -> None:
        """Raise the recorded fault, if any (a :class:`PowerCut` above all)."""
        if self.fault is not None:
            raise self.fault


class AppendFile:
    """A littlefs file open for appending; what :meth:`write` adds is durable after :meth:`sync`."""

    def __init__(self, store: LittleFsStore, path: str) -> None:
        self._store = store
        self.path = path
        with store._io(f"open {path}"):
            self._fh: lfs.LFSFile | None = lfs.file_open(store._fs, path, "a")

    def _handle(self) -> lfs.LFSFile:
        if self._fh is None:
            raise FileOperationError(f"{self.path} is closed", value=self.path)
        return self._fh

    @property
    def size(self) -> int:
        """The file's size, bytes not yet synced included."""
        with self._store._io(f"size of {self.path}"):
            return lfs.file_size(self._store._fs, self._handle())

    def write(self, data: bytes) -> None:
        with self._store._io(f"write {len(data)} bytes to {self.path}"):
            lfs.file_write(self._store._fs, self._handle(), bytes(data))

    def sync(self) -> None:
        with self._store._io(f"sync {self.path}"):
            lfs.file_sync(self._store._fs, self._handle())

    def close(self) -> None:
        """Close (which syncs) the file; idempotent."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with self._store._io(f"close {self.path}"):
                lfs.file_close(self._store._fs, fh)


class LittleFsStore:
    """A littlefs file system on ``flash``: mounted, or formatted first when none is there.

    One block per flash sector; programs are ``flash.write_align`` bytes. A :class:`PowerCut`
    (or any other exception of the flash) during a littlefs call is raised out of that call;
    the store is then dead (every call raises it again): after ``flash.power_on()`` mount a new
    store on the same flash. A littlefs error is a :class:`FileOperationError`.
    """

    def __init__(self, flash: Flash, *, block_cycles: int = 500) -> None:
        self.flash = flash
        self.block_size = flash.sector_size
        self.block_count = flash.size // flash.sector_size
        if self.block_size < 128 or self.block_count < 4:
            raise UsageError(
                f"littlefs needs at least 4 blocks of 128 bytes; the flash has {self.block_count} "
                f"sectors of {self.block_size} bytes",
                value=flash.size,
            )
        prog = flash.write_align
        cache = max(prog, min(CACHE_SIZE, self.block_size))
        cache -= cache % prog
        while self.block_size % cache:
            cache -= prog
        self.inline_max = min(cache, LFS_ATTR_MAX, self.block_size // 8)
        self._device = FlashBlockDevice(flash)
        self._cfg = lfs.LFSConfig(
            self._device,
            block_size=self.block_size,
            block_count=self.block_count,
            read_size=prog,
            prog_size=prog,
            cache_size=cache,
            lookahead_size=max(8, -(-self.block_count // 64) * 8),
            block_cycles=block_cycles,
            inline_max=self.inline_max,
        )
        self._fs = lfs.LFSFilesystem()
        self.formatted = False
        try:
            with self._io("mount"):
                lfs.mount(self._fs, self._cfg)
        except FileOperationError:  # blank or foreign flash: first use
            with self._io("format"):
                lfs.format(self._fs, self._cfg)
            with self._io("mount"):
                lfs.mount(self._fs, self._cfg)
            self.formatted = True

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Run littlefs calls: flash faults are re-raised, littlefs errors become ours."""
        self._device.check()
        try:
            yield
        except LittleFSError as exc:
            self._device.check()
            raise FileOperationError(
                f"littlefs: {what} failed ({exc.name})", value=exc.code
            ) from None
        self._device.check()

    # --- files ---------------------------------------------------------------------------------

    def size(self, path: str) -> int | None:
        """The file's durable size, or None when it does not exist."""
        with self._io(f"stat {path}"):
            try:
                return lfs.stat(self._fs, path).size
            except LittleFSError as exc:
                if exc.code != LittleFSError.Error.LFS_ERR_NOENT:
                    raise
                return None

    def chunks(
        self, path: str, chunk: int = 4096, *, offset: int = 0, size: int | None = None
    ) -> Iterator[bytes]:
        """The file's contents, ``chunk`` bytes at a time; with ``offset`` and ``size`` only
        those bytes (fewer when the file ends first)."""
        with self._io(f"open {path}"):
            fh = lfs.file_open(self._fs, path, "r")
        try:
            if offset:
                with self._io(f"seek {path}"):
                    lfs.file_seek(self._fs, fh, offset, 0)  # SEEK_SET
            left = size
            while left is None or left > 0:
                step = chunk if left is None else min(chunk, left)
                with self._io(f"read {path}"):
                    data = lfs.file_read(self._fs, fh, step)
                if not data:
                    return
                if left is not None:
                    left -= len(data)
                yield data
        finally:
            with self._io(f"close {path}"):
                lfs.file_close(self._fs, fh)

    @contextmanager
    def stream(self, path: str) -> Iterator[BinaryIO]:
        """The file as a forward-only binary stream (for :class:`PackageReader`)."""
        raw = _LittleFsReader(self, path)
        try:
            yield io.BufferedReader(raw, buffer_size=4096)
        finally:
            raw.close()

    def read(self, path: str) -> bytes:
        return b"".join(self.chunks(path))

    def write_file(self, path: str, data: bytes) -> None:
        """Replace the file's contents with ``data``, atomically (littlefs commits at close)."""
        with self._io(f"write {path}"):
            fh = lfs.file_open(self._fs, path, "w")
            try:
                lfs.file_write(self._fs, fh, bytes(data))
            finally:
                lfs.file_close(self._fs, fh)

    def append(self, path: str) -> AppendFile:
        """Open ``path`` for appending (created empty when missing)."""
        if self.size(path) is None:
            self.write_file(path, b"")
        return AppendFile(self, path)

    def remove(self, path: str) -> None:
        """Remove the file; nothing happens when it does not exist."""
        with self._io(f"remove {path}"):
            try:
                lfs.remove(self._fs, path)
            except LittleFSError as exc:
                if exc.code != LittleFSError.Error.LFS_ERR_NOENT:
                    raise

    # --- space ---------------------------------------------------------------------------------

    def used_blocks(self) -> int:
        with self._io("fs_size"):
            return lfs.fs_size(self._fs)

    def free_blocks(self) -> int:
        return self.block_count - self.used_blocks()

    def blocks_for(self, size: int) -> int:
        """Blocks a file of ``size`` bytes takes: 0 inline, else its CTZ skip-list."""
        if size <= self.inline_max:
            return 0
        blocks, capacity = 1, self.block_size
        while capacity < size:
            # block i > 0 starts with ctz(i) + 1 back pointers of 4 bytes
            capacity += self.block_size - 4 * ((blocks & -blocks).bit_length())
            blocks += 1
        return blocks

    def capacity(self, blocks: int) -> int:
        """The largest file that fits in ``blocks`` blocks (none kept in reserve)."""
        if blocks <= 0:
            return self.inline_max
        return self.block_size + sum(
            self.block_size - 4 * ((i & -i).bit_length()) for i in range(1, blocks)
        )

    def unmount(self) -> None:
        with self._io("unmount"):
            lfs.unmount(self._fs)


class _LittleFsReader(io.RawIOBase):
    """A littlefs file open for reading, as a raw stream."""

    def __init__(self, store: LittleFsStore, path: str) -> None:
        super().__init__()
        self._store = store
        self._path = path
        with store._io(f"open {path}"):
            self._fh: lfs.LFSFile | None = lfs.file_open(store._fs, path, "r")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._fh is None:
            raise FileOperationError(f"{self._path} is closed", value=self._path)
        with self._store._io(f"read {self._path}"):
            data = lfs.file_read(self._store._fs, self._fh, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with self._store._io(f"close {self._path}"):
                lfs.file_close(self._store._fs, fh)
        super().close()


# --- programming the external MCU --------------------------------------------------------------


class ExternalProgrammer(Protocol):
    """Writes a verified image into the external MCU.

    Raises an :class:`~otakit.errors.OtakitError` when the MCU was not programmed: the gateway
    reports it as "MCU Download fail". :class:`CommandProgrammer` runs a flasher; the simulator's
    :class:`otakit.sim.programmer.SimMcuProgrammer` programs a simulated MCU. A programmer that
    can also install multi-image packages implements :class:`PackageProgrammer` as well.
    """

    def program(self, data: bytes, version: str) -> None: ...


@dataclass(frozen=True)
class PackageImage:
    """One component of a verified package, as the gateway hands it to the programmer.

    ``image`` is the MCUboot image index (0 for ``NSPE``, the application; 1 for ``SPE``, the
    secure image); ``name`` the member's file name (a plain name, checked by the package
    reader), ``size`` its bytes. :meth:`chunks` streams the bytes from the gateway's littlefs
    file (each call reads them again); :meth:`read` returns them whole.
    """

    image: int
    file_type: str
    name: str
    size: int
    source: Callable[[], Iterator[bytes]] = field(repr=False, compare=False)

    def chunks(self) -> Iterator[bytes]:
        return self.source()

    def read(self) -> bytes:
        return b"".join(self.chunks())


@runtime_checkable
class PackageProgrammer(ExternalProgrammer, Protocol):
    """A programmer that also installs multi-image packages (protocols.md §6).

    :meth:`program_package` gets every component of one package (in archive order) and the
    package's version, and installs them as one update: all of them or, when it raises an
    :class:`~otakit.errors.OtakitError`, as far as it can tell none. A programmer without it
    makes the gateway refuse packages ("MCU Download fail"); single images always go to
    :meth:`program`.
    """

    def program_package(self, images: Sequence[PackageImage], version: str) -> None: ...


class ReadableProgrammer(ExternalProgrammer, Protocol):
    """A programmer that can also read back what the MCU runs (a simulated MCU can)."""

    def running(self) -> FirmwareVersion | None:
        """The version the MCU runs, or None when it runs nothing."""
        ...


class CommandProgrammer:
    """Programs the MCU with an external tool (pyOCD, OpenOCD, a vendor flasher...).

    ``command`` is an argument list, run without a shell, in which ``{file}`` becomes the path
    of a temporary file holding the image and ``{version}`` its version, e.g.
    ``["pyocd", "flash", "-t", "nrf52840", "{file}"]``. Exit status 0 means programmed.

    The command runs once for a single image (the file is ``firmware.bin``) and once per
    component for a package (the file has the component's name), in archive order, stopping
    at the first failure. Each run gets in its environment:

    - ``OTAKIT_VERSION``: the version being installed (the package's for a component);
    - ``OTAKIT_IMAGE``: the MCUboot image index, 0 for a single image and for ``NSPE``, 1 for
      ``SPE``;
    - ``OTAKIT_FILE_TYPE``: ``NSPE`` or ``SPE`` (empty for a single image);
    - ``OTAKIT_FILE_NAME``: the component's name in the package (empty for a single image);
    - ``OTAKIT_PART`` and ``OTAKIT_PARTS``: this run's number from 1, and the number of runs
      (1 and 1 for a single image).
    """

    def __init__(self, command: Sequence[str], *, timeout: float = 600) -> None:
        if not command or not all(isinstance(arg, str) and arg for arg in command):
            raise UsageError(f"the programmer command must be a list of words, not {command!r}")
        self.command = tuple(command)
        self.timeout = timeout

    def program(self, data: bytes, version: str) -> None:
        self._run(
            "firmware.bin",
            iter((data,)),
            version,
            {"OTAKIT_IMAGE": "0", "OTAKIT_FILE_TYPE": "", "OTAKIT_FILE_NAME": ""},
            what="",
        )

    def program_package(self, images: Sequence[PackageImage], version: str) -> None:
        for number, part in enumerate(images, 1):
            env = {
                "OTAKIT_IMAGE": str(part.image),
                "OTAKIT_FILE_TYPE": part.file_type,
                "OTAKIT_FILE_NAME": part.name,
                "OTAKIT_PART": str(number),
                "OTAKIT_PARTS": str(len(images)),
            }
            what = (
                f"component {number} of {len(images)}, {part.name} "
                f"({part.file_type}, image {part.image}): "
            )
            name = part.name if _PLAIN_NAME_RE.fullmatch(part.name) else "component.bin"
            self._run(name, part.chunks(), version, env, what=what)

    def _run(
        self,
        name: str,
        chunks: Iterator[bytes],
        version: str,
        extra: dict[str, str],
        *,
        what: str,
    ) -> None:
        env = {**os.environ, "OTAKIT_VERSION": version, "OTAKIT_PART": "1", "OTAKIT_PARTS": "1"}
        env.update(extra)
        with tempfile.TemporaryDirectory(prefix="otakit-mcu-") as tmp:
            path = Path(tmp, name)
            with path.open("wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            args = [
                arg.replace("{file}", str(path)).replace("{version}", version)
                for arg in self.command
            ]
            try:
                done = subprocess.run(
                    args, capture_output=True, text=True, timeout=self.timeout, env=env
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise McuProgramError(f"{what}programmer {args[0]!r} did not run: {exc}") from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise McuProgramError(
                f"{what}programmer {args[0]!r} exited with status {done.returncode}"
                + (f": {lines[-1][:200]}" if lines else ""),
                value=done.returncode,
            )


_PLAIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


# --- the storage target ------------------------------------------------------------------------

DOWNLOADING = "Downloading"
COMPLETED = "Completed"
_SHA256_RE = re.compile(r"[0-9A-Fa-f]{64}")


@dataclass(frozen=True)
class _Progress:
    """The progress record: which download, and whether it is complete and verified."""

    stage: str  # DOWNLOADING or COMPLETED
    download: Download

    def to_json(self) -> bytes:
        fields = asdict(self.download)
        version = fields.pop("version")
        return json.dumps({self.stage: version, **fields}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _Progress | None:
        try:
            obj = json.loads(data)
            stage = COMPLETED if COMPLETED in obj else DOWNLOADING
            download = Download(
                source=str(obj.get("source", "")),
                size=int(obj["size"]),
                version=str(obj[stage]),
                etag=obj.get("etag"),
                sha256=obj.get("sha256"),
            )
            FirmwareVersion.parse(download.version)
        except (ValueError, KeyError, TypeError, AttributeError, OtakitError):
            return None
        return cls(stage, download) if download.size >= 0 else None

    def same(self, download: Download) -> bool:
        """Whether ``download`` continues this one. The URL is not compared: §7 URLs carry an
        expiring signature and change between attempts; version, size and SHA-256 name the image.
        """
        mine, theirs = self.download, download
        if mine.version != theirs.version or mine.size != theirs.size:
            return False
        return (mine.sha256 or "").lower() == (theirs.sha256 or "").lower()


class GatewayStorage:
    """The §7 download target: a file in littlefs, then the external MCU.

    ``current_version`` is the version the MCU runs; only strictly newer versions are accepted,
    and a successful :meth:`set_pending` makes the programmed version current. That version is
    kept in ``/installed.json``, so after a restart the gateway knows what the MCU runs even when
    the programmer cannot read it back; it wins over ``current_version`` when newer.
    """

    INSTALLED = "/installed.json"

    def __init__(
        self,
        store: LittleFsStore,
        *,
        current_version: str,
        programmer: ExternalProgrammer,
        file_name: str = "firmware.bin",
        progress_name: str = "progress.json",
    ) -> None:
        self.store = store
        installed = self._installed()
        if installed is not None and FirmwareVersion.parse(installed) > FirmwareVersion.parse(
            current_version
        ):
            current_version = installed
        self.current = FirmwareVersion.parse(current_version)
        self.current_version = current_version
        self.programmer = programmer
        self.file = "/" + file_name.lstrip("/")
        self.progress_file = "/" + progress_name.lstrip("/")
        self._download: Download | None = None
        self._append: AppendFile | None = None
        self._verified = False
        self._package: PackageManifest | None = None
        record = self._load()
        if record is not None and self._newer(record.download.version):
            self._status = GatewayStatus(FwStatus.INTERRUPTED)
        else:
            self._status = GatewayStatus(FwStatus.APPLIED, version=current_version)

    # --- reported state ------------------------------------------------------------------------

    def status(self) -> GatewayStatus:
        """The §7 reported state; ``status().to_dict()`` gives Status, Error (and Version)."""
        return self._status

    def mark(self, status: str, error: str = FwError.NONE) -> None:
        """Set the reported state for what only the caller knows (``interrupted`` with
        "Network Timeout", ``error`` with "Http Response > 400"...). Raises UsageError."""
        try:
            state, failure = FwStatus(status), FwError(error)
        except ValueError:
            raise UsageError(
                f"unknown gateway status {status!r} / error {error!r}; expected one of "
                f"{', '.join(STATES)} / {', '.join(ERRORS)}",
                value=(status, error),
            ) from None
        version = self.current_version if state is FwStatus.APPLIED else None
        self._status = GatewayStatus(state, failure, version)

    def _fail(self, state: FwStatus, error: FwError = FwError.NONE) -> None:
        self._status = GatewayStatus(state, error)

    # --- Storage -------------------------------------------------------------------------------

    def progress(self) -> JournalRecord | None:
        record = self._load()
        if record is None:
            return None
        if record.stage == COMPLETED:
            return JournalRecord(record.download, record.download.size)
        durable = min(self.store.size(self.file) or 0, record.download.size)
        return JournalRecord(record.download, durable)

    def open(self, download: Download) -> int:
        """Start or resume ``download``; return how many of its bytes are stored.

        Raises :class:`~otakit.errors.UsageError` (no valid SHA-256, bad version, empty image),
        :class:`~otakit.errors.DowngradeError` (not newer than the running version),
        :class:`~otakit.errors.ImageTooLargeError` (larger than the free space) or
        :class:`FileOperationError`.
        """
        self._check_request(download)
        try:
            self._close_append()
            record = self._load()
            stored = self.store.size(self.file)
            room = self._room(stored or 0)
            if download.size > room:
                self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
                raise ImageTooLargeError(
                    f"the image is {download.size} bytes, larger than the {room} bytes free in "
                    "the gateway's file system",
                    value=download.size,
                )
            self._download, self._verified, self._package = download, False, None
            self._status = GatewayStatus(FwStatus.DOWNLOADING)
            if record is not None and record.same(download):
                if record.stage == COMPLETED and stored == download.size:
                    return download.size  # verify only
                if record.stage == DOWNLOADING and (stored or 0) <= download.size:
                    log.info("resuming %s at byte %d of %d", self.file, stored or 0, download.size)
                    return stored or 0
            # Another image: the old file goes first, so a record never describes foreign bytes.
            self.store.remove(self.file)
            self.store.write_file(self.progress_file, _Progress(DOWNLOADING, download).to_json())
            self.store.write_file(self.file, b"")
            return 0
        except FileOperationError:
            self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
            raise

    def write(self, offset: int, data: bytes) -> None:
        """Append ``data``, which must start where the file ends. Raises UsageError or
        FileOperationError."""
        download = self._opened()
        try:
            if self._append is None:
                self._append = self.store.append(self.file)
            size = self._append.size
            if offset != size:
                raise UsageError(
                    f"write at offset {offset}, but the gateway file ends at {size}: "
                    "it can only be appended to",
                    value=offset,
                )
            if offset + len(data) > download.size:
                raise UsageError(
                    f"write of {len(data)} bytes at {offset} goes past the "
                    f"{download.size}-byte image",
                    value=offset,
                )
            self._append.write(data)
        except FileOperationError:
            self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
            raise

    def commit(self, end: int) -> None:
        """Sync the file: littlefs makes its new size durable (the resumption point)."""
        self._opened()
        if self._append is None:
            return
        try:
            self._append.sync()
        except FileOperationError:
            self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
            raise

    @property
    def package(self) -> PackageManifest | None:
        """The checked manifest when :meth:`verify` found a multi-image package, else None."""
        return self._package

    def verify(self) -> str:
        """Check the stored file's SHA-256; return the version.

        On a mismatch the file and the progress record are deleted and
        :class:`~otakit.errors.HashMismatchError` is raised. A file that is a TAR package is
        then read through and checked (:func:`~otakit.image.package.read_manifest`); a bad
        package, or a programmer that cannot install packages, is deleted too, the status
        becomes error / "MCU Download fail" and the
        :class:`~otakit.errors.PackageError` (or :class:`~otakit.errors.McuProgramError`) is
        raised. On success the record becomes ``{"Completed": version}``.
        """
        download = self._opened()
        assert download.sha256 is not None  # checked by open()
        self._package = None
        try:
            self._close_append()
            digest, size, head = hashlib.sha256(), 0, b""
            for chunk in self.store.chunks(self.file):
                digest.update(chunk)
                size += len(chunk)
                if len(head) < BLOCK_SIZE:
                    head += chunk[: BLOCK_SIZE - len(head)]
            actual = digest.hexdigest().upper()
            if size != download.size or actual != download.sha256.upper():
                self._delete()
                self._download = None
                self._fail(FwStatus.ERROR, FwError.SHA256_VERIFY_FAIL)
                raise HashMismatchError(
                    f"the downloaded file ({size} of {download.size} bytes) has SHA-256 "
                    f"{actual}, not {download.sha256.upper()}; deleted",
                    value=actual,
                )
            if is_package(head):
                self._package = self._check_package(download)
            self.store.write_file(self.progress_file, _Progress(COMPLETED, download).to_json())
        except FileOperationError:
            self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
            raise
        self._verified = True
        return download.version

    def _check_package(self, download: Download) -> PackageManifest:
        """Read the stored package through; a bad one is deleted and raised (see verify)."""
        try:
            if not isinstance(self.programmer, PackageProgrammer):
                raise McuProgramError(
                    f"the download is a multi-image package and the programmer "
                    f"({type(self.programmer).__name__}) cannot install packages",
                    value=download.version,
                )
            with self.store.stream(self.file) as stream:
                manifest = read_manifest(stream, max_files=MAX_FILES)
        except FileOperationError:
            raise
        except OtakitError as exc:
            self._delete()
            self._download = None
            self._fail(FwStatus.ERROR, FwError.MCU_DOWNLOAD_FAIL)
            exc.message = f"the package was refused and deleted: {exc.message}"
            exc.args = (exc.message,)
            raise
        log.info(
            "the download is a package %s: %s",
            manifest.version,
            ", ".join(
                f"{c.name} ({c.file_type}, image {c.image_index}, {c.size} bytes)"
                for c in manifest.components
            ),
        )
        return manifest

    def set_pending(self, *, permanent: bool) -> None:
        """Program the MCU with the verified file (verified first if it was not), then delete it
        and make its version current. ``permanent`` is moot: the MCU is programmed for good.

        A programmer failure leaves the file and its ``Completed`` record (:meth:`abort` removes
        them), sets the status to error / "MCU Download fail" and is raised.
        """
        download = self._opened()
        if not self._verified:
            self.verify()
        self._status = GatewayStatus(FwStatus.APPLYING)
        if self._package is not None:
            self._program_package(self._package, download.version)
        else:
            try:
                data = self.store.read(self.file)
            except FileOperationError:
                self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
                raise
            log.info("programming the MCU with %s (%d bytes)", download.version, len(data))
            try:
                self.programmer.program(data, download.version)
            except OtakitError:
                self._fail(FwStatus.ERROR, FwError.MCU_DOWNLOAD_FAIL)
                raise
        self.current = FirmwareVersion.parse(download.version)
        self.current_version = download.version
        self._status = GatewayStatus(FwStatus.APPLIED, version=download.version)
        self._download, self._verified, self._package = None, False, None
        try:
            self.store.write_file(
                self.INSTALLED, json.dumps({"Version": download.version}).encode()
            )
            self._delete()
        except FileOperationError:
            # The MCU is updated; the stale file goes with the next download.
            self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
            raise

    def _program_package(self, manifest: PackageManifest, version: str) -> None:
        """Hand every component, streamed from the file, to the programmer."""
        assert isinstance(self.programmer, PackageProgrammer)  # checked by verify()
        images = tuple(
            PackageImage(
                image=c.image_index,
                file_type=c.file_type,
                name=c.name,
                size=c.size,
                source=self._member(c.offset or 0, c.size),
            )
            for c in manifest.components
        )
        log.info("programming the MCU with package %s (%d images)", version, len(images))
        try:
            self.programmer.program_package(images, version)
        except FileOperationError:
            self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
            raise
        except OtakitError:
            self._fail(FwStatus.ERROR, FwError.MCU_DOWNLOAD_FAIL)
            raise

    def _member(self, offset: int, size: int) -> Callable[[], Iterator[bytes]]:
        return lambda: self.store.chunks(self.file, offset=offset, size=size)

    def abort(self) -> None:
        """Remove the file and the progress record."""
        self._download, self._verified, self._package = None, False, None
        if self._status.status is FwStatus.DOWNLOADING:
            self._status = GatewayStatus(FwStatus.INTERRUPTED)
        try:
            self._close_append()
            self._delete()
        except FileOperationError:
            self._fail(FwStatus.ERROR, FwError.FILE_OPERATION_FAIL)
            raise

    # --- internals -----------------------------------------------------------------------------

    def _check_request(self, download: Download) -> None:
        try:
            if not download.sha256 or not _SHA256_RE.fullmatch(download.sha256):
                raise UsageError(
                    "the gateway model needs the image's SHA-256 (64 hex digits), "
                    f"got {download.sha256!r}",
                    value=download.sha256,
                )
            if download.size <= 0:
                raise UsageError(f"image size {download.size} is not positive", value=download.size)
            if not self._newer(download.version):
                raise DowngradeError(
                    f"version {download.version} is not newer than the running "
                    f"{self.current_version}: versions only go up",
                    value=download.version,
                )
        except OtakitError:
            self._fail(FwStatus.INVALID)
            raise

    def _newer(self, version: str) -> bool:
        """Whether ``version`` is strictly newer than the current one; raises VersionFormatError."""
        return FirmwareVersion.parse(version) > self.current

    def _room(self, stored: int) -> int:
        """The largest image the file system can take, the present file counted as free."""
        blocks = self.store.free_blocks() + self.store.blocks_for(stored) - RESERVED_BLOCKS
        return self.store.capacity(blocks)

    def _opened(self) -> Download:
        if self._download is None:
            raise UsageError("no download is open: call open() first")
        return self._download

    def _installed(self) -> str | None:
        """The version recorded by the last programming, if it is readable and well formed."""
        if self.store.size(self.INSTALLED) is None:
            return None
        try:
            version = json.loads(self.store.read(self.INSTALLED))["Version"]
            FirmwareVersion.parse(version)
        except (ValueError, KeyError, TypeError, OtakitError):
            return None
        return str(version)

    def _load(self) -> _Progress | None:
        if self.store.size(self.progress_file) is None:
            return None
        return _Progress.from_json(self.store.read(self.progress_file))

    def _close_append(self) -> None:
        if self._append is not None:
            append, self._append = self._append, None
            append.close()

    def _delete(self) -> None:
        self.store.remove(self.progress_file)
        self.store.remove(self.file)
