"""A fleet of simulated devices against one ``otakit serve`` on this machine.

N devices (default 10,000; ``--quick``: 1,000) each do a full update of a 256 KiB signed image
through the real server: enroll with an enrollment token, check in, report, download in 64 KiB
ranges, verify (hash and signature), reboot into it (overwrite bootloader), confirm, check in
with the new version. The fleet runs in this process (``otakit.sim.fleet``), the server in its
own (SQLite in a temporary folder, or ``--postgres``: a temporary PostgreSQL database).

Measured:

- **update phase**: wall time, the server's CPU seconds (user + system of its process tree,
  from /proc), this process's CPU, errors (failed attempts of devices that did not update:
  must be 0; transient failures the devices recovered from are counted apart, as
  ``recovered`` and ``retried``), updates per second, and the server's CPU per device updated;
- **idle phase**: every device checks in again (nothing more is offered: 204), as it would at
  each poll; the server's CPU per check-in;
- **reference**: the same fleet's idle check-ins against nginx answering the same URL with a
  fixed 204 (``return 204``, no database), started by this script, when nginx is installed.
  Without nginx only absolute numbers are reported, and the output says so.

Implied devices per server core at a 30-minute poll interval: one core at full use has 1,800
CPU-seconds per 30 minutes, so ``1800 / (server CPU seconds per idle check-in)`` devices can
poll every 30 minutes; ``1800 / (server CPU seconds per device update)`` devices can each also
take one full update within the same 30 minutes (the update phase's per-device cost includes its
two check-ins and status reports). Both are per server core (multiply by ``--workers`` on a
machine with that many free cores) and leave no headroom: plan for half.

Memory: peak resident memory of this process during the run, less what it held before the
devices existed, divided by the number of devices.

With ``--postgres`` the server's CPU is that of ``otakit serve`` only: PostgreSQL's own
processes are not counted (they belong to the machine's database server, which other work may
share).

Run: ``.venv/bin/python bench/fleet_bench.py [--quick] [--devices N] [--postgres]
[--results DIR]``. Prints a markdown table and writes ``bench/results/fleet.json``
(``--quick``: ``fleet-quick.json``; ``--postgres``: ``-postgres`` added to the name).
``--smoke --results DIR`` is the smallest run that still goes through every step (20 devices, a
32 KiB image in 16 KiB ranges, one idle check-in per device on otakit and on nginx), written as
``DIR/fleet-quick.json``: ``make test`` runs it (tests/test_bench_smoke.py) to check that the
script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from server_bench import (  # noqa: E402 - the same server start-up and CPU accounting
    BIN,
    BenchError,
    Running,
    add_smoke_options,
    check_smoke,
    cpu_seconds,
    nginx_server,
    otakit_server,
    postgres_database,
)

import otakit  # noqa: E402
from otakit.image.header import ImageVersion  # noqa: E402
from otakit.image.keys import SigningKey  # noqa: E402
from otakit.image.sign import SignOptions, sign_image  # noqa: E402
from otakit.sim.fleet import Fleet, FleetConfig  # noqa: E402

PRODUCT, GROUP, BOARD = "fleet-bench", "field", "BOARD_A"
POLL_INTERVAL_S = 1800
IDLE_CHECKINS_OTAKIT = 5_000  # at least this many idle check-ins are timed on otakit
IDLE_CHECKINS_NGINX = 50_000  # and on nginx (its CPU per request is tiny: more for resolution)
KEY = SigningKey.generate("ecdsa-p256")


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import httpx as hx
    import uvicorn

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "otakit": otakit.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": hx.__version__,
        "nginx": _nginx_version(),
        "otakit_from": str(Path(otakit.__file__).parent),
    }


def _nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def _nginx_version() -> str | None:
    nginx = _nginx()
    if nginx is None:
        return None
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ") or None


# --- the reference: nginx answering check-ins with 204 ------------------------------------------

NGINX_CONF = """\
worker_processes {workers};
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /api/v1/device/checkin {{ return 204; }}
    }}
}}
"""


def nginx_checkins(nginx: str, prefix: Path, workers: int) -> AbstractContextManager[Running]:
    """nginx in the foreground on a free loopback port, answering check-ins with 204."""
    return nginx_server(nginx, prefix, workers, NGINX_CONF)


# --- set-up -------------------------------------------------------------------------------------


def set_up(server: Running, image: bytes, data: Path, database_url: str | None) -> str:
    """Key, product, artifact and deployment through the API; returns an enrollment token."""
    headers = {"authorization": f"Bearer {server.admin}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as admin:
        pem = {"content-type": "application/x-pem-file"}
        steps = [
            admin.post("/api/v1/keys", content=KEY.public_key.pem(), headers=pem),
            admin.put(f"/api/v1/products/{PRODUCT}", json={"board": BOARD}),
        ]
        artifact = admin.post("/api/v1/artifacts", params={"name": "app.img"}, content=image)
        steps.append(artifact)
        for response in steps:
            if response.status_code >= 300:
                raise BenchError(f"{response.request.url.path}: {response.text[:300]}")
        body = {"artifact_id": artifact.json()["id"], "product": PRODUCT, "group": GROUP}
        created = admin.post("/api/v1/deployments", json=body)
        if created.status_code != 201:
            raise BenchError(f"deployment: {created.text[:300]}")
    where = ["--database-url", database_url] if database_url else ["--data", str(data)]
    args = ["token", "create", "--role", "enroll", "--product", PRODUCT, "--group", GROUP]
    done = subprocess.run(
        [str(BIN / "otakit"), *args, *where], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"otakit token create: {done.stderr.strip()}")
    return done.stdout.strip()


def applied(server: Running) -> int:
    headers = {"authorization": f"Bearer {server.admin}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as admin:
        deployment = admin.get("/api/v1/deployments").json()
        items = deployment["items"] if isinstance(deployment, dict) else deployment
        return int(items[0]["counts"]["Applied"])


# --- phases -------------------------------------------------------------------------------------


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _progress(snapshot: dict[str, int]) -> None:
    print(
        f"fleet_bench: {snapshot['settled']}/{snapshot['devices']} settled, "
        f"{snapshot['updated']} updated, {snapshot['errors']} errors",
        file=sys.stderr,
    )


def update_phase(fleet: Fleet, server: Running) -> dict[str, Any]:
    cpu0, self0, t0 = cpu_seconds(server.proc.pid), _self_cpu(), time.monotonic()
    report = asyncio.run(fleet.run(on_tick=_progress, tick=10))
    wall = time.monotonic() - t0
    server_cpu = cpu_seconds(server.proc.pid) - cpu0
    n = report.devices
    return {
        "devices": n,
        "updated": report.updated,
        "applied_on_server": applied(server),
        "errors": sum(report.errors.values()),
        "errors_by_code": report.errors,
        "failed": report.failed,
        "recovered": report.recovered,
        "retried": report.retried,
        "gave_up": report.gave_up,
        "timed_out": report.timed_out,
        "wall_s": round(wall, 2),
        "updates_per_s": round(report.updated / wall, 1),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_device": round(1000 * server_cpu / n, 3),
        "fleet_cpu_s": round(_self_cpu() - self0, 2),
        "fleet_cpu_ms_per_device": round(1000 * (_self_cpu() - self0) / n, 3),
        "requests": report.requests,
        "bytes_downloaded": report.bytes_downloaded,
        "update_seconds": report.update_seconds,
        "shared_sectors": report.shared_sectors,
    }


def idle_phase(fleet: Fleet, server: Running, url: str, at_least: int) -> dict[str, Any]:
    rounds = max(1, -(-at_least // len(fleet.devices)))
    statuses: dict[str, int] = {}
    cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    for _ in range(rounds):
        for status, count in asyncio.run(fleet.check_in_all(url)).items():
            statuses[status] = statuses.get(status, 0) + count
    wall = time.monotonic() - t0
    server_cpu = cpu_seconds(server.proc.pid) - cpu0
    checkins = rounds * len(fleet.devices)
    per = server_cpu / checkins
    return {
        "checkins": checkins,
        "answers": statuses,
        "errors": checkins - statuses.get("204", 0),
        "wall_s": round(wall, 2),
        "checkins_per_s": round(checkins / wall, 1),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_checkin": round(1000 * per, 4),
        "devices_per_core_at_30min": int(POLL_INTERVAL_S / per) if per > 0 else None,
    }


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=None, help="default 10000 (1000 --quick)")
    parser.add_argument("--quick", action="store_true", help="1,000 devices")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument("--workers", type=int, default=1, help="otakit serve --workers")
    parser.add_argument("--concurrency", type=int, default=64, help="requests on the wire")
    parser.add_argument("--image-kib", type=int, default=256, help="image payload size")
    parser.add_argument("--chunk-kib", type=int, default=64, help="range size")
    add_smoke_options(parser, "writes fleet-quick.json", "folder for the JSON (bench/results)")
    args = parser.parse_args()
    check_smoke(parser, args)
    if args.smoke:
        args.quick = True
        args.devices = args.devices or 20
        args.image_kib, args.chunk_kib = 32, 16
    devices = args.devices or (1_000 if args.quick else 10_000)
    # idle check-ins timed: whole rounds of the fleet, at least this many (--smoke: one round)
    idle_otakit = 1 if args.smoke else IDLE_CHECKINS_OTAKIT
    idle_nginx = 1 if args.smoke else IDLE_CHECKINS_NGINX

    payload = random.Random(1).randbytes(args.image_kib * 1024)
    image = sign_image(payload, KEY, SignOptions(ImageVersion.parse("1.1.0"), pad_header=True))
    machine = _machine()
    load_before = _load()
    nginx = _nginx()
    results: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "devices": devices,
            "database": "postgresql" if args.postgres else "sqlite",
            "workers": args.workers,
            "concurrency": args.concurrency,
            "image_bytes": len(image),
            "chunk_bytes": args.chunk_kib * 1024,
            "smoke": args.smoke,
            "strategy": "overwrite",
            "poll_interval_for_capacity_s": POLL_INTERVAL_S,
        },
    }
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-bench-")))
        database_url = stack.enter_context(postgres_database()) if args.postgres else None
        if args.postgres and database_url is None:
            print("fleet_bench: no PostgreSQL; run without --postgres", file=sys.stderr)
            return 2
        server = stack.enter_context(otakit_server(tmp / "data", database_url, args.workers))
        token = set_up(server, image, tmp / "data", database_url)
        rss_before = _rss_kib("VmRSS")
        config = FleetConfig(
            server=server.url,
            token=token,
            product=PRODUCT,
            group=GROUP,
            board=BOARD,
            devices=devices,
            keys=(KEY.public_key,),
            poll=1.0,  # a device that failed tries again after about a second
            concurrency=args.concurrency,
            chunk_size=args.chunk_kib * 1024,
            timeout=3600,
            serial_prefix="bench",
        )
        fleet = Fleet(config)
        print(f"fleet_bench: {devices} devices updating against {server.url}", file=sys.stderr)
        update = update_phase(fleet, server)
        peak = _rss_kib("VmHWM")
        update["memory"] = {
            "rss_before_devices_kib": rss_before,
            "peak_rss_kib": peak,
            "peak_kib_per_device": round((peak - rss_before) / devices, 2),
        }
        results["update"] = update
        print("fleet_bench: idle check-ins on otakit", file=sys.stderr)
        results["idle"] = idle_phase(fleet, server, server.url, idle_otakit)
        if nginx is not None:
            print("fleet_bench: idle check-ins on nginx (reference)", file=sys.stderr)
            # a folder of its own: nginx may run as nobody, who cannot enter ``tmp``
            prefix = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-nginx-")))
            reference = stack.enter_context(nginx_checkins(nginx, prefix, args.workers))
            results["reference"] = idle_phase(fleet, reference, reference.url, idle_nginx)
        else:
            results["reference"] = None
            results["reference_missing"] = (
                "nginx is not installed (apt-get install nginx-light): absolute numbers only"
            )
    results["load_average"] = {"before": load_before, "after": _load()}
    update, idle, reference = results["update"], results["idle"], results["reference"]
    per_update = update["server_cpu_s"] / devices
    results["capacity"] = {
        "devices_per_core_polling_every_30min": idle["devices_per_core_at_30min"],
        "devices_per_core_each_updating_within_30min": int(POLL_INTERVAL_S / per_update)
        if per_update > 0
        else None,
        "nginx_devices_per_core_polling_every_30min": reference["devices_per_core_at_30min"]
        if reference
        else None,
    }
    if reference and reference["server_cpu_ms_per_checkin"]:
        results["capacity"]["otakit_vs_nginx_cpu_per_checkin"] = round(
            idle["server_cpu_ms_per_checkin"] / reference["server_cpu_ms_per_checkin"], 1
        )
    args.results.mkdir(parents=True, exist_ok=True)
    name = "fleet-quick" if args.quick else "fleet"
    out = args.results / (f"{name}-postgres.json" if args.postgres else f"{name}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten {out}", file=sys.stderr)
    errors = update["errors"] + idle["errors"] + len(update["failed"])
    if errors or update["applied_on_server"] != devices:
        print(
            f"fleet_bench: {errors} errors; {update['applied_on_server']} applied", file=sys.stderr
        )
        return 1
    return 0


def _per_core(devices: int | None) -> str:
    """A capacity figure, or why there is none (no reference run, or CPU below /proc's tick)."""
    return f"{devices:,}" if devices else "-"


def table(results: dict[str, Any]) -> str:
    u, i, r = results["update"], results["idle"], results["reference"]
    c = results["capacity"]
    s = results["settings"]
    lines = [
        f"Fleet: {s['devices']} devices, {s['image_bytes'] // 1024} KiB image, "
        f"{s['chunk_bytes'] // 1024} KiB ranges, {s['database']}, {s['workers']} worker(s), "
        f"{s['concurrency']} connections; load average {results['load_average']}",
        "",
        "| phase | server | requests | wall s | server CPU s | server CPU per device | "
        "errors | rate |",
        "|---|---|---|---|---|---|---|---|",
        f"| full update | otakit | {sum(u['requests'].values())} | {u['wall_s']} | "
        f"{u['server_cpu_s']} | {u['server_cpu_ms_per_device']} ms | {u['errors']} | "
        f"{u['updates_per_s']} updates/s |",
        f"| idle check-in | otakit | {i['checkins']} | {i['wall_s']} | {i['server_cpu_s']} | "
        f"{i['server_cpu_ms_per_checkin']} ms | {i['errors']} | {i['checkins_per_s']} /s |",
    ]
    if r is not None:
        lines.append(
            f"| idle check-in | nginx `return 204` | {r['checkins']} | {r['wall_s']} | "
            f"{r['server_cpu_s']} | {r['server_cpu_ms_per_checkin']} ms | {r['errors']} | "
            f"{r['checkins_per_s']} /s |"
        )
    lines += [
        "",
        "| implied devices per server core, 30-minute poll | otakit | nginx (reference) |",
        "|---|---|---|",
        f"| polling only | {_per_core(c['devices_per_core_polling_every_30min'])} | "
        f"{_per_core(c['nginx_devices_per_core_polling_every_30min'])} |",
        f"| every device also takes one full update | "
        f"{_per_core(c['devices_per_core_each_updating_within_30min'])} | - |",
        "",
        f"Fleet process: {u['fleet_cpu_s']} CPU s ({u['fleet_cpu_ms_per_device']} ms per device), "
        f"peak RSS {u['memory']['peak_rss_kib'] / 1024:.0f} MiB, "
        f"{u['memory']['peak_kib_per_device']} KiB per device; update p50 "
        f"{u['update_seconds']['p50']} s, p99 {u['update_seconds']['p99']} s.",
    ]
    if r is None:
        lines.append(f"No reference: {results['reference_missing']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"fleet_bench: {exc}", file=sys.stderr)
        sys.exit(1)
