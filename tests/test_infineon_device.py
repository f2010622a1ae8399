"""Devices running Infineon's OTA middleware over HTTP(S), emulated from the middleware's own
behaviour (tests/infineon_device.py), against nginx and against ``otakit serve``. Issue 14, points
1 and 2.

- nginx serving the same files is the reference: the emulated device completes a 1 MiB download
  from it byte-exact, and stops after 4096 bytes when nginx is told not to answer ranges on the job
  document, as a real device does. That shows the emulator is realistic.
- ``otakit serve`` over HTTP and HTTPS: the job flow at ``/devices/SERIAL/ota_update.json`` and at
  ``/ota_update.json`` and the direct flow download the image byte-exact, and the server records
  the result. The middleware has no way to send a token (its request headers are fixed tables), so
  the devices belong to a product that allows anonymous devices.
- Every GET a device sends with ``Range`` is answered 206 with ``Content-Range`` (what
  ``curl -D - -H 'Range: bytes=0-' URL`` shows).

nginx is installed by ``make test`` (scripts/ensure-services.sh): without it these tests are
skipped, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image

from .infineon_device import (
    CHUNK_SIZE,
    Device,
    DeviceError,
    Exchange,
    parse_job,
    run_direct_flow,
    run_job_flow,
)
from .mqtt_harness import make_tls
from .server_harness import IN_CI, Server, free_port, start_server

BOARD = "CY8CPROTO_062_4343W"
KEY = SigningKey.generate("ecdsa-p256")
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def firmware() -> bytes:
    """A signed image of 1 MiB of payload. Its size ends in a short range (not a multiple of
    4096, nor one byte short of one, where the device's clamp would not apply)."""
    payload = random.Random(14).randbytes(1024 * 1024)
    image = sign_image(payload, KEY, SignOptions(ImageVersion.parse("2.0.0"), pad_header=True))
    assert len(image) % CHUNK_SIZE not in (0, CHUNK_SIZE - 1)
    return image


def _job_document(file: str) -> dict[str, str]:
    return {
        "Message": "Update Available",
        "Manufacturer": "Infineon",
        "ManufacturerID": "IFX",
        "Product": "widget",
        "SerialNumber": "ABC213450001",
        "Board": BOARD,
        "Version": "2.0.0",
        "Connection": "HTTP",
        "Server": "",
        "Port": "",
        "File": file,
    }


def _describe(trace: list[Exchange]) -> str:
    """The first and last requests of a session, for failure messages."""
    shown = trace if len(trace) <= 6 else [*trace[:3], *trace[-3:]]
    lines = [f"{len(trace)} requests:"]
    for e in shown:
        lines.append(
            f"  {e.method} {'https' if e.tls else 'http'}://{e.host}:{e.port}{e.path} "
            f"Range={e.request_header('Range')!r} -> {e.status} "
            f"Content-Range={e.header('Content-Range')!r} {e.error or ''}".rstrip()
        )
    return "\n".join(lines)


def _session(run: Callable[[], bytes], trace: list[Exchange]) -> bytes:
    """What the device wrote; the test fails with the device's error and requests if it gave up."""
    error: DeviceError | None = None
    try:
        return run()
    except DeviceError as exc:
        error = exc
    pytest.fail(f"the device gave up: {error}\n{_describe(trace)}")


def _device_ranges(total: int) -> list[str]:
    """4096-byte ranges from 0, the last one clamped to the end of the file."""
    return [
        f"bytes={start}-{min(start + CHUNK_SIZE, total) - 1}"
        for start in range(0, total, CHUNK_SIZE)
    ]


def _check_data_gets(trace: list[Exchange], path: str, total: int) -> None:
    gets = [e for e in trace if e.method == "GET" and e.path == path]
    assert [e.request_header("Range") for e in gets] == _device_ranges(total)
    for e in gets:
        assert e.request_header("User-Agent") == "ota-http-client"
        assert e.request_header("Host") == e.host  # the host name only, never the port
        assert e.status == 206, _describe(trace)
        first, last = (e.request_header("Range") or "").removeprefix("bytes=").split("-")
        assert e.header("Content-Range") == f"bytes {first}-{last}/{total}"


# --- nginx, the reference ----------------------------------------------------------------------

NGINX_CONF = """\
{user}
worker_processes 1;
error_log stderr notice;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
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
        # answered like today's otakit job documents: 200, no Content-Range
        location /no-range/ {{ max_ranges 0; }}
    }}
}}
"""


def _nginx_path() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, firmware: bytes) -> Iterator[int]:
    """nginx on a free loopback port serving the job document and the image; yields the port."""
    exe = _nginx_path()
    if exe is None:
        message = "nginx is not installed (make test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    prefix = tmp_path_factory.mktemp("nginx")
    www = prefix / "www"
    (www / "no-range").mkdir(parents=True)
    (prefix / "tmp").mkdir()
    (www / "ota-update.bin").write_bytes(firmware)
    (www / "ota_update.json").write_text(json.dumps(_job_document("/ota-update.bin")))
    (www / "no-range" / "ota_update.json").write_text(json.dumps(_job_document("/ota-update.bin")))
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # pytest's folders are private to root
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=port))
    proc = subprocess.Popen(
        [exe, "-e", "stderr", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while True:  # nginx opens its listening socket before it starts its workers
            try:
                line = lines.get(timeout=30)
            except queue.Empty:
                raise AssertionError("nginx did not start within 30 s:\n" + "".join(seen)) from None
            if line is None:
                raise AssertionError("nginx exited:\n" + "".join(seen))
            seen.append(line)
            if "start worker process" in line:
                break
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_job_flow_against_nginx(nginx: int, firmware: bytes) -> None:
    """The reference: the job with Range: bytes=0- (206), 4096-byte ranges driven by the total
    of the first data answer, then a POST with no body."""
    trace: list[Exchange] = []
    data = run_job_flow(HOST, nginx, job_path="/ota_update.json", board=BOARD, trace=trace)
    assert data == firmware, _describe(trace)
    job = trace[0]
    assert (job.method, job.path, job.request_header("Range")) == (
        "GET",
        "/ota_update.json",
        "bytes=0-",
    )
    assert job.status == 206
    assert re.fullmatch(r"bytes 0-(\d+)/(\d+)", job.header("Content-Range") or "")
    _check_data_gets(trace, "/ota-update.bin", len(firmware))
    result = trace[-1]
    assert (result.method, result.path) == ("POST", "/ota-update.bin")
    assert result.request.endswith(b"\r\n\r\n")  # no body
    assert result.request_header("Content-Length") is None
    assert result.request_header("Range") == "bytes=0-"
    assert len(trace) == 1 + len(_device_ranges(len(firmware))) + 1


def test_direct_flow_against_nginx(nginx: int, firmware: bytes) -> None:
    trace: list[Exchange] = []
    assert run_direct_flow(HOST, nginx, trace=trace) == firmware, _describe(trace)
    _check_data_gets(trace, "/ota-update.bin", len(firmware))
    assert all(e.method == "GET" for e in trace)  # the direct flow sends no result


def test_job_without_content_range_stops_the_device_after_4096_bytes(
    nginx: int, firmware: bytes
) -> None:
    """nginx answering the job with 200 and no Content-Range (ranges off there): the header
    table loses its Content-Range entry, the data loop has no total and stops after one range,
    and the entry stays lost for the next session until the device reboots."""
    device = Device(board=BOARD)
    data = run_job_flow(HOST, nginx, job_path="/no-range/ota_update.json", device=device)
    job = device.trace[0]
    assert (job.status, job.header("Content-Range")) == (200, None)
    assert data == firmware[:CHUNK_SIZE]
    assert [e.request_header("Range") for e in device.trace if e.method == "GET"] == [
        "bytes=0-",
        f"bytes=0-{CHUNK_SIZE - 1}",
    ]
    # the data answers did carry Content-Range: the device just no longer reads it
    assert device.trace[1].header("Content-Range") == f"bytes 0-4095/{len(firmware)}"
    assert run_direct_flow(HOST, nginx, device=device) == firmware[:CHUNK_SIZE]
    assert run_direct_flow(HOST, nginx) == firmware  # after a reboot


# --- the device's job rules, without a network ------------------------------------------------


def _parse(doc: dict[str, Any], *, connection: str = "HTTPS", strict: bool = True) -> Any:
    return parse_job(
        json.dumps(doc).encode(),
        host=HOST,
        port=8443,
        connection=connection,
        board=BOARD,
        version=(1, 0, 0),
        strict=strict,
    )


def test_job_rules_of_the_device() -> None:
    base = _job_document("/f.bin")
    # empty Server and Port keep the server, when Connection is the one in use
    same = _parse({**base, "Connection": "HTTPS"})
    assert (same.changing_server, same.connection, same.host, same.port) == (
        False,
        "HTTPS",
        HOST,
        8443,
    )
    assert not _parse(
        {**base, "Connection": "https", "Server": HOST, "Port": "8443"}
    ).changing_server
    # a device on HTTPS told "HTTP" with an empty Port moves to plain HTTP on port 0
    moved = _parse({**base, "Connection": "HTTP"})
    assert (moved.changing_server, moved.connection, moved.host, moved.port) == (
        True,
        "HTTP",
        HOST,
        0,
    )
    # the same with the right scheme but another port (e.g. a default one from a Host header)
    assert _parse({**base, "Connection": "HTTPS", "Port": "443"}).changing_server
    # Connection is a prefix match: "" is MQTT; numbers are not strings and are ignored
    assert _parse({**base, "Connection": ""}).connection == "MQTT"
    assert _parse({**base, "Connection": "HTTPS", "Port": 443}).port == 8443
    # versions and boards
    with pytest.raises(DeviceError, match="INVALID_VERSION"):
        _parse({**base, "Version": "1.0.0"})
    with pytest.raises(DeviceError, match="WRONG_BOARD"):
        _parse({**base, "Board": BOARD.lower()})
    # fixed buffers: SerialNumber is 32 bytes with its terminator
    assert _parse({**base, "Connection": "HTTPS", "SerialNumber": "S" * 31}).values[
        "serialnumber"
    ] == ("S" * 31)
    with pytest.raises(DeviceError, match="FIELD_TOO_LONG"):
        _parse({**base, "SerialNumber": "S" * 32})
    cut = _parse({**base, "Connection": "HTTPS", "SerialNumber": "S" * 60}, strict=False)
    assert cut.values["serialnumber"] == "S" * 31
    assert cut.warnings


# --- otakit serve ------------------------------------------------------------------------------


@dataclass
class Otakit:
    """A server with one anonymous product, its image deployed, and one registered device."""

    server: Server
    scheme: str
    port: int
    tls: ssl.SSLContext | None
    admin: httpx.Client
    product: str
    serial: str
    deployment: int

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.scheme}://{HOST}:{self.port}",
            verify=self.tls or True,
            timeout=30,
        )


