"""HTTP(S) transport: the job document, ranged downloads and the result, as the original device
does them (protocols.md §1-2), made resumable.

- Job: ``GET job_path`` (``/ota_update.json``) with ``User-Agent: ota-http-client``, parsed
  strictly (the agent then checks board and version). An empty Server/Port means the server the
  job came from; another server is followed.
- Data: ``Range: bytes=a-b`` requests of ``chunk_size`` bytes; the total comes from the first
  ``Content-Range``. Each range is tried ``download_tries`` times, on a fresh connection after a
  failure. After every range the bytes are committed to storage, so an interrupted download
  continues from the last durable byte, with ``If-Range`` and the ETag: a changed image on the
  server (200 instead of 206) restarts cleanly from zero.
- Result: ``POST`` to the file path with ``{"Message": "Success"|"Failure", "File": ..., "Error":
  ..., "Reason": ...}``; a server that does not answer counts as success.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from otakit.device.journal import Download
from otakit.device.storage import Storage
from otakit.device.transports.base import Job, Progress
from otakit.errors import JobFetchError, OtakitError, TransferError
from otakit.protocol.jobdoc import UPDATE_AVAILABLE, parse_job_document
from otakit.tls import client_context

log = logging.getLogger("otakit.http")

USER_AGENT = "ota-http-client"


@dataclass(frozen=True)
class HttpSettings:
    server: str  # base URL, e.g. https://ota.example:8443
    token: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    job_path: str = "/ota_update.json"
    file_path: str = "/ota-update.bin"
    chunk_size: int = 4096
    timeout: float = 3.0  # per request: connect, send, receive
    job_timeout: float = 30.0  # the whole job fetch, retries included
    data_timeout: float = 1200.0  # the whole download, retries included
    connect_retries: int = 3
    download_tries: int = 3

    def verify(self) -> ssl.SSLContext | bool:
        """What httpx's ``verify`` takes: the configured CA and client certificate, or the
        system CAs."""
        if not self.ca_file and not self.client_cert:
            return True
        return client_context(self.ca_file, self.client_cert, self.client_key)


@dataclass(frozen=True)
class _Answer:
    """A range request's answer: its status, headers and (for 206) body."""

    status: int
    headers: httpx.Headers
    data: bytes


