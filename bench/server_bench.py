"""Update server throughput next to nginx: check-ins per second and ranged image downloads.

Every cell is measured with the same load generator (``wrk``, one C program for both servers)
against ``otakit serve`` and against nginx started by this script in the same run, on the same
machine, with the same worker count; the table shows otakit's numbers as ratios of nginx's.

- Check-ins: ``POST /api/v1/device/checkin`` with a device token, for devices that have a
  pending deployment, so every request runs token lookup, device update, deployment selection
  and job building and answers 200 with a job. The reference is nginx serving the same job JSON
  (the bytes of a real answer) as a static file, ``GET /job.json``, with the same headers.
- Image bytes: 4 KiB, 64 KiB and 1 MiB ``Range`` requests of a ~8 MiB signed artifact, through
  otakit's signed URL (``/dl/...?expires=..&sig=..``), against nginx serving the same bytes with
  the same ranges. Offsets are sequential and aligned, as a device downloads; each wrk thread
  starts at a different place in the file.

Configurations: otakit on SQLite and on PostgreSQL (127.0.0.1:5432, user postgres, a temporary
database), each with ``--workers 1`` and ``--workers 2``; nginx with the same
``worker_processes``. Everything is set up through the real HTTP API (and ``otakit token
create`` for device tokens). Loads go to 127.0.0.1 only; each wrk run is bounded in time (and by
a request cap per thread) and stops by itself. The machine has few cores, so wrk (2 threads)
shares them with the server: both servers pay the same, and the server's own CPU time per
request (or per GiB) is reported too.

Run: ``.venv/bin/python bench/server_bench.py [--quick] [--results DIR]``. Prints markdown
tables and writes ``bench/results/server.json`` (``--quick``: ``server-quick.json``, 2 s cells,
fewer cells). ``--smoke --results DIR`` is the smallest run that still goes through every step
(1 s cells, no warm-up, one range size, a 1 MiB image, 2 devices), written as
``DIR/server-quick.json``: ``make test`` runs it (tests/test_bench_smoke.py) to check that the
script works; its numbers mean nothing. Needs ``wrk`` and ``nginx``; as root the script installs
them with apt-get, otherwise it says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import pwd
import queue
import random
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import httpx

import otakit
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image

BENCH = Path(__file__).parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
CONNECTIONS = 32
THREADS = 2
REQUEST_CAP = 5_000_000  # per wrk thread and run: a safety bound, far above what a run reaches
RANGES = (4 * 1024, 64 * 1024, 1024 * 1024)
IMAGE_PAYLOAD = 8 * 1024 * 1024  # the signed image is this plus its header and trailer
PRODUCT, GROUP, BOARD = "bench-product", "bench-group", "BOARD_A"
KEY = SigningKey.generate("ed25519")
TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A setup step failed; the message says which."""