@pytest.fixture(scope="module", params=["http", "https"])
def otakit(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, firmware: bytes
) -> Iterator[Otakit]:
    scheme = request.param
    folder = tmp_path_factory.mktemp(f"otakit-{scheme}")
    tls: ssl.SSLContext | None = None
    extra: tuple[str, ...] = ()
    if scheme == "https":
        files = make_tls(folder / "tls")
        tls = ssl.create_default_context(cafile=str(files.ca))
        extra = ("--tls-cert", str(files.server_cert), "--tls-key", str(files.server_key))
    server = start_server(folder / "data", extra=extra)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        admin = httpx.Client(
            base_url=f"{scheme}://{HOST}:{port}",
            headers={"authorization": f"Bearer {server.admin}"},
            verify=tls or True,
            timeout=60,
        )
        with admin:
            response = admin.post(
                "/api/v1/keys",
                content=KEY.public_key.pem(),
                headers={"content-type": "application/x-pem-file"},
            )
            assert response.status_code == 201, response.text
            product = f"prod-{uuid.uuid4().hex[:8]}"
            response = admin.put(
                f"/api/v1/products/{product}", json={"board": BOARD, "anonymous": True}
            )
            assert response.status_code == 200, response.text
            response = admin.post(
                "/api/v1/artifacts",
                params={"name": "app.img", "board": BOARD},
                content=firmware,
                headers={"content-type": "application/octet-stream"},
            )
            assert response.status_code == 201, response.text
            artifact = response.json()
            response = admin.post(
                "/api/v1/deployments",
                json={"artifact_id": artifact["id"], "product": product, "group": "g"},
            )
            assert response.status_code == 201, response.text
            deployment = response.json()["id"]
            serial = f"dev-{uuid.uuid4().hex[:8]}"
            response = admin.put(
                f"/api/v1/devices/{serial}",
                json={"product": product, "group": "g", "version": "1.0.0", "board": BOARD},
            )
            assert response.status_code == 200, response.text
            yield Otakit(server, scheme, port, tls, admin, product, serial, deployment)
    finally:
        server.stop()


