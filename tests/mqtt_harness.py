"""A real Mosquitto broker for tests, on free loopback ports, with TLS material made here.

``start_broker(tmp)`` starts ``mosquitto`` with three listeners, as the original deployments
use them (protocols.md §3):

- ``port``: plain MQTT, anonymous;
- ``tls_port``: TLS (server certificate signed by the test CA), anonymous;
- ``mtls_port``: TLS and a client certificate signed by the test CA is required.

``broker.tls`` holds the CA, server and client certificate/key files. Readiness is taken from
Mosquitto's own log line for the last listener, not from sleeping. ``broker.restart()`` stops it
and starts it again on the same ports (a broker restart mid-transfer).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .server_harness import IN_CI, free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA the broker does not trust
    stranger_cert: Path  # a client certificate signed by other_ca
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a client
    certificate from another CA."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    ca_key, other_key = _key(), _key()
    ca = _cert("otakit test CA", ca_key, None, ca=True)
    other = _cert("stranger CA", other_key, None, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    return TlsFiles(
        ca=_write_cert(folder / "ca.pem", ca),
        server_cert=_write_cert(
            folder / "server.pem",
            _cert("127.0.0.1", server_key, ("otakit test CA", ca_key), server=True),
        ),
        server_key=_write_key(folder / "server.key", server_key),
        client_cert=_write_cert(
            folder / "client.pem", _cert("device-1", client_key, ("otakit test CA", ca_key))
        ),
        client_key=_write_key(folder / "client.key", client_key),
        other_ca=_write_cert(folder / "other-ca.pem", other),
        stranger_cert=_write_cert(
            folder / "stranger.pem", _cert("stranger", stranger_key, ("stranger CA", other_key))
        ),
        stranger_key=_write_key(folder / "stranger.key", stranger_key),
    )


@dataclass
class Broker:
    folder: Path
    port: int
    tls_port: int
    mtls_port: int
    tls: TlsFiles
    proc: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)

    host = "127.0.0.1"

    def config(self) -> Path:
        t = self.tls
        tls = f"cafile {t.ca}\ncertfile {t.server_cert}\nkeyfile {t.server_key}\n"
        text = (
            "per_listener_settings false\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
            "log_type information\nmax_queued_messages 100000\nmax_inflight_messages 0\n"
            f"listener {self.port} 127.0.0.1\n"
            f"listener {self.tls_port} 127.0.0.1\n{tls}"
            f"listener {self.mtls_port} 127.0.0.1\n{tls}"
            "require_certificate true\nuse_identity_as_username true\n"
        )
        path = self.folder / "mosquitto.conf"
        path.write_text(text)
        return path

    def start(self) -> Broker:
        _traversable(self.folder)
        lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config())],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                self.log.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:  # "running" comes once every listener accepts connections
            try:
                line = lines.get(timeout=20)
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError("mosquitto did not start:\n" + "".join(self.log))
            if " running" in line and "mosquitto version" in line:
                return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _traversable(folder: Path) -> None:
    """Mosquitto started as root runs as its own user: it must be able to read the certificates,
    so the folders on the way (pytest's private temporary folders included) must be traversable.
    Done at every start: another pytest run may have made pytest's base folder private again."""
    for part in (folder, *folder.parents):
        if part == Path(tempfile.gettempdir()) or part == Path("/"):
            break
        part.chmod(part.stat().st_mode | 0o755)


def start_broker(folder: Path) -> Broker:
    """A running broker; skips (fails under CI=true) when Mosquitto is not installed."""
    if not os.path.exists(MOSQUITTO):
        message = "mosquitto is not installed (make test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    folder.mkdir(parents=True, exist_ok=True)
    broker = Broker(
        folder=folder,
        port=free_port(),
        tls_port=free_port(),
        mtls_port=free_port(),
        tls=make_tls(folder / "tls"),
    )
    return broker.start()


@contextmanager
def running_broker(folder: Path) -> Iterator[Broker]:
    broker = start_broker(folder)
    try:
        yield broker
    finally:
        broker.stop()