class HttpTransport:
    def __init__(
        self, settings: HttpSettings, *, board: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.board = board
        self.clock = clock  # for the job and data timeouts
        self._client = self._new_client()

    def _new_client(self) -> httpx.Client:
        s = self.settings
        headers = {"user-agent": USER_AGENT}
        if s.token:
            headers["authorization"] = f"Bearer {s.token}"
        return httpx.Client(
            headers=headers, timeout=s.timeout, verify=s.verify(), follow_redirects=False
        )

    def _reconnect(self) -> None:
        self._client.close()
        self._client = self._new_client()

    def close(self) -> None:
        self._client.close()

    # --- job -----------------------------------------------------------------------------------

    def _get(self, url: str, what: str, error: type[OtakitError], limit: float) -> httpx.Response:
        deadline = self.clock() + limit
        last: Exception | None = None
        for _ in range(max(1, self.settings.connect_retries)):
            if self.clock() >= deadline:
                break
            try:
                response = self._client.get(url)
            except httpx.HTTPError as exc:
                last = exc
                self._reconnect()
                continue
            if not 200 <= response.status_code < 300:
                raise error(f"{what}: the server answered {response.status_code}", value=url)
            return response
        raise error(
            f"{what}: cannot reach {url}: {last or f'no answer within {limit:g} s'}", value=url
        )

    def fetch_job(self) -> Job | None:
        url = urljoin(self.settings.server, self.settings.job_path)
        response = self._get(url, "fetching the job", JobFetchError, self.settings.job_timeout)
        doc = parse_job_document(response.content)
        if doc.message != UPDATE_AVAILABLE:
            return None
        base = self.settings.server
        if doc.server or doc.port:  # each empty one means the one the job came from
            current = urlsplit(base)
            host = doc.server or current.hostname or ""
            host = f"[{host}]" if ":" in host else host
            port = doc.port or (str(current.port) if current.port else "")
            scheme = "https" if doc.connection == "HTTPS" else "http"
            base = f"{scheme}://{host}" + (f":{port}" if port else "")
        return Job(
            url=urljoin(base, doc.file),
            file=doc.file,
            version=doc.version,
            board=doc.board,
            document=doc,
        )

    def direct_job(self) -> Job:
        path = self.settings.file_path
        return Job(url=urljoin(self.settings.server, path), file=path, board=self.board)

    # --- data ----------------------------------------------------------------------------------

    def _range(self, url: str, first: int, last: int, etag: str | None) -> _Answer:
        headers = {"range": f"bytes={first}-{last}"}
        if etag:
            headers["if-range"] = etag
        failure, status = "", None
        for _ in range(max(1, self.settings.download_tries)):
            try:
                # streamed and joined: a kept Response holds its body in a reference cycle
                # with its stream, so every range would stay in memory until a GC pass
                with self._client.stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    if status == 206:
                        return _Answer(status, response.headers, b"".join(response.iter_bytes()))
                    if status == 200:  # the whole file: not read, the caller starts over
                        return _Answer(status, response.headers, b"")
            except httpx.HTTPError as exc:
                failure, status = f"{type(exc).__name__}: {exc}", None
                log.warning("bytes %d-%d: %s; trying again", first, last, failure)
                self._reconnect()
                continue
            failure = f"the server answered {status}"
            if status in (401, 403, 404, 410, 416):
                break  # asking again will not help
        raise TransferError(
            f"downloading bytes {first}-{last} failed: {failure}", status=status, value=_path(url)
        )

    def download(self, job: Job, storage: Storage, progress: Progress) -> int:
        chunk = self.settings.chunk_size
        record = storage.progress()
        # the same image at the same place: signed URLs change their query between check-ins
        same = record is not None and _path(record.download.source) == _path(job.url)
        resume = record if same else None
        offset = resume.durable if resume is not None else 0
        if resume is not None and offset >= resume.download.size:
            # all bytes stored, but the attempt ended before the image was pending: fetch the
            # last range again, which also checks (If-Range) that the image did not change
            offset = max(0, resume.download.size - chunk)
        etag = resume.download.etag if resume is not None else None
        log.info("downloading %s from byte %d", _path(job.url), offset)
        deadline = self.clock() + self.settings.data_timeout
        total: int | None = None
        while total is None or offset < total:
            if self.clock() > deadline:
                raise TransferError(
                    f"the download did not finish within {self.settings.data_timeout:g} s "
                    f"(stopped at byte {offset}; the next attempt resumes there)",
                    value=_path(job.url),
                )
            last = offset + chunk - 1 if total is None else min(offset + chunk, total) - 1
            try:
                response = self._range(job.url, offset, last, etag if total is None else None)
            except TransferError as exc:
                if total is None and offset > 0 and exc.status == 416:
                    offset, etag = 0, None  # the journal's offset is past this image's end
                    continue
                raise
            if total is None:
                if response.status == 200:
                    # no range support, or the image changed (If-Range): start from zero
                    if offset != 0 or etag is not None:
                        offset, etag = 0, None
                        continue
                    raise TransferError(
                        "the server does not answer ranged requests (no 206/Content-Range)",
                        value=_path(job.url),
                    )
                total = content_total(response.headers, job.url)
                download = Download(
                    source=job.url,
                    size=total,
                    version=job.version,
                    etag=response.headers.get("etag"),
                    sha256=job.sha256,
                )
                stored = storage.open(download)
                if stored != offset:
                    offset = stored  # a different image than the journal's: start over
                    continue
            elif response.status != 206:
                raise TransferError(
                    f"the server answered {response.status} to a range request",
                    status=response.status,
                    value=_path(job.url),
                )
            data = response.data
            if not data:
                raise TransferError(f"empty answer for bytes {offset}-{last}", value=_path(job.url))
            storage.write(offset, data)
            offset += len(data)
            storage.commit(offset)
            progress(offset, total)
        log.info("downloaded %s: %d bytes", _path(job.url), total)
        return total

    # --- result --------------------------------------------------------------------------------

    def send_result(
        self, job: Job, *, success: bool, error: str | None, message: str | None
    ) -> None:
        body: dict[str, str] = {"Message": "Success" if success else "Failure", "File": job.file}
        if not success:
            body["Error"] = error or "GENERAL"
            if message:
                body["Reason"] = message[:200]
        # §2: a server that does not answer the POST counts as success
        with contextlib.suppress(httpx.HTTPError):
            self._client.post(job.url, json=body)


def _path(url: str) -> str:
    """``url`` without its query: signed URLs carry a credential that must not be logged."""
    return urlsplit(url).path


def content_total(headers: httpx.Headers, url: str) -> int:
    """The image size from a 206 answer's ``Content-Range``; TransferError if it has none."""
    content_range = headers.get("content-range", "")
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        raise TransferError(
            f"the answer has no usable Content-Range ({content_range!r})", value=_path(url)
        ) from None
