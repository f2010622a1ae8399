"""Real update servers for tests: ``otakit serve`` in a subprocess on a free loopback port.

Backends: SQLite in a temporary data folder, a uniquely named PostgreSQL database on the local
server (created and dropped here), and S3 through moto's server mode on loopback. Readiness is
taken from uvicorn's own "Application startup complete" line, not from sleeping.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

BIN = Path(sys.executable).parent
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
IN_CI = os.environ.get("CI") == "true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lines(stream: object, sink: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.put(line)
    sink.put(None)


@dataclass
class Server:
    url: str
    admin: str
    data: Path
    database_url: str | None
    env: dict[str, str]
    proc: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)
    stderr: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def wait_log(self, text: str, timeout: float = 30) -> str:
        """The next line of the server's log that contains ``text`` (lines before it are kept
        in ``log``); AssertionError if none comes within ``timeout``."""
        while True:
            try:
                line = self.stderr.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"the server logged no {text!r}") from None
            if line is None:
                raise AssertionError(f"the server exited without logging {text!r}")
            self.log.append(line)
            if text in line:
                return line

    def client(self, token: str | None = None, **kwargs: object) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def admin_client(self) -> httpx.Client:
        return self.client(self.admin)

    def otakit(self, *args: str) -> subprocess.CompletedProcess[str]:
        where = (
            ["--database-url", self.database_url]
            if self.database_url
            else ["--data", str(self.data)]
        )
        return subprocess.run(
            [str(BIN / "otakit"), *args, *where],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )

    def token(self, role: str, *extra: str) -> str:
        result = self.otakit("token", "create", "--role", role, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(
    data: Path,
    *,
    database_url: str | None = None,
    blob_url: str | None = None,
    env: dict[str, str] | None = None,
    workers: int = 1,
    extra: tuple[str, ...] = (),
) -> Server:
    port = free_port()
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    argv = [str(BIN / "otakit"), "serve", "--data", str(data), "--port", str(port)]
    argv += ["--workers", str(workers), *extra]
    if database_url:
        argv += ["--database-url", database_url]
    if blob_url:
        argv += ["--blob-url", blob_url]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
    )
    out: queue.Queue[str | None] = queue.Queue()
    errs: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    threading.Thread(target=_lines, args=(proc.stderr, errs), daemon=True).start()
    log: list[str] = []
    ready = 0
    listening = False
    # "Uvicorn running on" comes once the socket listens (with one worker, after the app's
    # startup; with several, from the parent before the workers start); each worker then
    # reports "Application startup complete".
    while ready < workers or not listening:
        try:
            line = errs.get(timeout=60)
        except queue.Empty:
            proc.kill()
            raise AssertionError("the server did not start within 60 s:\n" + "".join(log)) from None
        if line is None:
            raise AssertionError("the server exited:\n" + "".join(log))
        log.append(line)
        if "Application startup complete" in line:
            ready += 1
        if "Uvicorn running on" in line:
            listening = True
    admin = ""
    while not out.empty():
        line = out.get()
        if line and line.startswith("otk_"):
            admin = line.strip()
    return Server(f"http://127.0.0.1:{port}", admin, data, database_url, full_env, proc, log, errs)


# --- PostgreSQL --------------------------------------------------------------------------------


def _psql(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "psql",
            "-h",
            PG["host"],
            "-p",
            PG["port"],
            "-U",
            PG["user"],
            "-d",
            "postgres",
            "-tAc",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, uniquely named database; dropped afterwards."""
    if shutil.which("psql") is None or _psql("SELECT 1").returncode != 0:
        message = "PostgreSQL is not reachable on 127.0.0.1:5432 (run `make test` to set it up)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    name = f"otakit_test_{uuid.uuid4().hex[:12]}"
    created = _psql(f'CREATE DATABASE "{name}"')
    assert created.returncode == 0, created.stderr
    try:
        yield f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- S3 (moto server mode) ---------------------------------------------------------------------

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Service:
    """A moto S3 server with one bucket ``ota``; :meth:`stop` takes it away mid-test (S3 down)."""

    blob_url: str
    server: Any
    stopped: bool = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.stop()


@contextmanager
def s3_bucket() -> Iterator[str]:
    """A bucket on a moto S3 server on loopback; yields the otakit blob URL."""
    with s3_service() as service:
        yield service.blob_url


@contextmanager
def s3_service() -> Iterator[S3Service]:
    """A bucket on a moto S3 server on loopback, with a handle to stop the server."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    service = S3Service(f"s3://ota/artifacts?endpoint={endpoint}&region=us-east-1", server)
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket="ota")
        yield service
    finally:
        service.stop()
