"""BLE OTA push (protocols.md §4): a host pushes an image to a simulated device over the loopback
link; the device's receiver writes it into the secondary slot, verifies it and marks it pending.

Servers run in a thread (or as the real ``otakit sim serve-push`` process); a test waits for a
finished connection on the service's session queue, never with a sleep.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otakit.cli import main
from otakit.device.events import Answer, Event, Reason, State
from otakit.device.journal import Journal
from otakit.device.storage import SlotStorage
from otakit.device.transports.ble import (
    LoopbackPeripheral,
    OtaReceiver,
    ReceiverState,
    TransferOutcome,
)
from otakit.errors import (
    AttWriteError,
    ControlPointError,
    FrameError,
    LinkError,
    PushRefusedError,
    PushVerifyError,
)
from otakit.host.push import LoopbackLink, PushClient, loopback_address
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol import ble_ota
from otakit.protocol.ble_ota import (
    AttError,
    Command,
    ControlPointWrite,
    Reply,
)
from otakit.sim.agent import JOURNAL_FILE
from otakit.sim.device import SimDevice
from otakit.sim.push_cli import Session, SimPushService

from .conftest import BIN, Run

KEY = SigningKey.generate("ecdsa-p256")
OTHER_KEY = SigningKey.generate("ecdsa-p256")
PAYLOAD = 40_000


def image(version: str, size: int = PAYLOAD, key: SigningKey = KEY) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, key, SignOptions(ImageVersion.parse(version), pad_header=True))


def make_device(directory: Path, layout: str = "psoc6-2m-swap", size: int = PAYLOAD) -> SimDevice:
    device = SimDevice.create(directory, image("1.0.0", size), [KEY.public_key], layout=layout)
    device.boot()
    return device


@pytest.fixture
def device(tmp_path: Path) -> SimDevice:
    return make_device(tmp_path / "dev")


def secondary(device: SimDevice, length: int) -> bytes:
    with device.bootloader() as boot:
        return boot.secondary().read_at(0, length)


def slot_state(device: SimDevice) -> dict[str, object]:
    state: dict[str, object] = device.status()["slots"][0]
    return state


def assert_clean(device: SimDevice) -> None:
    """Nothing pending, the secondary slot erased (to the flash's erased value: 0x00 on the
    PSoC 6 rows of psoc6-2m-swap), no journal left."""
    assert slot_state(device)["next_boot"] == "none"
    assert secondary(device, 4096) == bytes([device.map.erased_value]) * 4096
    assert not (device.dir / JOURNAL_FILE).exists()


@dataclass
class Served:
    """A simulated device serving pushes on a thread."""

    device: SimDevice
    service: SimPushService
    peripheral: LoopbackPeripheral
    events: list[Event] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.peripheral.port

    def link(self, mtu: int = 247) -> LoopbackLink:
        return LoopbackLink("127.0.0.1", self.port, mtu=mtu, timeout=10)

    def session(self) -> Session:
        """The next finished connection (waits for the device to handle the disconnect)."""
        return self.service.sessions.get(timeout=10)

    def push(self, data: bytes, *, progress: Callable[[int, int], None] | None = None) -> Session:
        link = self.link()
        try:
            PushClient(link, timeout=10).push(data, progress=progress)
        finally:
            link.close()
        return self.session()


@contextlib.contextmanager
def serving(device: SimDevice, *, reboot: bool = False, confirm: bool = False) -> Iterator[Served]:
    events: list[Event] = []
    service = SimPushService(device.dir, callback=events.append, reboot=reboot, confirm=confirm)
    failure: list[BaseException] = []

    with LoopbackPeripheral() as peripheral:

        def serve() -> None:
            try:
                peripheral.serve(service)
            except BaseException as exc:  # shown by the test, not lost in the thread
                failure.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield Served(device, service, peripheral, events)
        finally:
            peripheral.close()
            thread.join(10)
    assert not thread.is_alive()
    if failure:
        raise failure[0]


# --- the acceptance cases, through otakit's host code ------------------------------------------


def test_push_then_reboot_runs_the_new_version_and_confirm(device: SimDevice) -> None:
    new = image("1.1.0")
    done: list[int] = []
    with serving(device) as served:
        session = served.push(new, progress=lambda n, total: done.append(n))
    assert [t.outcome for t in session.transfers] == [TransferOutcome.PENDING]
    transfer = session.transfers[0]
    assert transfer.version == "1.1.0"
    assert transfer.size == transfer.received == len(new)
    assert done[-1] == len(new)
    assert len(done) == -(-len(new) // 244)  # MTU 247: 244 bytes per write
    states = [e.state for e in served.events if e.reason is Reason.STATE_CHANGE]
    for expected in (State.START_UPDATE, State.STORAGE_OPEN, State.STORAGE_WRITE, State.VERIFY):
        assert expected in states
    assert served.events[-1].state is State.OTA_COMPLETE

    assert secondary(device, len(new)) == new
    status = slot_state(device)
    assert status["next_boot"] == "test"
    assert status["secondary"] == {
        "version": "1.1.0+0",
        "valid": True,
        "problem": None,
        "request": "test",
    }
    assert not (device.dir / JOURNAL_FILE).exists()

    report = device.boot().to_dict()
    assert report["images"][0]["action"] == "upgrade-test"
    assert slot_state(device)["running"] == "1.1.0+0"
    assert slot_state(device)["state"] == "testing"
    assert device.confirm()
    assert slot_state(device)["state"] == "confirmed"
    device.boot()
    assert slot_state(device)["running"] == "1.1.0+0"


def test_serve_push_reboots_and_confirms_after_a_successful_push(device: SimDevice) -> None:
    with serving(device, reboot=True, confirm=True) as served:
        link = served.link()
        client = PushClient(link, timeout=10)
        client.push(image("1.2.0"))
        with pytest.raises(LinkError, match="closed the connection"):
            link.wait_value(ble_ota.CONTROL_POINT_UUID, 10)  # the device rebooted
        link.close()
        session = served.session()
    assert session.updated
    assert (session.boot or {})["images"][0]["action"] == "upgrade-test"
    assert session.running == "1.2.0+0"
    assert session.confirmed
    assert slot_state(device)["state"] == "confirmed"


def test_abort_midway_leaves_the_slot_clean_for_the_next_push(device: SimDevice) -> None:
    new = image("1.1.0")

    class Interrupted(Exception):
        pass

    def stop_halfway(done: int, total: int) -> None:
        if done >= total // 2:
            raise Interrupted

    with serving(device) as served:
        with pytest.raises(Interrupted):
            served.push(new, progress=stop_halfway)  # the host sends ABORT
        session = served.session()
        [transfer] = session.transfers
        assert transfer.outcome is TransferOutcome.ABORTED
        assert len(new) // 2 <= transfer.received < len(new)
        assert_clean(device)
        assert served.push(new).updated
    assert slot_state(device)["next_boot"] == "test"


def test_wrong_crc_is_refused_with_3_and_nothing_is_pending(device: SimDevice) -> None:
    new = image("1.1.0")
    with serving(device) as served:
        link = served.link()
        client = PushClient(link, timeout=10)
        client.prepare()
        client.download(len(new))
        for offset in range(0, len(new), 244):
            client.write_data(new[offset : offset + 244])
        wrong = ble_ota.image_crc(new) ^ 0x1
        with pytest.raises(PushVerifyError) as caught:
            client.verify(wrong)
        assert caught.value.reply == Reply.VERIFY_FAILED
        link.close()
        [transfer] = served.session().transfers
    assert transfer.outcome is TransferOutcome.FAILED
    assert transfer.error == "VERIFY"
    assert f"not 0x{wrong:08x}" in (transfer.message or "")
    assert_clean(device)


def test_image_too_large_for_the_slot_is_refused_at_download(tmp_path: Path) -> None:
    small = make_device(tmp_path / "small", layout="sim-small", size=8000)
    big = image("1.1.0", size=24 * 1024)  # the slots are 20 KiB
    with serving(small) as served:
        with pytest.raises(PushRefusedError, match="does not fit") as caught:
            served.push(big)
        assert caught.value.command == "DOWNLOAD"
        [transfer] = served.session().transfers
    assert transfer.outcome is TransferOutcome.FAILED
    assert transfer.received == 0
    assert "larger than" in (transfer.message or "")
    assert slot_state(small)["next_boot"] == "none"


def test_truncated_transfer_then_a_fresh_push_succeeds(device: SimDevice) -> None:
    new = image("1.1.0")
    with serving(device) as served:
        link = served.link()
        client = PushClient(link, timeout=10)
        client.prepare()
        client.download(len(new))
        for offset in range(0, 10_000, 244):
            client.write_data(new[offset : offset + 244])
        link.close()  # the link drops mid-transfer
        [transfer] = served.session().transfers
        assert transfer.outcome is TransferOutcome.DISCONNECTED
        assert transfer.received == 41 * 244
        assert_clean(device)

        assert served.push(new).updated
    assert secondary(device, len(new)) == new
    device.boot()
    assert slot_state(device)["running"] == "1.1.0+0"


def test_invalid_signature_after_a_correct_crc_is_refused_with_3(device: SimDevice) -> None:
    forged = image("1.1.0", key=OTHER_KEY)
    with serving(device) as served:
        with pytest.raises(PushVerifyError):
            served.push(forged)
        [transfer] = served.session().transfers
    assert transfer.outcome is TransferOutcome.FAILED
    assert transfer.crc == ble_ota.image_crc(forged)  # the CRC matched; MCUboot said no
    assert transfer.error == "VERIFY"
    assert "key" in (transfer.message or "")
    assert_clean(device)
    device.boot()
    assert slot_state(device)["running"] == "1.0.0+0"


# --- the byte protocol, spoken without otakit's host code ---------------------------------------


def crc32(data: bytes) -> int:
    """The standard reflected CRC-32 (polynomial 0xEDB88320), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


