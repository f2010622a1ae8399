"""``otakit push FILE --to tcp://HOST:PORT | --ble ADDRESS``: the host side of BLE OTA.

The host is the GATT client of the device's OTA service (protocols.md §4). It subscribes to the
control point's replies, then::

    PREPARE_DOWNLOAD → DOWNLOAD size → the image in writes of MTU-3 bytes → VERIFY CRC-32

and the device answers each command with one byte (0 OK, 1 failure, 3 verification failed).
The image is checked to be a well-formed MCUboot image with an intact hash before anything is
sent; the device checks the signature and the version. Anything that stops a started push on
the host side (an error, Ctrl-C) sends ABORT, so the device's slot is left clean.

Two links, behind one small interface (:class:`GattLink`):

- :class:`LoopbackLink`: TCP to a simulated device (``otakit sim serve-push``), carrying the
  frames of :mod:`otakit.protocol.ble_ota`;
- :class:`BleakLink`: a real radio through ``bleak`` (an optional extra:
  ``pip install 'otakit[ble]'``), imported only when ``--ble`` is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from otakit.errors import (
    ImageError,
    LinkError,
    OtakitError,
    PushRefusedError,
    PushVerifyError,
    UsageError,
)
from otakit.files import read_input
from otakit.image.verify import verify_image
from otakit.protocol import ble_ota
from otakit.protocol.ble_ota import (
    CONTROL_POINT_UUID,
    DATA_UUID,
    FRAME_HEADER_SIZE,
    Frame,
    Op,
    Reply,
    Subscription,
)

DEFAULT_MTU = 247  # a common negotiated ATT MTU (251-byte LL packets): 244 bytes per write
DEFAULT_TIMEOUT = 30.0  # seconds for each answer of the device (VERIFY checks a signature)

err = Console(stderr=True, highlight=False, soft_wrap=True)

T = TypeVar("T")


# --- links -------------------------------------------------------------------------------------


class GattLink(Protocol):
    """A connection to the device's OTA service."""

    @property
    def mtu(self) -> int:
        """The ATT MTU in use; a write carries at most MTU-3 bytes."""
        ...

    @property
    def target(self) -> str:
        """Where the device is (for messages)."""
        ...

    def subscribe(self, characteristic: str) -> None:
        """Receive the values the device notifies or indicates on ``characteristic``."""
        ...

    def write(self, characteristic: str, value: bytes, *, response: bool = True) -> None:
        """Write ``value``; with ``response`` wait until the device accepted it.
        Raises :class:`LinkError`."""
        ...

    def wait_value(self, characteristic: str, timeout: float) -> bytes:
        """The next value notified or indicated on ``characteristic``. Raises
        :class:`LinkError` when none comes within ``timeout`` seconds."""
        ...

    def close(self) -> None: ...


