"""HTTP(S) transport: the job document, ranged downloads and the result, as the original device
does them (protocols.md §1-2), made resumable.

- Job: ``GET job_path`` (``/ota_update.json``) with ``User-Agent: ota-http-client``, read up to
  its 1024-byte limit (§1) and parsed strictly (the agent then checks board and version). An
  empty Server/Port means the server the job came from; another server is followed.
- Data: ``Range: bytes=a-b`` requests of ``chunk_size`` bytes; the total comes from the first
  ``Content-Range``. Each answer must be the bytes asked for (its Content-Range starts at ``a``,
  ends at most at ``b``, names the first answer's total) and is read no further than that. Each
  range is tried ``download_tries`` times, on a fresh connection after a failure. After every
  range the bytes are committed to storage, so an interrupted download continues from the last
  durable byte, with ``If-Range`` and the ETag: a changed image on the server (200 instead of
  206) restarts cleanly from zero.
- Result: ``POST`` to the file path with ``{"Message": "Success"|"Failure", "File": ..., "Error":
  ..., "Reason": ...}``; a server that does not answer counts as success. Its answer is not read.

Credentials (the bearer token, the client certificate) go only to the configured server's
origin (scheme, host and port of ``HttpSettings.server``) and to ``trusted_origins``
(:meth:`HttpSettings.credentials_for`, the one place of that rule); any other host a job,
check-in answer or MQTT publisher names is asked without them. A plain ``http://`` URL for a
device configured for an ``https://`` server is refused (``REDIRECT``) unless
``allow_insecure_redirects``. Every body is read as it arrives and no further than its limit;
``Accept-Encoding: identity`` is asked for and an encoded answer refused (a compressed body
could be any size once decoded). URLs are logged without their query (signed URLs carry a
credential), tokens never.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urljoin, urlsplit

import httpx

from otakit.device.journal import Download
from otakit.device.storage import Storage
from otakit.device.transports.base import Job, Progress
from otakit.errors import (
    JobFetchError,
    MalformedJobDocError,
    OtakitError,
    RedirectError,
    TransferError,
)
from otakit.protocol.jobdoc import MAX_DOCUMENT_BYTES, UPDATE_AVAILABLE, parse_job_document
from otakit.tls import client_context

log = logging.getLogger("otakit.http")

USER_AGENT = "ota-http-client"
MAX_JSON_BYTES = 16 * 1024  # any JSON answer the agent reads (a check-in answer)
DEFAULT_PORTS = {"http": 80, "https": 443}


class Origin(NamedTuple):
    """Where a URL points: scheme, host and port (the default port written out)."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def origin(url: str) -> Origin | None:
    """The origin of an ``http(s)`` URL; None for any other URL or one that cannot be read."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return Origin(scheme, host, port or DEFAULT_PORTS[scheme])


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
    trusted_origins: tuple[str, ...] = ()  # other origins that get the token and certificate
    allow_insecure_redirects: bool = False  # follow http:// URLs from an https:// server

    def verify(self, *, credentials: bool = True) -> ssl.SSLContext | bool:
        """What httpx's ``verify`` takes: the configured CA and, with ``credentials``, the client
        certificate; or the system CAs."""
        cert = self.client_cert if credentials else None
        if not self.ca_file and not cert:
            return True
        return client_context(self.ca_file, cert, self.client_key if cert else None)

    def credentials_for(self, url: str) -> bool:
        """Whether ``url`` may be sent the token and client certificate: it is on the configured
        server's origin or a trusted one.

        Raises RedirectError (``REDIRECT``) for a URL the agent does not fetch at all: not
        http(s), or plain HTTP when the configured server is HTTPS and
        ``allow_insecure_redirects`` is off.
        """
        target = origin(url)
        if target is None:
            scheme = url.split(":", 1)[0][:16] if ":" in url else ""
            raise RedirectError(
                f"refusing to fetch {_path(url)[:80]!r} (scheme {scheme!r}): only http and "
                "https URLs with a host are fetched",
                value=scheme,
            )
        home = origin(self.server)
        if (
            home is not None
            and home.scheme == "https"
            and target.scheme == "http"
            and not self.allow_insecure_redirects
        ):
            raise RedirectError(
                f"refusing plain HTTP to {target} for a device configured for an HTTPS server "
                "(allow_insecure_redirects is off)",
                value=str(target),
            )
        return target == home or target in {origin(o) for o in self.trusted_origins}


@dataclass(frozen=True)
class _Answer:
    """A range request's answer: its status, headers and (for 206) body and total size."""

    status: int
    headers: httpx.Headers
    data: bytes
    total: int = 0


