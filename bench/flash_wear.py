"""Flash wear per upgrade, per strategy: erases and writes, in total and per sector, next to
MCUboot's own counts for the same update.

For every strategy (overwrite, swap-scratch, swap-move, swap-offset, swap-status), on a small
layout of its own and on the single-image presets that use it, an update is installed as an
otakit agent does (v1 running, v2 in the secondary slot, a test request), then booted:

- ``upgrade``: the boot that installs v2; ``revert``: the next boot, which swaps v1 back
  because v2 was never confirmed (not for overwrite, which cannot go back).
- otakit's counts come from its flash model: erases and writes per sector.
- MCUboot's come from its own code (the host harness of ``../shared/mcuboot-host``, built once
  into ``.cache/mcuboot-host``, see ``tests/mcuboot_host.py``) booting the same flash: its
  operation count, and per sector by cutting the power after 1, 2, ... operations and
  comparing consecutive flash contents. ``op by op`` says whether each of MCUboot's operations
  changed the sector(s) otakit's operation of the same number wrote or erased; if so, an
  operation that changed no byte (erasing an erased sector) counts where otakit's did,
  otherwise it is left out (``mcuboot_unseen_ops`` in the JSON). Runs of more than
  ``PER_SECTOR_LIMIT`` operations get the operation count only.
- ``same flash``: whether both left identical flash contents.

The reference for ``erases vs overwrite`` is an overwrite-only upgrade of the same image on
the same geometry (the least wear an upgrade can cost), as before.

Run: ``make bench`` (or ``.venv/bin/python bench/flash_wear.py [--results DIR]``). Prints a
markdown table of ratios and writes ``bench/results/flash_wear.json`` (or ``DIR/flash_wear.json``).
Without the harness the MCUboot columns say ``-``. A few seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.mcuboot_host: the harness build and runner

from tests.mcuboot_host import (  # noqa: E402
    HARNESS,
    HarnessError,
    McubootHost,
    build,
    flash_bytes,
    flash_from_bytes,
    mask_unset_bytes,
    small_layout_dict,
)

from otakit.device.bootloader import Bootloader, BootloaderConfig  # noqa: E402
from otakit.device.flash import Flash  # noqa: E402
from otakit.device.flashmap import PRESETS, FlashMap  # noqa: E402
from otakit.errors import OtakitError  # noqa: E402
from otakit.image.header import ImageVersion  # noqa: E402
from otakit.image.keys import SigningKey  # noqa: E402
from otakit.image.sign import SignOptions, sign_image  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KEY = SigningKey.generate("ecdsa-p256")
STRATEGIES = ("overwrite", "swap-scratch", "swap-move", "swap-offset", "swap-status")
PER_SECTOR_LIMIT = 600  # MCUboot operations up to which it is cut at every one (one run each)


@dataclass
class Wear:
    layout: str
    strategy: str
    scenario: str
    image_kib: int
    sectors_moved: int
    erases: int
    writes: int
    max_erases_per_sector: int
    erases_per_moved_sector: float
    erases_vs_overwrite: float | None = None
    ops: int = 0  # otakit's flash operations (a write = 1, an erased sector = 1)
    mcuboot_ops: int | None = None
    ops_vs_mcuboot: float | None = None
    mcuboot_erases: int | None = None  # from the per-operation cuts, when done
    mcuboot_writes: int | None = None
    mcuboot_unseen_ops: int | None = None
    mcuboot_max_erases_per_sector: int | None = None
    same_flash: bool | None = None
    op_by_op: bool | None = None  # each MCUboot operation changed what otakit's did
    first_mismatch: int | None = None  # index of the first operation that did not
    error: str | None = None  # otakit could not run this update
    sectors: dict[int, list[int]] = field(default_factory=dict)  # sector: [erases, writes]
    mcuboot_sectors: dict[int, list[int]] = field(default_factory=dict)


# --- layouts and images --------------------------------------------------------------------------


def _strategy_of(fm: FlashMap) -> str:
    return str(fm.strategy)


def layouts(*, smoke: bool = False) -> list[tuple[str, FlashMap]]:
    """(name, map): the small layout of each strategy, then (unless ``smoke``) the single-image
    presets."""
    out = [(f"small-{s}", FlashMap.from_dict(small_layout_dict(s))) for s in STRATEGIES]
    if not smoke:
        out += [(name, fm) for name, fm in PRESETS.items() if len(fm.images) == 1]
    return out


def _image(fm: FlashMap, version: str, size: int, strategy: str) -> bytes:
    payload = random.Random(f"{version}/{size}").randbytes(size)
    align = fm.write_align if fm.write_align <= 32 else 8
    options = SignOptions(
        ImageVersion.parse(version),
        pad_header=True,
        align=align,
        max_sectors=fm.max_sectors,
        overwrite_only=strategy == "overwrite",
    )
    image = sign_image(payload, KEY, options)
    return image + bytes([fm.erased_value]) * (-len(image) % fm.write_align)


def _sizes(fm: FlashMap) -> tuple[int, int]:
    """v1 and v2 sizes: a few sectors on a small layout, 20 and 36 KiB on a large one."""
    limit = fm.max_image_size(0)
    if fm.primary(0).size // fm.sector_size > 64:
        return min(limit // 2, 20 * 1024), min(limit * 3 // 4, 36 * 1024)
    unit = fm.sector_size
    return min(limit // 2, int(unit * 1.6)), min(limit * 3 // 4, int(unit * 2.7))


def _bootloader(fm: FlashMap, data: bytes) -> Bootloader:
    return Bootloader(flash_from_bytes(data, fm), fm, BootloaderConfig(keys=(KEY.public_key,)))


def _start(fm: FlashMap, strategy: str, v1: bytes, v2: bytes) -> bytes:
    """v1 running, v2 installed as an agent does, a test request."""
    boot = _bootloader(fm, b"")
    boot.primary(0).write(0, v1)
    slot = boot.secondary(0)
    slot.erase_all()
    slot.write(fm.image_offset(0), v2)
    boot.set_pending(0)
    return flash_bytes(boot.flash)


# --- MCUboot -------------------------------------------------------------------------------------


class Mcuboot:
    def __init__(self, host: McubootHost, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir

    def boot(self, fm: FlashMap, data: bytes, cut: int | None = None) -> tuple[int, bytes]:
        path = self.workdir / "flash.bin"
        path.write_bytes(data)
        result = self.host.run_map(fm, path, key_pems=[KEY.public_key.pem()], cut_after=cut)
        # swap-status: the bytes MCUboot writes from an uninitialised buffer (they differ from
        # run to run, tests/mcuboot_host.unset_bytes) read as otakit writes them
        return result.ops, mask_unset_bytes(fm, path.read_bytes())

    def operations(self, fm: FlashMap, data: bytes, ops: int) -> list[Op | None] | None:
        """MCUboot's operations, one by one, seen in the flash after 1, 2, ... operations: what
        each changed (None: nothing, e.g. an erase of an erased sector). None above
        PER_SECTOR_LIMIT operations (one harness run each)."""
        if ops > PER_SECTOR_LIMIT:
            return None
        seen: list[Op | None] = []
        size, erased = fm.sector_size, fm.erased_value
        before = data
        for n in range(1, ops + 1):
            after = self.boot(fm, data, cut=n)[1]
            touched = tuple(
                i // size
                for i in range(0, len(after), size)
                if after[i : i + size] != before[i : i + size]
            )
            if not touched:
                seen.append(None)
            else:
                # NOR programming never brings a byte back to the erased value, so a sector
                # that became all erased was erased; with replace writes either may have
                kind = "write"
                if len(touched) == 1:
                    sector = after[touched[0] * size : (touched[0] + 1) * size]
                    if sector.count(erased) == size:
                        kind = "erase" if fm.write_mode == "and" else "erase-or-write"
                seen.append(Op(kind, touched))
            before = after
        return seen


@dataclass(frozen=True)
class Op:
    kind: str  # "write", "erase" ("erase-or-write": a replace write can look like an erase)
    sectors: tuple[int, ...]

    def matches(self, other: Op) -> bool:
        kind = self.kind == other.kind or "erase-or-write" in (self.kind, other.kind)
        return kind and set(self.sectors) <= set(other.sectors)


def _record(flash: Flash) -> list[Op]:
    """Log every write and erased sector of ``flash`` (wraps the instance's methods)."""
    log: list[Op] = []
    write, erase, size = flash.write, flash.erase, flash.sector_size

    def logged_write(offset: int, data: bytes) -> None:
        done = flash.operations
        try:
            write(offset, data)
        finally:
            if flash.operations > done and data:
                sectors = range(offset // size, (offset + len(data) - 1) // size + 1)
                log.append(Op("write", tuple(sectors)))

    def logged_erase(offset: int, length: int) -> None:
        done = flash.operations
        try:
            erase(offset, length)
        finally:
            first = offset // size
            log.extend(Op("erase", (first + i,)) for i in range(flash.operations - done))

    flash.write = logged_write  # type: ignore[method-assign]
    flash.erase = logged_erase  # type: ignore[method-assign]
    return log


def _count(ops: Iterable[Op]) -> dict[int, list[int]]:
    sectors: dict[int, list[int]] = {}
    for op in ops:
        for index in op.sectors:
            sectors.setdefault(index, [0, 0])[0 if op.kind.startswith("erase") else 1] += 1
    return dict(sorted(sectors.items()))


def _mcuboot() -> tuple[Mcuboot | None, str]:
    if not (HARNESS / "host" / "build.sh").exists():
        return None, f"no MCUboot host harness at {HARNESS}"
    try:
        bin_dir = build()
    except (HarnessError, OSError) as exc:
        return None, f"the MCUboot host harness did not build: {exc}"
    workdir = Path(tempfile.mkdtemp(prefix="flash-wear-"))
    return Mcuboot(McubootHost(bin_dir), workdir), f"MCUboot host harness {bin_dir}"


# --- measuring -----------------------------------------------------------------------------------


def _measure(
    name: str, fm: FlashMap, scenario: str, mcuboot: Mcuboot | None, size_fm: FlashMap | None = None
) -> Wear:
    strategy = _strategy_of(fm)
    v1_size, v2_size = _sizes(size_fm or fm)
    v1 = _image(fm, "1.0.0", v1_size, strategy)
    v2 = _image(fm, "1.1.0", v2_size, strategy)
    moved = -(-len(v2) // fm.sector_size)
    row = Wear(name, strategy, scenario, v2_size // 1024, moved, 0, 0, 0, 0.0)
    try:
        start = _start(fm, strategy, v1, v2)
        if scenario == "revert":  # the upgrade was booted and never confirmed
            upgrade = _bootloader(fm, start)
            upgrade.boot()
            start = flash_bytes(upgrade.flash)
        boot = _bootloader(fm, start)
        log = _record(boot.flash)
        boot.boot()
    except OtakitError as exc:
        row.error = f"{exc.code}: {exc.message}"
        return row
    except Exception as exc:  # a strategy otakit does not implement (yet)
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    stats = boot.flash.stats
    row.erases, row.writes, row.ops = stats.erases, stats.writes, boot.flash.operations
    row.max_erases_per_sector = stats.max_erases
    row.erases_per_moved_sector = round(row.erases / moved, 2)
    row.sectors = {
        i: [s.erases, s.writes] for i, s in sorted(stats.sectors.items()) if s.erases or s.writes
    }
    if mcuboot is not None:
        try:
            ops, after = mcuboot.boot(fm, start)
        except HarnessError as exc:
            row.error = f"MCUboot: {str(exc).splitlines()[-1]}"
            return row
        row.mcuboot_ops = ops
        row.ops_vs_mcuboot = _ratio(row.ops, ops)
        row.same_flash = after == mask_unset_bytes(fm, flash_bytes(boot.flash))
        seen = mcuboot.operations(fm, start, ops)
        if seen is not None:
            row.mcuboot_unseen_ops = seen.count(None)
            mismatch = next(
                (
                    i
                    for i, op in enumerate(seen)
                    if op is not None and (i >= len(log) or not op.matches(log[i]))
                ),
                None,
            )
            row.op_by_op = mismatch is None and len(seen) == len(log)
            if row.op_by_op:  # an operation that changed nothing: the sector otakit's touched
                counted = [log[i] if op is None else op for i, op in enumerate(seen)]
            else:
                counted = [op for op in seen if op is not None]
                row.first_mismatch = mismatch
            sectors = _count(counted)
            row.mcuboot_sectors = sectors
            row.mcuboot_erases = sum(e for e, _ in sectors.values())
            row.mcuboot_writes = sum(w for _, w in sectors.values())
            row.mcuboot_max_erases_per_sector = max((e for e, _ in sectors.values()), default=0)
    return row


def _ratio(a: int, b: int | None) -> float | None:
    return None if not b else round(a / b, 2)


def _overwrite_reference(name: str, fm: FlashMap, mcuboot: Mcuboot | None) -> Wear | None:
    """An overwrite-only upgrade of the same image on the same geometry (None when the
    geometry does not suit overwrite-only)."""
    if _strategy_of(fm) == "overwrite":
        return None
    try:
        reference_map = fm.with_strategy("overwrite")
    except OtakitError:
        return None
    row = _measure(name, reference_map, "upgrade", mcuboot, size_fm=fm)
    return None if row.error is not None else row


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="folder for flash_wear.json (bench/results)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="the small layouts only (a check that it runs)"
    )
    args = parser.parse_args()
    mcuboot, source = _mcuboot()
    print(f"MCUboot counts: {source}", file=sys.stderr)
    rows: list[Wear] = []
    for name, fm in layouts(smoke=args.smoke):
        strategy = _strategy_of(fm)
        scenarios = ["upgrade"] if strategy == "overwrite" else ["upgrade", "revert"]
        measured = [_measure(name, fm, s, mcuboot) for s in scenarios]
        reference: Wear | None = measured[0]
        if strategy != "overwrite":
            reference = _overwrite_reference(name, fm, mcuboot)
            if reference is not None:
                measured.insert(0, reference)
        for row in measured:
            if reference is not None and reference.erases and row.error is None:
                row.erases_vs_overwrite = round(row.erases / reference.erases, 2)
        rows += measured
    columns: list[tuple[str, Callable[[Wear], Any]]] = [
        ("layout", lambda r: r.layout),
        ("strategy", lambda r: r.strategy),
        ("scenario", lambda r: r.scenario),
        ("image KiB", lambda r: r.image_kib),
        ("erases", lambda r: r.erases),
        ("writes", lambda r: r.writes),
        ("max erases/sector", lambda r: r.max_erases_per_sector),
        ("erases vs overwrite", lambda r: r.erases_vs_overwrite and f"{r.erases_vs_overwrite}x"),
        ("otakit ops", lambda r: r.ops),
        ("MCUboot ops", lambda r: r.mcuboot_ops),
        ("ops vs MCUboot", lambda r: r.ops_vs_mcuboot and f"{r.ops_vs_mcuboot}x"),
        ("MCUboot erases", lambda r: r.mcuboot_erases),
        ("MCUboot writes", lambda r: r.mcuboot_writes),
        ("MCUboot max erases/sector", lambda r: r.mcuboot_max_erases_per_sector),
        ("same flash", lambda r: r.same_flash),
        ("op by op", lambda r: r.op_by_op),
    ]
    print("| " + " | ".join(c for c, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        if r.error is not None:
            print(f"| {r.layout} | {r.strategy} | {r.scenario} | not run: {r.error} |")
            continue
        print("| " + " | ".join(_cell(get(r)) for _, get in columns) + " |")
    unseen = ", ".join(
        f"{r.layout}/{r.strategy}/{r.scenario} {r.mcuboot_unseen_ops}"
        for r in rows
        if r.mcuboot_unseen_ops
    )
    print(
        "\nMCUboot erases/writes: its flash after each of its operations (runs of up to "
        f"{PER_SECTOR_LIMIT} operations; '-' above). 'op by op': each operation changed what "
        "otakit's operation of the same number did; then an operation that changed no byte "
        "(erasing an erased sector, writing what is there) counts where otakit's did, else it "
        f"is left out. Such operations: {unseen or 'none'}."
    )
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "flash_wear.json"
    # rows otakit could not run are in the table above, not in the JSON (summary.py's input)
    done = [asdict(r) for r in rows if r.error is None]
    out.write_text(json.dumps(done, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