class LoopbackLink:
    """The loopback link's host side (TCP); exchanges the MTU when it connects."""

    def __init__(
        self, host: str, port: int, *, mtu: int = DEFAULT_MTU, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._target = f"tcp://{host}:{port}"
        self._timeout = timeout
        self._values: deque[tuple[str | None, bytes]] = deque()
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise LinkError(
                f"cannot connect to {self._target}: {exc.strerror or exc}", value=self._target
            ) from None
        try:
            self._send(ble_ota.mtu_request(mtu))
            answer = self._answer((Op.MTU_RSP,), timeout)
            self._mtu = min(mtu, ble_ota.parse_mtu(answer))
        except BaseException:
            self._sock.close()
            raise

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def target(self) -> str:
        return self._target

    def subscribe(self, characteristic: str) -> None:
        if characteristic != CONTROL_POINT_UUID:
            raise UsageError(
                f"only the control point notifies, not {characteristic}", value=characteristic
            )
        self._send(ble_ota.subscribe(Subscription.NOTIFY))
        self._check_write(self._answer((Op.WRITE_RSP, Op.ERROR_RSP), self._timeout), "CCCD")

    def write(self, characteristic: str, value: bytes, *, response: bool = True) -> None:
        limit = ble_ota.max_write(self._mtu)
        if len(value) > limit:
            raise LinkError(
                f"a write of {len(value)} bytes does not fit MTU {self._mtu} ({limit} at most)",
                value=len(value),
            )
        self._send(Frame(Op.WRITE_REQ if response else Op.WRITE_CMD, characteristic, value))
        if response:
            answer = self._answer((Op.WRITE_RSP, Op.ERROR_RSP), self._timeout)
            self._check_write(answer, characteristic)

    def wait_value(self, characteristic: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            for index, (source, value) in enumerate(self._values):
                if source == characteristic:
                    del self._values[index]
                    return value
            self._dispatch(self._read(max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    # --- internals -----------------------------------------------------------------------------

    def _check_write(self, answer: Frame, what: str) -> None:
        if answer.op is Op.ERROR_RSP:
            _request, code = ble_ota.parse_error(answer)
            raise LinkError(
                f"the device refused the write to {what}: ATT error {ble_ota.att_error_name(code)}",
                value=code,
            )

    def _answer(self, ops: tuple[Op, ...], timeout: float) -> Frame:
        """The next frame among ``ops``, keeping the values notified meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._read(max(0.0, deadline - time.monotonic()))
            if frame.op in ops:
                return frame
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        if frame.op in (Op.NOTIFY, Op.INDICATE):
            self._values.append((frame.characteristic, frame.value))
            if frame.op is Op.INDICATE:
                self._send(Frame(Op.CONFIRM, frame.characteristic))

    def _send(self, frame: Frame) -> None:
        try:
            self._sock.sendall(frame.pack())
        except OSError as exc:
            raise LinkError(
                f"the connection to {self._target} is lost: {exc.strerror or exc}",
                value=self._target,
            ) from None

    def _read(self, timeout: float) -> Frame:
        header = self._recv(FRAME_HEADER_SIZE, timeout)
        op, characteristic, length = ble_ota.parse_frame_header(header)
        return Frame(op, characteristic, self._recv(length, timeout) if length else b"")

    def _recv(self, size: int, timeout: float) -> bytes:
        data = bytearray()
        try:
            self._sock.settimeout(max(timeout, 0.001))
            while len(data) < size:
                chunk = self._sock.recv(size - len(data))
                if not chunk:
                    raise LinkError(
                        f"the device at {self._target} closed the connection", value=self._target
                    )
                data += chunk
        except TimeoutError:
            raise LinkError(
                f"no answer from the device at {self._target} within {self._timeout:g} s",
                value=self._target,
            ) from None
        except OSError as exc:
            raise LinkError(
                f"the connection to {self._target} is lost: {exc.strerror or exc}",
                value=self._target,
            ) from None
        return bytes(data)


def load_bleak() -> Any:
    """The ``bleak`` module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module("bleak")
    except ImportError:
        raise UsageError(
            "--ble needs the bleak package, which is not installed: pip install 'otakit[ble]'"
        ) from None


class BleakLink:
    """A real radio through ``bleak`` (asyncio), driven from this thread.

    bleak's coroutines run on a private event loop in a background thread; notifications are
    queued for :meth:`wait_value`. The MTU is the smaller of ``mtu`` and the one the adapter
    reports (on BlueZ it may report 23 before the exchange: writes are then small, never wrong).
    """

    def __init__(
        self, address: str, *, mtu: int = DEFAULT_MTU, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        bleak = load_bleak()
        self._target = f"BLE device {address}"
        self._timeout = timeout
        self._values: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otakit-bleak")
        self._thread.daemon = True
        self._thread.start()
        try:
            self._client: Any = bleak.BleakClient(address, timeout=timeout)
            self._run(self._client.connect(), "connecting")
            services = self._client.services
            if (
                services.get_service(ble_ota.SERVICE_UUID) is None
                and services.get_service(ble_ota.SECURE_SERVICE_UUID) is None
            ):
                raise LinkError(f"{self._target} has no OTA service", value=address)
            self._mtu = max(ble_ota.DEFAULT_MTU, min(mtu, int(self._client.mtu_size)))
        except BaseException:
            self.close()
            raise

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def target(self) -> str:
        return self._target

    def subscribe(self, characteristic: str) -> None:
        def on_value(_sender: object, data: bytearray) -> None:
            self._values.put((characteristic, bytes(data)))

        self._run(self._client.start_notify(characteristic, on_value), "subscribing")

    def write(self, characteristic: str, value: bytes, *, response: bool = True) -> None:
        coro = self._client.write_gatt_char(characteristic, value, response=response)
        self._run(coro, "writing")

    def wait_value(self, characteristic: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                source, value = self._values.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise LinkError(
                    f"no answer from {self._target} within {timeout:g} s", value=self._target
                ) from None
            if source == characteristic:
                return value

    def close(self) -> None:
        if self._loop.is_closed():
            return
        client = getattr(self, "_client", None)
        if client is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                self._run(client.disconnect(), "disconnecting")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self._timeout)
        if not self._loop.is_running():
            self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._timeout)
        except OtakitError:
            raise
        except Exception as exc:  # bleak raises BleakError, OSError, timeouts, D-Bus errors...
            future.cancel()
            raise LinkError(
                f"{what} {self._target} failed: {type(exc).__name__}: {exc}", value=self._target
            ) from None


# --- the protocol ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushReport:
    size: int
    crc: int
    mtu: int
    writes: int
    seconds: float


class PushClient:
    """The OTA service's commands over a link; :meth:`push` runs a whole transfer."""

    def __init__(self, link: GattLink, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.link = link
        self.timeout = timeout
        self._subscribed = False

    def command(self, value: bytes) -> Reply:
        """Write one control-point command and return the device's reply."""
        if not self._subscribed:
            self.link.subscribe(CONTROL_POINT_UUID)
            self._subscribed = True
        self.link.write(CONTROL_POINT_UUID, value)
        return ble_ota.parse_reply(self.link.wait_value(CONTROL_POINT_UUID, self.timeout))

    def prepare(self) -> None:
        self._expect("PREPARE_DOWNLOAD", self.command(ble_ota.prepare_download()))

    def download(self, size: int) -> None:
        reply = self.command(ble_ota.download(size))
        self._expect(
            "DOWNLOAD",
            reply,
            f"the device refused an image of {size} bytes (reply 1): it does not fit its slot, "
            "or the device cannot open its storage",
        )

    def write_data(self, chunk: bytes) -> None:
        self.link.write(DATA_UUID, chunk)

    def verify(self, crc: int) -> None:
        reply = self.command(ble_ota.verify(crc))
        if reply is Reply.VERIFY_FAILED:
            raise PushVerifyError(
                f"the device rejected the image (reply 3, verification failed): the CRC-32 "
                f"0x{crc:08x} does not match what it received, or the image is not signed by a "
                "key it trusts or not newer than what it runs; nothing is pending",
                command="VERIFY",
                reply=reply,
            )
        self._expect(
            "VERIFY",
            reply,
            "the device answered VERIFY with a failure (reply 1): the transfer was incomplete "
            "or its storage failed; nothing is pending",
        )

    def abort(self) -> None:
        self._expect("ABORT", self.command(ble_ota.abort()))

    def push(
        self, image: bytes, *, progress: Callable[[int, int], None] | None = None
    ) -> PushReport:
        """PREPARE, DOWNLOAD, the data, VERIFY. Raises :class:`PushRefusedError`,
        :class:`PushVerifyError` or :class:`LinkError`; a failure on this side after PREPARE
        (including KeyboardInterrupt) sends ABORT first."""
        started = time.monotonic()
        crc = ble_ota.image_crc(image)
        step = ble_ota.max_write(self.link.mtu)
        writes = 0
        self.prepare()
        try:
            self.download(len(image))
            for offset in range(0, len(image), step):
                self.write_data(image[offset : offset + step])
                writes += 1
                if progress is not None:
                    progress(min(offset + step, len(image)), len(image))
            self.verify(crc)
        except (PushRefusedError, PushVerifyError):
            raise  # the device already left its slot clean
        except BaseException:
            with contextlib.suppress(OtakitError, OSError):
                self.abort()
            raise
        return PushReport(len(image), crc, self.link.mtu, writes, time.monotonic() - started)

    def _expect(self, command: str, reply: Reply, message: str | None = None) -> None:
        if reply is not Reply.OK:
            raise PushRefusedError(
                message or f"the device refused {command} (reply {int(reply)})",
                command=command,
                reply=reply,
            )


# --- the command -------------------------------------------------------------------------------


def _int_option(text: str, option: str, low: int, high: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an integer", value=text) from None
    if not low <= value <= high:
        raise UsageError(f"{option} must be from {low} to {high}, not {value}", value=value)
    return value


def _seconds_option(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a number of seconds", value=text) from None
    if not 0 < value <= 3600:
        raise UsageError(f"{option} must be more than 0 and at most 3600 s, not {text}", value=text)
    return value


def loopback_address(url: str) -> tuple[str, int]:
    """Host and port of ``tcp://HOST:PORT``; raises :class:`UsageError`."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or not port or parts.path not in ("", "/"):
        raise UsageError(
            f"--to {url!r} is not a loopback link address: expected tcp://HOST:PORT, "
            "e.g. tcp://127.0.0.1:7000",
            value=url,
        )
    return parts.hostname, port


def check_image(data: bytes, name: str) -> str:
    """The version of a well-formed MCUboot image with an intact hash (no key needed: the
    device checks the signature); raises :class:`UsageError` otherwise."""
    try:
        return str(verify_image(data).version)
    except ImageError as exc:
        raise UsageError(
            f"{name} is not a valid MCUboot image ({exc.message}); nothing was sent", value=name
        ) from None


def push(
    file: Annotated[Path, typer.Argument(help="Signed MCUboot image.", show_default=False)],
    to: Annotated[
        str | None,
        typer.Option("--to", help="Loopback link of a simulated device: tcp://127.0.0.1:PORT."),
    ] = None,
    ble: Annotated[
        str | None,
        typer.Option("--ble", help="Bluetooth address of the device (needs bleak: otakit\\[ble])."),
    ] = None,
    mtu: Annotated[
        str, typer.Option("--mtu", help="ATT MTU to use (23-517); writes carry MTU-3 bytes.")
    ] = str(DEFAULT_MTU),
    timeout: Annotated[
        str, typer.Option("--timeout", help="Seconds to wait for each answer of the device.")
    ] = str(int(DEFAULT_TIMEOUT)),
) -> None:
    """Push FILE to a device over Bluetooth LE, or to a simulated device's loopback link."""
    if (to is None) == (ble is None):
        raise UsageError("give exactly one of --to tcp://HOST:PORT and --ble ADDRESS")
    att_mtu = _int_option(mtu, "--mtu", ble_ota.DEFAULT_MTU, ble_ota.MAX_MTU)
    wait = _seconds_option(timeout, "--timeout")
    address = loopback_address(to) if to is not None else None
    image = read_input(file, what="image")
    version = check_image(image, str(file))
    if address is not None:
        link: GattLink = LoopbackLink(*address, mtu=att_mtu, timeout=wait)
    else:
        assert ble is not None
        link = BleakLink(ble, mtu=att_mtu, timeout=wait)
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as progress:
            task = progress.add_task(f"pushing {file.name}", total=len(image))

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            try:
                report = PushClient(link, timeout=wait).push(image, progress=advance)
            except KeyboardInterrupt:
                err.print("interrupted: the push was aborted, the device's slot is left clean")
                raise typer.Exit(130) from None
    finally:
        link.close()
    err.print(
        f"pushed {file.name} ({version}, {report.size} bytes, CRC-32 0x{report.crc:08x}) to "
        f"{link.target} in {report.writes} writes of up to {ble_ota.max_write(report.mtu)} "
        f"bytes, {report.seconds:.1f} s: verified and pending; it runs after the device reboots"
    )