class RawCentral:
    """A GATT client of the loopback link written from the frame table in docs/push.md."""

    CONTROL = uuid.UUID("a3dd50bf-f7a7-4e99-838e-570a086c661b").bytes[::-1]
    DATA = uuid.UUID("a2e86c7a-d961-4091-b74f-2409e72efe26").bytes[::-1]
    CCCD = uuid.UUID("00002902-0000-1000-8000-00805f9b34fb").bytes[::-1]

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, op: int, target: bytes, value: bytes = b"") -> None:
        self.sock.sendall(struct.pack("<B16sH", op, target, len(value)) + value)

    def recv(self) -> tuple[int, bytes, bytes]:
        header = self._exactly(19)
        op, target, length = struct.unpack("<B16sH", header)
        return op, target, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def write(self, target: bytes, value: bytes) -> tuple[int, bytes]:
        """Write with response: (0x13, b"") or (0x01, error value)."""
        self.send(0x12, target, value)
        op, _, answer = self.recv()
        return op, answer

    def command(self, value: bytes) -> int:
        assert self.write(self.CONTROL, value) == (0x13, b"")
        op, target, reply = self.recv()
        assert target == self.CONTROL
        assert op in (0x1B, 0x1D)
        if op == 0x1D:
            self.send(0x1E, self.CONTROL)  # confirm the indication
        assert len(reply) == 1
        return reply[0]

    def close(self) -> None:
        self.sock.close()


