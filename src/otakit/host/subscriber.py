"""``otakit subscriber``: a pretend device that checks an MQTT OTA publisher (protocols.md §3).

It speaks the device side of the original middleware's MQTT flows, once, and prints a verdict::

    job flow (default)                          direct flow (-d)
    subscribe COMPANY/BOARD/OTAImage/<n>        subscribe .../OTAImage/<n> and .../OTAImage
    -> "Update Availability"  (publish_notify)  -> "Send Direct Update"     (publish_notify)
    <- job document           (unique topic)    <- chunks                  (.../OTAImage)
    -> "Request Update"       (publish_notify)
    <- chunks                 (unique topic)
    -> "Request Data Chunk" for each chunk still missing (both flows)
    -> "Success"              (publish_notify)
    <- "Result Received"      (unique topic)

With ``-c SIZE`` the image is fetched piece by piece with "Request Data Chunk" instead of
"Request Update" / "Send Direct Update", like the original subscriber's ``-c``.

The chunks are put together by :class:`~otakit.device.core.assembly.ChunkAssembly`, the device
core that the agent and the fleet simulator run, into an :class:`ImageFile`: every chunk goes
through :func:`otakit.protocol.mqtt.parse_chunk`, the chunks must agree on the image size, their
version must be newer than the pretend device's (and equal the job's), and overlapping chunks must
carry the same bytes (they are read back from the file). A chunk the publisher skipped is asked for
again as soon as the last chunk has arrived, then again after ``--chunk-wait`` seconds without a
new one.

Success prints one line on stdout and exits 0::

    OK: 1048576 bytes in 0.42 s (2.4 MiB/s), 256 chunks, 0 re-requested, version 1.2.0

Anything else raises an :class:`~otakit.errors.OtakitError` that the CLI prints as one line
(``otakit: error [CODE]: ...``) with exit status 1 (2 for bad arguments); "No Update Available" is
``NO_UPDATE``, exit 1.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import ssl
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

import typer

from otakit.device.core.assembly import MIN_HELD_COST, ChunkAssembly
from otakit.device.core.job import check_job
from otakit.device.journal import Download, JournalRecord
from otakit.errors import (
    BrokerDroppedError,
    BrokerError,
    ChunkHeaderError,
    ImageTooLargeError,
    InputFileError,
    InvalidVersionError,
    JobFetchError,
    MalformedJobDocError,
    NoUpdateError,
    OtakitError,
    ResultError,
    TransferError,
    TransportUnsupportedError,
    UsageError,
    WrongBoardError,
)
from otakit.files import fsync_dir
from otakit.protocol import mqtt as wire
from otakit.protocol.jobdoc import (
    NO_UPDATE_AVAILABLE,
    RESULT_RECEIVED,
    UPDATE_AVAILABLE,
    JobDocument,
    parse_job_document,
)
from otakit.protocol.version import FirmwareVersion

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = logging.getLogger("otakit.subscriber")

KIT = "CY8CPROTO_062_4343W"  # the original subscriber's default kit
MAX_IMAGE_SIZE = 64 * 1024 * 1024  # largest image the subscriber takes (and may hold early)
PUBLIC_BROKERS = {  # the original's -b names; "amazon" was Infineon's own AWS IoT endpoint
    "m": "test.mosquitto.org",
    "mosquitto": "test.mosquitto.org",
    "e": "mqtt.eclipseprojects.io",
    "eclipse": "mqtt.eclipseprojects.io",
}
MIB = 1024 * 1024


# --- errors (names of the original middleware, protocols.md §8) --------------------------------


# --- configuration and verdict -----------------------------------------------------------------


@dataclass(frozen=True)
class SubscriberConfig:
    """One session of the pretend device. ``port`` None: 1883, 8883 with TLS, 8884 with a client
    certificate (protocols.md §3)."""

    host: str = "localhost"
    port: int | None = None
    tls: bool = False
    cafile: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    board: str = KIT
    company: str = wire.COMPANY
    app_prefix: bool = False
    version: FirmwareVersion = field(default_factory=lambda: FirmwareVersion(0))
    serial: str = "otakit-subscriber"
    direct: bool = False
    chunk_size: int | None = None  # -c: fetch piece by piece with "Request Data Chunk"
    output: Path | None = None
    timeout: float = 30.0  # longest wait for any answer, or for a new chunk
    chunk_wait: float = 5.0  # re-request missing chunks after this long without a new one

    @property
    def topics(self) -> wire.Topics:
        return wire.Topics(self.board, company=self.company, app_prefix=self.app_prefix)

    @property
    def broker_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.cert is not None:
            return wire.MTLS_PORT
        return wire.TLS_PORT if self.tls else wire.PORT


@dataclass(frozen=True)
class Verdict:
    """What a successful session received."""

    size: int
    seconds: float  # from the request for the image to its last byte
    chunks: int  # chunk messages that brought new bytes
    re_requested: int  # "Request Data Chunk" messages sent for missing or late chunks
    version: FirmwareVersion

    def line(self) -> str:
        rate = self.size / max(self.seconds, 1e-6)
        speed = f"{rate / MIB:.1f} MiB/s" if rate >= MIB else f"{rate / 1024:.1f} KiB/s"
        return (
            f"OK: {self.size} bytes in {self.seconds:.2f} s ({speed}), {self.chunks} chunks, "
            f"{self.re_requested} re-requested, version {self.version}"
        )


# --- where the image goes ------------------------------------------------------------------------


class ImageFile:
    """Where ``otakit subscriber`` puts the image: the :class:`~otakit.device.storage.Storage`
    that :class:`~otakit.device.core.assembly.ChunkAssembly` writes to.

    The bytes go to a temporary file next to ``path`` (an anonymous one without ``path``), which
    :meth:`set_pending` renames to ``path`` once the image is whole; :meth:`abort` removes it, so
    a failed session leaves no image. There is no journal: every session starts at byte 0.
    :meth:`open` raises :class:`ImageTooLargeError` for an image larger than ``max_size``;
    :class:`InputFileError` is raised when the file cannot be written.
    """

    def __init__(self, path: Path | None, *, max_size: int = MAX_IMAGE_SIZE) -> None:
        self.path = path
        self.max_size = max_size
        self.download: Download | None = None
        self.stored = 0  # bytes committed
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None

    def progress(self) -> JournalRecord | None:
        return None

    def open(self, download: Download) -> int:
        if download.size > self.max_size:
            raise ImageTooLargeError(
                f"image of {download.size} bytes is larger than the subscriber's "
                f"limit of {self.max_size}",
                value=download.size,
            )
        self.abort()
        try:
            if self.path is None:  # closed (and so removed) by set_pending() or abort()
                self._file = tempfile.TemporaryFile()  # noqa: SIM115
            else:
                fd, name = tempfile.mkstemp(
                    dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
                )
                self._tmp = Path(name)
                self._file = os.fdopen(fd, "w+b")
        except OSError as exc:
            raise self._error(exc) from None
        self.download, self.stored = download, 0
        return 0

    def write(self, offset: int, data: bytes) -> None:
        f = self._opened()
        try:
            f.seek(offset)
            f.write(data)
        except OSError as exc:
            raise self._error(exc) from None

    def commit(self, end: int) -> None:
        self.stored = end

    def read(self, offset: int, size: int) -> bytes:
        """Bytes written before, for the core to compare a repeated chunk with."""
        f = self._opened()
        f.seek(offset)
        return f.read(size)

    def verify(self) -> str:
        """The image's version, once every byte is stored; TransferError before."""
        download = self.download
        if download is None or self.stored < download.size:
            raise TransferError("the image is not complete", value=self.stored)
        return download.version

    def set_pending(self, *, permanent: bool) -> None:
        """Hand the image over: rename the file to ``path`` (synced)."""
        f = self._opened()
        try:
            f.flush()
            if self._tmp is not None and self.path is not None:
                os.fsync(f.fileno())
                f.close()
                os.chmod(self._tmp, 0o644)
                os.replace(self._tmp, self.path)
                self._tmp = None
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise self._error(exc) from None
        finally:
            f.close()
            self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self.download, self.stored = None, 0

    def _opened(self) -> BinaryIO:
        assert self._file is not None, "open() first"
        return self._file

    def _error(self, exc: OSError) -> InputFileError:
        where = str(self.path) if self.path is not None else "a temporary file"
        return InputFileError(f"cannot write {where}: {exc.strerror or exc}", value=where)


