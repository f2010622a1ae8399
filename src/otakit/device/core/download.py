"""A ranged download (protocols.md §2) into a :class:`~otakit.device.storage.Storage` with a
durable resume point, without I/O.

:class:`RangedDownload` says which bytes to ask for next (:meth:`~RangedDownload.next_request`),
judges the answer's status line and headers (:meth:`~RangedDownload.response`), writes and
commits the body (:meth:`~RangedDownload.body`) and counts failed tries
(:meth:`~RangedDownload.failed`). The driver does the I/O: the agent's
:class:`~otakit.device.transports.http.HttpTransport` with httpx, the fleet simulator with
asyncio; the rules are these, once:

- Ranges are ``chunk_size`` bytes (``Range: bytes=a-b``); the total comes from the first 206's
  ``Content-Range: bytes a-b/TOTAL``, and the last range is clamped to it. Every 206 must be
  the bytes asked for: its Content-Range starts at ``a``, ends at ``b`` at most (a shorter
  answer is taken, the next range starts after it) and names the first answer's total;
  anything else is a :class:`~otakit.errors.TransferError` at once (a server that answers
  other bytes than asked is not asked again).
- After every range the bytes are written and committed (the storage's journal records them),
  so an interrupted download continues from the last durable byte. The journal's download is
  continued when ``same`` says it is this one (by default: the same URL path, since signed URLs
  change their query between check-ins, and the same SHA-256 when both are known); a resume sends ``If-Range`` with the journal's ETag on
  its first range. A download whose bytes are all stored (the attempt ended before the image
  was pending) asks for its last range again, which also checks that the image did not change.
- A 200 instead of 206 on a resume (the image changed, ``If-Range``) or a 416 at a resumed
  offset (the journal's offset is past this image's end) starts again from byte 0; a 200 to a
  fresh download means the server does not answer ranges, a 200 after the first range is a
  protocol error: both TransferError.
- A failed request (connection lost, timeout, short body, a 5xx...) is asked again, up to
  ``tries`` times per range; 401, 403, 404, 410 and 416 are not asked again. The TransferError
  raised when the tries are used up carries the server's last status (None when it did not
  answer). :attr:`RangedDownload.recovered` counts the failures that a later try recovered
  from, so a report can tell "recovered after retry" from "failed".

The Content-Range is read from any ``Mapping[str, str]`` of headers (``httpx.Headers`` or a
plain dict); names are matched without regard to case.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from otakit.device.journal import Download
from otakit.device.storage import Storage
from otakit.errors import TransferError

FINAL_STATUSES = frozenset({401, 403, 404, 410, 416})
"""Answers that asking again will not change: the download fails at once."""

_CONTENT_RANGE = re.compile(r"bytes[ \t]+([0-9]{1,15})-([0-9]{1,15})/([0-9]{1,15})", re.IGNORECASE)


def header(headers: Mapping[str, str], name: str) -> str:
    """The value of header ``name`` (lower case) in ``headers``, whatever the case of its key
    there; "" when absent. ``httpx.Headers`` finds it directly; a plain dict may need a scan."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, found in headers.items():
        if key.lower() == name:
            return found
    return ""


def content_range(headers: Mapping[str, str]) -> tuple[int, int, int] | None:
    """First byte, last byte and total size of a ``Content-Range: bytes a-b/total`` header;
    None when there is none, it cannot be read or it is not possible (``a <= b < total``)."""
    match = _CONTENT_RANGE.fullmatch(header(headers, "content-range").strip())
    if match is None:
        return None
    first, last, total = (int(group) for group in match.groups())
    return (first, last, total) if first <= last < total else None


def _path(source: str) -> str:
    """``source`` without its query: signed URLs carry a credential that must not be shown."""
    try:
        return urlsplit(source).path
    except ValueError:
        return source.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """One range to ask for: bytes ``first``-``last`` (inclusive), with ``If-Range: if_range``
    when it is set (only on the first range of a resume)."""

    first: int
    last: int
    if_range: str | None = None

    def headers(self) -> dict[str, str]:
        """The request headers: ``range``, and ``if-range`` when set."""
        headers = {"range": f"bytes={self.first}-{self.last}"}
        if self.if_range:
            headers["if-range"] = self.if_range
        return headers

    def __str__(self) -> str:
        return f"bytes {self.first}-{self.last}"


