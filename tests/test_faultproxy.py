"""The fault proxy, against a real HTTP server serving a known byte pattern with Range support."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from .faultproxy import Fault, FaultProxy, ProxyStats

PATTERN = bytes(i % 251 for i in range(64 * 1024))
RAW_REQUEST = (
    b"GET /blob HTTP/1.1\r\nHost: origin\r\nRange: bytes=0-99\r\nConnection: close\r\n\r\n"
)
RANGE = {"Range": "bytes=4096-8191"}
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path != "/blob":
            self.send_error(404)
            return
        status, body, extra = 200, PATTERN, {}
        match = _RANGE_RE.fullmatch(self.headers.get("Range", ""))
        if match:
            first = int(match[1])
            last = min(int(match[2] or len(PATTERN) - 1), len(PATTERN) - 1)
            status, body = 206, PATTERN[first : last + 1]
            extra = {"Content-Range": f"bytes {first}-{last}/{len(PATTERN)}"}
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1  # the serving thread is the only writer
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the proxy cuts connections on purpose


@dataclass
class Origin:
    server: _Server

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="origin", daemon=True
    )
    thread.start()
    yield Origin(server)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def one_shot_client(proxy: FaultProxy, *, read_timeout: float = 5.0) -> httpx.Client:
    """A client that opens a new connection for every request."""
    return httpx.Client(
        base_url=proxy.url,
        timeout=httpx.Timeout(5.0, read=read_timeout),
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a reset counts as closing)."""
    sock.settimeout(5)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def read_into(buffer: bytearray, response: httpx.Response) -> None:
    """Append the raw body to ``buffer`` as it arrives, so a short read keeps what came."""
    for chunk in response.iter_raw():
        buffer += chunk


def no_faults(stats: ProxyStats) -> bool:
    return not any(stats.faults.values())


# --- pass-through ------------------------------------------------------------------------------


def test_pass_through(origin: Origin) -> None:
    with FaultProxy(origin.address) as proxy:
        with httpx.Client(base_url=proxy.url) as client:
            full = client.get("/blob")
            part = client.get("/blob", headers=RANGE)
        assert proxy.wait_idle()
        stats = proxy.stats
    assert full.content == PATTERN
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 4096-8191/{len(PATTERN)}"
    assert part.content == PATTERN[4096:8192]
    assert stats.connections == 1  # keep-alive: both requests on one connection
    assert proxy.choices == [Fault.NONE]
    assert no_faults(stats)
    assert stats.bytes_down > len(PATTERN) + 4096


def test_counts_bytes_each_way(origin: Origin) -> None:
    with FaultProxy(origin.address) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(RAW_REQUEST)
            received = recv_all(sock)
        assert proxy.wait_idle()
        stats = proxy.stats
    assert received.startswith(b"HTTP/1.1 206 ")
    assert received.endswith(b"\r\n\r\n" + PATTERN[:100])
    assert (stats.bytes_up, stats.bytes_down) == (len(RAW_REQUEST), len(received))
    assert (stats.connections, stats.open_connections) == (1, 0)


def test_records_the_requests_and_their_ranges(origin: Origin) -> None:
    with FaultProxy(origin.address) as proxy:
        with httpx.Client(base_url=proxy.url) as client:  # keep-alive: one connection
            client.get("/blob", headers={"Range": "bytes=10-19"})
            client.get("/blob", headers={"RANGE": "bytes=4096-8191"})
            client.get("/blob")
        with one_shot_client(proxy) as client:
            client.post("/blob", content=b"Range: bytes=1-2\r\n\r\n")  # a body, not a header
            client.get("/other?x=1", headers={"range": "Bytes = 7-8"})
            client.get("/blob", headers={"range": "bytes=100-"})  # open-ended: not listed
        assert proxy.wait_idle()
        requests = proxy.requests()
        assert proxy.ranges() == [(10, 19), (4096, 8191), (7, 8)]
        assert proxy.ranges("/blob") == [(10, 19), (4096, 8191)]
    assert [(r.connection, r.method, r.target) for r in requests] == [
        (0, "GET", "/blob"),
        (0, "GET", "/blob"),
        (0, "GET", "/blob"),
        (1, "POST", "/blob"),
        (2, "GET", "/other?x=1"),
        (3, "GET", "/blob"),
    ]
    assert requests[3].headers["content-length"] == "20"
    assert requests[4].path == "/other"


