"""The push receiver: the device side of the BLE OTA protocol (protocols.md §4).

Here the device does not fetch anything: it is the GATT server of the OTA service and a host
pushes the image to it. :class:`OtaReceiver` is the service's state machine; it writes into the
same :class:`~otakit.device.storage.Storage` as the pull transports::

    PREPARE_DOWNLOAD   any transfer in progress is abandoned (storage aborted)  → PREPARED
    DOWNLOAD size      storage opened for ``size`` bytes (refused when larger than the slot),
                       which erases it                                          → DOWNLOADING
    data writes        written in order at increasing offsets, committed every
                       ``commit_every`` bytes; more than ``size`` bytes is refused
    VERIFY crc         all bytes received, CRC-32 of them equal to ``crc``, then
                       ``storage.verify()`` (MCUboot hash, signature by a trusted key, version
                       newer than the running one) and ``storage.set_pending()`` (TEST unless
                       ``permanent``)                                           → IDLE
    ABORT (4 or 7)     storage aborted                                          → IDLE

Replies: 0 OK, 1 failure, 3 the image failed verification (CRC or MCUboot check). Every failure
aborts the storage, so the slot is erased, nothing is pending and the next PREPARE starts
clean; so does a disconnect in the middle of a transfer. The slot is opened and erased at
DOWNLOAD, when the size is known, rather than at PREPARE: opening for a size erases, so
erasing at PREPARE too would wear the slot twice per update. A push never resumes (the protocol
has no offsets): a journal left by an interrupted transfer is discarded.

The receiver reports the original agent's states (protocols.md §8) to an application callback:
START_UPDATE (PREPARE), STORAGE_OPEN and DATA_DOWNLOAD (DOWNLOAD), STORAGE_WRITE (each data
write, with the percentage), STORAGE_CLOSE and VERIFY (VERIFY), OTA_COMPLETE, and FAILURE events
with the original's error names. An answer of STOP fails the transfer.

GATT framing sits behind two small interfaces, so the same receiver runs over a real radio or a
loopback link: a :class:`Peripheral` (the BLE stack: advertises, accepts one central at a time
and routes writes to a :class:`GattService`) and a :class:`GattConnection` (the connected
central, which replies are notified or indicated to). :class:`LoopbackPeripheral` is the
loopback link of ``otakit sim serve-push``: TCP on 127.0.0.1 carrying the frames of
:mod:`otakit.protocol.ble_ota`. A real radio's device side is a plug-in implementing
:class:`Peripheral` on the platform's GATT server API (for instance BlueZ over D-Bus on a Linux
gateway); nothing else changes.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from otakit.device.events import Answer, Callback, Event, Reason, State
from otakit.device.journal import Download
from otakit.device.storage import Storage
from otakit.errors import (
    AttWriteError,
    ControlPointError,
    CrcMismatchError,
    FrameError,
    ImageError,
    OtakitError,
    StoppedByAppError,
    TransferError,
    UsageError,
)
from otakit.protocol import ble_ota
from otakit.protocol.ble_ota import (
    CCCD_UUID,
    CONTROL_POINT_UUID,
    DATA_UUID,
    FRAME_HEADER_SIZE,
    AttError,
    Command,
    Frame,
    Op,
    Reply,
    Subscription,
)

log = logging.getLogger("otakit.ble")

PUSH_SOURCE = "ble-push"  # the Download.source of pushed images
COMMIT_EVERY = 64 * 1024
# The loopback link drops a central that sends no complete frame for this long. Shorter than
# the host's default 30 s answer timeout (otakit push --timeout), so a host that connected
# behind a silent central is still waiting when its turn comes.
DEFAULT_IDLE_TIMEOUT = 20.0
MAX_IDLE_TIMEOUT = 3600.0


# --- the GATT interfaces -----------------------------------------------------------------------


class GattConnection(Protocol):
    """The connected central, as the service sees it."""

    @property
    def peer(self) -> str:
        """Who is connected (an address), for logs."""
        ...

    @property
    def mtu(self) -> int: ...

    def send(self, characteristic: str, value: bytes) -> None:
        """Notify or indicate ``value``, as the central subscribed (dropped if it did not)."""
        ...

    def disconnect(self) -> None:
        """End the connection once what was sent so far is delivered (a device rebooting)."""
        ...


class GattService(Protocol):
    """What a peripheral calls; one connection at a time."""

    def connected(self, connection: GattConnection) -> None: ...

    def write(self, characteristic: str, value: bytes) -> None:
        """A write to one of the service's characteristics. Raises :class:`AttWriteError`
        to refuse it (the central gets that ATT error for a write with response)."""
        ...

    def disconnected(self) -> None: ...


class Peripheral(Protocol):
    """A BLE stack's GATT server: the plug-in point for a real radio."""

    def serve(self, service: GattService, *, connections: int | None = None) -> None:
        """Advertise and serve centrals one after the other, until :meth:`close` (or after
        ``connections`` of them)."""
        ...

    def close(self) -> None: ...


