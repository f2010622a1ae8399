"""The HTTP agent against hostile servers: where its credentials go, and how much it reads.

Every test runs the real agent (:func:`update_once` over :class:`HttpTransport` or
:class:`CheckinTransport`, a simulated MCUboot device's :class:`SlotStorage`) against real HTTP(S)
servers on loopback: ``configured`` is the server the device is configured for, ``other`` a host
a job document, a check-in answer or an MQTT publisher names (an "attacker"). The servers record
every request (its ``Authorization`` header, whether a client certificate came with it) and, for
the hostile answers, how many body bytes they managed to send before the agent hung up: a
bounded read shows as a count far below the 64 MiB on offer (the socket buffers of loopback
hold a few MiB at most). Nothing sleeps and nothing is timed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import random
import re
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from otakit.device.agent import Outcome, Result, update_once
from otakit.device.config import LOG_FACILITIES, AgentConfig, ConfigError, LogConfig
from otakit.device.events import Event, Reason
from otakit.device.journal import Journal
from otakit.device.service import configure_logging, http_settings
from otakit.device.storage import SlotStorage
from otakit.device.transports.checkin import CHECKIN_PATH, STATUS_PATH, CheckinTransport
from otakit.device.transports.http import HttpSettings, HttpTransport
from otakit.errors import ApiError, JobFetchError
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.fwinfo import FwStatus, GatewayStatus
from otakit.sim.agent import JOURNAL_FILE, device_token
from otakit.sim.device import Identity, SimDevice

from .mqtt_harness import TlsFiles, make_tls

KEY = SigningKey.generate("ecdsa-p256")
BOARD = "CY8CPROTO_062_4343W"
RUNNING = "1.0.0"
FILE = "/firmware/app-1.1.0.bin"
JOB_PATH = "/ota_update.json"
TOKEN = "otk_device_secret_token"
WAIT = 30  # seconds: the longest any wait for something that should happen at once
OFFERED = 64 * 1024 * 1024  # what a hostile answer offers to send
READ_BOUND = 16 * 1024 * 1024  # far above limit + socket buffers, far below OFFERED


def image(version: str, size: int = 32_000) -> bytes:
    payload = random.Random(f"{version}/{size}").randbytes(size)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


IMAGE = image("1.1.0")
RANGES = -(-len(IMAGE) // 4096)  # ranged GETs of 4 KiB for the whole image


def job(**changes: str) -> bytes:
    doc = {
        "Message": "Update Available",
        "Version": "1.1.0",
        "Board": BOARD,
        "Connection": "HTTP",
        "Port": "",
        "Server": "",
        "File": FILE,
    }
    doc.update(changes)
    return json.dumps(doc).encode()


# --- servers that record what they see ---------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    client_cert: bool  # a client certificate came with the TLS connection


Answer = Callable[["_Handler"], None]


@dataclass
class Site:
    """One loopback HTTP(S) server; tests set ``job``, ``files`` and ``answers``."""

    url: str = ""
    job: bytes | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)  # (method, path)
    seen: list[Seen] = field(default_factory=list)
    posts: list[tuple[str, Any]] = field(default_factory=list)
    sent: int = 0  # body bytes a hostile answer got out before the agent hung up
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    def tokens(self) -> list[str | None]:
        return [s.authorization for s in self.seen]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    site: Site


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # small send buffer: what a hostile answer gets out is close to what the agent read
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def site(self) -> Site:
        return self.server.site

    def _record(self, method: str) -> str:
        path = urlsplit(self.path).path
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        self.site.seen.append(Seen(method, path, self.headers.get("Authorization"), bool(cert)))
        return path

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self._record("GET")
        answer = self.site.answers.get(("GET", path))
        if answer is not None:
            answer(self)
        elif path == JOB_PATH and self.site.job is not None:
            self.send(200, self.site.job, {"Content-Type": "application/json"})
        elif (data := self.site.files.get(path)) is not None:
            first, last = requested(self, len(data))
            self.send(
                206,
                data[first : last + 1],
                {"Content-Range": f"bytes {first}-{last}/{len(data)}", "ETag": '"e"'},
            )
        else:
            self.send(404, b"not found")

    def do_POST(self) -> None:
        path = self._record("POST")
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with contextlib.suppress(ValueError):
            self.site.posts.append((path, json.loads(raw)))
        answer = self.site.answers.get(("POST", path))
        if answer is not None:
            answer(self)
        else:
            self.send(200, b"{}", {"Content-Type": "application/json"})


def requested(handler: _Handler, size: int) -> tuple[int, int]:
    """The first and last byte a ``Range: bytes=a-b`` asks for, clipped to ``size``."""
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", handler.headers.get("Range", ""))
    assert match is not None, handler.headers.get("Range")
    return int(match[1]), min(int(match[2]), size - 1)


def flood(status: int, headers: dict[str, str] | None = None, *, announce: bool = False) -> Answer:
    """An answer whose body is OFFERED bytes (announced in Content-Length, or chunked), sent
    until the agent hangs up; ``site.sent`` counts what got out."""

    def answer(handler: _Handler) -> None:
        site = handler.site
        piece = b"{" * 65536
        try:
            handler.send_response(status)
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            if announce:
                handler.send_header("Content-Length", str(OFFERED))
            else:
                handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            while site.sent < OFFERED:
                if announce:
                    handler.wfile.write(piece)
                else:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                site.sent += len(piece)
            if not announce:
                handler.wfile.write(b"0\r\n\r\n")
        except OSError:  # the agent hung up: what we are checking for
            pass
        finally:
            handler.close_connection = True
            site.finished.set()

    return answer


def sent_by(site: Site) -> int:
    assert site.finished.wait(WAIT), "the hostile answer never ended"
    return site.sent


class Servers:
    def __init__(self) -> None:
        self._running: list[tuple[_Server, threading.Thread]] = []

    def start(self, tls: TlsFiles | None = None) -> Site:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
            context.load_cert_chain(tls.server_cert, tls.server_key)
            context.verify_mode = ssl.CERT_OPTIONAL  # records whether a client cert came
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
            scheme = "https"
        httpd.site = Site(url=f"{scheme}://127.0.0.1:{httpd.server_address[1]}")
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        self._running.append((httpd, thread))
        return httpd.site

    def stop(self) -> None:
        for httpd, thread in self._running:
            httpd.shutdown()
            httpd.server_close()
            thread.join(WAIT)


@pytest.fixture
def servers() -> Iterator[Servers]:
    running = Servers()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsFiles]:
    folder = Path(tempfile.mkdtemp(prefix="otakit-agent-security-"))
    try:
        yield make_tls(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- the device --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    device = SimDevice.create(
        tmp_path_factory.mktemp("template") / "device",
        image(RUNNING),
        [KEY.public_key],
        layout="psoc6-2m-swap",
        identity=Identity(board=BOARD),
    )
    device.boot()
    return device.dir


@pytest.fixture
def device(template: Path, tmp_path: Path) -> SimDevice:
    shutil.copytree(template, tmp_path / "device")
    return SimDevice(tmp_path / "device")


@dataclass
class Run:
    result: Result
    events: list[Event]


def update(device: SimDevice, transport: HttpTransport, *, keeps_journal: bool = False) -> Run:
    events: list[Event] = []
    try:
        with device.bootloader() as boot:
            storage = SlotStorage(
                boot, Journal(device.dir / JOURNAL_FILE), device.keys, current_version=RUNNING
            )
            result = update_once(
                transport, storage, board=BOARD, version=RUNNING, callback=events.append
            )
            if not keeps_journal:
                assert storage.progress() is None, "a resume journal was left behind"
    finally:
        transport.close()
    return Run(result, events)


def http(device: SimDevice, server: str, **settings: Any) -> Run:
    settings.setdefault("token", TOKEN)
    keeps_journal = settings.pop("keeps_journal", False)
    transport = HttpTransport(HttpSettings(server=server, **settings), board=BOARD)
    return update(device, transport, keeps_journal=keeps_journal)


def failed(run: Run, error: str, fragment: str = "") -> str:
    """Assert a FAILED attempt with ``error``, reported once to the callback; its message."""
    result = run.result
    assert (result.outcome, result.error) == (Outcome.FAILED, error), result
    message = result.message or ""
    assert fragment in message, message
    assert "\n" not in message
    assert [e.error for e in run.events if e.reason is Reason.FAILURE] == [error]
    return message


def slot_erased(device: SimDevice) -> bool:
    with device.bootloader() as boot:
        slot = boot.secondary()
        return slot.read_at(0, slot.size).count(boot.flash.erased_value) == slot.size


# --- item 2: credentials go only to the configured server --------------------------------------


def test_a_job_naming_another_host_gets_no_token(servers: Servers, device: SimDevice) -> None:
    """The job document sends the device to another port: the image is fetched and the result
    posted there, without the bearer token; the configured server got it."""
    configured, other = servers.start(), servers.start()
    configured.job = job(Server="127.0.0.1", Port=str(other.port))
    other.files[FILE] = IMAGE
    run = http(device, configured.url)
    assert run.result.outcome is Outcome.UPDATED, run.result
    assert configured.tokens() == [f"Bearer {TOKEN}"]
    assert [s.method for s in other.seen] == ["GET"] * RANGES + ["POST"]
    assert other.tokens() == [None] * (RANGES + 1), "the token went to a host not configured"
    assert other.posts == [(FILE, {"Message": "Success", "File": FILE})]


def test_a_trusted_origin_gets_the_token(servers: Servers, device: SimDevice) -> None:
    configured, other = servers.start(), servers.start()
    configured.job = job(Server="127.0.0.1", Port=str(other.port))
    other.files[FILE] = IMAGE
    run = http(device, configured.url, trusted_origins=(other.url,))
    assert run.result.outcome is Outcome.UPDATED, run.result
    assert other.tokens() == [f"Bearer {TOKEN}"] * (RANGES + 1)


def test_the_same_origin_gets_the_token(servers: Servers, device: SimDevice) -> None:
    """Server and Port naming the configured server itself (default port written out or not,
    host in capitals): the same origin."""
    configured = servers.start()
    configured.job = job(Server="127.0.0.1", Port=str(configured.port))
    configured.files[FILE] = IMAGE
    run = http(device, configured.url.replace("http://", "HTTP://") + "/")
    assert run.result.outcome is Outcome.UPDATED, run.result
    assert configured.tokens() == [f"Bearer {TOKEN}"] * (RANGES + 2)


def test_the_client_certificate_goes_only_to_the_configured_server(
    servers: Servers, tls: TlsFiles, device: SimDevice
) -> None:
    configured, other = servers.start(tls), servers.start(tls)
    configured.job = job(Connection="HTTPS", Server="127.0.0.1", Port=str(other.port))
    other.files[FILE] = IMAGE
    settings: dict[str, Any] = {
        "ca_file": str(tls.ca),
        "client_cert": str(tls.client_cert),
        "client_key": str(tls.client_key),
    }
    run = http(device, configured.url, **settings)
    assert run.result.outcome is Outcome.UPDATED, run.result
    assert [(s.authorization, s.client_cert) for s in configured.seen] == [
        (f"Bearer {TOKEN}", True)
    ]
    assert {(s.authorization, s.client_cert) for s in other.seen} == {(None, False)}
    # explicitly trusted: both go there too
    trusted = servers.start(tls)
    configured.job = job(Connection="HTTPS", Server="127.0.0.1", Port=str(trusted.port))
    trusted.files[FILE] = IMAGE
    again = http(
        device,
        configured.url,
        trusted_origins=(trusted.url,),
        **settings,
    )
    assert again.result.outcome is Outcome.UPDATED, again.result
    assert {(s.authorization, s.client_cert) for s in trusted.seen} == {(f"Bearer {TOKEN}", True)}


def test_plain_http_from_an_https_server_is_refused(
    servers: Servers, tls: TlsFiles, device: SimDevice
) -> None:
    """An HTTPS server's job naming a plain-HTTP host is not followed (REDIRECT): nothing is
    asked of that host, not even the result; the slot stays clean. Allowed when configured,
    and then still without the token."""
    configured, plain = servers.start(tls), servers.start()
    configured.job = job(Connection="HTTP", Server="127.0.0.1", Port=str(plain.port))
    plain.files[FILE] = IMAGE
    run = http(device, configured.url, ca_file=str(tls.ca))
    message = failed(run, "REDIRECT", "plain HTTP")
    assert plain.seen == [], "the device talked to the plain-HTTP host"
    assert configured.tokens() == [f"Bearer {TOKEN}"]
    assert TOKEN not in message
    assert slot_erased(device)
    allowed = http(device, configured.url, ca_file=str(tls.ca), allow_insecure_redirects=True)
    assert allowed.result.outcome is Outcome.UPDATED, allowed.result
    assert set(plain.tokens()) == {None}


def test_a_url_that_is_not_http_is_refused(servers: Servers, device: SimDevice) -> None:
    """A check-in answer naming a file:// or ftp:// URL: REDIRECT, nothing fetched."""
    configured = servers.start()
    answer = {
        "job": {
            "url": "ftp://127.0.0.1/fw.bin",
            "name": "fw.bin",
            "version": "1.1.0",
            "sha256": hashlib.sha256(IMAGE).hexdigest(),
        }
    }
    configured.answers[("POST", CHECKIN_PATH)] = lambda h: h.send(200, json.dumps(answer).encode())
    run = update(device, checkin(configured.url))
    failed(run, "REDIRECT", "ftp")