def test_records_nothing_a_reset_discarded(origin: Origin) -> None:
    with FaultProxy(origin.address) as proxy:
        proxy.force(Fault.RESET)
        with one_shot_client(proxy) as client:
            with pytest.raises(httpx.ReadError):
                client.get("/blob", headers={"Range": "bytes=0-9"})
            client.get("/blob", headers={"Range": "bytes=10-19"})
        assert proxy.wait_idle()
        assert proxy.ranges() == [(10, 19)]


# --- each fault as a client sees it ------------------------------------------------------------


@pytest.mark.parametrize("at", [0, 100, 1000])
def test_drop_is_a_short_response(origin: Origin, at: int) -> None:
    with FaultProxy(origin.address) as proxy:
        proxy.force(Fault.DROP, at=at)
        with one_shot_client(proxy) as client, pytest.raises(httpx.RemoteProtocolError):
            client.get("/blob")
        assert proxy.wait_idle()
        stats = proxy.stats
    assert stats.faults[Fault.DROP] == 1
    assert stats.bytes_down == at


def test_stall_is_a_read_timeout(origin: Origin) -> None:
    with FaultProxy(origin.address, stall_seconds=60) as proxy:
        proxy.force(Fault.STALL, at=500)
        with one_shot_client(proxy, read_timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
            client.get("/blob")
        # The client gave up and closed: the stall ends with it, long before 60 s.
        assert proxy.wait_idle(timeout=2)
        stats = proxy.stats
    assert stats.faults[Fault.STALL] == 1
    assert stats.bytes_down == 500


def test_stall_ends_in_a_close(origin: Origin) -> None:
    with FaultProxy(origin.address, stall_seconds=0.1) as proxy:
        proxy.force(Fault.STALL, at=0)
        with one_shot_client(proxy) as client:
            start = time.monotonic()
            with pytest.raises(httpx.RemoteProtocolError):
                client.get("/blob")
            assert time.monotonic() - start >= 0.1
        assert proxy.stats.faults[Fault.STALL] == 1


def test_truncate_is_a_short_body(origin: Origin) -> None:
    received = bytearray()
    with FaultProxy(origin.address) as proxy:
        proxy.force(Fault.TRUNCATE, at=1000)
        with one_shot_client(proxy) as client, client.stream("GET", "/blob") as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(PATTERN))
            with pytest.raises(httpx.RemoteProtocolError, match=r"complete message body"):
                read_into(received, response)
        assert proxy.wait_idle()
        assert proxy.stats.faults[Fault.TRUNCATE] == 1
    assert bytes(received) == PATTERN[:1000]


def test_reset_is_a_read_error_and_never_reaches_the_server(origin: Origin) -> None:
    before = origin.server.connections
    with FaultProxy(origin.address) as proxy:
        proxy.force(Fault.RESET)
        with one_shot_client(proxy) as client:
            with pytest.raises(httpx.ReadError):
                client.get("/blob")
            assert client.get("/blob", headers=RANGE).content == PATTERN[4096:8192]
        assert proxy.wait_idle()
        stats = proxy.stats
    assert proxy.choices == [Fault.RESET, Fault.NONE]
    assert stats.faults[Fault.RESET] == 1
    assert origin.server.connections == before + 1  # only the second connection


def test_fault_beyond_the_response_never_fires(origin: Origin) -> None:
    with FaultProxy(origin.address) as proxy:
        proxy.force(Fault.DROP, at=100_000)
        with one_shot_client(proxy) as client:
            assert client.get("/blob").content == PATTERN
        assert proxy.wait_idle()
        assert no_faults(proxy.stats)


