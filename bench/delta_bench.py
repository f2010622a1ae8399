"""Delta updates against full images: bytes on the wire and device CPU, for a real firmware.

Two builds of one small Cortex-M4 application, compiled here with Debian's
``arm-none-eabi-gcc`` (``-Os``, newlib-nano's ``snprintf``, a vector table, a few hundred
generated functions calling each other, a constant table and strings), differ by one change;
both are linked for an MCUboot slot (header 0x200) and signed with otakit (ECDSA P-256,
versions 1.0.0 and 1.1.0). Two changes:

- ``same-size``: one function's constant changes; no code moves;
- ``grows``: one function in the middle gains a few instructions, so every function after it
  moves and every call across it changes (the usual case, and the hard one for bsdiff).

For each change and compression (lzma, heatshrink, none): the delta's size next to the
full image's (and the 4 KiB ranged GETs each takes: bytes on the wire are the file's bytes
plus these requests), the server's CPU to make it, and the device's CPU to install it: the
delta applied by :func:`otakit.image.delta.apply_delta` from the primary slot of the flash
model (the nrf52840-swap-move preset) into the secondary slot through ``SlotStorage``, a
journal commit per 4 KiB, then the image verified (hash and signature); next to the same
storage written with the full image in 4 KiB ranges and verified; and the decoder alone (base
in memory, result discarded). CPU is
``time.process_time()``, the median of ``--repeat`` runs (the network is not part of either:
both start with the file's bytes in memory). The peak of Python allocations during an apply is
measured with ``tracemalloc`` in a separate run: it counts the flash model's sectors written
(allocated on first write) and Python's lzma module (whose liblzma allocations go through
Python's allocator, dictionary included), not heatshrink's C buffers.

Nothing is asserted; the ratios are printed (target of issue 20: at least 5x fewer bytes for a
one-function change).

Run: ``.venv/bin/python bench/delta_bench.py [--functions N] [--repeat N] [--results DIR]``
(about ten seconds). Prints a markdown table and writes ``DIR/delta.json`` (default
``bench/results/``). ``--smoke`` is the smallest run that goes through every step. Needs
``arm-none-eabi-gcc`` and newlib (``apt-get install gcc-arm-none-eabi
libnewlib-arm-none-eabi``); without them it says so and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from otakit.device.bootloader import Bootloader, BootloaderConfig  # noqa: E402
from otakit.device.flash import Flash  # noqa: E402
from otakit.device.flashmap import preset  # noqa: E402
from otakit.device.journal import Download, Journal  # noqa: E402
from otakit.device.storage import SlotStorage  # noqa: E402
from otakit.image.delta import COMPRESSIONS, apply_delta, create_delta  # noqa: E402
from otakit.image.header import ImageVersion  # noqa: E402
from otakit.image.keys import SigningKey  # noqa: E402
from otakit.image.sign import SignOptions, sign_image  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LAYOUT = "nrf52840-swap-move"
HEADER = 0x200
RANGE = 4096
KEY = SigningKey.generate("ecdsa-p256")
CC = "arm-none-eabi-gcc"
OBJCOPY = "arm-none-eabi-objcopy"


@dataclass
class Row:
    change: str
    compression: str
    full_bytes: int
    delta_bytes: int
    ratio: float  # full / delta
    full_ranges: int
    delta_ranges: int
    create_cpu_ms: float
    full_install_cpu_ms: float
    delta_install_cpu_ms: float
    apply_only_cpu_ms: float  # the decoder alone: base in memory, result discarded
    cpu_ratio: float  # delta install / full install
    apply_peak_python_kib: float


# --- the firmware --------------------------------------------------------------------------------

LINKER = """
MEMORY {
  FLASH (rx) : ORIGIN = 0x0000C200, LENGTH = 0x76000 - 0x200
  RAM (rwx)  : ORIGIN = 0x20000000, LENGTH = 256K
}
ENTRY(Reset_Handler)
SECTIONS {
  .text : {
    KEEP(*(.isr_vector))
    *(.text*) *(.rodata*)
    . = ALIGN(4);
  } > FLASH
  _sidata = LOADADDR(.data);
  .data : { _sdata = .; *(.data*) . = ALIGN(4); _edata = .; } > RAM AT > FLASH
  .bss : { _sbss = .; *(.bss*) *(COMMON) . = ALIGN(4); _ebss = .; } > RAM
  end = .;
  _estack = ORIGIN(RAM) + LENGTH(RAM);
}
"""


def source(functions: int, change: str | None) -> str:
    """The application's C source; ``change`` edits the function in the middle."""
    rng = random.Random(20)
    middle = functions // 2
    lines = [
        "#include <stdint.h>",
        "#include <stdio.h>",
        "#include <string.h>",
        "extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;",
        "int main(void);",
        "void Reset_Handler(void) {",
        "  uint32_t *s = &_sidata, *d = &_sdata;",
        "  while (d < &_edata) *d++ = *s++;",
        "  for (d = &_sbss; d < &_ebss;) *d++ = 0;",
        "  main();",
        "  for (;;) {}",
        "}",
        "void Default_Handler(void) { for (;;) {} }",
        '__attribute__((section(".isr_vector"), used)) void (*const vectors[64])(void) = {',
        "  (void (*)(void))&_estack, Reset_Handler,",
        *["  Default_Handler," for _ in range(62)],
        "};",
        "volatile uint32_t sink;",
        "char text[96];",
        "static const uint16_t table[2048] = {",
        ", ".join(str(rng.randrange(1 << 16)) for _ in range(2048)),
        "};",
    ]
    for i in range(functions):
        k = [rng.randrange(1, 1 << 12) for _ in range(4)]
        callee = f"f{rng.randrange(i)}(x ^ {k[3]}u)" if i else "x"
        body = rng.choice(
            [
                f"for (int j = 0; j < {k[0] % 13 + 2}; j++) x = (x << 3) ^ table[(x + j) & 2047]"
                f" ^ {k[1]}u;",
                f"switch (x & 7) {{ case 0: x += {k[0]}u; break; case 1: x ^= {k[1]}u; break; "
                f"case 2: x *= {k[2]}u; break; case 3: x -= table[x & 2047]; break; "
                "default: x = (x >> 1) | (x << 31); }",
                f"if (x > {k[0]}u) x = x / {k[1] % 97 + 3}u + {k[2]}u; else x = x * {k[1]}u;",
                f"x = (x * {k[0]}u + {k[1]}u) % {k[2] + 1000}u;",
            ]
        )
        extra = ""
        if i == middle and change == "same-size":
            body = body.replace(f"{k[1]}u", f"{k[1] ^ 0x5A5}u", 1)
        if i == middle and change == "grows":
            extra = " x ^= (x >> 7) * 2654435761u; sink = x;"
        lines.append(f"uint32_t f{i}(uint32_t x) {{ {body}{extra} return x + {callee}; }}")
    lines += [
        "uint32_t (*const handlers[])(uint32_t) = {",
        ", ".join(f"f{i}" for i in range(functions)),
        "};",
        "int main(void) {",
        "  uint32_t acc = 1;",
        "  for (;;) {",
        f"    for (unsigned i = 0; i < {functions}u; i++) acc += handlers[i](acc + i);",
        '    snprintf(text, sizeof text, "acc=%08lx ver=%s", (unsigned long)acc, "app");',
        "    sink = acc + strlen(text); }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def build(work: Path, name: str, functions: int, change: str | None) -> bytes:
    """Compile and link the application; its raw binary (the image payload)."""
    c, elf, binary = work / f"{name}.c", work / f"{name}.elf", work / f"{name}.bin"
    c.write_text(source(functions, change))
    (work / "app.ld").write_text(LINKER)
    cflags = ["-mcpu=cortex-m4", "-mthumb", "-Os", "-ffunction-sections", "-fdata-sections"]
    ldflags = ["-Wl,--gc-sections", "--specs=nano.specs", "--specs=nosys.specs", "-nostartfiles"]
    subprocess.run(
        [CC, *cflags, *ldflags, "-T", str(work / "app.ld"), "-o", str(elf), str(c)],
        check=True,
        capture_output=True,
    )
    subprocess.run([OBJCOPY, "-O", "binary", str(elf), str(binary)], check=True)
    return binary.read_bytes()


def signed(payload: bytes, version: str) -> bytes:
    options = SignOptions(ImageVersion.parse(version), header_size=HEADER, pad_header=True)
    return sign_image(payload, KEY, options)


# --- the device ----------------------------------------------------------------------------------


class Device:
    """A fresh flash model with ``base`` in the primary slot, and a journal on disk."""

    def __init__(self, base: bytes, journal: Path) -> None:
        fm = preset(LAYOUT)
        self.flash = Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align)
        self.boot = Bootloader(self.flash, fm, BootloaderConfig(keys=(KEY.public_key,)))
        self.boot.primary().write(0, base + b"\xff" * (-len(base) % fm.write_align))
        journal.unlink(missing_ok=True)
        self.storage = SlotStorage(
            self.boot, Journal(journal), (KEY.public_key,), current_version="1.0.0"
        )