def checkin(server: str, **settings: Any) -> CheckinTransport:
    return CheckinTransport(
        HttpSettings(server=server, token=TOKEN, **settings),
        identity={"serial": "GW-1", "board": BOARD},
        version=lambda: RUNNING,
        reported=lambda: GatewayStatus(FwStatus.APPLYING),
    )


def test_a_check_in_url_elsewhere_gets_no_token(servers: Servers, device: SimDevice) -> None:
    """The check-in answer's signed URL on another host (an S3 pre-signed URL, say): fetched
    without the bearer token, and its query (a credential) is never logged."""
    configured, other = servers.start(), servers.start()
    other.files["/bucket/fw.bin"] = IMAGE
    answer = {
        "job": {
            "url": f"{other.url}/bucket/fw.bin?X-Amz-Signature=QUERYSECRET",
            "name": "fw.bin",
            "version": "1.1.0",
            "sha256": hashlib.sha256(IMAGE).hexdigest(),
        }
    }
    configured.answers[("POST", CHECKIN_PATH)] = lambda h: h.send(200, json.dumps(answer).encode())
    run = update(device, checkin(configured.url))
    assert run.result.outcome is Outcome.UPDATED, run.result
    assert {s.path for s in configured.seen} == {CHECKIN_PATH, STATUS_PATH}
    assert set(configured.tokens()) == {f"Bearer {TOKEN}"}
    assert other.seen
    assert set(other.tokens()) == {None}