class RangedDownload:
    """A ranged download (protocols.md §2) into a Storage with a durable resume point.

    ``source`` names the download in the journal (a URL, or what the driver chooses, e.g. the
    URL's path when every check-in signs it anew); ``version`` and ``sha256`` are what the job
    says. ``same`` tells whether the journal's download is this one and may be continued (by
    default: the same URL path as ``source`` and, when both are known, the same SHA-256); the
    storage then has the last word (:meth:`Storage.open <otakit.device.storage.Storage.open>`
    says how many bytes it holds). ``tries`` is per range.

    Driver loop (sync or async alike)::

        dl = RangedDownload(storage, source=url, chunk_size=4096)
        while (req := dl.next_request()) is not None:
            try:
                response = GET(url, headers=req.headers())   # streamed
                if n := dl.response(response.status, response.headers):
                    dl.body(<at most n bytes of the body>)
            except <network error> as exc:
                dl.failed(str(exc))

    Raises :class:`~otakit.errors.TransferError` (with ``status``) when an answer is fatal or
    the tries of a range are used up, and whatever the storage raises (an image that does not
    fit, a flash error).
    """

    __slots__ = (
        "_answer",
        "_asked",
        "_etag",
        "_failures",
        "_shown",
        "_want",
        "chunk_size",
        "offset",
        "recovered",
        "resumed_from",
        "sha256",
        "source",
        "storage",
        "total",
        "tries",
        "version",
    )

    def __init__(
        self,
        storage: Storage,
        *,
        source: str,
        version: str = "",
        sha256: str | None = None,
        chunk_size: int,
        tries: int = 3,
        same: Callable[[Download], bool] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        self.storage = storage
        self.source = source
        self.version = version
        self.sha256 = sha256
        self.chunk_size = chunk_size
        self.tries = max(1, tries)
        self._shown = _path(source)
        self.total: int | None = None  # from the first 206's Content-Range
        self.recovered = 0  # failed tries that a later try of the same range made good
        self._failures = 0  # failed tries of the current range
        self._asked: RangeRequest | None = None  # the request last handed out
        self._want = 0  # body bytes expected after response()
        self._answer: tuple[int, int, int, str | None] | None = None  # first, last, total, ETag
        record = storage.progress()
        if record is None:
            resume = None
        elif same is None:
            resume = record if self._same(record.download) else None
        else:
            resume = record if same(record.download) else None
        offset = resume.durable if resume is not None else 0
        if resume is not None and offset >= resume.download.size:
            # all bytes stored, but the attempt ended before the image was pending: fetch the
            # last range again, which also checks (If-Range) that the image did not change
            offset = max(0, resume.download.size - chunk_size)
        self._etag = resume.download.etag if resume is not None else None  # for If-Range
        self.offset = offset  # the next byte wanted
        self.resumed_from = offset  # 0: a fresh download

    @property
    def done(self) -> bool:
        """Whether every byte is stored and committed."""
        return self.total is not None and self.offset >= self.total

    def next_request(self) -> RangeRequest | None:
        """The range to ask for now (the same one again after a failure); None when every byte
        is stored."""
        if self.total is None:
            request = RangeRequest(self.offset, self.offset + self.chunk_size - 1, self._etag)
        elif self.offset < self.total:
            last = min(self.offset + self.chunk_size, self.total) - 1
            request = RangeRequest(self.offset, last)
        else:
            return None
        self._asked, self._want, self._answer = request, 0, None
        return request

    def response(self, status: int, headers: Mapping[str, str]) -> int:
        """The status line and headers of the answer to :meth:`next_request`; returns how many
        body bytes the driver must read and hand to :meth:`body` (0: read nothing, ask
        :meth:`next_request` again: the download restarts from byte 0, or the try failed and
        another one is allowed).

        Raises TransferError (``status`` set where the server's answer is the reason) for a
        206 whose Content-Range is not the bytes asked for, a 200 to a fresh download (no range
        support) or after the first range, a 401/403/404/410/416 (except a 416 at a resumed
        offset, which restarts), and any other answer once the range's tries are used up.
        """
        asked = self._request()
        if status == 206:
            first, last, total = self._check(headers, asked)
            self._answer = (first, last, total, header(headers, "etag") or None)
            self._want = last - first + 1
            return self._want
        self._want, self._answer = 0, None
        if status == 200:
            if self.total is None and (self.offset != 0 or self._etag is not None):
                self._restart()  # the image changed (If-Range), or no range support: from 0
                return 0
            if self.total is None:
                raise TransferError(
                    "the server does not answer ranged requests (no 206/Content-Range)",
                    value=self._shown,
                )
            raise TransferError(
                "the server answered 200 to a range request", status=200, value=self._shown
            )
        if status == 416 and self.total is None and self.offset > 0:
            self._restart()  # the journal's offset is past this image's end
            return 0
        reason = f"the server answered {status}"
        if status in FINAL_STATUSES:
            raise TransferError(
                f"downloading {asked} failed: {reason}", status=status, value=self._shown
            )
        self.failed(reason, status)
        return 0

    def body(self, data: bytes) -> bool:
        """The body of the 206 that :meth:`response` accepted (at most the bytes it said).
        The first range opens the storage for the download; each range is then written and
        committed. Returns True when bytes were stored; False when the body was short (a failed
        try, as :meth:`failed`) or the storage holds a different number of bytes than the
        journal said (the download continues from there).

        Raises TransferError for a body longer than announced, or a short one when the range's
        tries are used up; whatever the storage raises (an image larger than the target).
        """
        asked = self._request()
        answer, want = self._answer, self._want
        if answer is None:
            raise RuntimeError("body() without a 206 accepted by response()")
        self._answer, self._want = None, 0
        if len(data) > want:
            raise TransferError(
                f"the answer to {asked} holds more than the {want} bytes of its Content-Range",
                value=self._shown,
            )
        if len(data) < want:
            self.failed(f"the answer ended after {len(data)} of its {want} bytes")
            return False
        first, _, total, etag = answer
        self.recovered += self._failures
        self._failures = 0
        if self.total is None:
            download = Download(
                source=self.source, size=total, version=self.version, etag=etag, sha256=self.sha256
            )
            stored = self.storage.open(download)  # refuses a total larger than the target
            self.total, self._etag = total, None
            if stored != first:
                self.offset = stored  # a different image than the journal's: from there
                return False
        self.storage.write(first, data)
        self.offset = first + len(data)
        self.storage.commit(self.offset)
        return True

    def failed(self, reason: str, status: int | None = None) -> None:
        """The current request failed (connection lost, timeout, short body, an injected
        fault); ``status`` is the server's answer, if any. Returns when the range may be asked
        again (:meth:`next_request`); raises TransferError with ``status`` when its tries are
        used up."""
        asked = self._request()
        self._want, self._answer = 0, None
        self._failures += 1
        if self._failures >= self.tries:
            raise TransferError(
                f"downloading {asked} failed: {reason}", status=status, value=self._shown
            )

    # --- internals -----------------------------------------------------------------------------

    def _request(self) -> RangeRequest:
        if self._asked is None:
            raise RuntimeError("next_request() first")
        return self._asked

    def _same(self, known: Download) -> bool:
        """The default of ``same``: the same URL path (signed URLs change their query between
        check-ins) and, when both are known, the same SHA-256."""
        if _path(known.source) != self._shown:
            return False
        return not (known.sha256 and self.sha256) or known.sha256.lower() == self.sha256.lower()

    def _restart(self) -> None:
        """Start again from byte 0, without If-Range, with fresh tries (the failed tries before
        the answer that said so were recovered from)."""
        self.recovered += self._failures
        self.offset, self._etag, self._failures = 0, None, 0

    def _check(self, headers: Mapping[str, str], asked: RangeRequest) -> tuple[int, int, int]:
        """The answer's Content-Range when it is for the bytes asked for: it starts at
        ``asked.first``, ends at ``asked.last`` at most and names the same total as the first
        answer; TransferError otherwise."""
        span = content_range(headers)
        shown = header(headers, "content-range")[:80]
        what = f"the answer to {asked}"
        if span is None:
            raise TransferError(f"{what} has no usable Content-Range ({shown!r})", value=shown)
        if span[0] != asked.first or span[1] > asked.last:
            raise TransferError(
                f"{what} has Content-Range {shown!r}, not the bytes asked for", value=shown
            )
        if self.total is not None and span[2] != self.total:
            raise TransferError(
                f"{what} has Content-Range {shown!r}, but the first answer's total was "
                f"{self.total}",
                value=shown,
            )
        return span