def test_byte_protocol_from_the_host_side(device: SimDevice) -> None:
    new = image("1.1.0")
    size, crc = len(new), crc32(new)
    with serving(device) as served:
        central = RawCentral(served.port)
        # MTU exchange: client 100, device answers its maximum (517); 100 is used
        central.send(0x02, bytes(16), struct.pack("<H", 100))
        assert central.recv() == (0x03, bytes(16), struct.pack("<H", 517))
        assert central.write(central.CCCD, struct.pack("<H", 2)) == (0x13, b"")  # indications

        assert central.command(b"\x01") == 0  # PREPARE_DOWNLOAD
        assert central.command(b"\x02" + struct.pack("<I", size)) == 0  # DOWNLOAD
        # a write longer than MTU-3 = 97 bytes is refused: INVALID_ATTRIBUTE_VALUE_LENGTH
        assert central.write(central.DATA, new[:98]) == (0x01, bytes([0x12, 0x0D]))
        for offset in range(0, size, 97):
            assert central.write(central.DATA, new[offset : offset + 97]) == (0x13, b"")
        assert central.command(b"\x03" + struct.pack("<I", crc ^ 0xFFFFFFFF)) == 3  # wrong CRC
        # data outside a transfer: application error 0x80
        assert central.write(central.DATA, b"x") == (0x01, bytes([0x12, 0x80]))

        assert central.command(b"\x01") == 0
        assert central.command(b"\x02" + struct.pack("<I", size)) == 0
        assert central.write(central.DATA, new[:97]) == (0x13, b"")
        assert central.command(b"\x07") == 0  # the other vendor table's ABORT
        assert central.command(b"\x03" + struct.pack("<I", crc)) == 1  # nothing to verify
        assert central.command(b"\x09") == 1  # unknown command
        assert central.command(b"\x02\x00") == 1  # DOWNLOAD without its u32

        assert central.write(central.CCCD, struct.pack("<H", 1)) == (0x13, b"")  # notifications
        assert central.command(b"\x01") == 0
        assert central.command(b"\x02" + struct.pack("<I", size)) == 0
        for offset in range(0, size, 97):
            central.send(0x52, central.DATA, new[offset : offset + 97])  # write commands
        assert central.command(b"\x03" + struct.pack("<I", crc)) == 0
        central.close()
        session = served.session()
    outcomes = [t.outcome for t in session.transfers]
    assert outcomes == [TransferOutcome.FAILED, TransferOutcome.ABORTED, TransferOutcome.PENDING]
    assert secondary(device, size) == new
    assert slot_state(device)["next_boot"] == "test"


