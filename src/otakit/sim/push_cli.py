"""``otakit sim serve-push DIR --port P``: a simulated device waiting for a BLE OTA push.

The device "advertises" by listening on the loopback link (TCP on 127.0.0.1) and serves one
central at a time (others wait in the listen queue; one that stays silent for ``--idle-timeout``
seconds is disconnected, so it cannot lock the others out) with the push receiver of
:mod:`otakit.device.transports.ble`, writing into the secondary slot of its flash like the pull
agent does (same storage, same resume journal file, so a push and a pull never disagree about
the slot). For each connection the device folder is opened anew, so the running version the
receiver compares against is always current.

With ``--reboot`` a successful push ends the connection and reboots the device (the simulated
bootloader swaps), as a real device does after its update; ``--confirm`` then confirms the new
image, as a healthy application would.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from otakit.device.events import Callback, Event, Reason, State
from otakit.device.journal import Journal
from otakit.device.storage import SlotStorage
from otakit.device.transports.ble import (
    DEFAULT_IDLE_TIMEOUT,
    MAX_IDLE_TIMEOUT,
    GattConnection,
    LoopbackPeripheral,
    OtaReceiver,
    Transfer,
    TransferOutcome,
)
from otakit.errors import DeviceError, UsageError
from otakit.protocol import ble_ota
from otakit.sim.agent import JOURNAL_FILE  # the journal of ``otakit sim run``: one per slot
from otakit.sim.device import SimDevice

err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Session:
    """One central's connection and what came of it."""

    peer: str
    transfers: tuple[Transfer, ...]
    boot: dict[str, Any] | None = None  # the boot after a successful push (with reboot)
    confirmed: bool = False
    running: str | None = None  # after that boot

    @property
    def updated(self) -> bool:
        return any(t.outcome is TransferOutcome.PENDING for t in self.transfers)


