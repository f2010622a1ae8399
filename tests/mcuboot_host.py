"""MCUboot's own bootloader code as the judge: the host harness of ``../shared/mcuboot-host``.

The harness (``host/README.md`` there) builds MCUboot's ``boot/bootutil`` with gcc into one
Linux program per swap mode; each runs ``boot_go()`` once over a flash image file, with power
cuts after any flash operation, and prints one JSON line.

This module builds it once per machine into the project's cache folder
(``.cache/mcuboot-host/<hash>``, gitignored; ``../shared`` is read-only in CI, so nothing is
ever built there) and runs it:

- :func:`get_host` builds every mode and both signature variants (about 10 s of wall time, 15 s
  of CPU) unless a finished build of the same sources is there: the build folder is named after
  a SHA-256 of every harness and MCUboot source file, the compiler's version and the build
  settings, and a ``stamp`` file written last marks it complete. A file lock serialises the
  build between pytest processes; the second one waits and reuses it.
- :meth:`McubootHost.run` runs one binary over a flash file and parses its JSON line into a
  :class:`HostResult`. :func:`map_args` derives the geometry arguments from an otakit
  :class:`~otakit.device.flashmap.FlashMap` (the harness takes offsets from the start of the
  file, which are otakit's flash offsets).
- otakit's :class:`~otakit.device.flash.FileBacking` file is the harness's flash file byte for
  byte: :func:`save_flash` writes any otakit Flash to a file, :func:`load_flash` reads a file
  back into an in-memory Flash.

Without ``../shared/mcuboot-host`` the tests that need it are skipped, except under
``CI=true``, where a missing harness is a failure. ``MCUBOOT_HOST_DIR`` points elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otakit.device.flash import Flash, MemoryBacking
from otakit.device.flashmap import FlashMap

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(os.environ.get("MCUBOOT_HOST_DIR", ROOT.parent / "shared" / "mcuboot-host"))
CACHE = ROOT / ".cache" / "mcuboot-host"
MODES = ("overwrite", "swap-scratch", "swap-move", "swap-offset", "swap-status")
SIGS = ("ecdsa-p256", "ed25519")
BUILD_TIMEOUT = 900  # seconds; about 10 s on an idle 2-core machine
RUN_TIMEOUT = 120


class HarnessError(Exception):
    """The harness refused its arguments or could not read/write the flash file (exit 2)."""


@dataclass(frozen=True)
class HostResult:
    """One ``boot_go()``: the harness's JSON line."""

    rc: int  # 0 boot_go() succeeded, 1 it did not, -1 power cut
    booted: bool
    cut: bool
    ops: int  # flash operations done (a write call = 1, one erased sector = 1)
    slot: str | None  # "primary", "secondary", ... area of the image it would start
    version: str | None  # "1.2.3+4" of the image it would start
    image_off: int | None  # flash offset of that image
    raw: dict[str, Any]


def binary_name(mode: str, *, ed25519: bool = False) -> str:
    return f"mcuboot-host-{mode}" + ("-ed25519" if ed25519 else "")