# --- logs never carry a token or a URL's query ---------------------------------------------------


@pytest.fixture
def agent_logs() -> Iterator[io.StringIO]:
    """The agent's logging as ``otakit agent run`` configures it, every facility at debug."""
    names = ("otakit", "httpx", *(f"otakit.{f}" for f in LOG_FACILITIES))
    saved = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in names
    }
    propagate = {name: logging.getLogger(name).propagate for name in names}
    stream = io.StringIO()
    configure_logging(LogConfig(level="debug"), stream)
    yield stream
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate[name]


def test_debug_logs_hold_no_token_nor_query(
    servers: Servers, device: SimDevice, agent_logs: io.StringIO
) -> None:
    configured = servers.start()
    configured.files[FILE] = IMAGE
    signed = f"{FILE}?expires=99&sig=QUERYSECRET"
    configured.job = job(File=signed)
    run = http(device, configured.url)
    assert run.result.outcome is Outcome.UPDATED, run.result
    logged = agent_logs.getvalue()
    assert FILE in logged  # the logs do name the file
    assert "QUERYSECRET" not in logged
    assert TOKEN not in logged


# --- item 4: reads are bounded -----------------------------------------------------------------


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
def test_a_huge_job_document_is_not_read(
    servers: Servers, device: SimDevice, announce: bool
) -> None:
    configured = servers.start()
    configured.answers[("GET", JOB_PATH)] = flood(200, announce=announce)
    run = http(device, configured.url)
    failed(run, "MALFORMED_JOB_DOC", "1024")
    assert sent_by(configured) < READ_BOUND
    assert slot_erased(device)


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
def test_a_huge_answer_to_a_range_is_not_read(
    servers: Servers, device: SimDevice, announce: bool
) -> None:
    configured = servers.start()
    configured.job = job()
    range_headers = {"Content-Range": f"bytes 0-4095/{len(IMAGE)}"}
    configured.answers[("GET", FILE)] = flood(206, range_headers, announce=announce)
    run = http(device, configured.url, download_tries=1)
    failed(run, "GET_DATA", "4096")
    assert sent_by(configured) < READ_BOUND
    assert slot_erased(device)


