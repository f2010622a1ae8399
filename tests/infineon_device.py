"""An emulator of the HTTP side of a device running Infineon's OTA middleware, for tests.

It follows what the device's code does, read from its public sources, and nothing of otakit's own
device code (it imports nothing from otakit). Raw sockets, HTTP/1.1 written and read by hand, every
read bounded by a timeout and by the device's fixed buffers.

Facts it follows (repository and path; Infineon/ota-update is v4.5.0, the newest stored):

Requests (FreeRTOS/coreHTTP source/core_http_client.c and source/include/core_http_client_private.h;
Infineon/http-client source/cy_http_client_api.c):
- The request line is ``METHOD PATH HTTP/1.1`` (an empty path becomes ``/``), then
  ``User-Agent: <HTTP_USER_AGENT_VALUE>``, then ``Host: <host name>``: the host name the device
  was configured with, never a port. No ``Connection`` header (http-client passes no request flags).
- Then the middleware's own headers from its static tables, then ``Range: bytes=START-END``, or
  ``bytes=START-`` when the end is -1 (http-client adds Range whenever the start is not -1).
- A request without a body carries no ``Content-Length``.
- Response header fields are matched case-insensitively; the first match wins; an empty value reads
  as "found, length 0". The whole response (status line, headers, body) is received into the
  request's buffer: a response that does not fit fails the request.
- ``HTTP_USER_AGENT_VALUE`` is ``"ota-http-client"`` unless the application overrides it
  (Infineon/ota-update makefiles/ota_update.mk, OTA_MAKEFILE_INFO_README.md).

The middleware (Infineon/ota-update source/cy_ota_http.c):
- Headers sent: job GET ``Accept-Ranges: bytes`` with range 0..-1 (so ``Range: bytes=0-``); data GETs
  ``Accept-Ranges: bytes`` with ``Range: bytes=A-B``; result POST ``Content-Type: application/json``
  with range 0..-1 (so ``Range: bytes=0-`` too) and no body (cy_http_client_send gets NULL, 0).
  These tables are fixed: the middleware has no way to send an Authorization header, so devices
  running it can only use paths that need no token.
- Responses are read through one *static* table of four fields, in this order: Content-Type,
  Content-Length, Content-Range, Accept-Ranges. Only the first min(4, header count) entries are read.
  When a field is missing from a response, http-client (cy_http_client_read_header) clears that
  entry's field name, so the entry is gone for every later request until reboot.
- Status: below 200 and from 300 up fail the request; 2xx succeeds (the result POST reads no
  headers and ignores the status; a POST that gets no response counts as success).
- On a 2xx answer while the total image size is 0, the entry named Content-Range gives the total:
  the digits after the first ``/`` from that value on, through ``atoi``. An empty Content-Range
  value just ends that search. The total is cleared when the data download starts
  (Infineon/ota-update source/cy_ota_agent.c, cy_ota_clear_received_stats).
- Data loop: first range 0-4095 (CY_OTA_CHUNK_SIZE, include/cy_ota_api.h); it runs while nothing
  is written yet or less than the total is written, and while end > start; after each answer the
  body is written at the bytes-written offset, start = end + 1, end += 4096 and, when end > total,
  end = total - 1 (32-bit unsigned). So with no total the loop stops after the first 4096 bytes.
- A failed data request: disconnect, reconnect (CY_OTA_CONNECT_RETRIES 3) and repeat the same range.
  (The real loop then tries again for as long as reconnecting works; this emulator stops after 3
  tries of one range.)
- Buffers: job and result use ctx->http.json_doc, CY_OTA_JSON_DOC_BUFF_SIZE 1024 bytes; data uses
  chunk_buffer, CY_OTA_CHUNK_SIZE + CY_OTA_CHUNK_HEADER_SIZE = 4096 + 1024
  (source/cy_ota_internal.h, include/cy_ota_api.h). The job body is copied into job_doc (1024) with
  at most 1023 bytes and parsed up to its first NUL.
- Defaults: job file ``/ota_update.json``, direct-flow file ``/ota-update.bin``
  (include/cy_ota_defaults.h); the application picks another job path (e.g.
  ``/devices/SERIAL/ota_update.json``) through the callback's ``file`` or CY_OTA_HTTP_JOB_FILE.

Job flow, parsing and redirects (Infineon/ota-update source/cy_ota_agent.c; JSON tokenizer from
Infineon/connectivity-utilities JSON_parser/cy_json_parser.c):
- States JOB_CONNECT, JOB_DOWNLOAD, JOB_DISCONNECT, JOB_PARSE, JOB_REDIRECT, DATA_CONNECT,
  DATA_DOWNLOAD, DATA_DISCONNECT, ..., RESULT_REDIRECT, RESULT_CONNECT, RESULT_SEND: one
  connection for the job, one for the data, one for the result. A parse or data failure still
  goes through RESULT_REDIRECT and posts a result. The direct flow sends no result.
- Field names match when they have the same length and compare equal ignoring case: Message,
  Manufacturer, ManufacturerID, Product, SerialNumber, Version, Board, Connection, Server, Broker,
  Port, File, UniqueTopicName. Only JSON string values count; numbers and others are ignored. The
  value is the raw text between the quotes (escapes are not decoded). The callback's return value
  is ignored by the JSON parser, so a bad Version or Connection does not stop the parse.
- Fixed buffers (include/cy_ota_api.h, source/cy_ota_internal.h): Message 32, Manufacturer 64,
  ManufacturerID 16, Product 64, SerialNumber 32, Version 16, Board 48 (32 in
  Infineon/anycloud-ota), Server/Broker 256, File 256, UniqueTopicName 256. A longer value is cut
  to size - 1 with a warning; a value of exactly the size fills the buffer with no terminator.
- Before parsing, the server name is the current one, the port the current port and the connection
  type the current one. Server is copied only when not empty. Port is ``atoi`` of the string into a
  16-bit field (Infineon/aws-iot-device-sdk-port include/cy_tcpip_port_secure_sockets.h), so
  ``""`` is 0. Connection is MQTT, HTTP or HTTPS when the value is a case-insensitive *prefix* of
  that word (strncasecmp with the value's length), tried in that order: ``""`` means MQTT.
- Version: major = atoi, minor = atoi after the first dot, build = atoi after the second; it must be
  strictly newer than the application's. Board must equal the build's board name exactly.
- The device stays on the server it used when the connection type equals its current one, Server
  is empty or equal to its host name, and Port is 0 or equal to its port. Otherwise it switches:
  the data connection goes to (Server, Port) with TLS only when the job says HTTPS.
- The result goes to the server the job came from, to the file path last used (the job's File
  once the data download started; the job path when it never did).

Other differences of Infineon/anycloud-ota 5.0.0 (same parsing and header table): the data loop
stops at the first failed range, Board is 32 bytes, the default data file is /anycloud-ota.bin.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass, field

USER_AGENT = "ota-http-client"
JOB_FILE = "/ota_update.json"
DATA_FILE = "/ota-update.bin"
CHUNK_SIZE = 4096
CHUNK_HEADER_SIZE = 1024
JSON_DOC_BUFF_SIZE = 1024
CONNECT_RETRIES = 3
U32 = 0xFFFFFFFF

READ_TABLE = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges")
HEADER_VALUE_LEN = 32  # the static value buffers an entry points at before its first read

FIELD_SIZES = {
    "message": 32,
    "manufacturer": 64,
    "manufacturerid": 16,
    "product": 64,
    "serialnumber": 32,
    "version": 16,
    "board": 48,
    "server": 256,
    "broker": 256,
    "file": 256,
    "uniquetopicname": 256,
}
CONNECTION_WORDS = ("MQTT", "HTTP", "HTTPS")


class DeviceError(Exception):
    """The device ended its session with this error (the middleware's error names)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _RequestFailed(Exception):
    """One request failed (no connection, no complete response, too big, or not 2xx)."""


@dataclass
class Exchange:
    """One request as the device sent it and what came back."""

    method: str
    path: str
    host: str
    port: int
    tls: bool
    request: bytes
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def request_header(self, name: str) -> str | None:
        for line in self.request.decode("latin-1").split("\r\n")[1:]:
            key, sep, value = line.partition(": ")
            if sep and key.lower() == name.lower():
                return value
        return None


@dataclass
class _Response:
    status: int
    raw: bytes
    headers: list[tuple[str, int, int]]  # (name, value offset in raw, value length)
    body: bytes
    close: bool

    def find(self, name: str) -> tuple[int, int] | None:
        for key, offset, length in self.headers:
            if key.lower() == name.lower():
                return offset, length
        return None

    def text_headers(self) -> list[tuple[str, str]]:
        return [
            (key, self.raw[offset : offset + length].decode("latin-1"))
            for key, offset, length in self.headers
        ]


def _atoi(data: bytes) -> int:
    """C ``atoi``: leading blanks, a sign, digits; 0 when there are none."""
    text = data.decode("latin-1")
    i = 0
    while i < len(text) and text[i] in " \t\n\v\f\r":
        i += 1
    sign = 1
    if i < len(text) and text[i] in "+-":
        sign = -1 if text[i] == "-" else 1
        i += 1
    digits = ""
    while i < len(text) and text[i].isdigit() and text[i].isascii():
        digits += text[i]
        i += 1
    return sign * int(digits) if digits else 0


def _c_string(data: bytes) -> bytes:
    return data.split(b"\0", 1)[0]


class _Connection:
    """One TCP (or TLS) connection, as http-client keeps it between requests."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> None:
        if not 0 < port < 65536:
            raise _RequestFailed(f"cannot connect to {host}:{port}")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _RequestFailed(f"cannot connect to {host}:{port}: {exc}") from None
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise _RequestFailed(f"TLS handshake with {host}:{port} failed: {exc}") from None
        sock.settimeout(timeout)
        self.sock: socket.socket | None = sock

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def exchange(self, request: bytes, capacity: int) -> _Response | None:
        """Send ``request``; receive one response into a buffer of ``capacity`` bytes.
        None: the server closed the connection without answering."""
        if self.sock is None:
            raise _RequestFailed("not connected")
        try:
            self.sock.sendall(request)
            buffer = b""
            while True:
                response = _parse(buffer)
                if response is not None:
                    return response
                if len(buffer) >= capacity:
                    raise _RequestFailed(f"the response does not fit the {capacity}-byte buffer")
                chunk = self.sock.recv(capacity - len(buffer))
                if not chunk:
                    if not buffer:
                        return None
                    response = _parse(buffer, eof=True)
                    if response is None:
                        raise _RequestFailed("the connection closed in the middle of a response")
                    return response
                buffer += chunk
        except (OSError, ssl.SSLError) as exc:
            raise _RequestFailed(f"network error: {exc}") from None


def _parse(buffer: bytes, *, eof: bool = False) -> _Response | None:
    """The response in ``buffer`` once complete (None: more is needed)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if eof:
            raise _RequestFailed("the connection closed before the response's headers ended")
        return None
    lines = buffer[:end].split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise _RequestFailed(f"not an HTTP response: {lines[0][:80]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise _RequestFailed(f"bad status line: {lines[0][:80]!r}") from None
    headers: list[tuple[str, int, int]] = []
    offset = len(lines[0]) + 2
    for line in lines[1:]:
        name, sep, _ = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise _RequestFailed(f"bad header line: {line[:80]!r}")
        start = offset + len(name) + 1
        value = buffer[start : offset + len(line)]
        stripped = value.strip(b" \t")
        start += len(value) - len(value.lstrip(b" \t"))
        headers.append((name.decode("latin-1"), start, len(stripped)))
        offset += len(line) + 2
    body_start = end + 4
    text = {k.lower(): buffer[o : o + n].decode("latin-1") for k, o, n in reversed(headers)}
    close = "close" in text.get("connection", "").lower()
    if status in (204, 304) or 100 <= status < 200:
        return _Response(status, buffer[:body_start], headers, b"", close)
    if "chunked" in text.get("transfer-encoding", "").lower():
        body = b""
        pos = body_start
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return None
            try:
                size = int(buffer[pos:line_end].split(b";")[0], 16)
            except ValueError:
                raise _RequestFailed("bad chunk size") from None
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0 and buffer[line_end : line_end + 4] != b"\r\n\r\n":
                    return None
                return _Response(status, buffer, headers, body, close)
            if len(buffer) < line_end + 2 + size + 2:
                return None
            body += buffer[line_end + 2 : line_end + 2 + size]
            pos = line_end + 2 + size + 2
    if "content-length" in text:
        try:
            length = int(text["content-length"])
        except ValueError:
            raise _RequestFailed("bad Content-Length") from None
        if len(buffer) < body_start + length:
            return None
        return _Response(status, buffer, headers, buffer[body_start : body_start + length], close)
    if not eof:
        return None  # the body runs to the end of the connection
    return _Response(status, buffer, headers, buffer[body_start:], True)


class _ReadHeaderTable:
    """The middleware's static table of response headers (one per boot)."""

    def __init__(self) -> None:
        self.fields: list[str | None] = list(READ_TABLE)
        self.values: list[bytes] = [b""] * len(READ_TABLE)  # from the value on, to a NUL
        self.lengths: list[int] = [HEADER_VALUE_LEN] * len(READ_TABLE)

    def read(self, response: _Response) -> None:
        for i in range(min(len(self.fields), len(response.headers))):
            name = self.fields[i]
            found = response.find(name) if name is not None else None
            if found is None:  # missing (or already cleared): the entry is gone
                self.fields[i], self.values[i], self.lengths[i] = None, b"", 0
            else:
                offset, length = found
                self.values[i] = _c_string(response.raw[offset:]) if length else b""
                self.lengths[i] = length

    def total(self) -> int:
        """The total size the entry named Content-Range gives (0: none)."""
        total = 0
        for i, name in enumerate(self.fields):
            if name != "Content-Range":
                continue  # includes entries whose name was cleared
            if self.lengths[i] == 0:
                break
            slash = self.values[i].find(b"/")
            if slash >= 0:
                total = _atoi(self.values[i][slash + 1 :]) & U32
        return total


@dataclass
class ParsedJob:
    """What the device took from a job document."""

    values: dict[str, str]
    version: tuple[int, int, int]
    connection: str
    host: str
    port: int
    file: str
    changing_server: bool
    warnings: list[str]


def _string_pairs(doc: bytes) -> list[tuple[bytes, bytes | None]]:
    """(name, raw value) of every ``"name": value`` in the document; None for non-strings."""
    tokens: list[tuple[str, bytes]] = []
    i, n = 0, len(doc)
    while i < n:
        c = doc[i : i + 1]
        if c == b'"':
            j = i + 1
            while j < n and doc[j : j + 1] != b'"':
                j += 2 if doc[j : j + 1] == b"\\" else 1
            tokens.append(("s", doc[i + 1 : j]))
            i = j + 1
        elif c in (b"{", b"}", b"[", b"]", b",", b":"):
            tokens.append((c.decode(), b""))
            i += 1
        elif c in (b" ", b"\t", b"\r", b"\n"):
            i += 1
        else:
            j = i
            while j < n and doc[j : j + 1] not in b'{}[],: \t\r\n"':
                j += 1
            tokens.append(("l", doc[i:j]))
            i = j
    pairs: list[tuple[bytes, bytes | None]] = []
    for k in range(len(tokens) - 2):
        if tokens[k][0] == "s" and tokens[k + 1][0] == ":":
            kind, raw = tokens[k + 2]
            pairs.append((tokens[k][1], raw if kind == "s" else None))
    return pairs


def _connection_type(value: bytes) -> str | None:
    text = value.decode("latin-1").upper()
    for word in CONNECTION_WORDS:
        if word.startswith(text):
            return word
    return None


def parse_job(
    doc: bytes,
    *,
    host: str,
    port: int,
    connection: str,
    board: str,
    version: tuple[int, int, int],
    strict: bool = True,
) -> ParsedJob:
    """Parse a job document as the device does; DeviceError where the device stops.

    ``strict``: a value that does not fit its buffer is an error here (the device cuts it, or leaves
    it unterminated, and logs a warning); False reproduces the cut."""
    doc = _c_string(doc[: JSON_DOC_BUFF_SIZE - 1])
    if not doc:
        raise DeviceError("BADARG", "the job document is empty")
    try:
        json.loads(doc)
    except ValueError as exc:
        raise DeviceError("MALFORMED_JOB_DOC", f"the job document is not JSON: {exc}") from None
    values: dict[str, str] = {}
    warnings: list[str] = []
    new_host, new_port, new_type = host, port, connection
    major = minor = build = 0
    for raw_name, raw_value in _string_pairs(doc):
        name = raw_name.decode("latin-1").lower()
        if raw_value is None:
            continue  # not a string: ignored
        if name == "connection":
            found = _connection_type(raw_value)
            if found is None:
                warnings.append(f"unknown Connection {raw_value!r} (ignored by the parser)")
            else:
                new_type = found
            values[name] = raw_value.decode("latin-1")
            continue
        if name == "port":
            new_port = _atoi(raw_value) & 0xFFFF
            values[name] = raw_value.decode("latin-1")
            continue
        size = FIELD_SIZES.get(name)
        if size is None:
            continue
        if name in ("server", "broker") and not raw_value:
            values[name] = ""
            continue  # empty: keep the current server
        kept = raw_value
        if len(raw_value) >= size:
            what = "is cut" if len(raw_value) > size else "fills it with no terminator"
            problem = f"{raw_name.decode()} ({len(raw_value)} bytes) does not fit its {size}-byte buffer: the device {what}"
            if strict:
                raise DeviceError("FIELD_TOO_LONG", problem)
            warnings.append(problem)
            if len(raw_value) > size:
                kept = raw_value[: size - 1]
        text = kept.decode("latin-1")
        values[name] = text
        if name in ("server", "broker"):
            new_host = text
        elif name == "version":
            major, minor, build = _atoi(kept) & 0xFFFF, 0, 0
            first = kept.find(b".")
            if first < 0:
                warnings.append(f"Version {text!r} has no dot (ignored by the parser)")
                continue
            minor = _atoi(kept[first + 1 :]) & 0xFFFF
            second = kept.find(b".", first + 1)
            if second < 0:
                warnings.append(f"Version {text!r} has one dot (ignored by the parser)")
                continue
            build = _atoi(kept[second + 1 :]) & 0xFFFF
    offered = (major, minor, build)
    if offered <= version:
        raise DeviceError(
            "INVALID_VERSION",
            f"the job offers {'.'.join(map(str, offered))}, not newer than {'.'.join(map(str, version))}",
        )
    if values.get("board", "") != board:
        raise DeviceError(
            "WRONG_BOARD", f"the job's Board {values.get('board', '')!r} is not {board!r}"
        )
    same = (
        new_type == connection
        and (new_host == "" or new_host == host)
        and (new_port == 0 or new_port == port)
    )
    if same:
        new_host, new_port = host, port
    return ParsedJob(
        values,
        offered,
        new_type,
        new_host,
        new_port,
        values.get("file", ""),
        not same,
        warnings,
    )


class Device:
    """One device between two reboots: the static header table lives as long as this object."""

    def __init__(
        self,
        *,
        board: str = "CY8CPROTO_062_4343W",
        version: tuple[int, int, int] = (1, 0, 0),
        user_agent: str = USER_AGENT,
        timeout: float = 10.0,
        strict_fields: bool = True,
        max_image_size: int = 16 * 1024 * 1024,
        trace: list[Exchange] | None = None,
    ) -> None:
        self.board = board
        self.version = version
        self.user_agent = user_agent
        self.timeout = timeout
        self.strict_fields = strict_fields
        self.max_image_size = max_image_size
        self.trace: list[Exchange] = trace if trace is not None else []
        self.table = _ReadHeaderTable()
        self.total_image_size = 0
        self.job: ParsedJob | None = None

    # --- one request ---------------------------------------------------------------------------

    def _request_bytes(
        self,
        method: str,
        path: str,
        host: str,
        headers: list[tuple[str, str]],
        range_start: int,
        range_end: int,
    ) -> bytes:
        lines = [f"{method} {path or '/'} HTTP/1.1", f"User-Agent: {self.user_agent}"]
        lines.append(f"Host: {host}")
        lines += [f"{name}: {value}" for name, value in headers]
        if range_start != -1:
            end = "" if range_end == -1 else str(range_end)
            lines.append(f"Range: bytes={range_start}-{end}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(
        self,
        conn: _Connection,
        where: tuple[str, int, bool],
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        range_: tuple[int, int],
        capacity: int,
        *,
        read_headers: bool = True,
    ) -> _Response | None:
        host, port, tls = where
        request = self._request_bytes(method, path, host, headers, *range_)
        exchange = Exchange(method, path or "/", host, port, tls, request)
        self.trace.append(exchange)
        if len(request) > capacity:
            exchange.error = "the request does not fit its buffer"
            raise _RequestFailed(exchange.error)
        try:
            response = conn.exchange(request, capacity)
        except _RequestFailed as exc:
            exchange.error = str(exc)
            raise
        if response is None:
            exchange.error = "no response"
            if method == "POST":
                return None  # the result: a server that does not answer counts as success
            raise _RequestFailed("the server closed the connection without a response")
        exchange.status, exchange.headers, exchange.body = (
            response.status,
            response.text_headers(),
            response.body,
        )
        if response.close:
            conn.close()
        if not read_headers:
            return response
        self.table.read(response)
        if not 200 <= response.status < 300:
            exchange.error = f"HTTP {response.status}"
            raise _RequestFailed(f"{method} {path} answered {response.status}")
        if self.total_image_size == 0:
            self.total_image_size = self.table.total()
        return response

    def _connect(self, host: str, port: int, tls: ssl.SSLContext | None) -> _Connection:
        return _Connection(host, port, tls, self.timeout)

    # --- phases --------------------------------------------------------------------------------

    def _download(self, host: str, port: int, tls: ssl.SSLContext | None, path: str) -> bytes:
        """DATA_CONNECT and DATA_DOWNLOAD: the range loop."""
        where = (host, port, tls is not None)
        try:
            conn: _Connection | None = self._connect(host, port, tls)
        except _RequestFailed as exc:
            raise DeviceError("CONNECT", f"data connection: {exc}") from None
        self.total_image_size = 0
        written = bytearray()
        start, end = 0, CHUNK_SIZE - 1
        requests = 0
        try:
            while (not written or len(written) < self.total_image_size) and end > start:
                tries = 0
                while True:
                    requests += 1
                    if requests > self.max_image_size // CHUNK_SIZE + 2 * CONNECT_RETRIES:
                        raise DeviceError("GET_DATA", f"no end after {requests - 1} requests")
                    try:
                        if conn is None or conn.sock is None:
                            conn = self._connect(host, port, tls)
                        response = self._send(
                            conn,
                            where,
                            "GET",
                            path,
                            [("Accept-Ranges", "bytes")],
                            (start, end),
                            CHUNK_SIZE + CHUNK_HEADER_SIZE,
                        )
                        assert response is not None
                        break
                    except _RequestFailed as exc:
                        if conn is not None:
                            conn.close()
                        conn = None
                        tries += 1
                        if tries >= CONNECT_RETRIES:
                            raise DeviceError(
                                "GET_DATA", f"GET {path} bytes={start}-{end}: {exc} ({tries} tries)"
                            ) from None
                written += response.body
                if len(written) > self.max_image_size:
                    raise DeviceError("WRITE_STORAGE", f"more than {self.max_image_size} bytes")
                start = (end + 1) & U32
                end = (end + CHUNK_SIZE) & U32
                if end > self.total_image_size:
                    end = (self.total_image_size - 1) & U32
        finally:
            if conn is not None:
                conn.close()
        return bytes(written)

    def _result(self, host: str, port: int, tls: ssl.SSLContext | None, path: str) -> None:
        """RESULT_CONNECT and RESULT_SEND: POST, no body; the outcome changes nothing."""
        try:
            conn = self._connect(host, port, tls)
        except _RequestFailed as exc:
            self.trace.append(
                Exchange("POST", path, host, port, tls is not None, b"", error=str(exc))
            )
            return
        try:
            self._send(
                conn,
                (host, port, tls is not None),
                "POST",
                path,
                [("Content-Type", "application/json")],
                (0, -1),
                JSON_DOC_BUFF_SIZE,
                read_headers=False,
            )
        except _RequestFailed:
            pass
        finally:
            conn.close()

    def job_flow(
        self, host: str, port: int, tls: ssl.SSLContext | None, job_path: str = JOB_FILE
    ) -> bytes:
        connection = "HTTPS" if tls is not None else "HTTP"
        where = (host, port, tls is not None)
        try:
            conn = self._connect(host, port, tls)
        except _RequestFailed as exc:
            raise DeviceError("CONNECT", f"job connection: {exc}") from None
        try:
            response = self._send(
                conn,
                where,
                "GET",
                job_path,
                [("Accept-Ranges", "bytes")],
                (0, -1),
                JSON_DOC_BUFF_SIZE,
            )
        except _RequestFailed as exc:
            raise DeviceError("GET_JOB", str(exc)) from None
        finally:
            conn.close()
        assert response is not None
        try:
            job = parse_job(
                response.body,
                host=host,
                port=port,
                connection=connection,
                board=self.board,
                version=self.version,
                strict=self.strict_fields,
            )
        except DeviceError:
            self._result(host, port, tls, job_path)
            raise
        self.job = job
        if job.connection == "MQTT":
            self._result(host, port, tls, job_path)
            raise DeviceError(
                "CONNECT", "the job says Connection MQTT: this HTTP device cannot follow it"
            )
        data_tls = tls if job.connection == "HTTPS" else None
        if job.connection == "HTTPS" and tls is None:
            self._result(host, port, tls, job_path)
            raise DeviceError("CONNECT", "the job moves to HTTPS: this device has no credentials")
        try:
            data = self._download(job.host, job.port, data_tls, job.file)
        except DeviceError as exc:
            if exc.code == "CONNECT":
                self._result(host, port, tls, job_path)
                if job.changing_server:
                    values = job.values
                    raise DeviceError(
                        "CONNECT",
                        f"the job (Connection {values.get('connection')!r}, Server "
                        f"{values.get('server')!r}, Port {values.get('port')!r}) moved a device "
                        f"on {connection} {host}:{port} to {job.connection} {job.host}:{job.port}, "
                        f"and that failed: {exc.message}",
                    ) from None
            else:
                self._result(host, port, tls, job.file)
            raise
        self._result(host, port, tls, job.file)
        return data

    def direct_flow(self, host: str, port: int, tls: ssl.SSLContext | None, file: str) -> bytes:
        return self._download(host, port, tls, file)


def run_job_flow(
    host: str,
    port: int,
    *,
    tls_context: ssl.SSLContext | None = None,
    job_path: str = JOB_FILE,
    board: str = "CY8CPROTO_062_4343W",
    version: tuple[int, int, int] = (1, 0, 0),
    trace: list[Exchange] | None = None,
    device: Device | None = None,
    timeout: float = 10.0,
) -> bytes:
    """What the device writes to its upgrade slot in one job-flow session (job document, ranged
    data, result POST). DeviceError where the device gives up."""
    device = device or Device(board=board, version=version, trace=trace, timeout=timeout)
    return device.job_flow(host, port, tls_context, job_path)


def run_direct_flow(
    host: str,
    port: int,
    *,
    tls_context: ssl.SSLContext | None = None,
    file: str = DATA_FILE,
    trace: list[Exchange] | None = None,
    device: Device | None = None,
    timeout: float = 10.0,
) -> bytes:
    """What the device writes in one direct-flow session: ranged GETs of ``file``, no result."""
    device = device or Device(trace=trace, timeout=timeout)
    return device.direct_flow(host, port, tls_context, file)