def source_hash() -> str:
    """SHA-256 over every harness/MCUboot file (path and content), gcc's version and settings."""
    h = hashlib.sha256()
    for path in sorted(p for p in HARNESS.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(HARNESS)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    cc = os.environ.get("CC", "gcc")
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        version = "no compiler"
    h.update(f"{cc}\0{version}\0{' '.join(MODES)}\0{' '.join(SIGS)}".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(cache: Path = CACHE) -> Path:
    """The ``bin`` folder of a complete build of the current sources (building it if needed)."""
    digest = source_hash()
    out = cache / digest[:16]
    stamp = out / "stamp"
    with _locked(cache / ".lock"):
        if stamp.exists() and stamp.read_text().strip() == digest:
            return out / "bin"
        shutil.rmtree(out, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if k not in ("MODES", "SIGS", "CFLAGS_EXTRA")}
        env |= {"MODES": " ".join(MODES), "SIGS": " ".join(SIGS)}
        proc = subprocess.run(
            ["bash", str(HARNESS / "host" / "build.sh"), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        missing = [
            binary_name(m, ed25519=e)
            for m in MODES
            for e in (False, True)
            if not (out / "bin" / binary_name(m, ed25519=e)).exists()
        ]
        if proc.returncode != 0 or missing:
            raise HarnessError(
                f"building the MCUboot host harness failed (exit {proc.returncode}, missing "
                f"{missing}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        stamp.write_text(digest + "\n")
        for old in cache.iterdir():  # earlier builds of other sources
            if old.is_dir() and old != out:
                shutil.rmtree(old, ignore_errors=True)
        return out / "bin"


Area = tuple[int, int]  # (offset from the start of the flash file, size)


class McubootHost:
    """The built harness binaries."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self._keys = bin_dir.parent / "keys"
        self._keys.mkdir(exist_ok=True)

    def binary(self, mode: str, *, ed25519: bool = False) -> Path:
        path = self.bin_dir / binary_name(mode, ed25519=ed25519)
        if not path.exists():
            raise HarnessError(f"no harness binary {path}")
        return path

    def key_file(self, pem: bytes | str | os.PathLike[str]) -> Path:
        """A file holding ``pem`` (a path is used as it is)."""
        if not isinstance(pem, bytes):
            return Path(pem)
        path = self._keys / f"{hashlib.sha256(pem).hexdigest()[:24]}.pem"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self._keys)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.replace(tmp, path)
        return path

    def argv(
        self,
        mode: str,
        flash_path: str | os.PathLike[str],
        *,
        key_pems: Sequence[bytes | str | os.PathLike[str]],
        primary: Area,
        secondary: Area,
        scratch: Area | None = None,
        status: Area | None = None,
        sector: int,
        align: int,
        erased: int,
        max_sectors: int,
        write_mode: str = "and",
        cut_after: int | None = None,
        torn: bool = False,
        ed25519: bool = False,
        log: int | None = None,
    ) -> list[str]:
        argv = [str(self.binary(mode, ed25519=ed25519)), "--flash", str(flash_path)]
        for pem in key_pems:
            argv += ["--key", str(self.key_file(pem))]
        named = {"primary": primary, "secondary": secondary, "scratch": scratch, "status": status}
        for name, area in named.items():
            if area is not None:
                argv += [f"--{name}", f"0x{area[0]:x}:0x{area[1]:x}"]
        argv += ["--sector", str(sector), "--align", str(align), "--erased", f"0x{erased:02x}"]
        argv += ["--max-sectors", str(max_sectors), "--write-mode", write_mode]
        if cut_after is not None:
            argv += ["--cut-after", str(cut_after)]
            if torn:
                argv.append("--torn")
        if log is not None:
            argv += ["--log", str(log)]
        return argv

    def run(
        self,
        mode: str,
        flash_path: str | os.PathLike[str],
        *,
        key_pems: Sequence[bytes | str | os.PathLike[str]],
        primary: Area,
        secondary: Area,
        scratch: Area | None = None,
        status: Area | None = None,
        sector: int,
        align: int,
        erased: int,
        max_sectors: int,
        write_mode: str = "and",
        cut_after: int | None = None,
        torn: bool = False,
        ed25519: bool = False,
        log: int | None = None,
    ) -> HostResult:
        """Run ``boot_go()`` once over ``flash_path`` (rewritten in place) and parse the result.

        Raises:
            HarnessError: the harness exited 2 (bad arguments, unreadable file) or printed
                no JSON line.
        """
        argv = self.argv(
            mode,
            flash_path,
            key_pems=key_pems,
            primary=primary,
            secondary=secondary,
            scratch=scratch,
            status=status,
            sector=sector,
            align=align,
            erased=erased,
            max_sectors=max_sectors,
            write_mode=write_mode,
            cut_after=cut_after,
            torn=torn,
            ed25519=ed25519,
            log=log,
        )
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 2 or not lines:
            raise HarnessError(
                f"{' '.join(argv)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
            )
        raw = json.loads(lines[-1])
        return HostResult(
            rc=int(raw["rc"]),
            booted=bool(raw["booted"]),
            cut=bool(raw["cut"]),
            ops=int(raw["ops"]),
            slot=raw.get("slot"),
            version=raw.get("version"),
            image_off=raw.get("image_off"),
            raw=raw,
        )

    def run_map(
        self,
        flashmap: FlashMap,
        flash_path: str | os.PathLike[str],
        *,
        key_pems: Sequence[bytes | str | os.PathLike[str]],
        cut_after: int | None = None,
        torn: bool = False,
        ed25519: bool = False,
        mode: str | None = None,
        image: int = 0,
        log: int | None = None,
    ) -> HostResult:
        """:meth:`run` with the arguments of ``flashmap`` (:func:`map_args`)."""
        args = map_args(flashmap, image)
        chosen = args.pop("mode") if mode is None else mode
        args.pop("mode", None)
        return self.run(
            chosen,
            flash_path,
            key_pems=key_pems,
            cut_after=cut_after,
            torn=torn,
            ed25519=ed25519,
            log=log,
            **args,
        )


def _value(obj: object, name: str, default: Any) -> Any:
    value = getattr(obj, name, default)
    return getattr(value, "value", value)  # an enum member: its string


def map_args(flashmap: FlashMap, image: int = 0) -> dict[str, Any]:
    """The harness arguments (``mode`` and geometry) for ``image`` of ``flashmap``.

    The mode is the map's ``strategy``; ``--status`` (the swap status partition) is passed only
    in swap-status mode (the other binaries refuse it), ``--scratch`` whenever the map has one.
    """
    scratch = flashmap.scratch
    mode = str(_value(flashmap, "strategy", "swap-scratch" if scratch else "overwrite"))
    primary, secondary = flashmap.primary(image), flashmap.secondary(image)
    status = flashmap.status(image) if mode == "swap-status" else None
    return {
        "mode": mode,
        "primary": (primary.offset, primary.size),
        "secondary": (secondary.offset, secondary.size),
        "scratch": None if scratch is None else (scratch.offset, scratch.size),
        "status": None if status is None else (status.offset, status.size),
        "sector": flashmap.sector_size,
        "align": flashmap.write_align,
        "erased": int(_value(flashmap, "erased_value", 0xFF)),
        "max_sectors": flashmap.max_sectors,
        "write_mode": str(_value(flashmap, "write_mode", "and")),
    }


# --- layouts -----------------------------------------------------------------------------------


def small_layout_dict(strategy: str, *, erased: int = 0xFF) -> dict[str, Any]:
    """A small single-image layout for ``strategy`` (every cut point is tried on it)."""
    if strategy == "swap-status":
        # PSoC 6 internal flash as MCUBootApp sees it: 512-byte rows written whole (replace),
        # erased to 0x00; scratch and status partition as swap_status.h sizes them
        row = 0x200
        slot = 24 * row
        flash = {"size": "0x10000", "sector_size": hex(row), "write_align": row}
        flash |= {"max_sectors": 32, "erased_value": "0x00", "write_mode": "replace"}
        areas = [
            ("bootloader", None, 0, 0x1000),
            ("primary", 0, 0x1000, slot),
            ("secondary", 0, 0x1000 + slot, slot),
            ("scratch", None, 0x1000 + 2 * slot, 0x1000),
            ("status", 0, 0x2000 + 2 * slot, 0x1800),
        ]
    else:
        sector = 0x1000
        primary, secondary = 5, 5
        if strategy == "swap-move":
            primary = 6
        if strategy == "swap-offset":
            secondary = 6
        flash = {"size": "0x10000", "sector_size": hex(sector), "write_align": 8}
        flash |= {"max_sectors": 16, "erased_value": hex(erased), "write_mode": "and"}
        areas = [
            ("bootloader", None, 0, sector),
            ("primary", 0, sector, primary * sector),
            ("secondary", 0, (1 + primary) * sector, secondary * sector),
        ]
        if strategy == "swap-scratch":
            areas.append(("scratch", None, (1 + primary + secondary) * sector, sector))
    return {
        "name": f"cross-{strategy}" + ("" if erased == 0xFF else "-00"),
        "strategy": strategy,
        "flash": flash,
        "areas": [
            {"name": n, "address": hex(a), "size": hex(s)} | ({} if i is None else {"image": i})
            for n, i, a, s in areas
        ],
    }


# --- flash files ---------------------------------------------------------------------------------


def save_flash(flash: Flash, path: str | os.PathLike[str]) -> None:
    """Write the whole of ``flash`` to ``path`` (the harness's flash file, byte for byte).

    Reads through the backing-independent :meth:`Flash.read`; the read counters it bumps are
    not wear.
    """
    Path(path).write_bytes(flash_bytes(flash))


def flash_bytes(flash: Flash) -> bytes:
    """Every byte of ``flash``, as the harness's flash file holds them."""
    return flash.read(0, flash.size)


def load_flash(path: str | os.PathLike[str], flashmap: FlashMap) -> Flash:
    """An in-memory otakit Flash of ``flashmap``'s geometry holding the bytes of ``path``."""
    return flash_from_bytes(Path(path).read_bytes(), flashmap)


def flash_from_bytes(data: bytes, flashmap: FlashMap) -> Flash:
    """An in-memory otakit Flash of ``flashmap``'s geometry holding ``data`` (its operation
    and wear counters at zero)."""
    erased = int(_value(flashmap, "erased_value", 0xFF))
    if len(data) < flashmap.flash_size:
        data += bytes([erased]) * (flashmap.flash_size - len(data))
    backing = MemoryBacking(flashmap.flash_size, flashmap.sector_size, erased)
    backing.write(0, data[: flashmap.flash_size])
    new_flash = getattr(flashmap, "new_flash", None)
    if new_flash is not None:
        flash: Flash = new_flash(backing=backing)
        return flash
    return Flash(
        flashmap.flash_size, flashmap.sector_size, write_align=flashmap.write_align, backing=backing
    )


# --- the fixture ---------------------------------------------------------------------------------

_HOST: McubootHost | None = None


def get_host() -> McubootHost:
    """The built harness; skip (fail under ``CI=true``) when it is absent, fail when it does
    not build."""
    global _HOST
    if _HOST is not None:
        return _HOST
    if not (HARNESS / "host" / "build.sh").exists():
        message = f"the MCUboot host harness is not at {HARNESS} (set MCUBOOT_HOST_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        _HOST = McubootHost(build())
    except (HarnessError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(str(exc))
    return _HOST


@pytest.fixture(scope="session")
def mcuboot_host() -> McubootHost:
    """MCUboot's bootloader, built once (see :func:`get_host`)."""
    return get_host()


TRAILER_ROW_USED = 48  # the bytes of swap_status_to_image_trailer's row MCUboot fills in


def unset_bytes(flashmap: FlashMap, image: int = 0) -> slice | None:
    """swap-status: the part of the primary slot's last trailer row that MCUboot writes from an
    uninitialised buffer (``swap_status_to_image_trailer``: a write-size multiple of which only
    the last 48 bytes are set; the rest is whatever its stack held, different from run to run,
    where otakit writes the erased value). None for the other strategies."""
    if str(flashmap.strategy) != "swap-status":
        return None
    align = flashmap.write_align
    row = -(-TRAILER_ROW_USED // align) * align
    end = flashmap.primary(image).end
    return slice(end - row, end - TRAILER_ROW_USED) if row > TRAILER_ROW_USED else None


def mask_unset_bytes(flashmap: FlashMap, data: bytes) -> bytes:
    """``data`` (a whole flash) with the :func:`unset_bytes` of every image set to zero."""
    out = bytearray(data)
    for image in flashmap.images:
        garbage = unset_bytes(flashmap, image)
        if garbage is not None:
            out[garbage] = bytes(garbage.stop - garbage.start)
    return bytes(out)
