"""A TCP proxy that breaks connections on purpose, to test downloads over a bad network.

It listens on 127.0.0.1 (a free port), forwards every connection to ``target`` and, per
connection, injects one :class:`Fault`::

    with FaultProxy(("127.0.0.1", server_port), seed=7, probabilities={Fault.DROP: 0.3}) as proxy:
        httpx.get(proxy.url + "/ota-update.bin")  # 30 % of connections are dropped
        proxy.force(Fault.STALL, count=2)         # the next two connections stall, whatever the dice
        proxy.wait_idle()                         # every connection is closed: counters are final
        proxy.stats.faults[Fault.STALL]

Faults, as an HTTP client sees them (the byte counts ``at`` are response bytes):

``none``
    Pass-through, half-closes included.
``drop``
    After ``at`` response bytes, both sides are closed: the client reads a short response
    (``at`` = 0: no response at all). httpx raises ``RemoteProtocolError``.
``stall``
    After ``at`` response bytes, nothing more is forwarded for ``stall_seconds``, then the
    connection is closed. A client with a shorter read timeout gets ``ReadTimeout``; one that
    gives up and closes ends the stall early.
``truncate``
    HTTP-aware: the response headers and then ``at`` body bytes are forwarded, then the proxy
    half-closes towards the client (FIN) and waits for the client to close. httpx gets the
    headers and then ``RemoteProtocolError`` while reading the body.
``reset``
    As soon as the client has sent its first bytes, the connection is reset (RST, via
    ``SO_LINGER`` 0) without the server ever being contacted. httpx raises ``ReadError``.
    Waiting for the request makes the failure a read error every time, not a write error by
    chance.

A fault whose ``at`` lies beyond the end of the response never fires: serve responses longer
than ``fault_bytes`` when every fault must show. :attr:`FaultProxy.stats` counts only faults
that fired.

Recording: the bytes each connection forwarded to the server are kept. :meth:`requests` parses
them into HTTP requests and :meth:`ranges` lists the ``Range: bytes=a-b`` they asked for::

    proxy.ranges("/ota-update.bin")  # [(0, 4095), (4096, 8191), ...], in the order sent

Determinism: connection *i* (in accept order) draws from ``random.Random(seed)`` exactly twice,
forced or not, so its fault and ``at`` depend only on the seed and *i*. :attr:`choices` lists the
fault chosen for each connection.

One background thread runs a ``selectors`` loop over every socket; :meth:`close` (or leaving
the ``with`` block) wakes it, closes every socket it opened and joins it.
"""

from __future__ import annotations

import contextlib
import errno
import random
import re
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType, TracebackType
from typing import Any

_RECV_SIZE = 65536
_MAX_BUFFER = 256 * 1024  # per direction; stop reading a side whose data cannot be sent on
_RANGE_RE = re.compile(rb"\s*bytes\s*=\s*(\d+)\s*-\s*(\d+)\s*", re.IGNORECASE)


class Fault(StrEnum):
    NONE = "none"
    DROP = "drop"
    STALL = "stall"
    TRUNCATE = "truncate"
    RESET = "reset"


_DICE_ORDER = (Fault.DROP, Fault.STALL, Fault.TRUNCATE, Fault.RESET)


@dataclass(frozen=True)
class ProxyStats:
    """A consistent snapshot of the proxy's counters."""

    connections: int  # accepted so far
    open_connections: int
    sockets_open: int  # sockets the proxy opened and has not closed yet (listener included)
    faults: Mapping[Fault, int]  # faults that fired, by kind (never NONE)
    bytes_up: int  # client -> server, forwarded
    bytes_down: int  # server -> client, forwarded


@dataclass(frozen=True)
class Request:
    """One HTTP request as the proxy forwarded it to the server."""

    connection: int  # accept order
    method: str
    target: str  # as on the request line, e.g. ``/ota-update.bin``
    headers: Mapping[str, str]  # names in lower case; a repeated header keeps its last value

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def range(self) -> tuple[int, int] | None:
        """``(a, b)`` of a ``Range: bytes=a-b`` header; None without one (or another form)."""
        match = _RANGE_RE.fullmatch(self.headers.get("range", "").encode())
        return (int(match[1]), int(match[2])) if match else None


