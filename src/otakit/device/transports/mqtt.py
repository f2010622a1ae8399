"""MQTT transport: the job and direct flows of the original middleware over MQTT (protocols.md §3),
made robust: every chunk is validated, chunks may come in any order or twice, missing ones are
asked for again, and the download resumes through the same storage and journal as HTTP.

Every request goes to ``COMPANY/BOARD/publish_notify`` (QoS 1, not retained) with the device's
identity and the session's unique topic. One session, one unique topic
``COMPANY/BOARD/OTAImage/<random number>``, subscribed before anything is asked::

    job flow                                         direct flow
    -> "Update Availability"                         -> "Send Direct Update"
    <- job document on the unique topic              <- chunks on COMPANY/BOARD/OTAImage
       (no answer within job_timeout: no update,
       as on the original device)
    -> "Request Update"
    <- chunks on the unique topic (or the topic the job names)

    resume (journal has durable bytes of this image): "Request Data Chunk" Offset=<durable>
    Size=-1 instead of "Request Update" / "Send Direct Update"
    gaps (chunk_timeout without a new chunk): "Request Data Chunk" Offset/Size for exactly the
    missing ranges, request_tries times in a row, then GET_DATA
    -> "Success" / "Failure" (+ "Error", "Reason")
    <- "Result Received" on the unique topic (waited result_timeout; silence counts as success)

Delta updates: an agent that can apply deltas (``image_sha256`` and ``delta`` given) adds
``ImageSHA256`` and ``Delta`` (comma-separated) to its "Update Availability"; a job document
with the six ``Delta*`` keys becomes a :class:`Job` whose ``delta`` is a :class:`DeltaJob`
(``url`` = the ``DeltaFile`` name). The agent downloads the patch with :meth:`download` of the
job with ``url`` (or ``file``) set to that name: it is asked for with "Request Data Chunk"
``Filename=DeltaFile`` (from the durable offset, ``Size=-1``) in the job's session, and its
chunks go through the same assembly (total size = the patch's size, the new image's version).
A result may carry ``DeltaError`` (why the patch was not used): the server then offers the
full image only.

Chunks are put together by :class:`~otakit.device.core.assembly.ChunkAssembly`, the device
core that the fleet simulator and ``otakit subscriber`` run too: a malformed header, or one that
disagrees with the first chunk (total size), is ``NOT_A_HEADER``; a version that is not the job's
or not strictly newer than the running one is ``INVALID_VERSION``. Chunks that arrive early are
held (at most ``max_buffered`` bytes, each chunk counting at least 256 so that tiny chunks cannot
pile up; beyond that they are dropped and asked for again) and written in order,
so append-only storage works; storage is committed after every contiguous step. This module
adds only the waiting: ``chunk_timeout`` without new bytes is a stall (the core counts it and
says what is missing), except while paho is reconnecting.

No message reaches the agent's thread longer than the largest valid one (a 32-byte header and
65535 data bytes): a longer one is cut there, so it fails as a malformed chunk or job document
(at most 1024 bytes, §1) without being held whole in the queue.

paho runs its network loop on its own thread, reconnects by itself and this module subscribes
the session's topics again after each reconnect; the agent's thread waits on a queue. A job
document that points to HTTP(S) becomes a :class:`Job` with the image's URL (an empty Server is
the broker's host), which the agent hands to the HTTP transport.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urljoin

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from otakit.device.core.assembly import MIN_HELD_COST, ChunkAssembly, ranges_text
from otakit.device.storage import Storage
from otakit.device.transports.base import DeltaJob, Job, Progress
from otakit.errors import (
    JobFetchError,
    MalformedJobDocError,
    OtakitError,
    TransferError,
    TransportUnsupportedError,
    UsageError,
    VersionFormatError,
)
from otakit.protocol import mqtt as wire
from otakit.protocol.jobdoc import (
    MAX_DOCUMENT_BYTES,
    RESULT_RECEIVED,
    UPDATE_AVAILABLE,
    JobDocument,
    parse_job_document,
)
from otakit.protocol.version import FirmwareVersion, job_version
from otakit.tls import client_context

log = logging.getLogger("otakit.mqtt")

INBOX_SIZE = 512  # messages waiting for the agent's thread; more are dropped (and asked again)
MAX_MESSAGE_BYTES = wire.HEADER_SIZE + wire.MAX_CHUNK_SIZE  # the largest valid chunk
MAX_RANGES = 16  # missing ranges asked for in one round
REPLACE = "replace"  # the publisher's placeholder for the device's unique topic (§1)


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and how patient the device is.

    TLS is used when ``tls`` is set or a ``ca_file``/``client_cert`` is given (``ca_file``
    replaces the system CAs; ``client_cert``/``client_key`` is presented to the broker).
    ``app_prefix`` names the board ``APP_BOARD`` on topics, as the original devices do.
    """

    host: str
    port: int = wire.PORT
    tls: bool = False
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    company: str = wire.COMPANY
    app_prefix: bool = True
    keepalive: int = wire.KEEPALIVE_S
    connect_timeout: float = 10.0  # connection and subscription
    job_timeout: float = 30.0  # wait for the job document
    chunk_timeout: float = 10.0  # no new chunk for this long: ask for what is missing
    request_tries: int = 3  # such requests in a row without progress, then GET_DATA
    result_timeout: float = 5.0  # wait for "Result Received"
    data_timeout: float = 1200.0  # the whole image
    max_buffered: int = 64 * wire.CHUNK_SIZE  # bytes of early chunks held (>= 256 per chunk)

    @property
    def secure(self) -> bool:
        return self.tls or bool(self.ca_file or self.client_cert)

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context: the configured CA (else the system's) and client certificate."""
        return client_context(self.ca_file, self.client_cert, self.client_key)


# --- one connection ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Suback:
    """Someone waiting for a subscription to be acknowledged."""

    done: threading.Event = field(default_factory=threading.Event)
    failures: list[str] = field(default_factory=list)


class _Link:
    """One connection to a broker. paho's loop runs on its own thread and reconnects by itself;
    the subscribed topics are subscribed again after each reconnect (clean sessions), and the
    messages on them are queued for the agent's thread in :attr:`inbox`."""

    def __init__(
        self,
        settings: MqttSettings,
        host: str,
        port: int,
        *,
        client_id: str,
        will: bytes,
        context: ssl.SSLContext | None,
    ) -> None:
        self.host, self.port = host, port
        self.keepalive = settings.keepalive
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=INBOX_SIZE)
        self.connected = threading.Event()
        self.refused: str | None = None  # why the broker refused or dropped us, last time
        self._lock = threading.Lock()
        self._topics: set[str] = set()
        self._subacks: dict[int, list[_Suback]] = {}
        self._waiting: set[_Suback] = set()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        client.will_set(wire.WILL_TOPIC, will, qos=wire.QOS, retain=False)
        client.reconnect_delay_set(1, 30)
        if context is not None:
            client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def open(self, timeout: float, error: type[OtakitError]) -> None:
        """Connect and start paho's loop; ``error`` if the broker cannot be reached."""
        try:
            self.client.connect(self.host, self.port, self.keepalive)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise error(
                f"cannot connect to the MQTT broker {self.where}: {exc}", value=self.where
            ) from None
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.close()
            reason = self.refused or f"no CONNACK within {timeout} s"
            raise error(
                f"the MQTT broker {self.where} did not accept us: {reason}", value=self.where
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def subscribe(self, topics: Iterable[str], timeout: float, error: type[OtakitError]) -> None:
        """Subscribe (QoS 1) and wait for the SUBACK, through reconnects, up to ``timeout``."""
        wanted = sorted(set(topics))
        waiter = _Suback()
        with self._lock:
            self._topics.update(wanted)
            self._waiting.add(waiter)  # a reconnect's subscription answers it too
            rc, mid = self.client.subscribe([(topic, wire.QOS) for topic in wanted])
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._subacks.setdefault(mid, []).append(waiter)
        answered = waiter.done.wait(timeout)
        with self._lock:
            self._waiting.discard(waiter)
        if not answered:
            raise error(
                f"no SUBACK from the MQTT broker {self.where} within {timeout} s "
                f"for {', '.join(wanted)}",
                value=wanted[0],
            )
        if waiter.failures:
            raise error(
                f"the MQTT broker {self.where} refused the subscription to "
                f"{', '.join(wanted)}: {waiter.failures[0]}",
                value=wanted[0],
            )

    def unsubscribe(self, topics: Iterable[str]) -> None:
        gone = set(topics)
        with self._lock:
            self._topics -= gone
        if gone and self.connected.is_set():
            self.client.unsubscribe(sorted(gone))

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1, not retained; while the connection is down paho keeps it and sends it after
        reconnecting."""
        info = self.client.publish(topic, payload, qos=wire.QOS, retain=False)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publishing to %s failed: %s", topic, paho.error_string(info.rc))

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.inbox.get_nowait()

    # --- paho's thread ---

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            log.warning("MQTT broker %s refused the connection: %s", self.where, reason)
            return
        self.refused = None
        with self._lock:
            topics = sorted(self._topics)
            if topics:  # a clean session forgets them: subscribe again
                rc, mid = client.subscribe([(topic, wire.QOS) for topic in topics])
                if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                    self._subacks.setdefault(mid, []).extend(self._waiting)
        log.info("connected to the MQTT broker %s", self.where)
        self.connected.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if not self.connected.is_set():  # closed before CONNACK: TLS or credentials refused
            self.refused = f"it closed the connection ({reason})"
        self.connected.clear()
        log.info("disconnected from the MQTT broker %s: %s", self.where, reason)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        failures = [str(r) for r in reasons if r.is_failure]
        with self._lock:
            waiters = self._subacks.pop(mid, [])
        for waiter in waiters:
            waiter.failures.extend(failures)
            waiter.done.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            wanted = message.topic in self._topics
        if not wanted:
            return
        payload = message.payload
        if len(payload) > MAX_MESSAGE_BYTES:  # invalid whatever it is: keep what shows that
            log.warning("a message of %d bytes on %s: cut short", len(payload), message.topic)
            payload = payload[: MAX_MESSAGE_BYTES + 1]
        try:
            self.inbox.put_nowait((message.topic, bytes(payload)))
        except queue.Full:
            log.warning("dropping a message on %s: the agent is behind", message.topic)


# --- one session -------------------------------------------------------------------------------


@dataclass
class _Session:
    """One update attempt: its unique topic, the topic requests name, the topics data comes on."""

    link: _Link
    unique: str
    reply: str
    data: frozenset[str]
    job: Job | None = None
    # total sizes of the patches downloaded in this session: late chunks of one (answers to
    # repeated requests) are dropped while the image comes (a patch is at most half its size)
    patches: set[int] = field(default_factory=set)


# --- the transport -----------------------------------------------------------------------------


class MqttTransport:
    """The device side of the MQTT flows (see the module docstring).

    ``version`` is the running firmware version (any :meth:`FirmwareVersion.parse` form); the
    identity goes into every request. ``image_sha256`` (the image digest of the running image,
    64 lowercase hex) and ``delta`` (the compressions the agent applies) ask for delta updates
    (both, or :meth:`offer_delta` later; ``image_sha256`` may be a function, called once, at
    the first job request). Raises UsageError when the TLS files cannot be loaded
    or the delta keys cannot be sent.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        board: str,
        version: str,
        serial: str = "",
        manufacturer: str = "",
        manufacturer_id: str = "",
        product: str = "",
        image_sha256: str | Callable[[], str | None] | None = None,
        delta: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.board = board
        self.version = FirmwareVersion.parse(version)
        self.serial = serial
        self.manufacturer = manufacturer
        self.manufacturer_id = manufacturer_id
        self.product = product
        self.topics = wire.Topics(board, settings.company, settings.app_prefix)
        try:  # the identity goes into every request: refuse one that cannot be sent
            self._message(wire.UPDATE_AVAILABILITY, self.topics.unique(0)).to_json()
        except MalformedJobDocError as exc:
            raise UsageError(f"the device identity cannot be sent over MQTT: {exc}") from None
        self._delta_keys: dict[str, str] = {}
        self._delta_source: Callable[[], str | None] | None = None
        self._delta = tuple(delta)
        if callable(image_sha256):  # computed when first needed (it reads the primary slot)
            self._delta_source = image_sha256
        else:
            self.offer_delta(image_sha256, delta)
        self._context = settings.ssl_context() if settings.secure else None
        self._client_id = f"otakit-{secrets.token_hex(8)}"
        self._link: _Link | None = None
        self._session: _Session | None = None

    def offer_delta(self, image_sha256: str | None, delta: Sequence[str]) -> None:
        """Ask for deltas from now on: the running image's digest and the compressions the
        agent applies (None or () : ask for full images only). Raises UsageError when they
        cannot be sent."""
        keys: dict[str, str] = {}
        if image_sha256 and delta:
            keys = {"ImageSHA256": image_sha256, "Delta": ",".join(delta)}
            try:
                self._message(wire.UPDATE_AVAILABILITY, self.topics.unique(0), keys).to_json()
            except MalformedJobDocError as exc:
                raise UsageError(f"the delta keys cannot be sent over MQTT: {exc}") from None
        self._delta_keys = keys

    def close(self) -> None:
        self._end()
        if self._link is not None:
            self._link.close()
            self._link = None

    # --- job -----------------------------------------------------------------------------------

    def fetch_job(self) -> Job | None:
        s = self.settings
        session = self._start(s.host, s.port, JobFetchError)
        if self._delta_source is not None:
            source, self._delta_source = self._delta_source, None
            try:
                self.offer_delta(source(), self._delta)
            except UsageError as exc:
                log.warning("asking for full images only: %s", exc.message)
        self._send(session, wire.UPDATE_AVAILABILITY, self._delta_keys)
        doc = self._wait_job(session)
        if doc is None:
            log.info("no job document on %s within %s s: no update", session.unique, s.job_timeout)
            return None
        if doc.message != UPDATE_AVAILABLE:
            log.info("the publisher answered %r", doc.message)
            return None
        job = self._job(doc)
        session.job = job
        return job

    def direct_job(self) -> Job:
        return Job(
            url=self._source(self.settings.host, self.settings.port), file="", board=self.board
        )

    def _job(self, doc: JobDocument) -> Job:
        """The job a document describes: here (MQTT) or on an HTTP(S) server."""
        if doc.connection == "MQTT":
            host, port = self._broker_of(doc)
            url = self._source(host, port)
        else:  # HTTP(S): an empty Server is the host the job came from, the broker's
            host = doc.server or self.settings.host
            host = f"[{host}]" if ":" in host else host
            scheme = "https" if doc.connection == "HTTPS" else "http"
            url = urljoin(f"{scheme}://{host}" + (f":{doc.port}" if doc.port else ""), doc.file)
        if doc.board == self.topics.wire_board:  # the board as the topics spell it (APP_X)
            doc = replace(doc, board=self.board)
        delta = None
        if doc.has_delta and doc.connection == "MQTT" and self._delta_keys:
            delta = DeltaJob(
                url=doc.delta_file,
                size=int(doc.delta_size),
                sha256=doc.delta_sha256,
                base_sha256=doc.delta_base,
                new_sha256=doc.delta_new,
                compression=doc.delta_compression,
            )
        return Job(
            url=url,
            file=doc.file,
            version=doc.version,
            board=doc.board,
            document=doc,
            delta=delta,
        )

    def _broker_of(self, doc: JobDocument | None) -> tuple[str, int]:
        """Where an MQTT job's image is; empty Broker/Port: the configured broker."""
        s = self.settings
        if doc is None:
            return s.host, s.port
        return doc.broker or s.host, doc.port_number or s.port

    def _source(self, host: str, port: int) -> str:
        """The image's name in the journal: the broker and the board's image topic."""
        where = f"[{host}]" if ":" in host else host
        return f"mqtt://{where}:{port}/{self.topics.direct}"

    def _wait_job(self, session: _Session) -> JobDocument | None:
        """The first message on the unique topic, parsed strictly; None after job_timeout."""
        deadline = time.monotonic() + self.settings.job_timeout
        while (incoming := _next(session.link, deadline - time.monotonic())) is not None:
            topic, payload = incoming
            if topic == session.unique:
                if len(payload) > MAX_DOCUMENT_BYTES:  # maybe cut short by _Link: say so
                    raise MalformedJobDocError(
                        f"the job document holds more than the {MAX_DOCUMENT_BYTES} bytes allowed",
                        value=len(payload),
                    )
                return parse_job_document(payload)
        return None

    # --- data ----------------------------------------------------------------------------------

    def download(self, job: Job, storage: Storage, progress: Progress) -> int:
        """Download ``job``'s image into ``storage`` through the chunk assembly core; return
        its size. Raises ChunkHeaderError, InvalidVersionError, TransferError (no new chunk
        after ``request_tries`` requests in a row, or not all within ``data_timeout``),
        TransportUnsupportedError for a job of another protocol, and what the storage raises."""
        doc = job.document
        if doc is not None and doc.connection != "MQTT":
            raise TransportUnsupportedError(
                f"the MQTT transport cannot download a {doc.connection} job",
                value=doc.connection,
            )
        s = self.settings
        patch = _patch_of(job)
        assembly = ChunkAssembly(
            storage,
            source=job.url,
            version=_version_of(job),
            running=self._running,
            tries=s.request_tries,
            max_early=max(1, s.max_buffered // MIN_HELD_COST),  # the bytes bound the count
            max_early_bytes=max(1, s.max_buffered),
            sha256=job.sha256 or (doc.delta_sha256 if patch and doc is not None else None),
        )
        session, message = self._data_session(job)
        expected = int(doc.delta_size) if patch and doc is not None else None
        if expected is not None:
            session.patches.add(expected)
        name = patch or job.file  # what "Request Data Chunk" names
        extra: dict[str, str] = {}
        if assembly.resumed_from or patch:  # a patch is only ever asked for by range
            message = wire.REQUEST_DATA_CHUNK
            extra = self._range(name, assembly.resumed_from, -1)

        def ask(first: int, size: int) -> None:
            self._send(session, wire.REQUEST_DATA_CHUNK, self._range(name, first, size))

        self._send(session, message, extra)
        reported: int | None = None
        now = time.monotonic()
        deadline, quiet_since = now + s.data_timeout, now
        while not assembly.done:
            now = time.monotonic()
            if now >= deadline:
                raise TransferError(
                    f"the {'patch' if patch else 'image'} did not arrive within {s.data_timeout} s "
                    f"({assembly.offset} of {assembly.total or '?'} bytes)",
                    value=job.url,
                )
            incoming = _next(session.link, min(quiet_since + s.chunk_timeout, deadline) - now)
            if incoming is not None:
                topic, payload = incoming
                if topic not in session.data:
                    continue
                if payload[:1] == b"{":
                    log.debug("ignoring a JSON message on %s during the download", topic)
                    continue
                if _other_file(payload, expected, session.patches):
                    log.debug("ignoring a chunk of another file on %s", topic)
                    continue
                if assembly.chunk(payload):
                    quiet_since = time.monotonic()
                for first, size in assembly.requests():
                    ask(first, size)
                total = assembly.total
                if total is not None and reported != assembly.offset:
                    if reported is None and assembly.started:
                        progress(assembly.started, total)
                    if reported is not None or assembly.offset != assembly.started:
                        progress(assembly.offset, total)
                    reported = assembly.offset
                continue
            # chunk_timeout without new bytes
            quiet_since = time.monotonic()
            if quiet_since >= deadline or not session.link.connected.is_set():
                continue  # paho reconnects: an outage is not a failed request
            try:
                assembly.stalled()
            except TransferError as exc:
                raise TransferError(
                    f"{exc.message} (waiting {s.chunk_timeout} s each time)", value=job.url
                ) from None
            if assembly.total is None:
                log.info("no chunk yet; asking again")
                self._send(session, message, extra)
                continue
            gaps = assembly.missing()
            log.info("missing %s; asking again", ranges_text(gaps))
            for first, size in gaps[:MAX_RANGES]:
                ask(first, size)
        assert assembly.total is not None
        log.info("downloaded %s: %d bytes", job.url, assembly.total)
        return assembly.total

    @property
    def _running(self) -> FirmwareVersion:
        v = self.version
        return FirmwareVersion(v.major, v.minor, v.revision)

    def _range(self, file: str, offset: int, size: int) -> dict[str, str]:
        return {"Filename": file, "Offset": str(offset), "Size": str(size)}

    def _data_session(self, job: Job) -> tuple[_Session, str]:
        """The session the image comes in (the job's, or a new one) and the request for it.
        The patch of a job's delta comes in the job's session (same document), which stays
        the job's for the image and the result."""
        doc = job.document
        host, port = self._broker_of(doc)
        session = self._session
        same = session is not None and (
            session.job is job
            or (doc is not None and session.job is not None and session.job.document is doc)
        )
        if session is None or not same or (session.link.host, session.link.port) != (host, port):
            session = self._start(host, port, TransferError)
            session.job = job
        named = doc.unique_topic_name if doc is not None else ""
        if not named:  # direct flow: the image comes on the board's topic
            session.data = frozenset({self.topics.direct, session.unique})
            message = wire.SEND_DIRECT_UPDATE
        else:
            session.reply = session.unique if named == REPLACE else named
            session.data = frozenset({session.reply})
            message = wire.REQUEST_UPDATE
        session.link.subscribe(session.data, self.settings.connect_timeout, TransferError)
        return session, message

    # --- result --------------------------------------------------------------------------------

    def send_result(
        self,
        job: Job,
        *,
        success: bool,
        error: str | None,
        message: str | None,
        delta_error: str | None = None,
    ) -> None:
        s = self.settings
        session = self._session
        if session is None or not (
            session.job is job
            or (
                job.document is not None
                and session.job is not None
                and session.job.document is job.document
            )
        ):
            log.warning("no MQTT session for %s: result not sent", job.url)
            return
        extra: dict[str, str] = {}
        if not success:
            extra = {
                "Error": error or "GENERAL",
                "Reason": (message or "").replace("\x00", " ")[:200],
            }
        # why the patch was not used (a DeltaError reason): full images only from then on
        noted = {"DeltaError": delta_error[:32]} if delta_error else {}
        try:
            self._send(session, wire.SUCCESS if success else wire.FAILURE, {**extra, **noted})
        except MalformedJobDocError:
            self._send(session, wire.FAILURE, {"Error": error or "GENERAL", **noted})
        if not self._wait_result(session):
            log.debug("no %r within %s s: counted as received", RESULT_RECEIVED, s.result_timeout)
        self._end()

    def _wait_result(self, session: _Session) -> bool:
        """Whether "Result Received" came within result_timeout; other messages are ignored."""
        deadline = time.monotonic() + self.settings.result_timeout
        while (incoming := _next(session.link, deadline - time.monotonic())) is not None:
            topic, payload = incoming
            if topic in (session.unique, session.reply) and payload[:1] == b"{":
                with contextlib.suppress(OtakitError):
                    if parse_job_document(payload).message == RESULT_RECEIVED:
                        return True
        return False

    # --- sessions and messages -----------------------------------------------------------------

    def _connect(self, host: str, port: int, error: type[OtakitError]) -> _Link:
        link = self._link
        if link is not None and (link.host, link.port) == (host, port):
            return link
        if link is not None:
            link.close()
            self._link = None
        s = self.settings
        # another broker named by a job: the same TLS files, except on the plain port (1883),
        # where the original device never uses them
        same = (host, port) == (s.host, s.port)
        context = self._context if same or port != wire.PORT else None
        will = f"otakit device {self.serial or self._client_id} disconnected unexpectedly"
        link = _Link(s, host, port, client_id=self._client_id, will=will.encode(), context=context)
        link.open(s.connect_timeout, error)
        self._link = link
        return link

    def _start(self, host: str, port: int, error: type[OtakitError]) -> _Session:
        """A new session: a new unique topic, subscribed."""
        self._end()
        link = self._connect(host, port, error)
        link.drain()
        unique = self.topics.unique(secrets.randbelow(10**9))
        session = _Session(link, unique, unique, frozenset({unique}))
        link.subscribe([unique], self.settings.connect_timeout, error)
        self._session = session
        return session

    def _end(self) -> None:
        session, self._session = self._session, None
        if session is not None and session.link is self._link:
            session.link.unsubscribe(session.data | {session.unique})

    def _send(self, session: _Session, message: str, extra: dict[str, str] | None = None) -> None:
        """Publish one request to ``COMPANY/BOARD/publish_notify``."""
        payload = self._message(message, session.reply, extra).to_json()
        log.debug("-> %s %s", self.topics.notify, payload.decode())
        session.link.publish(self.topics.notify, payload)

    def _message(
        self, message: str, topic: str, extra: dict[str, str] | None = None
    ) -> JobDocument:
        """A device message: its identity, the session's topic and ``extra`` keys, all strings
        (protocols.md §3; ``ManufacturerID`` is written ``ManufacturerId``, keys are matched
        case-insensitively)."""
        return JobDocument(
            message=message,
            manufacturer=self.manufacturer,
            manufacturer_id=self.manufacturer_id,
            serial_number=self.serial,
            version=self.version.short,
            unique_topic_name=topic,
            extra=(("ProductID", self.product), ("BoardName", self.board), *(extra or {}).items()),
        )


def _next(link: _Link, timeout: float) -> tuple[str, bytes] | None:
    """The next message for the agent's thread, or None after ``timeout`` seconds."""
    try:
        return link.inbox.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return None


def _other_file(payload: bytes, expected: int | None, patches: set[int]) -> bool:
    """Whether a chunk is of another file of the session: while a patch of ``expected`` bytes
    comes, any chunk of another total size; while the image comes, one of a patch's size."""
    if len(payload) < wire.HEADER_SIZE:
        return False  # the assembly says what is wrong with it
    total = wire.HEADER.unpack_from(payload)[6]
    return total != expected if expected is not None else total in patches


def _patch_of(job: Job) -> str | None:
    """The DeltaFile when ``job`` is the download of its document's delta patch (``url`` or
    ``file`` set to the DeltaFile), else None."""
    doc = job.document
    if doc is None or not doc.has_delta:
        return None
    return doc.delta_file if doc.delta_file in (job.url, job.file) else None


def _version_of(job: Job) -> FirmwareVersion | None:
    """The version the job says its image is (None in the direct flow). Raises
    MalformedJobDocError for one that is not a version."""
    if not job.version:
        return None
    try:
        return FirmwareVersion.parse(job.version)
    except VersionFormatError:
        return job_version(job.version)  # the job document's own form (leading zeros)