def _history(srv: Otakit) -> list[dict[str, Any]]:
    response = srv.admin.get(f"/api/v1/devices/{srv.serial}/history")
    assert response.status_code == 200, response.text
    return sorted(response.json(), key=lambda entry: entry["id"])


@pytest.mark.parametrize("path", ["/devices/{serial}/ota_update.json", "/ota_update.json"])
def test_job_flow_against_otakit(otakit: Otakit, firmware: bytes, path: str) -> None:
    """The middleware's job flow against otakit serve: a 1 MiB image byte-exact, then the
    result POST (no body) answered and recorded."""
    job_path = path.format(serial=otakit.serial)
    device_path = "{serial}" in path
    before = len(_history(otakit)) if device_path else 0
    trace: list[Exchange] = []
    data = _session(
        lambda: run_job_flow(
            HOST, otakit.port, tls_context=otakit.tls, job_path=job_path, board=BOARD, trace=trace
        ),
        trace,
    )
    written, size = len(data), len(firmware)
    assert written == size, f"the device wrote {written} of {size} bytes\n{_describe(trace)}"
    assert data == firmware
    job = trace[0]
    file = json.loads(job.body)["File"]
    _check_data_gets(trace, file, len(firmware))
    result = trace[-1]
    assert (result.method, result.path, result.tls) == ("POST", file, otakit.tls is not None)
    assert result.request.endswith(b"\r\n\r\n")  # the original sends no body
    assert result.status == 200, _describe(trace)
    assert json.loads(result.body)["Message"] == "Result Received"
    if device_path:
        history = _history(otakit)
        assert len(history) == before + 1
        assert history[-1]["deployment_id"] == otakit.deployment
        assert history[-1]["source"] == "device"
        assert history[-1]["status"] == "unknown"  # finished; the empty body says no more
    else:
        listed = otakit.admin.get(
            "/api/v1/anonymous-devices", params={"deployment": otakit.deployment}
        ).json()
        assert [(d["user_agent"], d["status"]) for d in listed] == [("ota-http-client", "unknown")]