def _longer(factor: int, *, honest_range: bool) -> Answer:
    """Every range answered with ``factor`` times the bytes asked for (the image, then junk);
    Content-Range names the bytes sent, or (not ``honest_range``) the bytes asked for."""

    def answer(handler: _Handler) -> None:
        first, last = requested(handler, 1 << 40)
        body = (IMAGE + b"\xaa" * (1 << 20))[first : first + factor * (last - first + 1)]
        end = first + len(body) - 1 if honest_range else last
        handler.send(206, body, {"Content-Range": f"bytes {first}-{end}/{len(IMAGE)}"})

    return answer


@pytest.mark.parametrize("honest_range", [True, False], ids=["range-says-so", "range-hides-it"])
def test_replies_longer_than_asked_are_not_written(
    servers: Servers, device: SimDevice, honest_range: bool
) -> None:
    """8x the 4 KiB asked for: refused, nothing written (before, the image was written with
    junk past its end and the update went through)."""
    configured = servers.start()
    configured.job = job()
    configured.answers[("GET", FILE)] = _longer(8, honest_range=honest_range)
    run = http(device, configured.url)
    failed(run, "GET_DATA", "bytes 0-4095")
    assert slot_erased(device)


def _shifted(handler: _Handler) -> None:
    """Ranges after the first answered with the first range's bytes, as Content-Range says."""
    first, last = requested(handler, len(IMAGE))
    if first:
        first, last = 0, last - first
    headers = {"Content-Range": f"bytes {first}-{last}/{len(IMAGE)}"}
    handler.send(206, IMAGE[first : last + 1], headers)