# --- tools --------------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def ensure_tools() -> tuple[str, str]:
    """Paths of wrk and nginx, installing them with apt-get when running as root."""
    missing = [name for name in ("wrk", "nginx") if _which(name) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit(
                f"server_bench: {' and '.join(missing)} not found; install them "
                f"(sudo apt-get install -y {' '.join(missing)}) and run again"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        lists = Path("/var/lib/apt/lists")
        if not any(lists.glob("*_Packages")):
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        print(f"server_bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
        install = ["apt-get", "install", "-y", "-qq", *missing]
        if subprocess.run(install, env=env, timeout=900, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
            subprocess.run(install, check=True, env=env, timeout=900)
    wrk, nginx = _which("wrk"), _which("nginx")
    if wrk is None or nginx is None:
        sys.exit("server_bench: wrk or nginx is still missing after apt-get install")
    return wrk, nginx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine(wrk: str, nginx: str) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import uvicorn

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(BENCH), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "otakit": otakit.__version__,
        "uvicorn": uvicorn.__version__,
        "nginx": _version_of([nginx, "-v"]).removeprefix("nginx version: "),
        "wrk": _version_of([wrk, "-v"]).split(" Copyright")[0],
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_changed": bool(git("status", "--porcelain", "--", "src")),
        "otakit_from": str(Path(otakit.__file__).parent),
    }


# --- processes ----------------------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def cpu_seconds(root: int) -> float:
    """User plus system CPU time of a process tree, in seconds."""
    total = 0
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def _drain(stream: Any, sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Running:
    """A server this script started: its base URL and its process."""

    url: str
    proc: subprocess.Popen[str]
    admin: str = ""
    log: list[str] = field(default_factory=list)


@contextmanager
def otakit_server(
    data: Path, database_url: str | None, workers: int, extra: Sequence[str] = ()
) -> Iterator[Running]:
    """``otakit serve`` on a free loopback port (``extra``: more of its options)."""
    first_start = not data.exists()
    port = free_port()
    argv = [str(BIN / "otakit"), "serve", "--data", str(data), "--port", str(port)]
    argv += ["--workers", str(workers), *extra]
    if database_url:
        argv += ["--database-url", database_url]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        out: queue.Queue[str | None] = queue.Queue()
        errs: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True).start()
        threading.Thread(target=_drain, args=(proc.stderr, errs), daemon=True).start()
        server = Running(f"http://127.0.0.1:{port}", proc)
        # "Uvicorn running on" comes once the socket listens (with one worker, after the app's
        # start-up; with several, from the parent first); each worker reports its start-up.
        ready, listening, deadline = 0, False, time.monotonic() + 60
        while ready < workers or not listening:
            try:
                line = errs.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(
                    "otakit serve did not start within 60 s:\n" + "".join(server.log)
                ) from None
            if line is None:
                raise BenchError("otakit serve exited:\n" + "".join(server.log))
            server.log.append(line)
            if "Application startup complete" in line:
                ready += 1
            if "Uvicorn running on" in line:
                listening = True
        while first_start and not server.admin:  # printed on the first start only
            try:
                line = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError("otakit serve printed no admin token on its first start") from None
            if line is None:
                raise BenchError("otakit serve printed no admin token on its first start")
            if line.startswith("otk_"):
                server.admin = line.strip()

        def keep_log() -> None:  # the server's later lines too (the last 200), for error reports
            while (line := errs.get()) is not None:
                server.log.append(line)
                del server.log[:-200]

        threading.Thread(target=keep_log, daemon=True).start()
        yield server
    finally:
        _stop(proc)


NGINX_CONF = """\
worker_processes {workers};
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 10000000;  # uvicorn keeps a connection for any number of requests
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    types {{ application/json json; application/octet-stream bin; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
    }}
}}
"""


@contextmanager
def nginx_server(
    nginx: str, prefix: Path, workers: int, template: str | None = None
) -> Iterator[Running]:
    """nginx in the foreground on a free loopback port, as nobody when this script is root;
    ``template`` (default :data:`NGINX_CONF`) is formatted with workers, prefix and port.

    ``prefix`` (made if missing) holds the configuration, logs and temporary files. As root,
    nginx runs as the user nobody, so every folder above ``prefix`` must let others through:
    give it a folder of its own (``tempfile.mkdtemp()``), not one inside another private
    temporary folder."""
    port = free_port()
    prefix.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for parent in prefix.resolve().parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise BenchError(
                    f"nginx runs as nobody, who cannot enter {parent}: give nginx_server a "
                    "prefix of its own (tempfile.mkdtemp())"
                )
    conf = prefix / "nginx.conf"
    text = template if template is not None else NGINX_CONF
    conf.write_text(text.format(workers=workers, prefix=prefix, port=port))
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    (prefix / "error.log").unlink(missing_ok=True)
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (prefix, *prefix.rglob("*")):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    argv = [nginx, "-e", str(prefix / "error.log"), "-c", str(conf), "-p", str(prefix)]
    proc = subprocess.Popen(
        [*argv, "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **user,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise BenchError(f"nginx exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("nginx did not listen within 15 s") from None
                time.sleep(0.05)
        yield Running(f"http://127.0.0.1:{port}", proc)
    finally:
        _stop(proc)


# --- PostgreSQL ---------------------------------------------------------------------------------


def _psql(sql: str) -> subprocess.CompletedProcess[str]:
    argv = ["psql", "-h", PG["host"], "-p", PG["port"], "-U", PG["user"], "-d", "postgres"]
    return subprocess.run(
        [*argv, "-tAc", sql], capture_output=True, text=True, timeout=30, check=False
    )


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh database on 127.0.0.1:5432, dropped afterwards; None when PostgreSQL is absent."""
    if shutil.which("psql") is None or _psql("SELECT 1").returncode != 0:
        print(
            "server_bench: PostgreSQL is not reachable on 127.0.0.1:5432 (`make services` starts "
            "it); the PostgreSQL rows are left out",
            file=sys.stderr,
        )
        yield None
        return
    name = f"otakit_bench_{uuid.uuid4().hex[:12]}"
    created = _psql(f'CREATE DATABASE "{name}"')
    if created.returncode != 0:
        raise BenchError(f"cannot create database {name}: {created.stderr.strip()}")
    try:
        yield f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- set-up through the HTTP API ----------------------------------------------------------------


@dataclass
class Fleet:
    """What the set-up made on one database: devices with tokens and a signed download URL."""

    database: str  # "sqlite" or "postgresql"
    data: Path
    database_url: str | None
    devices: list[tuple[str, str]]  # (serial, device token)
    download: str  # path and query of the signed URL
    job: bytes  # one real 200 check-in answer


def checkin_body(serial: str) -> str:
    return json.dumps({"serial": serial, "version": "1.0.0", "board": BOARD})


def _ok(response: httpx.Response, *codes: int) -> httpx.Response:
    if response.status_code not in codes:
        raise BenchError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:300]}"
        )
    return response


def set_up(
    server: Running, fleet_db: str, data: Path, database_url: str | None, image: bytes, n: int
) -> Fleet:
    admin = httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {server.admin}"}, timeout=60
    )
    with admin:
        pem = {"content-type": "application/x-pem-file"}
        _ok(admin.post("/api/v1/keys", content=KEY.public_key.pem(), headers=pem), 201)
        _ok(admin.put(f"/api/v1/products/{PRODUCT}", json={"board": BOARD}), 200)
        artifact = _ok(
            admin.post(
                "/api/v1/artifacts",
                params={"name": "app.img"},
                content=image,
                headers={"content-type": "application/octet-stream"},
            ),
            201,
        ).json()
        if artifact["id"] != hashlib.sha256(image).hexdigest():
            raise BenchError("the uploaded artifact's id is not the image's SHA-256")
        deployment = {"artifact_id": artifact["id"], "product": PRODUCT, "group": GROUP}
        _ok(admin.post("/api/v1/deployments", json=deployment), 201)
        serials = [f"bench-{i:03d}" for i in range(n)]
        device = {"product": PRODUCT, "group": GROUP, "version": "1.0.0", "board": BOARD}
        for serial in serials:
            _ok(admin.put(f"/api/v1/devices/{serial}", json=device), 200)
    where = ["--database-url", database_url] if database_url else ["--data", str(data)]

    def token(serial: str) -> str:
        argv = [str(BIN / "otakit"), "token", "create", "--role", "device", "--device", serial]
        done = subprocess.run(
            [*argv, *where], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"otakit token create failed: {done.stderr.strip()}")
        return done.stdout.strip()

    devices = [(serial, token(serial)) for serial in serials]
    serial, device_token = devices[0]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer = _ok(
            client.post(
                "/api/v1/device/checkin",
                content=checkin_body(serial),
                headers={
                    "authorization": f"Bearer {device_token}",
                    "content-type": "application/json",
                },
            ),
            200,
        )
        job = answer.json()["job"]
        if job is None or job["artifact_id"] != artifact["id"]:
            raise BenchError(f"the check-in did not offer the deployed artifact: {answer.text}")
        url = httpx.URL(job["url"])
        download = url.raw_path.decode()
        part = _ok(client.get(download, headers={"range": "bytes=4096-8191"}), 206)
        if part.content != image[4096:8192]:
            raise BenchError("the signed URL served other bytes than the image's")
    return Fleet(fleet_db, data, database_url, devices, download, answer.content)


def make_image(payload_bytes: int = IMAGE_PAYLOAD) -> bytes:
    payload = random.Random(20240).randbytes(payload_bytes)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse("1.2.0"), pad_header=True))


# --- wrk ----------------------------------------------------------------------------------------

LUA = """\
-- generated by bench/server_bench.py
local specs = {specs}
local stride = {stride}
local cap = {cap}
local threads = 0
local wanted = {{}}
local at = 0
local sent = 0

function setup(thread)
  thread:set("thread_index", threads)
  threads = threads + 1
end

function init(args)
  for i, s in ipairs(specs) do
    wanted[i] = wrk.format(s[1], s[2], s[3], s[4])
  end
  at = ((thread_index or 0) * stride) % #wanted
end

function request()
  sent = sent + 1
  if sent > cap then
    wrk.thread:stop()
  end
  at = at % #wanted + 1
  return wanted[at]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"duration_us": %.0f, "requests": %.0f, "bytes": %.0f, "connect": %.0f, ' ..
    '"read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f, "p50_us": %.0f, ' ..
    '"p90_us": %.0f, "p99_us": %.0f, "mean_us": %.1f, "max_us": %.0f}}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def _lua_string(text: str) -> str:
    if not text.isascii() or "\\u" in json.dumps(text):
        raise BenchError(f"cannot put {text!r} in a Lua script")
    return json.dumps(text)  # JSON's escapes for ASCII text are Lua's too


def lua_script(
    path: Path, specs: list[tuple[str, str, dict[str, str], str | None]], stride: int
) -> Path:
    def spec(method: str, target: str, headers: dict[str, str], body: str | None) -> str:
        head = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
        return (
            f"{{{_lua_string(method)}, {_lua_string(target)}, {{{head}}}, "
            f"{_lua_string(body) if body is not None else 'nil'}}}"
        )

    table = "{\n  " + ",\n  ".join(spec(*s) for s in specs) + "\n}"
    path.write_text(LUA.format(specs=table, stride=stride, cap=REQUEST_CAP))
    return path


class Serving(TypedDict):
    """Which server a cell measures: :meth:`Bench.cell`'s keyword arguments other than the
    workload's."""

    name: str
    database: str
    workers: int


@dataclass
class Cell:
    server: str  # "nginx" or "otakit"
    database: str  # "-" for nginx
    workers: int
    workload: str  # "checkin" or "range"
    range_bytes: int | None
    duration_s: float
    requests: int
    req_per_s: float
    payload_bytes_per_s: float | None  # ranges: requested bytes per second
    wire_bytes: int  # everything wrk read, headers included
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int]
    server_cpu_s: float
    client_cpu_s: float
    vs_nginx: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    wrk: str
    duration: int
    warmup: int

    def run(self, url: str, script: Path, seconds: int) -> dict[str, Any]:
        argv = [self.wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s"]
        done = subprocess.run(
            [*argv, "-s", str(script), url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        for line in done.stdout.splitlines():
            if line.startswith("WRKJSON "):
                result: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
                return result
        raise BenchError(
            f"wrk gave no result (exit {done.returncode}):\n{done.stdout}{done.stderr}"
        )

    def cell(
        self,
        server: Running,
        script: Path,
        *,
        name: str,
        database: str,
        workers: int,
        range_bytes: int | None,
    ) -> Cell:
        if self.warmup > 0:
            self.run(server.url, script, self.warmup)
        cpu0, client0 = cpu_seconds(server.proc.pid), _children_cpu()
        r = self.run(server.url, script, self.duration)
        cpu1, client1 = cpu_seconds(server.proc.pid), _children_cpu()
        seconds = r["duration_us"] / 1e6
        requests = r["requests"]
        if requests >= REQUEST_CAP * THREADS:
            print("server_bench: a wrk run reached its request cap", file=sys.stderr)
        errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout")}
        # wrk's byte count includes the answers in flight when it stops: one per connection
        if range_bytes is not None and r["bytes"] > (requests + CONNECTIONS) * (range_bytes + 4096):
            raise BenchError(f"{name}: answers are larger than the range asked for")
        cell = Cell(
            server=name,
            database=database,
            workers=workers,
            workload="checkin" if range_bytes is None else "range",
            range_bytes=range_bytes,
            duration_s=round(seconds, 3),
            requests=requests,
            req_per_s=round(requests / seconds, 1),
            payload_bytes_per_s=(
                round((requests - errors["status"]) * range_bytes / seconds)
                if range_bytes is not None
                else None
            ),
            wire_bytes=r["bytes"],
            p50_ms=r["p50_us"] / 1000,
            p90_ms=r["p90_us"] / 1000,
            p99_ms=r["p99_us"] / 1000,
            mean_ms=round(r["mean_us"] / 1000, 3),
            max_ms=r["max_us"] / 1000,
            errors=errors,
            server_cpu_s=round(cpu1 - cpu0, 2),
            client_cpu_s=round(client1 - client0, 2),
        )
        what = "check-ins" if range_bytes is None else f"{_size(range_bytes)} ranges"
        rate = (
            f"{cell.req_per_s:,.0f} req/s"
            if range_bytes is None
            else f"{_mib(cell.payload_bytes_per_s or 0)} MiB/s"
        )
        bad = sum(errors.values())
        print(
            f"  {name:6} {database:10} w{workers} {what:14} {rate:>14}  p99 {cell.p99_ms:7.2f} ms"
            + (f"  errors {errors}" if bad else ""),
            file=sys.stderr,
        )
        return cell


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mib(bytes_per_s: float) -> str:
    mib = bytes_per_s / 2**20
    return f"{mib:,.1f}" if mib < 100 else f"{mib:,.0f}"


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 1024} KiB"


def range_specs(
    target: str, size: int, total: int
) -> list[tuple[str, str, dict[str, str], str | None]]:
    """Sequential, aligned ranges of ``size`` over the first whole ``size`` blocks of the file."""
    return [
        ("GET", target, {"Range": f"bytes={a}-{a + size - 1}"}, None)
        for a in range(0, total - size + 1, size)
    ]


# --- the run ------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float:
    return round(a / b, 3) if a is not None and b else 0.0


def compare(cells: list[Cell]) -> None:
    """Fill ``vs_nginx`` of each otakit cell from nginx's cell of the same workload and workers."""
    reference = {(c.workers, c.workload, c.range_bytes): c for c in cells if c.server == "nginx"}
    for c in cells:
        ref = reference.get((c.workers, c.workload, c.range_bytes))
        if ref is None:
            continue
        c.vs_nginx = {
            "req_per_s": _ratio(c.req_per_s, ref.req_per_s),
            "p50": _ratio(c.p50_ms, ref.p50_ms),
            "p99": _ratio(c.p99_ms, ref.p99_ms),
            "server_cpu_per_request": _ratio(
                c.server_cpu_s / max(c.requests, 1), ref.server_cpu_s / max(ref.requests, 1)
            ),
        }
        if c.payload_bytes_per_s is not None:
            c.vs_nginx["bytes_per_s"] = _ratio(c.payload_bytes_per_s, ref.payload_bytes_per_s)


def tables(cells: list[Cell]) -> str:
    lines = ["### Check-ins (otakit `POST /api/v1/device/checkin` vs nginx `GET /job.json`)", ""]
    lines.append(
        "| server | database | workers | req/s | p50 ms | p99 ms | errors | "
        "server CPU µs/req | req/s vs nginx | p99 vs nginx |"
    )
    lines.append("|" + "---|" * 10)

    def order(c: Cell) -> tuple[int, int, bool, str]:
        return (c.range_bytes or 0, c.workers, c.server != "nginx", c.database)

    for c in sorted((c for c in cells if c.workload == "checkin"), key=order):
        cpu = c.server_cpu_s / max(c.requests, 1) * 1e6
        vs = c.vs_nginx
        lines.append(
            f"| {c.server} | {c.database} | {c.workers} | {c.req_per_s:,.0f} | {c.p50_ms:.2f} | "
            f"{c.p99_ms:.2f} | {sum(c.errors.values())} | {cpu:,.0f} | "
            f"{vs.get('req_per_s', 1.0):.3f}x | {vs.get('p99', 1.0):.1f}x |"
        )
    lines += ["", "### Image bytes (otakit signed URL `/dl/...` vs nginx, `Range` requests)", ""]
    lines.append(
        "| server | database | workers | range | req/s | MiB/s | p50 ms | p99 ms | errors | "
        "server CPU s/GiB | MiB/s vs nginx |"
    )
    lines.append("|" + "---|" * 11)
    for c in sorted((c for c in cells if c.workload == "range"), key=order):
        assert c.range_bytes is not None
        assert c.payload_bytes_per_s is not None
        gib = c.requests * c.range_bytes / 2**30
        lines.append(
            f"| {c.server} | {c.database} | {c.workers} | {_size(c.range_bytes)} | "
            f"{c.req_per_s:,.0f} | {_mib(c.payload_bytes_per_s)} | {c.p50_ms:.2f} | "
            f"{c.p99_ms:.2f} | {sum(c.errors.values())} | {c.server_cpu_s / max(gib, 1e-9):.2f} | "
            f"{c.vs_nginx.get('bytes_per_s', 1.0):.3f}x |"
        )
    aim = [
        f"{c.database} w{c.workers} {c.vs_nginx.get('bytes_per_s', 0):.2f}x"
        for c in cells
        if c.server == "otakit" and c.range_bytes == 2**20
    ]
    met = all(
        c.vs_nginx.get("bytes_per_s", 0) >= 0.5
        for c in cells
        if c.server == "otakit" and c.range_bytes == 2**20
    )
    verdict = f"{'met' if met else 'NOT met'} ({', '.join(aim)})" if aim else "not measured"
    lines += ["", f"Aim (otakit >= 0.5x nginx bytes/s for 1 MiB ranges): {verdict}"]
    return "\n".join(lines)


def add_smoke_options(parser: argparse.ArgumentParser, smoke: str, results: str) -> None:
    """``--smoke`` (the smallest run, ``smoke`` says what it does) and ``--results DIR``, for
    every bench script; :func:`check_smoke` keeps a smoke run out of bench/results/."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"the smallest run, to check that the script works (numbers mean nothing): {smoke}; "
        "needs --results",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=results)


def check_smoke(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop (exit 2) a ``--smoke`` run that would write into the recorded results."""
    if args.smoke and args.results == parser.get_default("results"):
        parser.error("--smoke needs --results DIR: its numbers are not results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s cells and fewer cells")
    add_smoke_options(parser, "writes server-quick.json", "folder for the JSON (bench/results)")
    args = parser.parse_args(argv)
    check_smoke(parser, args)
    quick = args.quick or args.smoke
    duration, warmup = (1, 0) if args.smoke else (2, 1) if quick else (5, 1)  # whole seconds
    worker_counts = (1,) if quick else (1, 2)
    sizes = (RANGES[1],) if args.smoke else (RANGES[0], RANGES[2]) if quick else RANGES
    n_devices = 2 if args.smoke else 4 if quick else 16
    image_payload = 2**20 if args.smoke else IMAGE_PAYLOAD
    out = args.results / ("server-quick.json" if quick else "server.json")

    wrk, nginx = ensure_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that clean-up runs
    about = machine(wrk, nginx)
    print(
        f"machine: {about['cpu']}, {about['cores']} cores, Linux {about['kernel']}, "
        f"Python {about['python']}, otakit {about['otakit']}, uvicorn {about['uvicorn']}, "
        f"nginx {about['nginx']}, {about['wrk']}",
        file=sys.stderr,
    )
    cells: list[Cell] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otakit-bench-")))
        bench = Bench(wrk, duration, warmup)
        image = make_image(image_payload)
        fleets: list[Fleet] = []
        print("setting up (HTTP API, otakit token create)...", file=sys.stderr)
        for database in ("sqlite", "postgresql"):
            url = None
            if database == "postgresql":
                url = stack.enter_context(postgres_database())
                if url is None:
                    continue
            data = work / f"data-{database}"
            with otakit_server(data, url, 1) as server:
                fleets.append(set_up(server, database, data, url, image, n_devices))

        # nginx gets a folder of its own: it may run as nobody, who cannot enter ``work``
        prefix = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otakit-nginx-")))
        (prefix / "www").mkdir()
        (prefix / "www" / "image.bin").write_bytes(image)
        (prefix / "www" / "job.json").write_bytes(fleets[0].job)
        scripts = work / "lua"
        scripts.mkdir()

        def checkins(fleet: Fleet | None) -> Path:
            specs = [
                (
                    "POST" if fleet else "GET",
                    "/api/v1/device/checkin" if fleet else "/job.json",
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                    checkin_body(serial) if fleet else None,
                )
                for serial, token in (fleet or fleets[0]).devices
            ]
            name = fleet.database if fleet else "nginx"
            return lua_script(scripts / f"checkin-{name}.lua", specs, len(specs) // THREADS)

        def ranges(fleet: Fleet | None, size: int) -> Path:
            specs = range_specs(fleet.download if fleet else "/image.bin", size, len(image))
            name = fleet.database if fleet else "nginx"
            return lua_script(scripts / f"range-{name}-{size}.lua", specs, len(specs) // THREADS)

        for workers in worker_counts:
            print(f"workers {workers}:", file=sys.stderr)
            with nginx_server(nginx, prefix, workers) as server:
                common = Serving(name="nginx", database="-", workers=workers)
                cells.append(bench.cell(server, checkins(None), range_bytes=None, **common))
                for size in sizes:
                    cells.append(bench.cell(server, ranges(None, size), range_bytes=size, **common))
            for fleet in fleets:
                with otakit_server(fleet.data, fleet.database_url, workers) as server:
                    common = Serving(name="otakit", database=fleet.database, workers=workers)
                    cells.append(bench.cell(server, checkins(fleet), range_bytes=None, **common))
                    for size in sizes:
                        cells.append(
                            bench.cell(server, ranges(fleet, size), range_bytes=size, **common)
                        )
                    # the device still gets its job: every check-in above took the 200 path
                    serial, token = fleet.devices[-1]
                    still = httpx.post(
                        f"{server.url}/api/v1/device/checkin",
                        content=checkin_body(serial),
                        headers={
                            "authorization": f"Bearer {token}",
                            "content-type": "application/json",
                        },
                        timeout=60,
                    )
                    _ok(still, 200)

    compare(cells)
    report = tables(cells)
    print(f"\nmachine: {about['cpu']}, {about['cores']} cores, nginx {about['nginx']}")
    print(report)
    result = {
        "machine": about,
        "settings": {
            "quick": quick,
            "smoke": args.smoke,
            "duration_s": duration,
            "warmup_s": warmup,
            "connections": CONNECTIONS,
            "threads": THREADS,
            "devices": n_devices,
            "image_bytes": len(image),
            "ranges": list(sizes),
            "offsets": "sequential, aligned to the range size; each wrk thread starts elsewhere",
        },
        "cells": [asdict(c) for c in cells],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"server_bench: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