def test_force_applies_to_the_next_n_connections(origin: Origin) -> None:
    with FaultProxy(origin.address, probabilities={Fault.RESET: 0.0}) as proxy:
        proxy.force(Fault.DROP, count=2)
        outcomes = []
        with one_shot_client(proxy) as client:
            for _ in range(3):
                try:
                    outcomes.append(client.get("/blob", headers=RANGE).status_code)
                except httpx.RemoteProtocolError:
                    outcomes.append(0)
    assert outcomes == [0, 0, 206]
    assert proxy.choices == [Fault.DROP, Fault.DROP, Fault.NONE]


# --- determinism -------------------------------------------------------------------------------

EXPECTED = {
    Fault.NONE: "206",
    Fault.DROP: "RemoteProtocolError",
    Fault.STALL: "RemoteProtocolError",  # stall_seconds is short: the stall ends in a close
    Fault.TRUNCATE: "RemoteProtocolError",
    Fault.RESET: "ReadError",
}


def run_seeded(origin: Origin, seed: int) -> tuple[list[Fault], list[str], ProxyStats]:
    odds = {"drop": 0.2, "stall": 0.1, "truncate": 0.2, "reset": 0.2}
    outcomes = []
    with FaultProxy(origin.address, seed=seed, probabilities=odds, stall_seconds=0.05) as proxy:
        with one_shot_client(proxy) as client:
            for _ in range(20):
                try:
                    response = client.get("/blob", headers=RANGE)
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)
                else:
                    assert response.content == PATTERN[4096:8192]
                    outcomes.append(str(response.status_code))
        assert proxy.wait_idle()
        return proxy.choices, outcomes, proxy.stats


def test_same_seed_same_faults(origin: Origin) -> None:
    choices, outcomes, stats = run_seeded(origin, seed=1)
    assert run_seeded(origin, seed=1) == (choices, outcomes, stats)
    assert outcomes == [EXPECTED[fault] for fault in choices]
    assert set(choices) == set(Fault)  # 20 connections show every kind with this seed
    assert sum(stats.faults.values()) == sum(fault is not Fault.NONE for fault in choices)
    assert run_seeded(origin, seed=2)[0] != choices


# --- lifecycle ---------------------------------------------------------------------------------


def test_close_ends_every_connection_and_leaks_nothing(origin: Origin) -> None:
    proxy = FaultProxy(origin.address, stall_seconds=60).start()
    port = proxy.port
    proxy.force(Fault.STALL, at=0)
    with (
        socket.create_connection(("127.0.0.1", port)) as stalled,
        socket.create_connection(("127.0.0.1", port)) as idle,
    ):
        stalled.sendall(RAW_REQUEST)
        assert proxy.wait_until(lambda s: s.faults[Fault.STALL] == 1 and s.connections == 2)
        assert proxy.stats.sockets_open == 3 + 1 + 2  # listener, wake pair; stalled; idle + server

        start = time.monotonic()
        proxy.close()
        assert time.monotonic() - start < 1

        assert not proxy.alive
        assert not [t for t in threading.enumerate() if t.name == f"faultproxy:{port}"]
        assert proxy.stats.sockets_open == 0
        assert proxy.stats.open_connections == 0
        assert recv_all(stalled) == b""
        assert recv_all(idle) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    proxy.close()  # again: nothing to do


def test_leaving_the_block_on_an_error_stops_the_proxy(origin: Origin) -> None:
    with pytest.raises(KeyError), FaultProxy(origin.address) as proxy:
        raise KeyError("boom")
    assert not proxy.alive
    assert proxy.stats.sockets_open == 0


def test_refused_upstream_closes_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()
    with FaultProxy(dead) as proxy:
        with one_shot_client(proxy) as client, pytest.raises(httpx.RemoteProtocolError):
            client.get("/blob")
        assert proxy.wait_idle()


@pytest.mark.parametrize(
    "odds",
    [{"drop": 0.6, "reset": 0.6}, {"drop": -0.1}, {"none": 0.5}, {"boom": 0.1}],
)
def test_bad_probabilities(odds: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        FaultProxy(("127.0.0.1", 1), probabilities=odds)