# --- the receiver ------------------------------------------------------------------------------


class ReceiverState(StrEnum):
    IDLE = "idle"
    PREPARED = "prepared"
    DOWNLOADING = "downloading"


class TransferOutcome(StrEnum):
    PENDING = "pending"  # verified and marked pending: it runs after a reboot
    FAILED = "failed"  # refused (reply 1 or 3) or broken; storage erased
    ABORTED = "aborted"  # the host sent ABORT (or PREPARE again); storage erased
    DISCONNECTED = "disconnected"  # the link dropped mid-transfer; storage erased


@dataclass(frozen=True)
class Transfer:
    """How one transfer (PREPARE to VERIFY, ABORT or a disconnect) ended."""

    outcome: TransferOutcome
    size: int | None  # None when DOWNLOAD never came
    received: int
    crc: int | None = None  # announced by VERIFY
    version: str | None = None  # of the pending image
    error: str | None = None  # the original's error name
    message: str | None = None


class OtaReceiver:
    """The OTA service's state machine over one :class:`Storage` (see the module docstring).

    Not thread-safe: a peripheral calls it from one thread, one connection at a time.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        permanent: bool = False,
        commit_every: int = COMMIT_EVERY,
        callback: Callback | None = None,
        on_transfer: Callable[[Transfer], None] | None = None,
    ) -> None:
        if commit_every <= 0:
            raise UsageError("commit_every must be positive", value=commit_every)
        self.storage = storage
        self.permanent = permanent
        self.commit_every = commit_every
        self.callback = callback
        self.on_transfer = on_transfer
        self.transfers: list[Transfer] = []
        self.state = ReceiverState.IDLE
        self.size: int | None = None
        self.received = 0
        self.crc = 0
        self._committed = 0
        self._connection: GattConnection | None = None

    # --- GattService ---------------------------------------------------------------------------

    def connected(self, connection: GattConnection) -> None:
        log.info("central %s connected (MTU %d)", connection.peer, connection.mtu)
        self._connection = connection

    def write(self, characteristic: str, value: bytes) -> None:
        if characteristic == CONTROL_POINT_UUID:
            reply = self.command(value)
            if self._connection is not None:
                self._connection.send(CONTROL_POINT_UUID, ble_ota.pack_reply(reply))
        elif characteristic == DATA_UUID:
            self.data(value)
        else:
            raise AttWriteError(
                f"no characteristic {characteristic} in the OTA service",
                error=AttError.ATTRIBUTE_NOT_FOUND,
                value=characteristic,
            )

    def disconnected(self) -> None:
        if self.state is not ReceiverState.IDLE:
            self._fail(
                TransferError(
                    f"the central disconnected after {self.received} of {self.size or 0} bytes"
                ),
                State.DATA_DOWNLOAD,
                TransferOutcome.DISCONNECTED,
            )
        self._connection = None

    # --- control point -------------------------------------------------------------------------

    def command(self, value: bytes) -> Reply:
        """Handle one control-point write; return the reply."""
        try:
            write = ble_ota.parse_command(value)
        except ControlPointError as exc:
            log.info("control point: %s", exc)
            return Reply.FAILURE
        log.info("control point: %s%s", write.command.name, _arg(write.value))
        if write.command is Command.PREPARE_DOWNLOAD:
            return self._prepare()
        if write.command is Command.DOWNLOAD:
            assert write.value is not None
            return self._download(write.value)
        if write.command is Command.VERIFY:
            assert write.value is not None
            return self._verify(write.value)
        return self._abort()

    def _prepare(self) -> Reply:
        if self.state is not ReceiverState.IDLE:
            self._clean()
            self._finish(TransferOutcome.ABORTED, message="replaced by a new PREPARE_DOWNLOAD")
        try:
            self._step(State.START_UPDATE)
        except OtakitError as exc:
            return self._fail(exc, State.START_UPDATE)
        self.state = ReceiverState.PREPARED
        return Reply.OK

    def _download(self, size: int) -> Reply:
        if self.state is ReceiverState.IDLE:
            log.info("DOWNLOAD without PREPARE_DOWNLOAD: refused")
            return Reply.FAILURE
        if self.state is ReceiverState.DOWNLOADING:
            return self._fail(
                TransferError("a second DOWNLOAD in the middle of a transfer"), State.DATA_DOWNLOAD
            )
        self.size = size
        try:
            if size <= 0:
                raise TransferError("DOWNLOAD announced an empty image", value=size)
            self._step(State.STORAGE_OPEN)
            download = Download(source=PUSH_SOURCE, size=size)
            if self.storage.open(download) != 0:
                # a push has no offsets: what an interrupted transfer left is started over
                self.storage.abort()
                self.storage.open(download)
            self._step(State.DATA_DOWNLOAD, total=size)
        except OtakitError as exc:
            return self._fail(exc, State.STORAGE_OPEN)
        self.state = ReceiverState.DOWNLOADING
        self.received = self._committed = 0
        self.crc = 0
        return Reply.OK

    def _verify(self, crc: int) -> Reply:
        if self.state is not ReceiverState.DOWNLOADING:
            if self.state is ReceiverState.IDLE:
                log.info("VERIFY without a transfer: refused")
                return Reply.FAILURE
            return self._fail(TransferError("VERIFY before DOWNLOAD"), State.VERIFY)
        assert self.size is not None
        state = State.STORAGE_CLOSE
        try:
            self._step(state)
            if self.received != self.size:
                raise TransferError(
                    f"VERIFY after {self.received} of {self.size} bytes: the image is incomplete",
                    value=self.received,
                )
            self.storage.commit(self.received)
            state = State.VERIFY
            answer = self._step(state)
            if self.crc != crc:
                raise CrcMismatchError(
                    f"the CRC-32 of the {self.received} received bytes is 0x{self.crc:08x}, "
                    f"not 0x{crc:08x}",
                    value=f"0x{crc:08x}",
                )
            version = None if answer is Answer.APP_SUCCESS else self.storage.verify()
            self.storage.set_pending(permanent=self.permanent)
        except OtakitError as exc:
            # the image itself failed (CRC, MCUboot checks): 3; anything else (storage, an
            # incomplete transfer, the application): 1
            reply = Reply.VERIFY_FAILED if isinstance(exc, ImageError) else Reply.FAILURE
            return self._fail(exc, state, crc=crc, reply=reply)
        kind = "permanent" if self.permanent else "test"
        self._finish(TransferOutcome.PENDING, crc=crc, version=version)
        self._emit(
            Event(
                State.OTA_COMPLETE,
                Reason.SUCCESS,
                message=f"version {version} pending ({kind})",
                bytes_done=self.received,
                total=self.size,
            )
        )
        return Reply.OK

    def _abort(self) -> Reply:
        if self.state is not ReceiverState.IDLE:
            self._clean()
            self._finish(TransferOutcome.ABORTED, message="aborted by the central")
        return Reply.OK

    # --- data ----------------------------------------------------------------------------------

    def data(self, value: bytes) -> None:
        """Handle one write to the data characteristic. Raises :class:`AttWriteError`."""
        if self.state is not ReceiverState.DOWNLOADING:
            raise AttWriteError(
                "data written outside a transfer", error=AttError.NOT_DOWNLOADING, value=len(value)
            )
        assert self.size is not None
        end = self.received + len(value)
        if end > self.size:
            message = f"data up to byte {end} of an image announced as {self.size} bytes"
            self._fail(TransferError(message, value=end), State.STORAGE_WRITE)
            raise AttWriteError(message, error=AttError.BEYOND_IMAGE_SIZE, value=end)
        try:
            if value:
                self.storage.write(self.received, value)
            self.received = end
            self.crc = ble_ota.image_crc(value, self.crc)
            if self.received - self._committed >= self.commit_every:
                self.storage.commit(self.received)
                self._committed = self.received
            self._step(
                State.STORAGE_WRITE,
                percentage=self.received * 100 // self.size,
                bytes_done=self.received,
                total=self.size,
            )
        except OtakitError as exc:
            self._fail(exc, State.STORAGE_WRITE)
            raise AttWriteError(exc.message, error=AttError.STORAGE_FAILED) from None

    # --- internals -----------------------------------------------------------------------------

    def _emit(self, event: Event) -> Answer:
        log.debug("%s %s %s", event.state, event.reason, event.message or "")
        answer = self.callback(event) if self.callback is not None else None
        return answer or Answer.CONTINUE

    def _step(
        self,
        state: State,
        *,
        percentage: int | None = None,
        bytes_done: int | None = None,
        total: int | None = None,
    ) -> Answer:
        event = Event(
            state, Reason.STATE_CHANGE, percentage=percentage, bytes_done=bytes_done, total=total
        )
        answer = self._emit(event)
        if answer in (Answer.STOP, Answer.APP_FAILED):
            raise StoppedByAppError(f"the application stopped the push at {state}")
        return answer

    def _clean(self) -> None:
        try:
            self.storage.abort()
        except OtakitError:
            log.exception("cleaning storage after a failed push")

    def _fail(
        self,
        exc: OtakitError,
        state: State,
        outcome: TransferOutcome = TransferOutcome.FAILED,
        *,
        crc: int | None = None,
        reply: Reply = Reply.FAILURE,
    ) -> Reply:
        log.info("push %s at %s: [%s] %s", outcome, state, exc.code, exc.message)
        self._clean()
        self._finish(outcome, crc=crc, error=exc.agent_error, message=exc.message)
        self._emit(Event(state, Reason.FAILURE, error=exc.agent_error, message=exc.message))
        return reply

    def _finish(
        self,
        outcome: TransferOutcome,
        *,
        crc: int | None = None,
        version: str | None = None,
        error: str | None = None,
        message: str | None = None,
    ) -> None:
        transfer = Transfer(outcome, self.size, self.received, crc, version, error, message)
        self.transfers.append(transfer)
        self.state = ReceiverState.IDLE
        self.size = None
        self.received = self._committed = 0
        self.crc = 0
        if self.on_transfer is not None:
            self.on_transfer(transfer)


def _arg(value: int | None) -> str:
    return "" if value is None else f" {value} (0x{value:08x})"


# --- the loopback link -------------------------------------------------------------------------


class LoopbackPeripheral:
    """The loopback link's device side: a TCP listener on 127.0.0.1 standing in for a radio.

    One central at a time is served (a connected peripheral stops advertising); the next waits
    in the listen queue. A central that sends no complete frame for ``idle_timeout`` seconds
    (counted from the end of the previous one, so a frame sent byte by byte counts as silence)
    is disconnected, as if its link had dropped: a transfer in progress is aborted and the next
    central in the queue is served. So a silent central holds the device for at most
    ``idle_timeout``. The frame format is in :mod:`otakit.protocol.ble_ota`. The link
    enforces the ATT rules the service relies on: the MTU is 23 until exchanged, a write
    longer than MTU-3 is refused (a write request with INVALID_ATTRIBUTE_VALUE_LENGTH; a write
    command, which cannot be answered, ends the connection), replies go out only to a central
    that subscribed (CCCD), each after the response to the write that caused it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_mtu: int = ble_ota.MAX_MTU,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if not ble_ota.DEFAULT_MTU <= max_mtu <= ble_ota.MAX_MTU:
            raise UsageError(
                f"the MTU must be from {ble_ota.DEFAULT_MTU} to {ble_ota.MAX_MTU}, not {max_mtu}",
                value=max_mtu,
            )
        if not 0 < idle_timeout <= MAX_IDLE_TIMEOUT:
            raise UsageError(
                f"the idle timeout must be more than 0 and at most {MAX_IDLE_TIMEOUT:g} s, "
                f"not {idle_timeout:g}",
                value=idle_timeout,
            )
        self.max_mtu = max_mtu
        self.idle_timeout = idle_timeout
        try:
            self._listener = socket.create_server((host, port))
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}", value=port
            ) from None
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._serving = False
        self._active: socket.socket | None = None

    @property
    def host(self) -> str:
        return str(self._listener.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def serve(self, service: GattService, *, connections: int | None = None) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._serving = True
        try:
            self._serve(service, connections)
        finally:
            with self._lock:
                self._serving = False
            if self._closed.is_set():
                self._release()

    def _serve(self, service: GattService, connections: int | None) -> None:
        served = 0
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set() and (connections is None or served < connections):
                ready = {key.fileobj for key, _ in selector.select()}
                if self._closed.is_set() or self._listener not in ready:
                    continue
                try:
                    sock, address = self._listener.accept()
                except OSError:
                    continue
                with self._lock:
                    if self._closed.is_set():
                        sock.close()
                        break
                    self._active = sock
                try:
                    _LoopbackConnection(sock, address, self.max_mtu, self.idle_timeout).run(service)
                finally:
                    with self._lock:
                        self._active = None
                served += 1

    def close(self) -> None:
        """Stop serving and stop listening; a connection being served ends (the service sees
        a disconnect). Safe to call from another thread while :meth:`serve` runs."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            if self._active is not None:
                with contextlib.suppress(OSError):
                    self._active.shutdown(socket.SHUT_RDWR)
            serving = self._serving
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if not serving:
            self._release()  # else serve() does, once it has stopped using the sockets

    def _release(self) -> None:
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> LoopbackPeripheral:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LinkClosed(Exception):
    """The central closed the connection (or broke the link's rules)."""


class _LoopbackConnection:
    """One central on the loopback link; a :class:`GattConnection`."""

    def __init__(
        self, sock: socket.socket, address: object, max_mtu: int, idle_timeout: float
    ) -> None:
        self._sock = sock
        self._peer = _format_address(address)
        self._max_mtu = max_mtu
        self._idle_timeout = idle_timeout
        self._deadline = 0.0
        self._mtu = ble_ota.DEFAULT_MTU
        self._subscription = Subscription.NONE
        self._outbox: list[Frame] | None = None  # while a write is handled
        self._ending = False

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def mtu(self) -> int:
        return self._mtu

    def send(self, characteristic: str, value: bytes) -> None:
        if characteristic != CONTROL_POINT_UUID or self._subscription is Subscription.NONE:
            log.debug("%s: not subscribed; value %s dropped", self._peer, value.hex())
            return
        op = Op.INDICATE if self._subscription is Subscription.INDICATE else Op.NOTIFY
        frame = Frame(op, characteristic, value[: ble_ota.max_write(self._mtu)])
        if self._outbox is not None:
            self._outbox.append(frame)
        else:
            self._send(frame)

    def disconnect(self) -> None:
        self._ending = True

    def run(self, service: GattService) -> None:
        try:
            service.connected(self)
        except BaseException:
            self._sock.close()
            raise
        try:
            while not self._ending:
                frame = self._read_frame()
                if frame is None:
                    break
                self._handle(frame, service)
        except _LinkClosed as exc:
            log.warning("%s: %s", self._peer, exc)
        except FrameError as exc:
            log.warning("%s: malformed frame (%s); closing the connection", self._peer, exc)
        except OSError as exc:
            log.info("%s: connection lost (%s)", self._peer, exc)
        finally:
            with contextlib.suppress(OSError):
                self._sock.close()
            log.info("central %s disconnected", self._peer)
            service.disconnected()

    def _handle(self, frame: Frame, service: GattService) -> None:
        if frame.op is Op.MTU_REQ:
            self._mtu = min(ble_ota.parse_mtu(frame), self._max_mtu)
            self._send(ble_ota.mtu_response(self._max_mtu))
        elif frame.op in (Op.WRITE_REQ, Op.WRITE_CMD):
            self._write(frame, service)
        elif frame.op is Op.CONFIRM:
            pass
        else:
            self._send(ble_ota.error_response(frame.op, None, AttError.REQUEST_NOT_SUPPORTED))

    def _write(self, frame: Frame, service: GattService) -> None:
        with_response = frame.op is Op.WRITE_REQ
        error: AttError | None = None
        limit = ble_ota.max_write(self._mtu)
        if len(frame.value) > limit:
            if not with_response:
                raise _LinkClosed(
                    f"write command of {len(frame.value)} bytes with MTU {self._mtu} "
                    f"(at most {limit}); closing the connection"
                )
            error = AttError.INVALID_ATTRIBUTE_VALUE_LENGTH
        elif frame.characteristic == CCCD_UUID:
            try:
                self._subscription = ble_ota.parse_subscription(frame.value)
            except FrameError:
                error = AttError.INVALID_ATTRIBUTE_VALUE_LENGTH
        elif frame.characteristic in (CONTROL_POINT_UUID, DATA_UUID):
            self._outbox = []
            try:
                service.write(frame.characteristic, frame.value)
            except AttWriteError as exc:
                error = AttError(exc.error)
        else:
            error = AttError.ATTRIBUTE_NOT_FOUND
        outbox, self._outbox = self._outbox or [], None
        if with_response:
            if error is None:
                self._send(Frame(Op.WRITE_RSP, frame.characteristic))
            else:
                self._send(ble_ota.error_response(frame.op, frame.characteristic, error))
        for queued in outbox:
            self._send(queued)

    def _send(self, frame: Frame) -> None:
        # a central that reads nothing for the idle timeout is dropped too (TimeoutError is an
        # OSError: the connection ends as lost)
        self._sock.settimeout(self._idle_timeout)
        self._sock.sendall(frame.pack())

    def _read_frame(self) -> Frame | None:
        """The next frame; it must be complete within the idle timeout."""
        self._deadline = time.monotonic() + self._idle_timeout
        header = self._recv(FRAME_HEADER_SIZE, at_boundary=True)
        if header is None:
            return None
        op, characteristic, length = ble_ota.parse_frame_header(header)
        value = self._recv(length, at_boundary=False) if length else b""
        assert value is not None
        return Frame(op, characteristic, value)

    def _recv(self, size: int, *, at_boundary: bool) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise _LinkClosed(self._idle_message())
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(size - len(data))
            except TimeoutError:
                raise _LinkClosed(self._idle_message()) from None
            if not chunk:
                if at_boundary and not data:
                    return None
                raise _LinkClosed("the connection ended in the middle of a frame")
            data += chunk
        return bytes(data)

    def _idle_message(self) -> str:
        return (
            f"no complete frame for {self._idle_timeout:g} s; disconnecting the idle central "
            "(a transfer in progress is aborted)"
        )


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