def install_full(device: Device, image: bytes) -> None:
    storage = device.storage
    storage.open(Download(source="full", size=len(image)))
    for start in range(0, len(image), RANGE):
        storage.write(start, image[start : start + RANGE])
        storage.commit(min(start + RANGE, len(image)))
    storage.verify()


def install_delta(device: Device, patch: bytes, size: int) -> None:
    storage = device.storage
    storage.open(Download(source="delta", size=size))
    apply_delta(
        device.boot.primary(),
        patch,
        storage,
        progress=lambda done, _total: storage.commit(done),
    )
    storage.verify()


class _Discard:
    def write(self, offset: int, data: bytes) -> None:
        pass


def _decode(_device: Device, *, base: bytes, patch: bytes) -> None:
    apply_delta(base, patch, _Discard())


def cpu_ms(run: Callable[[Device], object], base: bytes, journal: Path, repeat: int) -> float:
    """Median CPU of ``run`` on a fresh device (made before the clock starts)."""
    times = []
    for _ in range(repeat):
        device = Device(base, journal)
        start = time.process_time()
        run(device)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1000


def measure(base: bytes, new: bytes, change: str, repeat: int, work: Path) -> list[Row]:
    journal = work / "journal.json"
    full_cpu = cpu_ms(functools.partial(install_full, image=new), base, journal, repeat)
    rows = []
    for compression in COMPRESSIONS:
        start = time.process_time()
        patch = create_delta(base, new, compression=compression)
        create = (time.process_time() - start) * 1000
        install = functools.partial(install_delta, patch=patch, size=len(new))
        delta_cpu = cpu_ms(install, base, journal, repeat)
        decode = functools.partial(_decode, base=base, patch=patch)
        apply_only = cpu_ms(decode, base, journal, repeat)
        device = Device(base, journal)
        tracemalloc.start()
        install_delta(device, patch, len(new))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append(
            Row(
                change=change,
                compression=compression,
                full_bytes=len(new),
                delta_bytes=len(patch),
                ratio=round(len(new) / len(patch), 2),
                full_ranges=-(-len(new) // RANGE),
                delta_ranges=-(-len(patch) // RANGE),
                create_cpu_ms=round(create, 2),
                full_install_cpu_ms=round(full_cpu, 2),
                delta_install_cpu_ms=round(delta_cpu, 2),
                apply_only_cpu_ms=round(apply_only, 2),
                cpu_ratio=round(delta_cpu / full_cpu, 2),
                apply_peak_python_kib=round(peak / 1024, 1),
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", type=int, default=1500, help="generated C functions")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where delta.json goes")
    parser.add_argument("--smoke", action="store_true", help="smallest run: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.functions, args.repeat = 60, 1
    missing = [tool for tool in (CC, OBJCOPY) if shutil.which(tool) is None]
    if missing:
        print(
            f"delta_bench needs {', '.join(missing)}: "
            "apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi",
            file=sys.stderr,
        )
        return 2
    rows: list[Row] = []
    create_delta(b"warm", b"up", whole_files=True)  # detools' import is not the first cell's
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_payload = build(work, "v1", args.functions, None)
        base = signed(base_payload, "1.0.0")
        for change in ("same-size", "grows"):
            new_payload = build(work, change, args.functions, change)
            changed = sum(a != b for a, b in zip(base_payload, new_payload, strict=False))
            print(
                f"{change}: payload {len(base_payload)} -> {len(new_payload)} bytes, "
                f"{changed + abs(len(new_payload) - len(base_payload))} bytes differ in place",
                file=sys.stderr,
            )
            rows += measure(base, signed(new_payload, "1.1.0"), change, args.repeat, work)
    print(
        "| change | compression | full B | delta B | full/delta | ranges full/delta "
        "| create ms | install ms full | install ms delta | delta/full CPU | apply only ms "
        "| apply peak KiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.change} | {r.compression} | {r.full_bytes} | {r.delta_bytes} | {r.ratio}x "
            f"| {r.full_ranges}/{r.delta_ranges} | {r.create_cpu_ms} | {r.full_install_cpu_ms} "
            f"| {r.delta_install_cpu_ms} | {r.cpu_ratio} | {r.apply_only_cpu_ms} "
            f"| {r.apply_peak_python_kib} |"
        )
    args.results.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": "delta",
        "layout": LAYOUT,
        "functions": args.functions,
        "repeat": args.repeat,
        "compiler": subprocess.run(
            [CC, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0],
        "base_sha256": hashlib.sha256(base).hexdigest(),
        "rows": [asdict(r) for r in rows],
    }
    (args.results / "delta.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