def _resized(handler: _Handler) -> None:
    """The second range announces another total size."""
    first, last = requested(handler, len(IMAGE))
    total = len(IMAGE) if first == 0 else len(IMAGE) + 4096
    handler.send(206, IMAGE[first : last + 1], {"Content-Range": f"bytes {first}-{last}/{total}"})


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [(_shifted, "bytes 0-4095"), (_resized, f"{len(IMAGE) + 4096}")],
    ids=["other-start", "other-total"],
)
def test_a_content_range_that_disagrees_is_refused(
    servers: Servers, device: SimDevice, answer: Answer, fragment: str
) -> None:
    """A 206 for other bytes than asked, or another total than the first: GET_DATA, and the
    durable bytes before it are kept for the next attempt."""
    configured = servers.start()
    configured.job = job()
    configured.answers[("GET", FILE)] = answer
    run = http(device, configured.url, keeps_journal=True)
    message = failed(run, "GET_DATA", "Content-Range")
    assert fragment in message
    configured.answers.clear()
    configured.files[FILE] = IMAGE
    again = http(device, configured.url)
    assert again.result.outcome is Outcome.UPDATED, again.result


@pytest.mark.parametrize(
    ("content_range", "error"),
    [
        ("bytes 0-4095/999999999999", "VERIFY"),  # storage: larger than the slot
        ("bytes 0-4095/" + "9" * 5000, "GET_DATA"),
        ("bytes 0-4095/-5", "GET_DATA"),
        ("bytes 0-4095/100", "GET_DATA"),  # the range ends past the total
        ("bytes 0-4095/*", "GET_DATA"),
    ],
)
def test_an_absurd_total_fails_before_anything_is_written(
    servers: Servers, device: SimDevice, content_range: str, error: str
) -> None:
    configured = servers.start()
    configured.job = job()
    configured.answers[("GET", FILE)] = lambda h: h.send(
        206, IMAGE[:4096], {"Content-Range": content_range}
    )
    run = http(device, configured.url)
    failed(run, error)
    assert slot_erased(device)


def test_a_huge_check_in_answer_is_not_read(servers: Servers) -> None:
    configured = servers.start()
    configured.answers[("POST", CHECKIN_PATH)] = flood(200, {"Content-Type": "application/json"})
    transport = checkin(configured.url)
    try:
        with pytest.raises(JobFetchError, match="16384"):
            transport.fetch_job()
    finally:
        transport.close()
    assert sent_by(configured) < READ_BOUND


def test_a_huge_answer_to_the_result_is_not_read(servers: Servers, device: SimDevice) -> None:
    configured = servers.start()
    configured.job, configured.files[FILE] = job(), IMAGE
    configured.answers[("POST", FILE)] = flood(200, {"Content-Type": "application/json"})
    run = http(device, configured.url)
    assert run.result.outcome is Outcome.UPDATED, run.result
    assert sent_by(configured) < READ_BOUND


