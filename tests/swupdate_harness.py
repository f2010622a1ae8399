"""Debian's SWUpdate as a hawkBit device for tests: ``.swu`` bundles built here, and its suricatta
client run headless against a DDI server.

A ``.swu`` is a cpio archive (``newc``) whose first member is ``sw-description`` (libconfig),
then ``sw-description.sig`` (a detached CMS signature, DER), then the images. Debian's build
(2022.12) requires the signature (``-k`` is mandatory) and checks hardware compatibility
(``-H``), so :func:`build_swu` signs with a throwaway self-signed certificate and names the
hardware revision :data:`HARDWARE` accepts. Its image is installed by the ``rawfile`` handler to
a plain file, so the test can compare bytes.

:class:`Suricatta` runs ``swupdate -u ...`` as a subprocess in its own session, with its own
``TMPDIR`` (SWUpdate's IPC sockets and temporary files live there, so runs never share them),
an ``identify`` section (the attributes it sends as configData) and a short retry wait. The
``none`` bootloader keeps the update state in memory: a run installs and reports
``proceeding``; the next run started with ``confirm="2"`` (what a boot with ``ustate=2`` in the
bootloader's environment does) reports the action closed with success. Its log is read line by
line; :meth:`Suricatta.wait_log` waits on what SWUpdate says, not on time.

Without ``/usr/bin/swupdate`` the tests are skipped, except under CI=true, where that is a
failure (scripts/ensure-services.sh installs it with apt-get).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from .faultproxy import Request, parse_requests
from .server_harness import IN_CI

SWUPDATE = Path("/usr/bin/swupdate")
BOARD = "otakit-gw"
HARDWARE = "1.0"  # the revision given with -H and accepted by every sw-description here
IMAGE_NAME = "rootfs.img"  # the image's name inside the .swu


def swupdate_or_skip() -> None:
    """Skip the test without Debian's swupdate; under CI=true fail it instead."""
    if SWUPDATE.exists():
        return
    problem = (
        f"{SWUPDATE} not found: install Debian's swupdate "
        "(scripts/ensure-services.sh does, or apt-get install swupdate)"
    )
    if IN_CI:
        pytest.fail(problem)
    pytest.skip(problem)


# --- .swu bundles --------------------------------------------------------------------------------


def _cpio_member(name: str, data: bytes, inode: int) -> bytes:
    """One ``newc`` member: a 110-byte header of hex fields, the name, the data; each padded to
    a multiple of 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (inode, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    member = b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
    member += b"\0" * (-len(member) % 4) + data
    return member + b"\0" * (-len(member) % 4)


def cpio_newc(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A cpio archive (SVR4 ``newc``, no CRC) of ``members`` in order, as ``cpio -H newc``
    writes it: ended by ``TRAILER!!!`` and padded to 512 bytes."""
    archive = b"".join(_cpio_member(n, d, i) for i, (n, d) in enumerate(members, start=1))
    archive += _cpio_member("TRAILER!!!", b"", 0)
    return archive + b"\0" * (-len(archive) % 512)