@dataclass
class _Connection:
    connection: GattConnection
    receiver: OtaReceiver
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class SimPushService:
    """The OTA GATT service of a simulated device folder (a
    :class:`~otakit.device.transports.ble.GattService`).

    Each finished connection is put on :attr:`sessions` (and given to ``on_session``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        permanent: bool = False,
        reboot: bool = False,
        confirm: bool = False,
        callback: Callback | None = None,
        on_transfer: Callable[[Transfer], None] | None = None,
        on_session: Callable[[Session], None] | None = None,
    ) -> None:
        if confirm and not reboot:
            raise UsageError("confirming needs a reboot into the new image first (--reboot)")
        self.dir = Path(directory)
        device = SimDevice(self.dir)  # fails now for a folder that is not a device
        if device.status()["slots"][0]["running"] is None:
            raise DeviceError(
                f"{self.dir} has no running image; boot it first (`otakit sim boot`)",
                value=str(self.dir),
            )
        self.permanent = permanent
        self.reboot = reboot
        self.confirm = confirm
        self.callback = callback
        self.on_transfer = on_transfer
        self.on_session = on_session
        self.sessions: queue.Queue[Session] = queue.Queue()
        self._current: _Connection | None = None

    def connected(self, connection: GattConnection) -> None:
        device = SimDevice(self.dir)
        running = device.status()["slots"][0]["running"]
        stack = contextlib.ExitStack()
        try:
            boot = stack.enter_context(device.bootloader())
            storage = SlotStorage(
                boot,
                Journal(self.dir / JOURNAL_FILE),
                device.keys,
                # a device mid-upgrade runs nothing yet: the bootloader checks versions anyway
                current_version=(running or "0").split("+")[0],
                allow_downgrade=device.state.allow_downgrade,
            )
        except BaseException:
            stack.close()
            raise
        receiver = OtaReceiver(
            storage, permanent=self.permanent, callback=self._event, on_transfer=self.on_transfer
        )
        self._current = _Connection(connection, receiver, stack)
        receiver.connected(connection)

    def write(self, characteristic: str, value: bytes) -> None:
        assert self._current is not None, "connected() first"
        self._current.receiver.write(characteristic, value)

    def disconnected(self) -> None:
        current, self._current = self._current, None
        assert current is not None, "connected() first"
        try:
            current.receiver.disconnected()
        finally:
            current.stack.close()  # the flash is flushed and closed before any reboot
        transfers = tuple(current.receiver.transfers)
        session = Session(current.connection.peer, transfers)
        if self.reboot and session.updated:
            device = SimDevice(self.dir)
            report = device.boot()
            confirmed = self.confirm and device.confirm()
            running = device.status()["slots"][0]["running"]
            session = Session(session.peer, transfers, report.to_dict(), confirmed, running)
        self.sessions.put(session)
        if self.on_session is not None:
            self.on_session(session)

    def _event(self, event: Event) -> None:
        if self.callback is not None:
            self.callback(event)
        if (
            self.reboot
            and event.state is State.OTA_COMPLETE
            and event.reason is Reason.SUCCESS
            and self._current is not None
        ):
            self._current.connection.disconnect()  # the device reboots after its reply


# --- the command -------------------------------------------------------------------------------


def describe(transfer: Transfer) -> str:
    """One line about a finished transfer."""
    size = transfer.size if transfer.size is not None else 0
    if transfer.outcome is TransferOutcome.PENDING:
        return (
            f"received {transfer.version or 'an image'} ({size} bytes, CRC-32 "
            f"0x{transfer.crc or 0:08x}): verified, pending for the next boot"
        )
    if transfer.outcome is TransferOutcome.ABORTED:
        return f"transfer aborted after {transfer.received} of {size} bytes; slot erased"
    if transfer.outcome is TransferOutcome.DISCONNECTED:
        return f"central disconnected after {transfer.received} of {size} bytes; slot erased"
    return f"transfer failed [{transfer.error}]: {transfer.message}; slot erased"


def describe_session(session: Session) -> str | None:
    if session.boot is None:
        return None
    action = (session.boot.get("images") or [{}])[0].get("action")
    state = "confirmed" if session.confirmed else "not confirmed: reverts at next boot"
    return f"rebooted ({action}); running {session.running}, {state}"


def _port(text: str) -> int:
    try:
        port = int(text, 0)
    except ValueError:
        raise UsageError(f"--port {text!r} is not an integer", value=text) from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, not {port}", value=port)
    return port


def _mtu(text: str) -> int:
    try:
        mtu = int(text, 0)
    except ValueError:
        raise UsageError(f"--max-mtu {text!r} is not an integer", value=text) from None
    if not ble_ota.DEFAULT_MTU <= mtu <= ble_ota.MAX_MTU:
        raise UsageError(
            f"--max-mtu must be from {ble_ota.DEFAULT_MTU} to {ble_ota.MAX_MTU}, not {mtu}",
            value=mtu,
        )
    return mtu


def _idle_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(
            f"--idle-timeout {text!r} is not a number of seconds", value=text
        ) from None
    if not 0 < seconds <= MAX_IDLE_TIMEOUT:
        raise UsageError(
            f"--idle-timeout must be more than 0 and at most {MAX_IDLE_TIMEOUT:g} s, not {text}",
            value=text,
        )
    return seconds


def serve_push(
    directory: Annotated[Path, typer.Argument(help="Device folder.", show_default=False)],
    port: Annotated[
        str, typer.Option("--port", help="TCP port on 127.0.0.1; 0 picks a free one.")
    ] = "0",
    once: Annotated[
        bool,
        typer.Option("--once", help="Serve one connection, then exit (1 unless it updated)."),
    ] = False,
    reboot: Annotated[
        bool,
        typer.Option("--reboot", help="After a successful push, disconnect and reboot."),
    ] = False,
    confirm: Annotated[
        bool, typer.Option("--confirm", help="With --reboot, confirm the new image after it.")
    ] = False,
    permanent: Annotated[
        bool, typer.Option("--permanent", help="Request a permanent upgrade (no test run).")
    ] = False,
    max_mtu: Annotated[
        str, typer.Option("--max-mtu", help="Largest ATT MTU the device accepts (23-517).")
    ] = str(ble_ota.MAX_MTU),
    idle_timeout: Annotated[
        str,
        typer.Option(
            "--idle-timeout",
            help="Seconds a central may stay silent before it is disconnected.",
        ),
    ] = f"{DEFAULT_IDLE_TIMEOUT:g}",
) -> None:
    """Wait for a BLE OTA push (`otakit push --to tcp://...`) on a simulated device.

    Prints "listening on tcp://127.0.0.1:PORT" once ready; stops on Ctrl-C or SIGTERM (exit 0).
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    chosen_port = _port(port)
    chosen_mtu = _mtu(max_mtu)
    chosen_idle = _idle_timeout(idle_timeout)
    sessions: list[Session] = []
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task("waiting for a push", total=None, visible=False)

        def on_event(event: Event) -> None:
            if event.state is State.DATA_DOWNLOAD and event.total:
                progress.update(
                    task, description="receiving", total=event.total, completed=0, visible=True
                )
            elif event.state is State.STORAGE_WRITE and event.bytes_done is not None:
                progress.update(task, completed=event.bytes_done)

        def on_transfer(transfer: Transfer) -> None:
            progress.update(task, visible=False)
            err.print(describe(transfer), markup=False)

        def on_session(session: Session) -> None:
            sessions.append(session)
            line = describe_session(session)
            if line is not None:
                err.print(line, markup=False)

        service = SimPushService(
            directory,
            permanent=permanent,
            reboot=reboot,
            confirm=confirm,
            callback=on_event,
            on_transfer=on_transfer,
            on_session=on_session,
        )
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            with LoopbackPeripheral(
                port=chosen_port, max_mtu=chosen_mtu, idle_timeout=chosen_idle
            ) as peripheral:
                err.print(f"listening on {peripheral.address}")
                peripheral.serve(service, connections=1 if once else None)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a transfer in progress was aborted
            return
        finally:
            signal.signal(signal.SIGTERM, previous)
    if once and not (sessions and sessions[-1].updated):
        raise typer.Exit(1)
