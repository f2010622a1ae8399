"""The device agent's own cost: CPU seconds and peak memory per MiB downloaded, next to curl.

The real agent (``otakit.device.agent.update_once`` with ``HttpTransport`` and ``UpdateStorage``)
updates a simulated device against ``otakit serve`` (SQLite, one worker, started here) through
the original job flow: ``GET /ota_update.json`` with the device's token, board and version
checks, ``Range`` requests of ``chunk`` bytes on the job's file
(``/devices/{serial}/files/{id}/{name}``), each written to the secondary slot of an in-memory
flash and committed to a memory journal, then the image verified (SHA-256 and ECDSA-P256
signature, version newer), marked pending (TEST) and the result posted. Images: a signed 1 MiB
and 8 MiB payload; chunks: 4 KiB (the original middleware's default), 64 KiB and 1 MiB.

Each (image, chunk) cell runs the agent in a fresh child process, so that its numbers are its
own: ``time.process_time()`` around ``update_once`` (the server is another process and is not
counted), the median of ``--repeat`` updates, split into the storage target (flash model
writes, journal commits), verification and the rest (HTTP client, job, loop, result); the
process's peak RSS before and after its first update (RSS growth); and, in one more update with
``tracemalloc`` on, the peak of Python allocations during the update (and per agent state). The
flash is one ``bytearray`` allocated before measuring, so neither memory figure counts the
simulated flash itself. The child warms up first (a job fetch, one range, the verification of a
small image), so lazy imports are not counted.

Reference, same run, same server, same URL, same ranges: one ``curl`` process given the ranges
in a ``--config`` file (one ``url``/``range`` entry per chunk, ``next`` between them: one
connection for all, which ``%{num_connects}`` confirms), output to /dev/null, the image's
ranges repeated until 256 MiB or 1,000 requests so that curl's CPU is well above its start-up;
its CPU is ``getrusage(RUSAGE_CHILDREN)`` around the curl process less curl's start-up (a
one-byte fetch, measured in the same run). curl stores and verifies nothing, so the table also
gives the agent's CPU without storage and verification.

Caveats: peak RSS is a high-water mark; growth shows only what the update adds above the
child's peak before it (imports, the allocated flash, the warm-up). It is read from ``VmHWM``
in /proc: ``getrusage().ru_maxrss`` (also recorded) is updated lazily by the kernel for a live
process and stayed at 0-4 KiB of growth where ``VmHWM`` grew by 7 MiB. ``tracemalloc`` counts
Python allocations only (including the bodies httpx hands over), not the C libraries' own
buffers; it slows allocation, so it runs in its own update, apart from the timed ones.

Run: ``.venv/bin/python bench/agent_bench.py [--repeat N] [--sizes 1,8] [--chunks 4,64,1024]
[--results DIR]`` (KiB for chunks, MiB for sizes; about a minute). Prints a markdown table and
writes ``bench/results/agent.json``. Without curl the reference is left out, with a message, and
the absolute numbers are reported. ``--smoke --results DIR`` is the smallest run that still goes
through every step (one 1 MiB image in 64 KiB ranges, one timed update, curl over the image 3
times), written as ``DIR/agent.json``: ``make test`` runs it (tests/test_bench_smoke.py) to
check that the script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from server_bench import (  # noqa: E402 - the same server start-up as the server benchmark
    BIN,
    BenchError,
    Running,
    _ok,
    add_smoke_options,
    check_smoke,
    otakit_server,
)

import otakit  # noqa: E402
from otakit.device.agent import Outcome, update_once  # noqa: E402
from otakit.device.bootloader import Bootloader, BootloaderConfig, Strategy  # noqa: E402
from otakit.device.events import Event  # noqa: E402
from otakit.device.flash import Flash  # noqa: E402
from otakit.device.journal import Download, JournalRecord  # noqa: E402
from otakit.device.storage import UpdateStorage  # noqa: E402
from otakit.device.transports.http import HttpSettings, HttpTransport  # noqa: E402
from otakit.image.header import ImageVersion  # noqa: E402
from otakit.image.keys import PublicKey, SigningKey  # noqa: E402
from otakit.image.sign import SignOptions, sign_image  # noqa: E402
from otakit.image.verify import verify_image  # noqa: E402
from otakit.sim.fleet import MemoryJournal, fleet_flashmap  # noqa: E402

PRODUCT, BOARD = "agent-bench", "BOARD_A"
RUNNING, NEW = "1.0.0", "1.1.0"
MIB = 2**20
KIB = 1024
CURL_BYTES = 256 * MIB  # curl repeats the image's ranges up to this many bytes
CURL_REQUESTS = 1000  # or until this many requests, whichever comes first
SMOKE_CURL_REQUESTS = 50  # --smoke: a few passes over the image only


# --- the device, in the child process -----------------------------------------------------------


class FlatBacking:
    """The whole flash in one ``bytearray``, allocated and touched up front (the flash model's
    own ``MemoryBacking`` allocates sectors as they are written, which would count the image
    itself as the agent's memory). Implements :class:`otakit.device.flash.Backing`."""

    def __init__(self, size: int) -> None:
        self._data = bytearray(b"\xff") * size
        self._view = memoryview(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._view[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._view[offset : offset + len(data)] = data

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TimedStorage:
    """``UpdateStorage`` with the CPU time of each call added up: storage (open, write, commit,
    abort) and verification (verify, set_pending). Implements otakit's ``Storage``."""

    def __init__(self, inner: UpdateStorage) -> None:
        self.inner = inner
        self.storage_s = 0.0
        self.verify_s = 0.0
        self.writes = 0

    def progress(self) -> JournalRecord | None:
        return self.inner.progress()

    def open(self, download: Download) -> int:
        t = time.process_time()
        try:
            return self.inner.open(download)
        finally:
            self.storage_s += time.process_time() - t

    def write(self, offset: int, data: bytes) -> None:
        t = time.process_time()
        self.inner.write(offset, data)
        self.writes += 1
        self.storage_s += time.process_time() - t

    def commit(self, end: int) -> None:
        t = time.process_time()
        self.inner.commit(end)
        self.storage_s += time.process_time() - t

    def verify(self) -> str:
        t = time.process_time()
        try:
            return self.inner.verify()
        finally:
            self.verify_s += time.process_time() - t

    def set_pending(self, *, permanent: bool) -> None:
        t = time.process_time()
        self.inner.set_pending(permanent=permanent)
        self.verify_s += time.process_time() - t

    def abort(self) -> None:
        t = time.process_time()
        self.inner.abort()
        self.storage_s += time.process_time() - t


def _slot_size(image_bytes: int) -> int:
    """A slot that holds the image and its trailer: the image plus 64 KiB, in 64 KiB steps."""
    step = 64 * KIB
    return -(-(image_bytes + step) // step) * step


def _device(spec: dict[str, Any], key: PublicKey) -> tuple[Bootloader, TimedStorage]:
    fmap = fleet_flashmap(Strategy.OVERWRITE, slot_size=_slot_size(spec["image_bytes"]))
    flash = Flash(
        fmap.flash_size,
        fmap.sector_size,
        write_align=fmap.write_align,
        backing=FlatBacking(fmap.flash_size),
    )
    for index in range(fmap.flash_size // fmap.sector_size):
        flash.stats.sector(index)  # the wear counters exist before measuring, as the flash does
    boot = Bootloader(flash, fmap, BootloaderConfig(strategy=Strategy.OVERWRITE, keys=(key,)))
    storage = UpdateStorage(boot, MemoryJournal(), (key,), current_version=RUNNING)
    return boot, TimedStorage(storage)


def _transport(spec: dict[str, Any]) -> HttpTransport:
    settings = HttpSettings(
        server=spec["server"],
        token=spec["token"],
        chunk_size=spec["chunk"],
        timeout=60.0,
        data_timeout=3600.0,
    )
    return HttpTransport(settings, board=BOARD)


def _peak_rss_kib() -> tuple[int, int]:
    """This process's peak resident memory, KiB: ``VmHWM`` from /proc and ``ru_maxrss``.

    The kernel updates the high-water mark behind ``ru_maxrss`` lazily (when memory is
    unmapped, at exit), so for a live process it can lag; ``VmHWM`` also looks at the current
    RSS. Both are reported; the growth uses ``VmHWM``."""
    hwm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _one_update(spec: dict[str, Any], key: PublicKey, *, traced: bool) -> dict[str, Any]:
    """One full update of a fresh device; the figures of it, after checking it happened."""
    boot, storage = _device(spec, key)
    transport = _transport(spec)
    phases: dict[str, int] = {}
    last = ["start"]

    def phase_peak(event: Event) -> None:
        """The peak since the previous event goes to the previous event's state: the work
        done in it (JOB_DOWNLOAD: the job fetch; STORAGE_WRITE: a range; VERIFY: the check)."""
        _, peak = tracemalloc.get_traced_memory()
        phases[last[0]] = max(phases.get(last[0], 0), peak)
        tracemalloc.reset_peak()
        last[0] = str(event.state)

    rss0 = _peak_rss_kib()
    if traced:
        tracemalloc.start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = update_once(
        transport,
        storage,
        board=BOARD,
        version=RUNNING,
        callback=phase_peak if traced else None,
    )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    peak = None
    if traced:
        _, peak = tracemalloc.get_traced_memory()
        phases[last[0]] = max(phases.get(last[0], 0), peak)
        peak = max(phases.values())
        tracemalloc.stop()
    rss1 = _peak_rss_kib()
    transport.close()
    # it really happened: the outcome, the version, the bootloader's request, the bytes
    status = boot.status()[0]
    stored = boot.secondary().read_at(0, spec["image_bytes"])
    checks = {
        "outcome": str(result.outcome),
        "version": result.version,
        "next_boot": status.pending,
        "secondary_version": str(status.secondary.version),
        "bytes_match": hashlib.sha256(stored).hexdigest() == spec["sha256"],
    }
    if (
        result.outcome is not Outcome.UPDATED
        or result.version != NEW
        or status.pending != "test"
        or not checks["bytes_match"]
    ):
        raise BenchError(f"the update did not happen: {checks} {result.error} {result.message}")
    return {
        "cpu_s": round(cpu, 4),
        "storage_cpu_s": round(storage.storage_s, 4),
        "verify_cpu_s": round(storage.verify_s, 4),
        "wall_s": round(wall, 4),
        "ranges": storage.writes,
        "rss_growth_kib": rss1[0] - rss0[0],
        "ru_maxrss_growth_kib": rss1[1] - rss0[1],
        "tracemalloc_peak_bytes": peak,
        "tracemalloc_peak_by_state": phases if traced else None,
        "checks": checks,
    }


def _warm_up(spec: dict[str, Any], key: PublicKey) -> None:
    """What a first update would import or set up lazily: a job fetch, one range, a verify."""
    transport = _transport(spec)
    job = transport.fetch_job()
    if job is None:
        raise BenchError("the device was offered no update")
    _ok(transport._client.get(job.url, headers={"range": "bytes=0-4095"}), 206)
    transport.close()
    verify_image(Path(spec["small_image"]).read_bytes(), [key])


def device_main(spec: dict[str, Any]) -> int:
    """The child: warm up, ``runs`` timed updates, one traced update; one JSON line out."""
    key = PublicKey.from_pem(Path(spec["key"]).read_bytes())
    _warm_up(spec, key)
    runs = [_one_update(spec, key, traced=False) for _ in range(spec["runs"])]
    traced = _one_update(spec, key, traced=True)
    print(json.dumps({"runs": runs, "traced": traced}))
    return 0


# --- the reference: curl ------------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _curl_config(path: Path, url: str, token: str, ranges: list[tuple[int, int]]) -> Path:
    entries = [
        f'url = "{url}"\n'
        f'range = "{first}-{last}"\n'
        'output = "/dev/null"\n'
        f'header = "Authorization: Bearer {token}"\n'
        'header = "User-Agent: curl-reference"\n'
        'write-out = "%{http_code} %{size_download} %{num_connects}\\n"\n'
        for first, last in ranges
    ]
    path.write_text("next\n".join(entries))
    return path


def curl_run(curl: str, config: Path, expect_bytes: int, expect_count: int) -> dict[str, float]:
    """One curl process over ``config``; its CPU (children's rusage) and wall time, checked."""
    cpu0, wall0 = _children_cpu(), time.perf_counter()
    done = subprocess.run(
        [curl, "--silent", "--show-error", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wall, cpu = time.perf_counter() - wall0, _children_cpu() - cpu0
    lines = [line.split() for line in done.stdout.splitlines() if line.strip()]
    codes = {line[0] for line in lines}
    got = sum(int(line[1]) for line in lines)
    connects = sum(int(line[2]) for line in lines)
    if done.returncode != 0 or len(lines) != expect_count or got != expect_bytes:
        raise BenchError(
            f"curl: exit {done.returncode}, {len(lines)} transfers, {got} bytes, codes {codes}: "
            f"{done.stderr.strip()[:300]}"
        )
    if expect_count > 1 and codes != {"206"}:
        raise BenchError(f"curl: answers {codes}, not all 206")
    return {"cpu_s": cpu, "wall_s": wall, "connections": connects}


# --- set-up, in the parent ----------------------------------------------------------------------


def _image(key: SigningKey, payload_bytes: int, seed: int) -> bytes:
    payload = random.Random(seed).randbytes(payload_bytes)
    return sign_image(payload, key, SignOptions(ImageVersion.parse(NEW), pad_header=True))


def set_up(
    server: Running, data: Path, key: SigningKey, images: dict[str, bytes]
) -> dict[str, Any]:
    """Key, product, one artifact, deployment (to its own group) and device per image, through
    the HTTP API; device tokens with ``otakit token create``. Returns per image: serial, token,
    the job's file URL."""
    made: dict[str, Any] = {}
    headers = {"authorization": f"Bearer {server.admin}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as admin:
        pem = {"content-type": "application/x-pem-file"}
        _ok(admin.post("/api/v1/keys", content=key.public_key.pem(), headers=pem), 201)
        _ok(admin.put(f"/api/v1/products/{PRODUCT}", json={"board": BOARD}), 200)
        for name, image in images.items():
            artifact = _ok(
                admin.post(
                    "/api/v1/artifacts",
                    params={"name": f"app-{name}.img"},
                    content=image,
                    headers={"content-type": "application/octet-stream"},
                ),
                201,
            ).json()
            group, serial = f"g-{name}", f"agent-{name}"
            deployment = {"artifact_id": artifact["id"], "product": PRODUCT, "group": group}
            _ok(admin.post("/api/v1/deployments", json=deployment), 201)
            device = {"product": PRODUCT, "group": group, "version": RUNNING, "board": BOARD}
            _ok(admin.put(f"/api/v1/devices/{serial}", json=device), 200)
            argv = [str(BIN / "otakit"), "token", "create", "--role", "device", "--device", serial]
            done = subprocess.run(
                [*argv, "--data", str(data)], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                raise BenchError(f"otakit token create failed: {done.stderr.strip()}")
            made[name] = {"serial": serial, "token": done.stdout.strip(), "artifact": artifact}
    for name, device in made.items():
        auth = {"authorization": f"Bearer {device['token']}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
            job = _ok(client.get("/ota_update.json"), 200).json()
            if job.get("Message") != "Update Available" or job.get("Version") != NEW:
                raise BenchError(f"device {device['serial']} was not offered the image: {job}")
            device["url"] = urljoin(server.url, job["File"])
            part = _ok(client.get(device["url"], headers={"range": "bytes=4096-8191"}), 206)
            if part.content != images[name][4096:8192]:
                raise BenchError("the job's file served other bytes than the image's")
    return made


def _machine(curl: str | None) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    curl_version = None
    if curl is not None:
        done = subprocess.run([curl, "--version"], capture_output=True, text=True, check=False)
        curl_version = done.stdout.split("\n", 1)[0].split(" (")[0]
    import platform

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "otakit": otakit.__version__,
        "httpx": httpx.__version__,
        "curl": curl_version,
        "otakit_from": str(Path(otakit.__file__).parent),
    }


def _size_name(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def cell_summary(
    image_bytes: int, chunk: int, agent: dict[str, Any], curl: list[dict[str, float]] | None
) -> dict[str, Any]:
    """The medians of a cell, per MiB of image, and the ratios to curl."""
    mib = image_bytes / MIB
    runs = agent["runs"]
    cpu = statistics.median(r["cpu_s"] for r in runs)
    storage = statistics.median(r["storage_cpu_s"] for r in runs)
    verify = statistics.median(r["verify_cpu_s"] for r in runs)
    http = statistics.median(r["cpu_s"] - r["storage_cpu_s"] - r["verify_cpu_s"] for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    rss = runs[0]["rss_growth_kib"]  # only the first update in the child can raise the peak
    peak = agent["traced"]["tracemalloc_peak_bytes"]
    out: dict[str, Any] = {
        "image_bytes": image_bytes,
        "chunk_bytes": chunk,
        "ranges": runs[0]["ranges"],
        "agent": {
            "cpu_s": round(cpu, 4),
            "cpu_s_per_mib": round(cpu / mib, 4),
            "storage_cpu_s_per_mib": round(storage / mib, 4),
            "verify_cpu_s_per_mib": round(verify / mib, 4),
            "http_cpu_s_per_mib": round(http / mib, 4),
            "wall_s": round(wall, 3),
            "mib_per_s": round(mib / wall, 1),
            "tracemalloc_peak_mib": round(peak / MIB, 3),
            "tracemalloc_peak_mib_per_mib": round(peak / MIB / mib, 4),
            "rss_growth_mib": round(rss / 1024, 2),
            "rss_growth_mib_per_mib": round(rss / 1024 / mib, 4),
            "runs": runs,
            "traced_run": agent["traced"],
        },
        "curl": None,
        "vs_curl": None,
    }
    if curl:
        c_cpu = statistics.median(r["net_cpu_s"] / r["mib"] for r in curl)  # per MiB
        c_rate = statistics.median(r["mib"] / r["wall_s"] for r in curl)
        out["curl"] = {
            "cpu_s_per_mib": round(c_cpu, 5),
            "mib_per_s": round(c_rate, 1),
            "passes": curl[0]["passes"],
            "requests": curl[0]["passes"] * runs[0]["ranges"],
            "connections": curl[0]["connections"],
            "runs": curl,
        }
        out["vs_curl"] = {
            "cpu": _ratio(cpu / mib, c_cpu),
            "http_cpu": _ratio(http / mib, c_cpu),
            "mib_per_s": _ratio(mib / wall, c_rate),
        }
    return out


def _x(v: float | None) -> str:
    return f"{v:.1f}x" if v is not None else "-"


def table(cells: list[dict[str, Any]]) -> str:
    """CPU in milliseconds per MiB of image; memory in MiB."""
    lines = [
        "| image | chunk | ranges | agent CPU ms/MiB | of which storage / verify | "
        "curl CPU ms/MiB | agent vs curl | agent without storage+verify vs curl | "
        "agent peak MiB (tracemalloc) | per MiB downloaded | RSS growth MiB | "
        "agent MiB/s | curl MiB/s |",
        "|" + "---|" * 13,
    ]
    for c in cells:
        a, r, vs = c["agent"], c["curl"], c["vs_curl"] or {}
        curl_cpu = f"{1000 * r['cpu_s_per_mib']:.2f}" if r else "-"
        lines.append(
            f"| {_size_name(c['image_bytes'])} | {_size_name(c['chunk_bytes'])} | {c['ranges']} | "
            f"{1000 * a['cpu_s_per_mib']:.1f} | {1000 * a['storage_cpu_s_per_mib']:.1f} / "
            f"{1000 * a['verify_cpu_s_per_mib']:.1f} | {curl_cpu} | {_x(vs.get('cpu'))} | "
            f"{_x(vs.get('http_cpu'))} | {a['tracemalloc_peak_mib']:.2f} | "
            f"{a['tracemalloc_peak_mib_per_mib']:.3f} | {a['rss_growth_mib']:.1f} | "
            f"{a['mib_per_s']} | {r['mib_per_s'] if r else '-'} |"
        )
    return "\n".join(lines)


def _list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--sizes", default="1,8", help="image payloads, MiB")
    parser.add_argument("--chunks", default="4,64,1024", help="range sizes, KiB")
    add_smoke_options(
        parser,
        "--repeat 1 --sizes 1 --chunks 64, curl over the image a few times",
        "folder for agent.json (bench/results)",
    )
    parser.add_argument("--device-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device_run:
        return device_main(json.loads(args.device_run))
    curl_requests = CURL_REQUESTS
    check_smoke(parser, args)
    if args.smoke:
        args.repeat, args.sizes, args.chunks = 1, "1", "64"
        curl_requests = SMOKE_CURL_REQUESTS

    curl = shutil.which("curl")
    if curl is None:
        print(
            "agent_bench: curl is not installed: no reference, absolute numbers only",
            file=sys.stderr,
        )
    about = _machine(curl)
    load_before = round(os.getloadavg()[0], 2)
    key = SigningKey.generate("ecdsa-p256")
    images = {f"{n}m": _image(key, n * MIB, seed=n) for n in _list(args.sizes)}
    chunks = [k * KIB for k in _list(args.chunks)]
    cells: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agent-bench-")))
        (tmp / "key.pem").write_bytes(key.public_key.pem())
        (tmp / "small.img").write_bytes(_image(key, 16 * KIB, seed=0))
        server = stack.enter_context(otakit_server(tmp / "data", None, 1))
        devices = set_up(server, tmp / "data", key, images)
        startup: list[float] = []
        if curl is not None:
            one = _curl_config(
                tmp / "startup.cfg",
                devices[next(iter(devices))]["url"],
                devices[next(iter(devices))]["token"],
                [(0, 0)],
            )
            startup = [curl_run(curl, one, 1, 1)["cpu_s"] for _ in range(5)]
        curl_startup = statistics.median(startup) if startup else 0.0
        for name, image in images.items():
            device = devices[name]
            for chunk in chunks:
                print(f"agent_bench: {name} image, {_size_name(chunk)} ranges", file=sys.stderr)
                ranges = [(a, min(a + chunk, len(image)) - 1) for a in range(0, len(image), chunk)]
                curl_runs = None
                if curl is not None:
                    # enough passes over the image that curl's CPU is well above its start-up
                    passes = max(
                        1,
                        min(-(-CURL_BYTES // len(image)), -(-curl_requests // len(ranges))),
                    )
                    config = _curl_config(
                        tmp / f"{name}-{chunk}.cfg", device["url"], device["token"], ranges * passes
                    )
                    curl_runs = []
                    for _ in range(args.repeat):
                        run = curl_run(curl, config, passes * len(image), passes * len(ranges))
                        run["net_cpu_s"] = max(0.0, run["cpu_s"] - curl_startup)
                        run["passes"] = passes
                        run["mib"] = passes * len(image) / MIB
                        curl_runs.append({k: round(v, 4) for k, v in run.items()})
                spec = {
                    "server": server.url,
                    "token": device["token"],
                    "chunk": chunk,
                    "image_bytes": len(image),
                    "sha256": hashlib.sha256(image).hexdigest(),
                    "key": str(tmp / "key.pem"),
                    "small_image": str(tmp / "small.img"),
                    "runs": args.repeat,
                }
                done = subprocess.run(
                    [sys.executable, __file__, "--device-run", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=False,
                )
                if done.returncode != 0:
                    raise BenchError(f"the agent run failed:\n{done.stderr[-2000:]}")
                agent = json.loads(done.stdout.strip().splitlines()[-1])
                cell = cell_summary(len(image), chunk, agent, curl_runs)
                a = cell["agent"]
                print(
                    f"  agent {a['cpu_s_per_mib']:.4f} CPU s/MiB, peak "
                    f"{a['tracemalloc_peak_mib']:.2f} MiB; curl "
                    f"{cell['curl']['cpu_s_per_mib'] if cell['curl'] else '-'} CPU s/MiB",
                    file=sys.stderr,
                )
                cells.append(cell)

    result = {
        "machine": about,
        "settings": {
            "server": "otakit serve, SQLite, 1 worker, on this machine (127.0.0.1)",
            "flow": "job: GET /ota_update.json, ranges of /devices/{serial}/files/{id}/{name}",
            "strategy": "overwrite",
            "flash": "in memory, one bytearray allocated before measuring",
            "journal": "in memory (otakit.sim.fleet.MemoryJournal)",
            "key": "ecdsa-p256",
            "repeat": args.repeat,
            "smoke": args.smoke,
            "images": {name: len(image) for name, image in images.items()},
            "chunks": chunks,
            "curl_startup_cpu_s": round(curl_startup, 4),
            "reference": "curl --config: every range in one process, one connection, "
            "output /dev/null; CPU from RUSAGE_CHILDREN less curl's start-up"
            if curl
            else None,
        },
        "load_average": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
        "cells": cells,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "agent.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"Agent (update_once, HttpTransport, UpdateStorage) vs curl, same server and ranges; "
        f"{about['cpu']}, {about['cores']} cores, {about['curl'] or 'no curl'}; "
        f"load average {result['load_average']}\n"
    )
    print(table(cells))
    if curl is None:
        print("\nNo reference: curl is not installed (apt-get install curl).")
    print(f"\nwritten {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"agent_bench: {exc}", file=sys.stderr)
        sys.exit(1)