@dataclass(frozen=True)
class Signer:
    """A throwaway ECDSA P-256 key and its self-signed certificate: SWUpdate trusts the
    certificate given with ``-k`` and checks ``sw-description.sig`` against it."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls) -> Signer:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otakit test signer")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, data: bytes) -> bytes:
        """A detached CMS (PKCS#7) signature of ``data``, DER, as ``openssl cms -sign -binary
        -outform DER`` makes it."""
        options = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
        return (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(data)
            .add_signer(self.certificate, self.key, hashes.SHA256())
            .sign(serialization.Encoding.DER, options)
        )


def sw_description(version: str, image: bytes, target: Path) -> bytes:
    """An ``sw-description`` installing ``image`` to the file ``target`` (rawfile handler)."""
    return f"""software =
{{
\tversion = "{version}";
\thardware-compatibility: [ "{HARDWARE}" ];
\tfiles: (
\t\t{{
\t\t\tfilename = "{IMAGE_NAME}";
\t\t\tpath = "{target}";
\t\t\tsha256 = "{hashlib.sha256(image).hexdigest()}";
\t\t}}
\t);
}}
""".encode()


def build_swu(image: bytes, target: Path, version: str, signer: Signer) -> bytes:
    """A signed ``.swu`` that installs ``image`` to ``target``."""
    description = sw_description(version, image, target)
    return cpio_newc(
        [
            ("sw-description", description),
            ("sw-description.sig", signer.sign(description)),
            (IMAGE_NAME, image),
        ]
    )


def install_swu(bundle: Path, signer: Signer) -> str:
    """``swupdate -i bundle``: SWUpdate installs a local bundle (signature, hardware, SHA-256
    checked); its log (stdout and stderr). Judge by the target file and the log: the exit
    status is not to be trusted (now and then 1 after a successful install, as a helper
    process ends)."""
    swupdate_or_skip()
    with tempfile.TemporaryDirectory(prefix="swu-") as home:
        certificate = Path(home) / "signer.pem"
        certificate.write_bytes(signer.certificate_pem())
        done = subprocess.run(
            [
                *(str(SWUPDATE), "-v", "-k", str(certificate)),
                *("-H", f"{BOARD}:{HARDWARE}", "-i", str(bundle)),
            ],
            capture_output=True,
            text=True,
            errors="replace",
            env={**os.environ, "TMPDIR": home},
            timeout=60,
            check=False,
        )
    return done.stdout + done.stderr


# --- the suricatta client ----------------------------------------------------------------------


def _config(attributes: Mapping[str, str]) -> str:
    """swupdate.cfg: SWUpdate refuses a file without ``globals``; ``identify`` is what it
    sends as configData."""
    entries = ",\n".join(f'\t{{ name = "{k}"; value = "{v}"; }}' for k, v in attributes.items())
    return f"globals :\n{{\n\tloglevel = 6;\n}};\nidentify : (\n{entries}\n);\n"


def _drain(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


@dataclass
class Suricatta:
    """``swupdate`` polling ``url`` as controller ``controller_id`` of ``tenant``.

    ``token`` is sent as ``TargetToken`` (``gateway``: as ``GatewayToken``); ``confirm`` is
    SWUpdate's ``-c`` (the update state to report at start: ``"2"`` success, ``"3"``
    failure). Start it with ``with`` or :meth:`start`; :meth:`stop` ends its whole session.
    (SWUpdate's ``-n`` download limit is no way to slow a download down here: libcurl 7.88
    lets a transfer burst far past it on loopback; :class:`SlowLink` does.)
    """

    url: str
    controller_id: str
    token: str
    signer: Signer
    attributes: Mapping[str, str] = field(default_factory=dict)
    gateway: bool = False
    tenant: str = "DEFAULT"
    confirm: str | None = None
    retries: int = 5
    retry_wait: int = 1
    log: list[str] = field(default_factory=list)
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _proc: subprocess.Popen[str] | None = None
    _reader: threading.Thread | None = None
    _home: Path | None = None

    def argv(self, home: Path) -> list[str]:
        suricatta = [
            *("-t", self.tenant, "-u", self.url, "-i", self.controller_id),
            *("-g" if self.gateway else "-k", self.token),
            *("-p", "1", "-r", str(self.retries), "-w", str(self.retry_wait), "-m", "1"),
        ]
        if self.confirm is not None:
            suricatta += ["-c", self.confirm]
        return [
            str(SWUPDATE),
            "-v",
            *("-f", str(home / "swupdate.cfg")),
            *("-k", str(home / "signer.pem")),
            *("-H", f"{BOARD}:{HARDWARE}"),
            *("-u", " ".join(suricatta)),
        ]

    def start(self) -> Suricatta:
        swupdate_or_skip()
        # a short path: SWUpdate's IPC sockets live in TMPDIR (a socket path has 108 bytes)
        home = self._home = Path(tempfile.mkdtemp(prefix="swu-"))
        (home / "tmp").mkdir()
        (home / "swupdate.cfg").write_text(_config(self.attributes))
        (home / "signer.pem").write_bytes(self.signer.certificate_pem())
        self._proc = subprocess.Popen(
            self.argv(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, "TMPDIR": str(home / "tmp")},
            start_new_session=True,  # its own process group: stop() ends its children too
        )
        self._reader = threading.Thread(
            target=_drain, args=(self._proc.stdout, self._lines), daemon=True
        )
        self._reader.start()
        return self

    def wait_log(self, text: str, *, timeout: float = 30, fail: Sequence[str] = ()) -> str:
        """The next line of SWUpdate's log containing ``text``; AssertionError (with the end of
        the log) when a line contains one of ``fail`` first, SWUpdate exits, or ``timeout``
        seconds pass without it."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"swupdate logged no {text!r}:\n{self.tail()}") from None
            if line is None:
                self._lines.put(None)  # it stays ended
                raise AssertionError(f"swupdate exited without logging {text!r}:\n{self.tail()}")
            self.log.append(line)
            if text in line:
                return line
            if any(bad in line for bad in fail):
                raise AssertionError(f"swupdate logged {line.strip()!r}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log read so far."""
        return "".join(self.log[-lines:])

    def stop(self) -> None:
        """End SWUpdate (SIGTERM to its process group, SIGKILL if it lingers) and remove its
        TMPDIR; idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)  # its output ends with the process
            self._reader = None
            with contextlib.suppress(queue.Empty):  # the rest of the log, for the test
                while (line := self._lines.get(timeout=10)) is not None:
                    self.log.append(line)
            self._lines.put(None)  # wait_log after stop: "swupdate exited"
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def __enter__(self) -> Suricatta:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- a link that holds a download half-way ------------------------------------------------------


class SlowLink:
    """A TCP relay to ``target`` on 127.0.0.1 that holds every response past ``hold_at`` bytes
    (per connection) until :meth:`release`, then passes the rest on at ``rate`` bytes per
    second: a download that stops half-way, for as long as the test needs, and then crawls.

    Only a download gets past ``hold_at`` (polls and feedback answers are a few hundred bytes
    each); :attr:`held` is set when one did. What clients sent is recorded: :meth:`requests`
    parses it as tests/faultproxy.py does. One thread accepts, two per connection relay.
    """

    def __init__(self, target: tuple[str, int], *, hold_at: int, rate: int) -> None:
        self.target = target
        self.hold_at = hold_at
        self.rate = rate
        self.held = threading.Event()
        self._released = threading.Event()
        self._closing = False
        self._lock = threading.Lock()
        self._sent: list[bytearray] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SlowLink:
        self._spawn(self._accept)
        return self

    def release(self) -> None:
        """Let held responses go on, at ``rate``."""
        self._released.set()

    def requests(self) -> list[Request]:
        with self._lock:
            sent = [bytes(data) for data in self._sent]
        return [request for i, data in enumerate(sent) for request in parse_requests(i, data)]

    def close(self) -> None:
        """Close every socket and join every thread."""
        self._closing = True
        self._released.set()
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in list(self._threads):
            thread.join(timeout=10)

    def __enter__(self) -> SlowLink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            sent = bytearray()
            with self._lock:
                self._sockets += [client, upstream]
                self._sent.append(sent)
            self._spawn(self._up, client, upstream, sent)
            self._spawn(self._down, upstream, client)

    def _up(self, client: socket.socket, upstream: socket.socket, sent: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
                with self._lock:
                    sent += data
            upstream.shutdown(socket.SHUT_WR)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        passed = 0
        chunk = 1024
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                fast = max(0, min(len(data), self.hold_at - passed))
                client.sendall(data[:fast])
                passed += len(data)
                rest = data[fast:]
                if rest:
                    self.held.set()
                    self._released.wait()
                for i in range(0, len(rest), chunk):
                    if self._closing:
                        return
                    client.sendall(rest[i : i + chunk])
                    time.sleep(chunk / self.rate)  # the link's speed
            client.shutdown(socket.SHUT_WR)