# --- the session -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    kind: str  # connect, disconnect, subscribe, message
    topic: str = ""
    payload: bytes = b""
    mid: int = 0
    failed: bool = False
    reason: str = ""


class Subscriber:
    """One update session against a publisher, as a device runs it; :meth:`run` does it all."""

    def __init__(self, config: SubscriberConfig) -> None:
        self.config = config
        self.topics = config.topics
        self.unique = self.topics.unique(secrets.randbelow(10**9))
        self.re_requested = 0
        self.chunks = 0  # chunk messages that brought new bytes
        self.largest = 0  # the largest chunk seen: the publisher's chunk size
        self._events: queue.Queue[_Event] = queue.Queue()
        self._pending: deque[_Event] = deque()
        self._subscribed: set[str] = set()
        self._client: paho.Client | None = None

    # -- public

    def run(self) -> Verdict:
        """Connect, run the job (or direct) flow, write the image, report Success.

        Raises an :class:`~otakit.errors.OtakitError` naming what went wrong (see the module
        docstring); the connection is closed in every case.
        """
        cfg = self.config
        if cfg.output is not None:
            cfg.output.unlink(missing_ok=True)  # as the original: no stale image after a failure
        self._connect()
        try:
            return self._session()
        finally:
            self._close()

    # -- flows

    def _session(self) -> Verdict:
        cfg = self.config
        job: JobDocument | None = None
        if cfg.direct:
            self._subscribe([self.unique, self.topics.direct])
        else:
            self._subscribe([self.unique])
            self._send(self._message(wire.UPDATE_AVAILABILITY))
            job = self._await_job()
            if not job.unique_topic_name:  # no unique topic: the image comes on the direct one
                self._subscribe([self.topics.direct])
        storage = ImageFile(cfg.output)
        assembly = image_assembly(
            storage,
            source=f"mqtt://{cfg.host}:{cfg.broker_port}/{self.topics.direct}",
            version=job.firmware_version if job else None,
            running=cfg.version,
        )
        filename = job.file if job else ""
        started = time.monotonic()
        try:
            try:
                if cfg.chunk_size is not None:
                    self._fetch_in_pieces(assembly, filename, cfg.chunk_size)
                else:
                    ask = wire.SEND_DIRECT_UPDATE if cfg.direct else wire.REQUEST_UPDATE
                    self._send(self._message(ask))
                    self._receive_all(assembly, filename, ask)
            except (
                ChunkHeaderError,
                InvalidVersionError,
                TransferError,
                ImageTooLargeError,
            ) as exc:
                self._report_failure(exc)
                raise
            seconds = time.monotonic() - started
            storage.verify()
            storage.set_pending(permanent=True)  # the image file is in place
        finally:
            storage.abort()  # after set_pending: nothing left to remove
        self._send(JobDocument(message=wire.SUCCESS, unique_topic_name=self.unique))
        self._await_result()
        assert assembly.total is not None
        assert assembly.version is not None
        return Verdict(assembly.total, seconds, self.chunks, self.re_requested, assembly.version)

    def _await_job(self) -> JobDocument:
        cfg = self.config
        deadline = time.monotonic() + cfg.timeout
        while True:
            event = self._next(deadline)
            if event is None:
                raise JobFetchError(
                    f"no answer to {wire.UPDATE_AVAILABILITY!r} on {self.unique} within "
                    f"{cfg.timeout:g} s (is a publisher listening on {self.topics.notify}?)",
                    value=self.unique,
                )
            if event.kind != "message" or event.topic != self.unique:
                continue
            doc = parse_job_document(event.payload)
            log.debug("job document: %s", event.payload.decode(errors="replace"))
            if doc.message == NO_UPDATE_AVAILABLE:
                raise self._no_update()
            if doc.message != UPDATE_AVAILABLE:
                raise MalformedJobDocError(
                    f"expected {UPDATE_AVAILABLE!r} or {NO_UPDATE_AVAILABLE!r} on {self.unique}, "
                    f"got {doc.message!r}",
                    value=doc.message,
                )
            self._check_job(doc)
            return doc

    def _check_job(self, doc: JobDocument) -> None:
        cfg = self.config
        if doc.connection != "MQTT":
            raise TransportUnsupportedError(
                f"the job offers the image over {doc.connection} "
                f"({doc.server or 'same server'}:{doc.port or 'default port'}{doc.file}); "
                "otakit subscriber checks MQTT publishers",
                value=doc.connection,
            )
        names = (cfg.board, wire.APP_PREFIX + cfg.board)
        if doc.board not in names:
            raise WrongBoardError(
                f"job is for board {doc.board!r}, this device is {self.topics.wire_board!r}",
                value=doc.board,
            )
        check_job(doc, board=doc.board, current_version=cfg.version)
        if doc.unique_topic_name not in ("", self.unique):
            raise MalformedJobDocError(
                f"job UniqueTopicName {doc.unique_topic_name!r} is not the device's "
                f"{self.unique!r}",
                value=doc.unique_topic_name,
            )

    def _receive_all(self, assembly: ChunkAssembly, filename: str, ask: str) -> None:
        """Chunks of the whole image; re-request what is missing once the last chunk has come,
        then after every ``chunk_wait`` seconds without a new chunk."""
        cfg = self.config
        progress_by = time.monotonic() + cfg.timeout
        rerequest_at: float | None = None  # armed once the image size is known
        end_handled = False
        while not assembly.done:
            wake = progress_by if rerequest_at is None else min(progress_by, rerequest_at)
            event = self._next(wake)
            now = time.monotonic()
            if event is not None:
                new = self._take(event, assembly)
                if new is None:
                    continue
                if new:
                    progress_by, rerequest_at = now + cfg.timeout, now + cfg.chunk_wait
                if assembly.done:
                    break
                header = assembly.header
                assert header is not None
                if header.end == header.total_size and not end_handled:
                    end_handled = True
                    self._rerequest(assembly, filename)
                    rerequest_at = now + cfg.chunk_wait
                continue
            if now >= progress_by:
                raise self._stalled(assembly, ask)
            if rerequest_at is not None and now >= rerequest_at:
                self._rerequest(assembly, filename)
                rerequest_at = now + cfg.chunk_wait

    def _fetch_in_pieces(self, assembly: ChunkAssembly, filename: str, size: int) -> None:
        """The original subscriber's ``-c``: one "Request Data Chunk" at a time."""
        cfg = self.config
        offset = 0
        while assembly.total is None or offset < assembly.total:
            if _stored(assembly, offset + size):  # the publisher sent more than asked
                offset += size
                continue
            self._request_chunk(offset, size, filename)
            progress_by = time.monotonic() + cfg.timeout
            resend_at = time.monotonic() + cfg.chunk_wait
            while not _stored(assembly, offset + size):
                event = self._next(min(progress_by, resend_at))
                now = time.monotonic()
                if event is not None:
                    if self._take(event, assembly):
                        progress_by, resend_at = now + cfg.timeout, now + cfg.chunk_wait
                    continue
                if now >= progress_by:
                    raise self._stalled(assembly, wire.REQUEST_DATA_CHUNK)
                if now >= resend_at:
                    self.re_requested += 1
                    self._request_chunk(offset, size, filename)
                    resend_at = now + cfg.chunk_wait
            offset += size

    def _await_result(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.timeout
        while True:
            event = self._next(deadline)
            if event is None:
                raise ResultError(
                    f"no {RESULT_RECEIVED!r} on {self.unique} within {cfg.timeout:g} s "
                    f"after {wire.SUCCESS!r}",
                    value=self.unique,
                )
            if event.kind != "message" or event.topic != self.unique:
                continue
            if not _is_json(event.payload):
                continue  # a late or duplicate chunk
            doc = parse_job_document(event.payload)
            if doc.message == RESULT_RECEIVED:
                log.debug("result received: %s", event.payload.decode(errors="replace"))
                return
            raise MalformedJobDocError(
                f"expected {RESULT_RECEIVED!r} after {wire.SUCCESS!r}, got {doc.message!r}",
                value=doc.message,
            )

    # -- chunks

    def _take(self, event: _Event, assembly: ChunkAssembly) -> bool | None:
        """A chunk from an image topic, handed to the assembly: whether it brought new bytes;
        None for anything else."""
        if event.kind != "message" or event.topic not in self._subscribed:
            return None
        if _is_json(event.payload):
            doc = parse_job_document(event.payload)
            if doc.message == NO_UPDATE_AVAILABLE:
                raise self._no_update()
            log.debug("ignored %r on %s during the transfer", doc.message, event.topic)
            return None
        new = assembly.chunk(event.payload)
        header = assembly.header
        assert header is not None
        self.chunks += new
        self.largest = max(self.largest, header.data_size)
        log.debug(
            "chunk %d of %d: bytes %d-%d of %d%s on %s",
            header.index,
            header.total_payloads,
            header.offset,
            header.end,
            header.total_size,
            "" if new else " (duplicate)",
            event.topic,
        )
        return new

    def _rerequest(self, assembly: ChunkAssembly, filename: str) -> None:
        for offset, size in assembly.missing(split=self.largest or wire.CHUNK_SIZE):
            self.re_requested += 1
            self._request_chunk(offset, size, filename)

    def _request_chunk(self, offset: int, size: int, filename: str) -> None:
        self._send(
            self._message(
                wire.REQUEST_DATA_CHUNK,
                ("Filename", filename),
                ("Offset", str(offset)),
                ("Size", str(size)),
            )
        )

    def _stalled(self, assembly: ChunkAssembly, ask: str) -> TransferError:
        timeout = self.config.timeout
        if assembly.total is None:
            return TransferError(
                f"no image chunk arrived within {timeout:g} s after {ask!r}", value=ask
            )
        gaps = assembly.missing(split=self.largest or wire.CHUNK_SIZE)
        where = ", ".join(str(offset) for offset, _ in gaps[:5]) + (
            ", ..." if len(gaps) > 5 else ""
        )
        return TransferError(
            f"no new chunk for {timeout:g} s; {len(gaps)} piece(s) of the {assembly.total}-byte "
            f"image still missing (offsets {where})",
            value=len(gaps),
        )

    def _no_update(self) -> NoUpdateError:
        cfg = self.config
        return NoUpdateError(
            f"the publisher answered {NO_UPDATE_AVAILABLE!r} for {self.topics.wire_board} "
            f"version {cfg.version.short}",
            value=cfg.version.short,
        )

    # -- messages

    def _message(self, message: str, *extra: tuple[str, str]) -> JobDocument:
        """A device request: the keys the device sends (``ManufacturerID``, ``ProductID``,
        ``BoardName``) and the ones the original subscriber's template sends (``Product``,
        ``Board``), all strings."""
        cfg = self.config
        board = self.topics.wire_board
        product = "otakit subscriber"
        return JobDocument(
            message=message,
            manufacturer="otakit",
            manufacturer_id="OTAKIT",
            product=product,
            serial_number=cfg.serial,
            version=cfg.version.short,
            board=board,
            unique_topic_name=self.unique,
            extra=(("ProductID", product), ("BoardName", board), *extra),
        )

    def _send(self, doc: JobDocument) -> paho.MQTTMessageInfo:
        payload = doc.to_json()
        log.debug("send to %s: %s", self.topics.notify, payload.decode())
        assert self._client is not None
        info = self._client.publish(self.topics.notify, payload, qos=wire.QOS)
        if info.rc != 0:
            raise BrokerDroppedError(
                f"cannot publish {doc.message!r} to {self.topics.notify}: the connection is lost",
                value=info.rc,
            )
        return info

    def _report_failure(self, exc: OtakitError) -> None:
        """Tell the publisher, best effort (the original device never sends Failure)."""
        reason = f"{exc.code}: {exc.message}"[:200]
        try:
            info = self._send(
                JobDocument(
                    message=wire.FAILURE, unique_topic_name=self.unique, extra=(("Reason", reason),)
                )
            )
            info.wait_for_publish(timeout=min(self.config.timeout, 5.0))
        except (OtakitError, RuntimeError, ValueError):
            pass

    # -- MQTT plumbing

    def _connect(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"otakit-sub-{secrets.token_hex(6)}",
            clean_session=True,
            reconnect_on_failure=False,
        )
        if log.isEnabledFor(logging.DEBUG):
            client.enable_logger(logging.getLogger("otakit.subscriber.paho"))
        if cfg.tls:
            try:
                client.tls_set(
                    ca_certs=None if cfg.cafile is None else str(cfg.cafile),
                    certfile=None if cfg.cert is None else str(cfg.cert),
                    keyfile=None if cfg.key is None else str(cfg.key),
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise InputFileError(f"cannot load the TLS files: {exc}") from None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        where = f"{cfg.host}:{cfg.broker_port}"
        try:
            client.connect(cfg.host, cfg.broker_port, keepalive=wire.KEEPALIVE_S)
        except (OSError, ssl.SSLError) as exc:
            hint = ""
            if (
                cfg.tls
                and isinstance(exc, ConnectionResetError | ssl.SSLError)
                and not isinstance(exc, ssl.SSLCertVerificationError)
            ):
                hint = "; is it a plain (non-TLS) port?"
            raise BrokerError(
                f"cannot connect to {where}: {_reason(exc)}{hint}", value=where
            ) from None
        self._client = client
        sock = client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket too
            # Without it Nagle's algorithm holds each request until the broker acknowledges the
            # last PUBACK (40 ms of delayed ACK on Linux), which would time the subscriber, not
            # the publisher, in the request-and-answer of -c.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        event = self._wait_for("connect", time.monotonic() + cfg.timeout, where)
        if event.failed:
            raise BrokerError(f"the broker at {where} refused the connection: {event.reason}")
        log.debug("connected to %s%s", where, " with TLS" if cfg.tls else "")

    def _subscribe(self, topics: list[str]) -> None:
        assert self._client is not None
        result, mid = self._client.subscribe([(t, wire.QOS) for t in topics])
        if result != 0:
            raise BrokerDroppedError(f"cannot subscribe to {', '.join(topics)}: connection lost")
        deadline = time.monotonic() + self.config.timeout
        while True:
            event = self._wait_for("subscribe", deadline, ", ".join(topics))
            if event.mid == mid:
                break
        if event.failed:
            raise BrokerError(f"the broker refused the subscription to {', '.join(topics)}")
        self._subscribed.update(topics)
        log.debug("subscribed to %s", ", ".join(topics))

    def _wait_for(self, kind: str, deadline: float, what: str) -> _Event:
        """The next event of ``kind``; other events wait in ``_pending`` for :meth:`_next`."""
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BrokerError(
                    f"no answer from the broker within {self.config.timeout:g} s ({kind} {what})"
                ) from None
            if event.kind == kind:
                return event
            if event.kind == "disconnect":
                raise self._dropped(event, before=kind == "connect")
            self._pending.append(event)

    def _next(self, deadline: float) -> _Event | None:
        """The next event before ``deadline`` (monotonic), or None."""
        if self._pending:
            event = self._pending.popleft()
        else:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
        if event.kind == "disconnect":
            raise self._dropped(event, before=False)
        return event

    def _dropped(self, event: _Event, *, before: bool) -> BrokerError:
        cfg = self.config
        where = f"{cfg.host}:{cfg.broker_port}"
        # paho names a plain socket close "Unspecified error": say nothing rather than that
        reason = "" if event.reason == "Unspecified error" else f" ({event.reason})"
        if before:
            if not cfg.tls:
                hint = "; is it a TLS port (add tls)?"
            elif cfg.cert is None:
                hint = "; does it require a client certificate (--cert)?"
            else:
                hint = "; does it trust the client certificate?"
            return BrokerError(
                f"the broker at {where} closed the connection before accepting it{reason}{hint}",
                value=where,
            )
        return BrokerDroppedError(
            f"the broker at {where} closed the connection{reason}", value=where
        )

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # paho callbacks (network thread): only queue what happened.

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._events.put(_Event("connect", failed=reason.is_failure, reason=str(reason)))

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._events.put(_Event("disconnect", reason=str(reason)))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        self._events.put(_Event("subscribe", mid=mid, failed=any(r.is_failure for r in reasons)))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._events.put(_Event("message", topic=message.topic, payload=bytes(message.payload)))


def image_assembly(
    storage: ImageFile,
    *,
    source: str,
    version: FirmwareVersion | None,
    running: FirmwareVersion,
) -> ChunkAssembly:
    """The chunk assembly of one session into ``storage``: from byte 0 (no journal), as much
    held past a gap as the image may be (a publisher's order is its own; each held chunk counts
    at least :data:`~otakit.device.core.assembly.MIN_HELD_COST` bytes), and repeated chunks
    compared with the bytes in the file. ``version`` is the job's (None in the direct flow),
    ``running`` the pretend device's."""
    return ChunkAssembly(
        storage,
        source=source,
        version=version,
        running=running,
        resume=False,
        max_early=MAX_IMAGE_SIZE // MIN_HELD_COST,
        max_early_bytes=MAX_IMAGE_SIZE,
        read=storage.read,
    )


def _stored(assembly: ChunkAssembly, end: int) -> bool:
    """Whether the bytes up to ``end`` (clipped to the image) are stored."""
    total = assembly.total
    return total is not None and assembly.offset >= min(end, total)


def _is_json(payload: bytes) -> bool:
    """Whether a message is JSON (an object) rather than a chunk, which starts "OTAImage"."""
    return not payload.startswith(wire.MAGIC) and payload.lstrip()[:1] == b"{"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None):
        detail = getattr(exc, "verify_message", None)
        return f"TLS error {exc.reason}" + (f" ({detail})" if detail else "")
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# --- command line ------------------------------------------------------------------------------


def _number(text: str, option: str, *, low: float, high: float, integer: bool = True) -> float:
    """A number option, parsed here so that a bad value is a one-line usage error."""
    try:
        value = int(text, 10) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{option} {text!r} is not {kind}", value=text) from None
    if not low <= value <= high:
        raise UsageError(f"{option} {text} is out of range ({low:g} to {high:g})", value=text)
    return value


def _topic_level(text: str, option: str) -> str:
    if not text or any(c in text for c in "/+#\x00"):
        raise UsageError(
            f"{option} {text!r} must be one non-empty MQTT topic level (no '/', '+' or '#')",
            value=text,
        )
    return text


def _readable(path: Path | None, what: str) -> Path | None:
    if path is not None and not path.is_file():
        raise InputFileError(f"{what} {path} is not a readable file", value=str(path))
    return path


def subscriber(
    mode: Annotated[
        str | None,
        typer.Argument(
            metavar="tls", help="'tls' to connect with TLS, as the original.", show_default=False
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("-l", "--log", help="Log every step and MQTT packet on stderr.")
    ] = False,
    broker: Annotated[
        str,
        typer.Option(
            "-b",
            "--host",
            "--broker",
            help="Broker host; 'mosquitto'/'m', 'eclipse'/'e' name the public test brokers.",
        ),
    ] = "localhost",
    port: Annotated[
        str | None,
        typer.Option("--port", help="Broker port (default 1883; 8883 with tls; 8884 with --cert)."),
    ] = None,
    cafile: Annotated[
        Path | None, typer.Option("--cafile", help="CA certificates (PEM); implies tls.")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Client certificate (PEM); implies tls.")
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="Client key (PEM), if not in --cert.")
    ] = None,
    kit: Annotated[str, typer.Option("-k", "--kit", help="Board (kit) name.")] = KIT,
    app_prefix: Annotated[
        bool | None,
        typer.Option(
            "--app-prefix/--no-app-prefix",
            help="Name the board APP_<kit> on the wire (default: only if --kit has it).",
            show_default=False,
        ),
    ] = None,
    company: Annotated[
        str, typer.Option("-e", "--company", help="First topic level.")
    ] = wire.COMPANY,
    direct: Annotated[
        bool, typer.Option("-d", "--direct", help="Direct flow: no job document.")
    ] = False,
    chunk_size: Annotated[
        str | None,
        typer.Option(
            "-c", "--chunk-size", help="Fetch the image piece by piece, SIZE bytes per request."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-f", "--file", help="Write the received image here.")
    ] = None,
    version: Annotated[
        str, typer.Option("-v", "--version", help="The pretend device's running version.")
    ] = "0.0.0",
    serial: Annotated[
        str, typer.Option("--serial", help="The pretend device's SerialNumber.")
    ] = "otakit-subscriber",
    timeout: Annotated[
        str, typer.Option("--timeout", help="Seconds to wait for each answer or new chunk.")
    ] = "30",
    chunk_wait: Annotated[
        str,
        typer.Option(
            "--chunk-wait", help="Re-request missing chunks after this many idle seconds."
        ),
    ] = "5",
) -> None:
    """Act as a device to check an MQTT publisher: get an update, print one verdict line."""
    if mode is not None and mode.lower() != "tls":
        raise UsageError(f"unexpected argument {mode!r}; the only one is 'tls'", value=mode)
    if broker.lower() in ("a", "amazon"):
        raise UsageError(
            "the original's 'amazon' broker is Infineon's own AWS IoT endpoint; "
            "give your endpoint's host name with -b",
            value=broker,
        )
    host = PUBLIC_BROKERS.get(broker.lower(), broker)
    if not host:
        raise UsageError("-b/--host must not be empty")
    if key is not None and cert is None:
        raise UsageError("--key needs --cert")
    board = _topic_level(kit, "-k/--kit")
    if board.startswith(wire.APP_PREFIX) and len(board) > len(wire.APP_PREFIX):
        board = board[len(wire.APP_PREFIX) :]
        app_prefix = True if app_prefix is None else app_prefix
    if len((wire.APP_PREFIX + board).encode()) > 48:
        raise UsageError(f"-k/--kit {kit!r} is longer than the 48 bytes a Board holds", value=kit)
    if not serial or len(serial.encode()) > 32:
        raise UsageError("--serial must be 1 to 32 bytes", value=serial)
    if output is not None and output.is_dir():
        raise InputFileError(f"-f {output} is a folder, not a file name", value=str(output))
    if output is not None and not output.parent.is_dir():
        raise InputFileError(
            f"cannot write -f {output}: there is no folder {output.parent}", value=str(output)
        )
    config = SubscriberConfig(
        host=host,
        port=None if port is None else int(_number(port, "--port", low=1, high=65535)),
        tls=mode is not None or cafile is not None or cert is not None,
        cafile=_readable(cafile, "--cafile"),
        cert=_readable(cert, "--cert"),
        key=_readable(key, "--key"),
        board=board,
        company=_topic_level(company, "-e/--company"),
        app_prefix=bool(app_prefix),
        version=FirmwareVersion.parse(version),
        serial=serial,
        direct=direct,
        chunk_size=(
            None
            if chunk_size is None
            else int(_number(chunk_size, "-c/--chunk-size", low=1, high=wire.MAX_CHUNK_SIZE))
        ),
        output=output,
        timeout=_number(timeout, "--timeout", low=0.1, high=86400, integer=False),
        chunk_wait=_number(chunk_wait, "--chunk-wait", low=0.05, high=86400, integer=False),
    )
    if debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("subscriber: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    verdict = Subscriber(config).run()
    sys.stdout.write(verdict.line() + "\n")
    sys.stdout.flush()