class HttpTransport:
    def __init__(
        self, settings: HttpSettings, *, board: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.board = board
        self.clock = clock  # for the job and data timeouts
        self._client = self._new_client(credentials=True)
        self._anonymous: httpx.Client | None = None  # for other origins, made when needed

    def _new_client(self, *, credentials: bool) -> httpx.Client:
        s = self.settings
        headers = {"user-agent": USER_AGENT, "accept-encoding": "identity"}
        if s.token and credentials:
            headers["authorization"] = f"Bearer {s.token}"
        return httpx.Client(
            headers=headers,
            timeout=s.timeout,
            verify=s.verify(credentials=credentials),
            follow_redirects=False,
        )

    def _client_for(self, url: str) -> httpx.Client:
        """The client for ``url``: with credentials for the configured server and trusted
        origins, without for any other. Raises RedirectError for a URL not to be fetched."""
        if self.settings.credentials_for(url):
            return self._client
        if self._anonymous is None:
            self._anonymous = self._new_client(credentials=False)
        return self._anonymous

    def _reconnect(self) -> None:
        self.close()
        self._client = self._new_client(credentials=True)

    def close(self) -> None:
        self._client.close()
        if self._anonymous is not None:
            self._anonymous.close()
            self._anonymous = None

    # --- job -----------------------------------------------------------------------------------

    def _job_document(self, url: str) -> bytes:
        """The job document's bytes (at most MAX_DOCUMENT_BYTES), with connect_retries tries
        within job_timeout."""
        limit = self.settings.job_timeout
        deadline = self.clock() + limit
        last: Exception | None = None
        for _ in range(max(1, self.settings.connect_retries)):
            if self.clock() >= deadline:
                break
            try:
                with self._client_for(url).stream("GET", url) as response:
                    log.debug("GET %s: %d", _path(url), response.status_code)
                    if not 200 <= response.status_code < 300:
                        raise JobFetchError(
                            f"fetching the job: the server answered {response.status_code}",
                            value=_path(url),
                        )
                    return read_body(
                        response, MAX_DOCUMENT_BYTES, "the job document", MalformedJobDocError
                    )
            except httpx.HTTPError as exc:
                last = exc
                self._reconnect()
        raise JobFetchError(
            f"fetching the job: cannot reach {_shown(url)}: "
            f"{last or f'no answer within {limit:g} s'}",
            value=_path(url),
        )

    def fetch_job(self) -> Job | None:
        url = urljoin(self.settings.server, self.settings.job_path)
        doc = parse_job_document(self._job_document(url))
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

    def _range(
        self, url: str, first: int, last: int, etag: str | None, total: int | None
    ) -> _Answer:
        """Bytes ``first``-``last`` of ``url``; ``total`` is the size the first answer gave.

        A 206 must be those bytes (:func:`_check_range`) and is read no further than its
        Content-Range; a 200 (no ranges, or the image changed) is not read at all.
        """
        headers = {"range": f"bytes={first}-{last}"}
        if etag:
            headers["if-range"] = etag
        asked = f"bytes {first}-{last}"
        failure, status = "", None
        for _ in range(max(1, self.settings.download_tries)):
            try:
                # streamed, and a kept Response would hold its body in a reference cycle with
                # its stream, so every range would stay in memory until a GC pass
                with self._client_for(url).stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    log.debug("GET %s %s: %d", _path(url), asked, status)
                    if status == 200:  # the whole file: not read, the caller starts over
                        return _Answer(status, response.headers, b"")
                    if status == 206:
                        start, end, size = _check_range(response.headers, first, last, total)
                        want = end - start + 1
                        data = read_body(response, want, f"the answer to {asked}", TransferError)
                        if len(data) == want:
                            return _Answer(status, response.headers, data, size)
                        failure = f"the answer ended after {len(data)} of its {want} bytes"
                    else:
                        failure = f"the server answered {status}"
            except httpx.HTTPError as exc:
                failure, status = f"{type(exc).__name__}: {exc}", None
                log.warning("%s: %s; trying again", asked, failure)
                self._reconnect()
                continue
            if status in (401, 403, 404, 410, 416):
                break  # asking again will not help
        raise TransferError(
            f"downloading {asked} failed: {failure}", status=status, value=_path(url)
        )

    def download(self, job: Job, storage: Storage, progress: Progress) -> int:
        chunk = self.settings.chunk_size
        if not self.settings.credentials_for(job.url):  # RedirectError: not fetched at all
            log.info("%s is not the configured server: no credentials go there", origin(job.url))
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
                response = self._range(
                    job.url, offset, last, etag if total is None else None, total
                )
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
                total = response.total
                download = Download(
                    source=job.url,
                    size=total,
                    version=job.version,
                    etag=response.headers.get("etag"),
                    sha256=job.sha256,
                )
                stored = storage.open(download)  # refuses a total larger than the target
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
        try:
            client = self._client_for(job.url)
        except RedirectError as exc:
            log.warning("result not sent: %s", exc.message)
            return
        # §2: a server that does not answer the POST counts as success; its answer is not read
        with contextlib.suppress(httpx.HTTPError), client.stream("POST", job.url, json=body) as r:
            log.debug("POST %s: %d", _path(job.url), r.status_code)


def _path(url: str) -> str:
    """``url`` without its query: signed URLs carry a credential that must not be logged."""
    return urlsplit(url).path


def _shown(url: str) -> str:
    """``url`` as it may be shown: its origin and path, never its query."""
    where = origin(url)
    return f"{where}{_path(url)}" if where is not None else _path(url)


def read_body(response: httpx.Response, limit: int, what: str, error: type[OtakitError]) -> bytes:
    """The body of a streamed ``response``, read as it arrives and no further than ``limit``
    bytes: a longer one (announced or sent) raises ``error``, as does a Content-Encoding (the
    agent asks for identity; a compressed body could be any size once decoded)."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise error(
            f"{what} came with Content-Encoding {encoding[:32]!r}, which the agent did not ask for",
            value=encoding[:32],
        )
    too_long = f"{what} holds more than the {limit} bytes allowed"
    announced = response.headers.get("content-length", "")
    if announced.isascii() and announced.isdigit() and int(announced[:20]) > limit:
        raise error(too_long, value=limit)
    body = bytearray()
    for piece in response.iter_raw():
        body += piece
        if len(body) > limit:
            raise error(too_long, value=limit)
    return bytes(body)


_CONTENT_RANGE = re.compile(r"bytes[ \t]+([0-9]{1,15})-([0-9]{1,15})/([0-9]{1,15})", re.IGNORECASE)


def _span(headers: httpx.Headers) -> tuple[int, int, int] | None:
    """First byte, last byte and total size of a ``Content-Range: bytes a-b/total`` header;
    None when there is none or it is not possible (``a <= b < total``)."""
    match = _CONTENT_RANGE.fullmatch(headers.get("content-range", "").strip())
    if match is None:
        return None
    first, last, total = (int(group) for group in match.groups())
    return (first, last, total) if first <= last < total else None


def _check_range(
    headers: httpx.Headers, first: int, last: int, total: int | None
) -> tuple[int, int, int]:
    """The answer's Content-Range when it is for the bytes asked for: it starts at ``first``,
    ends at ``last`` at most and names the same total as the first answer (``total``);
    TransferError otherwise."""
    span = _span(headers)
    shown = headers.get("content-range", "")[:80]
    asked = f"the answer to bytes {first}-{last}"
    if span is None:
        raise TransferError(f"{asked} has no usable Content-Range ({shown!r})", value=shown)
    if span[0] != first or span[1] > last:
        raise TransferError(
            f"{asked} has Content-Range {shown!r}, not the bytes asked for", value=shown
        )
    if total is not None and span[2] != total:
        raise TransferError(
            f"{asked} has Content-Range {shown!r}, but the first answer's total was {total}",
            value=shown,
        )
    return span


def content_total(headers: httpx.Headers, url: str) -> int:
    """The image size from a 206 answer's ``Content-Range``; TransferError if it has none."""
    span = _span(headers)
    if span is None:
        content_range = headers.get("content-range", "")[:80]
        raise TransferError(
            f"the answer has no usable Content-Range ({content_range!r})", value=_path(url)
        )
    return span[2]