def test_oversized_write_command_ends_the_connection_and_cleans_the_slot(
    device: SimDevice,
) -> None:
    with serving(device) as served:
        central = RawCentral(served.port)  # no MTU exchange: 23, so 20 bytes per write
        assert central.write(central.CCCD, struct.pack("<H", 1)) == (0x13, b"")
        assert central.command(b"\x01") == 0
        assert central.command(b"\x02" + struct.pack("<I", 1000)) == 0
        central.send(0x52, central.DATA, bytes(20))
        central.send(0x52, central.DATA, bytes(21))
        with pytest.raises(ConnectionError):
            central.recv()
        central.close()
        [transfer] = served.session().transfers
    assert transfer.outcome is TransferOutcome.DISCONNECTED
    assert transfer.received == 20
    assert_clean(device)


def test_only_one_central_at_a_time(device: SimDevice) -> None:
    with serving(device) as served:
        first = RawCentral(served.port)
        first.send(0x02, bytes(16), struct.pack("<H", 247))
        assert first.recv()[0] == 0x03
        second = RawCentral(served.port)  # waits in the listen queue
        second.send(0x02, bytes(16), struct.pack("<H", 247))
        first.close()
        assert second.recv()[0] == 0x03  # served once the first one left
        second.close()
        assert served.session().transfers == ()
        assert served.session().transfers == ()


# --- the receiver on its own --------------------------------------------------------------------


@contextlib.contextmanager
def receiver(device: SimDevice, **options: object) -> Iterator[OtaReceiver]:
    with device.bootloader() as boot:
        storage = SlotStorage(
            boot, Journal(device.dir / JOURNAL_FILE), device.keys, current_version="1.0.0"
        )
        yield OtaReceiver(storage, **options)  # type: ignore[arg-type]