def parse_requests(connection: int, data: bytes) -> list[Request]:
    """The complete requests in ``data``, the bytes a client sent on one connection.

    Bodies are skipped by ``Content-Length``; parsing stops at an incomplete request or a
    chunked body (the agent sends neither in the middle of a connection).
    """
    requests: list[Request] = []
    pos = 0
    while (end := data.find(b"\r\n\r\n", pos)) >= 0:
        line, *fields = data[pos:end].decode("latin-1").split("\r\n")
        method, target, _ = [*line.split(" ", 2), "", ""][:3]
        headers: dict[str, str] = {}
        for item in fields:
            name, _, value = item.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            break
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            break
        if end + 4 + length > len(data):
            break
        requests.append(Request(connection, method, target, MappingProxyType(headers)))
        pos = end + 4 + length
    return requests


@dataclass(eq=False)
class _Conn:
    index: int
    fault: Fault
    at: int
    client: socket.socket
    sent: bytearray  # every byte forwarded to the server, kept after the connection closes
    upstream: socket.socket | None = None
    connecting: bool = True
    up_buf: bytearray = field(default_factory=bytearray)
    down_buf: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    upstream_eof: bool = False
    up_shut: bool = False
    down_shut: bool = False
    limit: int | None = None  # stream offset of the response where the fault fires
    kept: int = 0  # response bytes queued for the client
    head: bytearray = field(default_factory=bytearray)  # truncate: response bytes until headers end
    cut: bool = False  # limit reached: read no more from the server
    stall_until: float | None = None
    truncated: bool = False
    closed: bool = False

    @property
    def discarding(self) -> bool:
        """Client data goes nowhere: the connection is being reset, stalled or truncated."""
        return self.fault is Fault.RESET or self.stall_until is not None or self.truncated


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target``, injecting faults per connection.

    ``probabilities`` maps faults to their chance per connection (sum at most 1; the rest is
    pass-through). ``at`` is drawn uniformly from 0 to ``fault_bytes``. Raises ValueError for
    probabilities out of range or a negative ``fault_bytes``/``stall_seconds``.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        seed: int = 0,
        probabilities: Mapping[Fault | str, float] | None = None,
        fault_bytes: int = 1024,
        stall_seconds: float = 10.0,
    ) -> None:
        self.target = target
        self._odds = {Fault(kind): float(p) for kind, p in (probabilities or {}).items()}
        if Fault.NONE in self._odds:
            raise ValueError("give the chances of faults; pass-through takes what is left")
        if any(not 0 <= p <= 1 for p in self._odds.values()) or sum(self._odds.values()) > 1:
            raise ValueError(
                f"fault probabilities must be from 0 to 1 and sum to at most 1: {probabilities}"
            )
        if fault_bytes < 0 or stall_seconds < 0:
            raise ValueError("fault_bytes and stall_seconds must not be negative")
        self.fault_bytes = fault_bytes
        self.stall_seconds = stall_seconds
        self._rng = random.Random(seed)
        self._forced: deque[tuple[Fault, int | None]] = deque()

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._connections = 0
        self._faults = dict.fromkeys(_DICE_ORDER, 0)
        self._bytes_up = 0
        self._bytes_down = 0
        self._choices: list[Fault] = []
        self._sent: list[bytearray] = []  # per connection, in accept order

        self._conns: list[_Conn] = []
        self._sockets: set[socket.socket] = set()  # every socket opened and not yet closed
        self._registered: dict[socket.socket, int] = {}
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._family, self._kind, self._proto = socket.AF_INET, socket.SOCK_STREAM, 0
        self._address: tuple[Any, ...] = ()
        self.port = 0

    # --- public ---

    @property
    def url(self) -> str:
        """The proxy's base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                *self.target, type=socket.SOCK_STREAM
            )[0]
            self._family, self._kind, self._proto, self._address = family, kind, proto, address
            self._selector = selectors.DefaultSelector()
            listener = self._socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            self._listener = listener
            self.port = listener.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
            self._sockets |= {self._wake_r, self._wake_w}
            self._wake_r.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, "listener")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        except BaseException:
            for sock in self._sockets:
                sock.close()
            if self._selector is not None:
                self._selector.close()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Close every connection and the listener, and join the thread; idempotent."""
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        thread.join(timeout=10)
        if thread.is_alive():  # pragma: no cover - a bug in the loop
            raise RuntimeError("fault proxy thread did not stop")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def force(self, fault: Fault | str, count: int = 1, *, at: int | None = None) -> None:
        """Give the next ``count`` connections ``fault``; ``at`` fixes its byte count."""
        with self._lock:
            self._forced.extend([(Fault(fault), at)] * count)

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return self._snapshot()

    @property
    def choices(self) -> list[Fault]:
        """The fault chosen for each connection so far, in accept order (fired or not)."""
        with self._lock:
            return list(self._choices)

    def requests(self) -> list[Request]:
        """Every complete request forwarded to the server so far: by connection (accept
        order), then in the order sent."""
        with self._lock:
            sent = [bytes(data) for data in self._sent]
        return [request for i, data in enumerate(sent) for request in parse_requests(i, data)]

    def ranges(self, path: str | None = None) -> list[tuple[int, int]]:
        """The ``(a, b)`` of every ``Range: bytes=a-b`` request forwarded, in order; only
        those for ``path`` when given."""
        return [
            request.range
            for request in self.requests()
            if request.range is not None and (path is None or request.path == path)
        ]

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_until(self, predicate: Callable[[ProxyStats], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate(stats)`` holds (True) or ``timeout`` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._snapshot()), timeout)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until no connection is open: the counters are final until the next one."""
        return self.wait_until(lambda s: s.open_connections == 0, timeout)

    # --- the loop ---

    def _snapshot(self) -> ProxyStats:
        return ProxyStats(
            connections=self._connections,
            open_connections=len(self._conns),
            sockets_open=sum(1 for s in self._sockets if s.fileno() != -1),
            faults=MappingProxyType(dict(self._faults)),
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
        )

    def _socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        sock = socket.socket(family, kind, proto)
        self._sockets.add(sock)
        return sock

    def _run(self) -> None:
        """The loop. It holds the lock while it works, so a snapshot always sees a whole step."""
        assert self._selector is not None
        try:
            while not self._stopping:
                ready = self._selector.select(self._timeout())
                with self._changed:
                    self._step(ready)
                    self._changed.notify_all()
        finally:
            with self._changed:
                for conn in list(self._conns):
                    self._close_conn(conn)
                for sock in self._sockets:
                    sock.close()
                self._selector.close()
                self._changed.notify_all()

    def _step(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, events in ready:
            if key.data == "listener":
                self._accept()
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    key.fileobj.recv(64)  # type: ignore[union-attr]
            else:
                conn, role = key.data
                if not conn.closed:
                    self._on_event(conn, role, events)
        for conn in list(self._conns):
            self._progress(conn)
            if not conn.closed:
                self._update_interest(conn)

    def _timeout(self) -> float | None:
        deadlines = [c.stall_until for c in self._conns if c.stall_until is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._sockets.add(client)
            client.setblocking(False)
            index = self._connections
            self._connections += 1
            roll = self._rng.random()
            at = self._rng.randint(0, self.fault_bytes)
            fault = Fault.NONE
            for kind in _DICE_ORDER:
                roll -= self._odds.get(kind, 0.0)
                if roll < 0:
                    fault = kind
                    break
            if self._forced:
                fault, forced_at = self._forced.popleft()
                at = at if forced_at is None else forced_at
            self._choices.append(fault)
            conn = _Conn(index=index, fault=fault, at=at, client=client, sent=bytearray())
            self._sent.append(conn.sent)
            if fault in (Fault.DROP, Fault.STALL):
                conn.limit = at
            self._conns.append(conn)
            if fault is not Fault.RESET:
                self._connect_upstream(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        upstream = self._socket(self._family, self._kind, self._proto)
        upstream.setblocking(False)
        conn.upstream = upstream
        err = upstream.connect_ex(self._address)
        if err == 0:
            conn.connecting = False
        elif err not in (errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._close_conn(conn)

    def _on_event(self, conn: _Conn, role: str, events: int) -> None:
        if role == "client":
            if events & selectors.EVENT_READ:
                self._read_client(conn)
            if events & selectors.EVENT_WRITE and not conn.closed:
                self._write_client(conn)
        else:
            if events & selectors.EVENT_WRITE:
                self._write_upstream(conn)
            if events & selectors.EVENT_READ and not conn.closed:
                self._read_upstream(conn)

    def _read_client(self, conn: _Conn) -> None:
        try:
            data = conn.client.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(conn)
            return
        if not data:
            conn.client_eof = True
        elif conn.fault is Fault.RESET:
            self._reset(conn)
        elif not conn.discarding:
            conn.up_buf += data

    def _write_client(self, conn: _Conn) -> None:
        try:
            sent = conn.client.send(conn.down_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(conn)
            return
        del conn.down_buf[:sent]
        self._bytes_down += sent

    def _write_upstream(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        if conn.connecting:
            if conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._close_conn(conn)  # the server refused: so does the proxy
            else:
                conn.connecting = False
            return
        try:
            sent = conn.upstream.send(conn.up_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(conn)
            return
        conn.sent += conn.up_buf[:sent]
        del conn.up_buf[:sent]
        self._bytes_up += sent

    def _read_upstream(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        try:
            data = conn.upstream.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(conn)
            return
        if not data:
            conn.upstream_eof = True
            return
        if conn.fault is Fault.TRUNCATE and conn.limit is None:
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end >= 0:
                conn.limit = end + 4 + conn.at
                conn.head = bytearray()
        if conn.limit is not None:
            data = data[: max(conn.limit - conn.kept, 0)]
            conn.cut = conn.kept + len(data) >= conn.limit
        conn.down_buf += data
        conn.kept += len(data)

    def _progress(self, conn: _Conn) -> None:
        """Move ``conn`` on after I/O: fire its fault, pass half-closes on, end it when done."""
        if conn.closed:
            return
        if conn.fault is Fault.RESET:
            if conn.client_eof:
                self._reset(conn)
            return
        if conn.stall_until is not None:
            if conn.client_eof or time.monotonic() >= conn.stall_until:
                self._close_conn(conn)
            return
        if conn.truncated:
            if conn.client_eof:
                self._close_conn(conn)
            return
        if conn.cut and not conn.down_buf:
            self._fire(conn)
            return
        if conn.upstream is None or conn.connecting:
            return
        if conn.client_eof and not conn.up_buf and not conn.up_shut:
            conn.up_shut = True
            with contextlib.suppress(OSError):
                conn.upstream.shutdown(socket.SHUT_WR)
        if conn.upstream_eof and not conn.down_buf and not conn.down_shut:
            conn.down_shut = True
            with contextlib.suppress(OSError):
                conn.client.shutdown(socket.SHUT_WR)
        if conn.up_shut and conn.down_shut:
            self._close_conn(conn)

    def _fire(self, conn: _Conn) -> None:
        self._faults[conn.fault] += 1
        if conn.fault is Fault.DROP:
            self._close_conn(conn)
            return
        self._close_socket(conn.upstream)
        conn.upstream = None
        if conn.fault is Fault.STALL:
            conn.stall_until = time.monotonic() + self.stall_seconds
        else:  # TRUNCATE
            conn.truncated = True
            with contextlib.suppress(OSError):
                conn.client.shutdown(socket.SHUT_WR)

    def _reset(self, conn: _Conn) -> None:
        self._faults[Fault.RESET] += 1
        with contextlib.suppress(OSError):
            conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close_conn(conn)

    def _update_interest(self, conn: _Conn) -> None:
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        events = 0
        if not conn.client_eof and (conn.discarding or len(conn.up_buf) < _MAX_BUFFER):
            events |= read
        if conn.down_buf and conn.stall_until is None:
            events |= write
        self._want(conn.client, events, (conn, "client"))
        if conn.upstream is not None:
            events = 0
            if conn.connecting:
                events = write
            else:
                if not conn.upstream_eof and not conn.cut and len(conn.down_buf) < _MAX_BUFFER:
                    events |= read
                if conn.up_buf:
                    events |= write
            self._want(conn.upstream, events, (conn, "upstream"))

    def _want(self, sock: socket.socket, events: int, data: object) -> None:
        assert self._selector is not None
        current = self._registered.get(sock, 0)
        if events == current:
            return
        if current == 0:
            self._selector.register(sock, events, data)
        elif events == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, events, data)
        if events:
            self._registered[sock] = events
        else:
            del self._registered[sock]

    def _close_socket(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        if self._registered.pop(sock, 0):
            assert self._selector is not None
            self._selector.unregister(sock)
        sock.close()
        self._sockets.discard(sock)

    def _close_conn(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._close_socket(conn.upstream)
        self._close_socket(conn.client)
        self._conns.remove(conn)
