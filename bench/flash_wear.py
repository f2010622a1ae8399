"""Flash wear per upgrade, per strategy: erases and writes, in total and per sector.

The reference, measured in the same run, is overwrite-only: it writes every moved sector once
and cannot go back, so it is the least wear an upgrade can cost. Swap-scratch pays for being able
to revert: each region is written three times (primary, secondary, scratch), and the scratch
area is erased once per region, which makes it the most-worn sector.

Run: ``make bench`` (or ``.venv/bin/python bench/flash_wear.py [--results DIR]``). Prints a
markdown table and writes ``bench/results/flash_wear.json`` (or ``DIR/flash_wear.json``). It
takes well under a second, so ``make test`` runs it as it is (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from otakit.device.bootloader import Bootloader, BootloaderConfig, Strategy
from otakit.device.flash import Flash
from otakit.device.flashmap import FlashMap, preset
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image

RESULTS = Path(__file__).parent / "results"
KEY = SigningKey.generate("ed25519")


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
    erases_vs_overwrite: float = 0.0


def _image(version: str, size: int) -> bytes:
    payload = random.Random(version).randbytes(size)
    image = sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))
    return image + b"\xff" * (-len(image) % 8)


def _measure(fm: FlashMap, strategy: Strategy, size: int, scenario: str) -> Wear:
    flash = Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align)
    boot = Bootloader(flash, fm, BootloaderConfig(strategy=strategy, keys=(KEY.public_key,)))
    boot.primary().write(0, _image("1.0.0", size))
    new = _image("1.1.0", size)
    secondary = boot.secondary()
    secondary.write(0, new)
    boot.set_pending()
    if scenario == "revert":
        boot.boot()  # upgrade on test, never confirmed
    flash.stats.sectors.clear()
    boot.boot()
    stats = flash.stats
    moved = -(-len(new) // fm.sector_size)
    erases = stats.erases
    return Wear(
        layout=fm.name,
        strategy=strategy.value,
        scenario=scenario,
        image_kib=size // 1024,
        sectors_moved=moved,
        erases=erases,
        writes=stats.writes,
        max_erases_per_sector=stats.max_erases,
        erases_per_moved_sector=round(erases / moved, 2),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="folder for flash_wear.json (bench/results)"
    )
    args = parser.parse_args()
    rows: list[Wear] = []
    for layout, size in (("sim-small", 12 * 1024), ("psoc6-2m-swap", 256 * 1024)):
        fm = preset(layout)
        reference = _measure(fm, Strategy.OVERWRITE, size, "upgrade")
        for strategy, scenario in (
            (Strategy.OVERWRITE, "upgrade"),
            (Strategy.SWAP_SCRATCH, "upgrade"),
            (Strategy.SWAP_SCRATCH, "revert"),
        ):
            row = (
                reference
                if strategy is Strategy.OVERWRITE
                else _measure(fm, strategy, size, scenario)
            )
            row.erases_vs_overwrite = round(row.erases / reference.erases, 2)
            rows.append(row)
    header = (
        "| layout | strategy | scenario | image KiB | sectors | erases | writes | "
        "max erases/sector | erases/sector | erases vs overwrite |"
    )
    print(header)
    print("|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r.layout} | {r.strategy} | {r.scenario} | {r.image_kib} | {r.sectors_moved} | "
            f"{r.erases} | {r.writes} | {r.max_erases_per_sector} | "
            f"{r.erases_per_moved_sector} | {r.erases_vs_overwrite}x |"
        )
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "flash_wear.json"
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