def test_receiver_refuses_what_the_protocol_does_not_allow(device: SimDevice) -> None:
    new = image("1.1.0")
    with receiver(device) as r:
        assert r.command(ble_ota.download(len(new))) is Reply.FAILURE  # no PREPARE
        with pytest.raises(AttWriteError) as caught:
            r.data(b"abc")
        assert caught.value.error is AttError.NOT_DOWNLOADING
        assert r.command(ble_ota.prepare_download()) is Reply.OK
        assert r.command(ble_ota.download(0)) is Reply.FAILURE  # an empty image
        assert r.command(ble_ota.prepare_download()) is Reply.OK
        assert r.command(ble_ota.download(10)) is Reply.OK
        with pytest.raises(AttWriteError) as caught:
            r.data(bytes(11))
        assert caught.value.error is AttError.BEYOND_IMAGE_SIZE
        assert r.state is ReceiverState.IDLE
        assert r.command(ble_ota.prepare_download()) is Reply.OK
        assert r.command(ble_ota.download(len(new))) is Reply.OK
        r.data(new[:1000])
        assert r.command(ble_ota.verify(ble_ota.image_crc(new))) is Reply.FAILURE  # incomplete
        assert r.command(ble_ota.prepare_download()) is Reply.OK
        assert r.command(ble_ota.download(len(new))) is Reply.OK
        r.data(new[:1000])
        assert r.command(ble_ota.prepare_download()) is Reply.OK  # starts over
        assert r.command(ble_ota.download(len(new))) is Reply.OK
        r.data(new)
        assert r.command(ble_ota.verify(ble_ota.image_crc(new))) is Reply.OK
        outcomes = [t.outcome for t in r.transfers]
    assert outcomes == [
        TransferOutcome.FAILED,  # empty
        TransferOutcome.FAILED,  # too much data
        TransferOutcome.FAILED,  # incomplete
        TransferOutcome.ABORTED,  # replaced by PREPARE
        TransferOutcome.PENDING,
    ]
    assert slot_state(device)["next_boot"] == "test"


def test_receiver_refuses_an_older_image_and_honours_permanent(device: SimDevice) -> None:
    same = image("1.0.0")
    with receiver(device) as r:
        for cmd in (ble_ota.prepare_download(), ble_ota.download(len(same))):
            assert r.command(cmd) is Reply.OK
        r.data(same)
        assert r.command(ble_ota.verify(ble_ota.image_crc(same))) is Reply.VERIFY_FAILED
        assert r.transfers[-1].error == "INVALID_VERSION"
    assert_clean(device)
    new = image("1.1.0")
    with receiver(device, permanent=True, commit_every=4096) as r:
        for cmd in (ble_ota.prepare_download(), ble_ota.download(len(new))):
            assert r.command(cmd) is Reply.OK
        r.data(new[:20_000])
        journal = Journal(device.dir / JOURNAL_FILE).load()
        assert journal is not None
        assert journal.durable == 20_000  # committed as it goes
        r.data(new[20_000:])
        assert r.command(ble_ota.verify(ble_ota.image_crc(new))) is Reply.OK
    assert slot_state(device)["next_boot"] == "permanent"


def test_application_can_stop_a_push(device: SimDevice) -> None:
    def stop_at_open(event: Event) -> Answer | None:
        return Answer.STOP if event.state is State.STORAGE_OPEN else None

    with receiver(device, callback=stop_at_open) as r:
        assert r.command(ble_ota.prepare_download()) is Reply.OK
        assert r.command(ble_ota.download(1000)) is Reply.FAILURE
        assert r.transfers[-1].error == "APP_RETURNED_STOP"


# --- control-point and frame layouts ------------------------------------------------------------