def test_an_encoded_answer_is_refused(servers: Servers, device: SimDevice) -> None:
    """A gzip bomb is small on the wire: the agent asks for identity and refuses an encoding."""
    configured = servers.start()
    configured.job = job()
    configured.answers[("GET", FILE)] = lambda h: h.send(
        206,
        b"\x1f\x8b" + bytes(4094),
        {"Content-Range": f"bytes 0-4095/{len(IMAGE)}", "Content-Encoding": "gzip"},
    )
    run = http(device, configured.url)
    failed(run, "GET_DATA", "gzip")
    assert slot_erased(device)


# --- configuration -----------------------------------------------------------------------------


def _config(**agent: object) -> AgentConfig:
    return AgentConfig.from_dict(
        {
            "agent": {"server": "https://ota.example:8443", "token": TOKEN, **agent},
            "identity": {"serial": "S-1", "board": BOARD, "version": RUNNING},
        }
    )


def test_trusted_origins_and_insecure_redirects_in_the_config(tmp_path: Path) -> None:
    config = _config(
        trusted_origins=["https://cdn.example", "http://mirror.local:8080"],
        allow_insecure_redirects=True,
    )
    settings = http_settings(config)
    assert settings.trusted_origins == ("https://cdn.example", "http://mirror.local:8080")
    assert settings.allow_insecure_redirects is True
    assert AgentConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "agent.toml"
    path.write_text(config.to_toml())
    assert AgentConfig.from_toml(path) == config


@pytest.mark.parametrize(
    ("agent", "fragment"),
    [
        ({"trusted_origins": "https://cdn.example"}, "must be a list"),
        ({"trusted_origins": ["ftp://cdn.example"]}, "trusted_origins[0] 'ftp://cdn.example'"),
        ({"trusted_origins": ["https://cdn.example/path"]}, "no path"),
        ({"trusted_origins": ["https://cdn.example", "https://u@cdn.example"]}, "credentials"),
        ({"trusted_origins": ["http://cdn.example"]}, "allow_insecure_redirects"),
        ({"allow_insecure_redirects": "yes"}, "true or false"),
    ],
)
def test_bad_trusted_origins_are_config_errors(agent: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        _config(**agent)


def test_http_settings_default_to_no_other_origin() -> None:
    settings = http_settings(_config())
    assert settings.trusted_origins == ()
    assert settings.allow_insecure_redirects is False


def test_the_sim_agents_check_in_answer_is_bounded(servers: Servers, device: SimDevice) -> None:
    """``otakit sim run`` enrolls with a check-in of its own: its answer is bounded too."""
    configured = servers.start()
    configured.answers[("POST", CHECKIN_PATH)] = flood(200, {"Content-Type": "application/json"})
    with pytest.raises(ApiError, match="16384"):
        device_token(device, HttpSettings(server=configured.url, token=TOKEN), RUNNING)
    assert sent_by(configured) < READ_BOUND


def test_a_refused_url_leaves_a_download_under_way_resumable(
    servers: Servers, tls: TlsFiles, device: SimDevice
) -> None:
    """Durable bytes from the configured server survive a job that is refused (REDIRECT)."""
    configured, plain = servers.start(tls), servers.start()
    configured.job = job()

    def first_range_only(handler: _Handler) -> None:
        first, last = requested(handler, len(IMAGE))
        if first:
            handler.send(404, b"gone")
        else:
            headers = {"Content-Range": f"bytes 0-{last}/{len(IMAGE)}", "ETag": '"e"'}
            handler.send(206, IMAGE[: last + 1], headers)

    configured.answers[("GET", FILE)] = first_range_only
    interrupted = http(device, configured.url, ca_file=str(tls.ca), keeps_journal=True)
    failed(interrupted, "GET_DATA")
    configured.job = job(Connection="HTTP", Server="127.0.0.1", Port=str(plain.port))
    refused = http(device, configured.url, ca_file=str(tls.ca), keeps_journal=True)
    failed(refused, "REDIRECT")
    record = Journal(device.dir / JOURNAL_FILE).load()
    assert record is not None
    assert record.durable == 4096
    configured.job = job()
    configured.answers.clear()
    configured.files[FILE] = IMAGE
    resumed = http(device, configured.url, ca_file=str(tls.ca))
    assert resumed.result.outcome is Outcome.UPDATED, resumed.result
    assert [s.method for s in configured.seen].count("GET") == 1 + 2 + 1 + 1 + (RANGES - 1)