def test_direct_flow_against_otakit(otakit: Otakit, firmware: bytes) -> None:
    trace: list[Exchange] = []
    data = _session(
        lambda: run_direct_flow(HOST, otakit.port, tls_context=otakit.tls, trace=trace), trace
    )
    written, size = len(data), len(firmware)
    assert written == size, f"the device wrote {written} of {size} bytes\n{_describe(trace)}"
    assert data == firmware
    _check_data_gets(trace, "/ota-update.bin", len(firmware))


def test_every_ranged_get_answers_206(otakit: Otakit, firmware: bytes) -> None:
    """``curl -D - -H 'Range: bytes=0-' URL`` on every path a device GETs with Range (the job
    documents, the file a job names, the direct-flow file), and the device's first and last data
    ranges on the files: 206 with ``Content-Range: bytes FIRST-LAST/TOTAL``."""
    total = len(firmware)
    ranges = _device_ranges(total)
    with otakit.client() as client:
        doc = client.get(f"/devices/{otakit.serial}/ota_update.json")
        assert doc.status_code in (200, 206), doc.text
        file = json.loads(doc.content)["File"]
        checks = [
            (f"/devices/{otakit.serial}/ota_update.json", "bytes=0-"),
            ("/ota_update.json", "bytes=0-"),
            *[
                (path, rng)
                for path in (file, "/ota-update.bin")
                for rng in ("bytes=0-", ranges[0], ranges[-1])
            ],
        ]
        wrong = []
        for path, rng in checks:
            response = client.get(path, headers={"range": rng, "user-agent": "ota-http-client"})
            content_range = response.headers.get("content-range")
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range or "")
            first, _, last = rng.removeprefix("bytes=").partition("-")
            if (
                response.status_code != 206
                or match is None
                or int(match[1]) != int(first)
                or int(match[2]) >= int(match[3])
                or (last and int(match[2]) != int(last))
                or len(response.content) != int(match[2]) - int(first) + 1
            ):
                wrong.append(
                    f"GET {path} Range: {rng} -> {response.status_code}, "
                    f"Content-Range: {content_range}"
                )
            elif path in (file, "/ota-update.bin"):
                assert int(match[3]) == total
                assert response.content == firmware[int(first) : int(match[2]) + 1]
    assert not wrong, "\n".join(wrong)