def test_control_point_layouts() -> None:
    assert ble_ota.prepare_download() == b"\x01"
    assert ble_ota.download(0x01020304) == b"\x02\x04\x03\x02\x01"
    assert ble_ota.verify(0xDEADBEEF) == b"\x03\xef\xbe\xad\xde"
    assert ble_ota.abort() == b"\x04"
    assert ble_ota.parse_command(b"\x07") == ControlPointWrite(Command.ABORT_ALT)
    assert ble_ota.parse_command(b"\x02\x10\x00\x00\x00") == ControlPointWrite(Command.DOWNLOAD, 16)
    for bad in (b"", b"\x05", b"\x01\x00", b"\x03\x00\x00\x00", b"\x02" + bytes(5)):
        with pytest.raises(ControlPointError):
            ble_ota.parse_command(bad)
    with pytest.raises(ControlPointError):
        ControlPointWrite(Command.DOWNLOAD, 2**32).pack()
    assert ble_ota.parse_reply(b"\x03") is Reply.VERIFY_FAILED
    for bad in (b"", b"\x02", b"\x00\x00"):
        with pytest.raises(ControlPointError):
            ble_ota.parse_reply(bad)
    assert ble_ota.image_crc(b"123456789") == 0xCBF43926 == crc32(b"123456789")


def test_frame_layout() -> None:
    frame = ble_ota.Frame(ble_ota.Op.WRITE_REQ, ble_ota.DATA_UUID, b"abc")
    raw = frame.pack()
    assert raw[0] == 0x12
    assert raw[1:17] == uuid.UUID(ble_ota.DATA_UUID).bytes[::-1]
    assert raw[17:19] == b"\x03\x00"
    assert ble_ota.parse_frame(raw) == frame
    with pytest.raises(FrameError, match="opcode"):
        ble_ota.parse_frame_header(b"\x99" + bytes(18))
    with pytest.raises(FrameError, match="longer"):
        ble_ota.parse_frame_header(b"\x12" + bytes(16) + b"\xff\xff")
    with pytest.raises(FrameError):
        ble_ota.parse_frame(raw[:-1])
    assert ble_ota.parse_mtu(ble_ota.mtu_request(10)) == 23


# --- the commands -------------------------------------------------------------------------------


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_push_command_errors_are_one_line(
    device: SimDevice, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "v2.img"
    good.write_bytes(image("1.1.0"))
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"not an image" * 10)
    cases = [
        ([str(good)], 2, "give exactly one of --to"),
        ([str(good), "--to", "http://127.0.0.1:1"], 2, "expected tcp://HOST:PORT"),
        ([str(good), "--to", "tcp://127.0.0.1:1", "--mtu", "600"], 2, "--mtu must be from 23"),
        ([str(good), "--to", "tcp://127.0.0.1:1", "--mtu", "big"], 2, "not an integer"),
        ([str(raw), "--to", "tcp://127.0.0.1:1"], 2, "not a valid MCUboot image"),
        ([str(tmp_path / "missing.img"), "--to", "tcp://127.0.0.1:1"], 2, "cannot read image"),
    ]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    cases.append(([str(good), "--to", f"tcp://127.0.0.1:{port}"], 1, "[LINK]: cannot connect"))
    for args, status, text in cases:
        code, err = _run_main(["push", *args], capsys)
        assert code == status, (args, err)
        assert text in err, (args, err)
        assert err.count("\n") == 1, err
        assert err.startswith("otakit: error ["), err
    if not _has_bleak():
        code, err = _run_main(["push", str(good), "--ble", "AA:BB:CC:DD:EE:FF"], capsys)
        assert code == 2
        assert "pip install 'otakit[ble]'" in err


