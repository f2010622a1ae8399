"""HTTP(S) transport: the job document, ranged downloads and the result, as the original device
does them (protocols.md §1-2), made resumable.

- Job: ``GET job_path`` (``/ota_update.json``) with ``User-Agent: ota-http-client``, read up to
  its 1024-byte limit (§1) and parsed strictly (the agent then checks board and version). An
  empty Server/Port means the server the job came from; another server is followed.
- Data: ``Range: bytes=a-b`` requests of ``chunk_size`` bytes, driven by
  :class:`~otakit.device.core.download.RangedDownload`, which holds the rules (the same core
  the fleet simulator drives): the total comes from the first ``Content-Range``; each answer
  must be the bytes asked for (its Content-Range starts at ``a``, ends at most at ``b``, names
  the first answer's total); each range is tried ``download_tries`` times; after every range
  the bytes are committed to storage, so an interrupted download continues from the last
  durable byte, with ``If-Range`` and the ETag: a changed image on the server (200 instead of
  206) restarts cleanly from zero. This module does the I/O around it: streamed GETs whose body
  is read no further than the Content-Range, a fresh connection after a failed one, and the
  ``data_timeout`` deadline for the whole download.
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
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urljoin, urlsplit

import httpx

from otakit.device.core.download import RangedDownload, RangeRequest, content_range, header
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

    def _range(self, url: str, request: RangeRequest, download: RangedDownload) -> bool:
        """One try of ``request``: the answer is handed to ``download``, a 206's body read no
        further than its Content-Range and a 200 not at all. A connection error or timeout
        reconnects and counts a failed try. True when bytes were stored.

        Raises TransferError (from ``download``) when the answer is fatal or the range's tries
        are used up, and what ``read_body`` raises for a body longer than announced.
        """
        asked = str(request)
        try:
            # streamed, and a kept Response would hold its body in a reference cycle with
            # its stream, so every range would stay in memory until a GC pass
            with self._client_for(url).stream("GET", url, headers=request.headers()) as response:
                log.debug("GET %s %s: %d", _path(url), asked, response.status_code)
                want = download.response(response.status_code, response.headers)
                if not want:
                    return False
                data = read_body(response, want, f"the answer to {asked}", TransferError)
        except httpx.HTTPError as exc:
            failure = f"{type(exc).__name__}: {exc}"
            log.warning("%s: %s; trying again", asked, failure)
            self._reconnect()
            download.failed(failure)
            return False
        return download.body(data)

    def download(self, job: Job, storage: Storage, progress: Progress) -> int:
        """Ranged GETs of ``job.url`` into ``storage`` as :class:`RangedDownload` rules them
        (protocols.md §2), resuming from the journal; the size.

        Raises RedirectError for a URL not to be fetched, TransferError when a range fails
        (after ``download_tries``) or the download takes longer than ``data_timeout``, and what
        the storage raises (an image larger than the slot)."""
        if not self.settings.credentials_for(job.url):  # RedirectError: not fetched at all
            log.info("%s is not the configured server: no credentials go there", origin(job.url))
        download = RangedDownload(
            storage,
            # origin and path: a signed URL's query is a credential (never on disk) and changes
            # between check-ins while the image stays the same
            source=_shown(job.url),
            version=job.version,
            sha256=job.sha256,
            chunk_size=self.settings.chunk_size,
            tries=self.settings.download_tries,
        )
        log.info("downloading %s from byte %d", _path(job.url), download.offset)
        deadline = self.clock() + self.settings.data_timeout
        while (request := download.next_request()) is not None:
            if self.clock() > deadline:
                raise TransferError(
                    f"the download did not finish within {self.settings.data_timeout:g} s "
                    f"(stopped at byte {download.offset}; the next attempt resumes there)",
                    value=_path(job.url),
                )
            if self._range(job.url, request, download) and download.total is not None:
                progress(download.offset, download.total)
        total = download.total or 0
        log.info(
            "downloaded %s: %d bytes (%d failed tries recovered)",
            _path(job.url),
            total,
            download.recovered,
        )
        return total

    # --- result --------------------------------------------------------------------------------

    def send_result(
        self,
        job: Job,
        *,
        success: bool,
        error: str | None,
        message: str | None,
        delta_error: str | None = None,  # the job document offers no delta: never set here
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


def content_total(headers: Mapping[str, str], url: str) -> int:
    """The image size from a 206 answer's ``Content-Range``; TransferError if it has none."""
    span = content_range(headers)
    if span is None:
        shown = header(headers, "content-range")[:80]
        raise TransferError(f"the answer has no usable Content-Range ({shown!r})", value=_path(url))
    return span[2]