def test_push_command_reports_a_refused_image(
    device: SimDevice, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = tmp_path / "forged.img"
    forged.write_bytes(image("1.1.0", key=OTHER_KEY))
    good = tmp_path / "v2.img"
    good.write_bytes(image("1.1.0"))
    with serving(device) as served:
        code, err = _run_main(
            ["push", str(forged), "--to", f"tcp://127.0.0.1:{served.port}"], capsys
        )
        assert code == 1
        assert err.startswith("otakit: error [PUSH_VERIFY]: the device rejected the image"), err
        served.session()
        code, err = _run_main(
            ["push", str(good), "--to", f"tcp://127.0.0.1:{served.port}", "--mtu", "23"], capsys
        )
        assert code == 0, err
        assert "pushed v2.img (1.1.0+0" in err
        assert "writes of up to 20 bytes" in err
        assert served.session().updated


def _has_bleak() -> bool:
    try:
        import bleak  # noqa: F401
    except ImportError:
        return False
    return True


def test_loopback_address() -> None:
    assert loopback_address("tcp://127.0.0.1:7000") == ("127.0.0.1", 7000)
    for bad in ("tcp://127.0.0.1", "udp://127.0.0.1:1", "tcp://:5", "tcp://h:99999", "h:1"):
        with pytest.raises(Exception, match="tcp://HOST:PORT"):
            loopback_address(bad)


# --- the real processes -------------------------------------------------------------------------

# Until ``otakit sim serve-push`` is registered, the same command function runs on its own.
_SERVE_PUSH_ALONE = (
    "import typer; from otakit.sim.push_cli import serve_push; "
    "app = typer.Typer(add_completion=False); app.command()(serve_push); app()"
)


def serve_push_argv() -> list[str]:
    from otakit.sim.cli import app

    names = {getattr(c.callback, "__name__", "") for c in app.registered_commands}
    if "serve_push" in names:
        return [str(BIN / "otakit"), "sim", "serve-push"]
    return [sys.executable, "-c", _SERVE_PUSH_ALONE]


def test_serve_push_and_push_as_real_processes(
    device: SimDevice, tmp_path: Path, otakit: Callable[..., Run]
) -> None:
    new = tmp_path / "v2.img"
    new.write_bytes(image("1.1.0"))
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    argv = [*serve_push_argv(), str(device.dir), "--port", "0", "--once", "--reboot", "--confirm"]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()  # printed once the device listens
            assert line.startswith("listening on tcp://127.0.0.1:"), line
            address = line.split()[-1]
            pushed = otakit("push", new, "--to", address)
            assert pushed.returncode == 0, pushed.stderr
            assert "pushed v2.img (1.1.0+0, " in pushed.stderr
            assert "verified and pending" in pushed.stderr
            _, errors = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, errors
    assert "received 1.1.0" in errors
    assert "rebooted (upgrade-test); running 1.1.0+0, confirmed" in errors
    status = slot_state(SimDevice(device.dir))
    assert status["running"] == "1.1.0+0"
    assert status["state"] == "confirmed"


def test_serve_push_once_exits_1_when_the_push_fails(device: SimDevice, tmp_path: Path) -> None:
    forged = image("1.1.0", key=OTHER_KEY)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    argv = [*serve_push_argv(), str(device.dir), "--port", "0", "--once"]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stderr is not None
            link = LoopbackLink(*loopback_address(proc.stderr.readline().split()[-1]), timeout=10)
            with pytest.raises(PushVerifyError):
                PushClient(link, timeout=10).push(forged)
            link.close()
            _, errors = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1
    assert "transfer failed [VERIFY]" in errors
    assert_clean(device)


def test_serve_push_usage_errors(device: SimDevice, tmp_path: Path) -> None:
    from otakit.errors import DeviceError, UsageError
    from otakit.sim.push_cli import serve_push

    with pytest.raises(UsageError, match="--reboot"):
        serve_push(device.dir, confirm=True)
    with pytest.raises(UsageError, match="--port"):
        serve_push(device.dir, port="http")
    with pytest.raises(UsageError, match="--max-mtu"):
        serve_push(device.dir, max_mtu="20")
    with pytest.raises(DeviceError):
        serve_push(tmp_path / "nothing")


def test_serve_push_stops_on_sigterm_and_cleans_a_transfer_in_progress(
    device: SimDevice,
) -> None:
    new = image("1.1.0")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    argv = [*serve_push_argv(), str(device.dir), "--port", "0"]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stderr is not None
            link = LoopbackLink(*loopback_address(proc.stderr.readline().split()[-1]), timeout=10)
            client = PushClient(link, timeout=10)
            client.prepare()
            client.download(len(new))
            client.write_data(new[:200])  # acknowledged: the device has written it
            proc.terminate()
            _, errors = proc.communicate(timeout=30)
            link.close()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, errors
    assert "central disconnected after 200 of" in errors
    assert_clean(device)
