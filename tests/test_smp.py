"""SMP (mcumgr) image management on a simulated device, driven by the real ``smpclient``.

The device answers on a loopback UDP port from its own asyncio loop in a thread (as a device's
network stack would), or as the real ``otakit sim serve-smp`` command. The client is smpclient's
UDP transport, as a user would run it against a Zephyr device.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import random
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest
from smp import error as smperr
from smp import header as smphdr
from smp import image_management as smpimg
from smp import os_management as smpos
from smp import packet as smppacket
from smpclient import SMPClient
from smpclient.exceptions import SMPUploadError
from smpclient.generics import error_v1, error_v2, success
from smpclient.requests.image_management import ImageErase, ImageStatesRead, ImageStatesWrite
from smpclient.requests.image_management import ImageUploadWrite as Upload
from smpclient.requests.os_management import (
    BootloaderInformationRead,
    EchoWrite,
    MCUMgrParametersRead,
    OSApplicationInfoRead,
    ResetWrite,
)
from smpclient.requests.statistics_management import ListOfGroups
from smpclient.transport.udp import SMPUDPTransport

from otakit.device.transports.smp import UDP_BUF_SIZE, PtyConsole, SmpServer, open_udp
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.verify import verify_image
from otakit.sim.device import Identity, SimDevice
from otakit.sim.smp_cli import journal_for, sim_smp_server

from .conftest import DeviceLoop

KEY = SigningKey.generate("ecdsa-p256")
UNTRUSTED = SigningKey.generate("ecdsa-p256")
BIN = Path(sys.executable).parent
IMG = smpimg.IMG_MGMT_ERR
MGMT = smperr.MGMT_ERR
T = TypeVar("T")


def image(version: str, size: int = 40000, key: SigningKey = KEY) -> bytes:
    payload = random.Random(version).randbytes(size)
    return sign_image(payload, key, SignOptions(ImageVersion.parse(version), pad_header=True))


def digest(data: bytes) -> bytes:
    """The image hash MCUboot reports (the SHA-256 TLV), not the file's SHA-256."""
    return verify_image(data).digest


@pytest.fixture
def device(tmp_path: Path) -> SimDevice:
    dev = SimDevice.create(
        tmp_path / "dev",
        image("1.0.0"),
        [KEY.public_key],
        identity=Identity(serial="SMP-0001", board="SIM_BOARD"),
    )
    dev.boot()
    return dev


# --- the device side: an asyncio loop in a thread ------------------------------------------------


@contextlib.contextmanager
def served(device_loop: DeviceLoop, directory: Path) -> Iterator[int]:
    """The device answering SMP on a free loopback port; the port."""
    with sim_smp_server(directory) as server:
        transport = device_loop.run(open_udp(server, "127.0.0.1", 0))
        try:
            yield int(transport.get_extra_info("sockname")[1])
        finally:
            device_loop.run(_close(transport))


async def _close(transport: asyncio.BaseTransport) -> None:
    transport.close()


@pytest.fixture
def port(device_loop: DeviceLoop, device: SimDevice) -> Iterator[int]:
    with served(device_loop, device.dir) as number:
        yield number


# --- the host side: smpclient ----------------------------------------------------------------------


class UdpTransport(SMPUDPTransport):
    """smpclient's UDP transport on a given port (SMPClient.connect always uses 1337)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def connect(self, address: str, timeout_s: float, port: int = 0) -> None:
        await super().connect(address, timeout_s, self.port)


def talk(port: int, scenario: Callable[[SMPClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with SMPClient(UdpTransport(port), "127.0.0.1", timeout_s=10) as client:
            return await scenario(client)

    return asyncio.run(main())


async def states(client: SMPClient) -> list[smpimg.ImageState]:
    response = await client.request(ImageStatesRead())
    assert success(response), response
    return response.images


def slot(images: list[smpimg.ImageState], number: int) -> smpimg.ImageState | None:
    return next((s for s in images if s.slot == number), None)


async def upload(client: SMPClient, data: bytes, image: int = 0) -> list[int]:
    return [offset async for offset in client.upload(data, slot=image)]  # "slot": image number


def secondary_is_erased(device: SimDevice) -> bool:
    with device.bootloader() as boot:
        secondary = boot.secondary(0)
        return secondary.flash.is_erased(secondary.area.offset, secondary.size)


# --- the acceptance scenario -----------------------------------------------------------------------


def test_upload_test_reset_confirm(port: int, device: SimDevice) -> None:
    new = image("1.1.0")

    async def scenario(client: SMPClient) -> None:
        before = await states(client)
        assert [(s.slot, s.version, s.active, s.confirmed) for s in before] == [
            (0, "1.0.0", True, True)
        ]
        assert before[0].hash == digest(image("1.0.0"))
        assert before[0].bootable

        offsets = await upload(client, new)
        assert offsets[-1] == len(new)
        assert offsets == sorted(offsets)
        assert len(offsets) > 10
        uploaded = slot(await states(client), 1)
        assert uploaded is not None
        assert (uploaded.version, uploaded.pending, uploaded.confirmed) == ("1.1.0", False, False)
        assert uploaded.hash == digest(new)

        marked = await client.request(ImageStatesWrite(hash=digest(new)))
        assert success(marked), marked
        assert marked.header.op == smphdr.OP.WRITE_RSP
        pending = slot(marked.images, 1)
        assert pending is not None
        assert pending.pending
        assert not pending.permanent

        assert success(await client.request(ResetWrite()))
        after = await states(client)
        running, previous = slot(after, 0), slot(after, 1)
        assert running is not None
        assert previous is not None
        assert (running.version, running.active, running.confirmed) == ("1.1.0", True, False)
        assert running.hash == digest(new)
        assert (previous.version, previous.confirmed) == ("1.0.0", True)  # what a revert restores

        confirmed = await client.request(ImageStatesWrite(confirm=True))
        assert success(confirmed), confirmed
        running = slot(confirmed.images, 0)
        assert running is not None
        assert running.confirmed

    talk(port, scenario)
    status = SimDevice(device.dir).status()["slots"][0]
    assert (status["running"], status["state"], status["next_boot"]) == (
        "1.1.0+0",
        "confirmed",
        "none",
    )
    assert not journal_for(device.dir, 0).path.exists()


def test_unconfirmed_image_reverts_and_permanent_update(port: int) -> None:
    tested, permanent = image("1.1.0"), image("1.2.0")

    async def scenario(client: SMPClient) -> None:
        await upload(client, tested)
        await client.request(ImageStatesWrite(hash=digest(tested)))
        await client.request(ResetWrite())
        await client.request(ResetWrite())  # not confirmed: the bootloader swaps back
        reverted = await states(client)
        running, other = slot(reverted, 0), slot(reverted, 1)
        assert running is not None
        assert other is not None
        assert (running.version, running.confirmed) == ("1.0.0", True)
        assert (other.version, other.pending) == ("1.1.0", False)

        await upload(client, permanent)
        marked = await client.request(ImageStatesWrite(hash=digest(permanent), confirm=True))
        assert success(marked), marked
        pending = slot(marked.images, 1)
        assert pending is not None
        assert pending.pending
        assert pending.permanent
        await client.request(ResetWrite())
        running = slot(await states(client), 0)
        assert running is not None
        assert (running.version, running.confirmed) == ("1.2.0", True)

    talk(port, scenario)


def test_second_image_of_a_two_image_device(device_loop: DeviceLoop, tmp_path: Path) -> None:
    dev = SimDevice.create(tmp_path / "two", image("1.0.0"), [KEY.public_key], layout="two-image")
    dev.boot()
    network = image("2.0.0", size=20000)

    async def scenario(client: SMPClient) -> list[smpimg.ImageState]:
        assert (await upload(client, network, image=1))[-1] == len(network)
        uploaded = [(s.image, s.slot, s.version) for s in await states(client)]
        assert uploaded == [(0, 0, "1.0.0"), (1, 1, "2.0.0")]
        await client.request(ImageStatesWrite(hash=digest(network), confirm=True))
        await client.request(ResetWrite())
        return await states(client)

    with served(device_loop, dev.dir) as number:
        after = talk(number, scenario)
    assert [(s.image, s.slot, s.version, s.active) for s in after] == [
        (0, 0, "1.0.0", True),
        (1, 0, "2.0.0", True),
    ]
    assert journal_for(dev.dir, 1).path.name == "agent-journal-1.json"


# --- resumption ------------------------------------------------------------------------------------


def test_upload_resumes_after_the_device_restarts(
    device_loop: DeviceLoop, device: SimDevice
) -> None:
    new = image("1.1.0", size=60000)

    async def interrupted(client: SMPClient) -> int:
        packets = client.upload(new)
        offsets = [await anext(packets) for _ in range(8)]
        assert isinstance(packets, AsyncGenerator)  # an async generator, so it can be closed
        await packets.aclose()  # the host goes away mid-upload
        return offsets[-1]

    with served(device_loop, device.dir) as first:
        durable = talk(first, interrupted)
    record = json.loads(journal_for(device.dir, 0).path.read_text())
    assert record["durable"] == durable
    assert record["download"]["sha256"] == hashlib.sha256(new).hexdigest()

    with served(device_loop, device.dir) as second:  # a new process: nothing in RAM
        offsets = talk(second, lambda client: upload(client, new))
        assert offsets[0] == durable  # the first packet was answered with the durable offset
        assert offsets[-1] == len(new)
        assert len(offsets) < len(new) // UDP_BUF_SIZE  # the first part was not sent again
        uploaded = slot(talk(second, states), 1)
        assert uploaded is not None
        assert uploaded.hash == digest(new)


def test_another_image_starts_over(port: int, device: SimDevice) -> None:
    first, second = image("1.1.0", size=60000), image("1.2.0", size=60000)

    async def scenario(client: SMPClient) -> list[int]:
        packets = client.upload(first)
        for _ in range(8):
            await anext(packets)
        assert isinstance(packets, AsyncGenerator)  # an async generator, so it can be closed
        await packets.aclose()
        return await upload(client, second)

    offsets = talk(port, scenario)
    assert offsets[0] < UDP_BUF_SIZE  # one packet in: the other upload's bytes were erased
    assert offsets[-1] == len(second)


def test_a_packet_at_another_offset_is_answered_with_the_expected_one(port: int) -> None:
    new = image("1.1.0")
    sha = hashlib.sha256(new).digest()

    async def scenario(client: SMPClient) -> None:
        async def put(off: int, **extra: Any) -> Any:
            response = await client.request(Upload(off=off, data=new[off : off + 512], **extra))
            assert success(response), response
            return response.off

        assert await put(0, len=len(new), sha=sha) == 512
        assert await put(1024) == 512  # a gap: continue at 512
        assert await put(512) == 1024
        assert await put(512) == 1024  # a repeat (lost answer): continue at 1024
        assert await put(0, len=len(new), sha=sha) == 1024  # the same upload again: resumed
        await client.request(ResetWrite())
        assert await put(1024) == 0  # the device forgot the upload: start again

    talk(port, scenario)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build", "rc"),
    [
        ("untrusted key", lambda: image("1.1.0", key=UNTRUSTED), IMG.INVALID_TLV),
        ("older version", lambda: image("0.9.0"), IMG.CURRENT_VERSION_IS_NEWER),
        ("same version", lambda: image("1.0.0"), IMG.CURRENT_VERSION_IS_NEWER),
        ("tampered payload", lambda: _tampered(image("1.1.0")), IMG.INVALID_HASH),
    ],
)
def test_a_rejected_image_leaves_the_slot_clean(
    port: int, device: SimDevice, name: str, build: Callable[[], bytes], rc: IMG
) -> None:
    data = build()

    async def scenario(client: SMPClient) -> Any:
        with pytest.raises(SMPUploadError) as failure:
            await upload(client, data)
        return failure.value.args[0], await states(client)

    refusal, after = talk(port, scenario)
    assert error_v2(refusal), refusal
    assert (refusal.err.group, refusal.err.rc) == (smphdr.GroupId.IMAGE_MANAGEMENT, rc)
    assert [s.slot for s in after] == [0]
    assert secondary_is_erased(device)
    assert not journal_for(device.dir, 0).path.exists()


def _tampered(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[1000] ^= 0xFF
    return bytes(flipped)


def test_not_an_image_is_refused_at_the_first_packet(port: int) -> None:
    async def scenario(client: SMPClient) -> Any:
        with pytest.raises(SMPUploadError) as failure:
            await upload(client, b"\x00" * 5000)
        return failure.value.args[0]

    refusal = talk(port, scenario)
    assert error_v2(refusal)
    assert refusal.err.rc == IMG.INVALID_IMAGE_HEADER_MAGIC


def test_version_1_clients_get_translated_errors_with_a_reason(port: int) -> None:
    response = talk(
        port,
        lambda client: client.request(
            ImageStatesWrite(hash=b"\x01" * 5, version=smphdr.Version.V1)
        ),
    )
    assert error_v1(response), response
    assert response.rc == MGMT.EINVAL
    assert response.rsn
    assert "5-byte hash" in response.rsn


def test_state_write_refusals(port: int) -> None:
    async def scenario(client: SMPClient) -> list[Any]:
        running = digest(image("1.0.0"))
        return [
            await client.request(ImageStatesWrite(hash=b"\x42" * 32)),
            await client.request(ImageStatesWrite(hash=running)),  # test the running image
            await client.request(ImageStatesWrite()),  # test without a hash
        ]

    codes = [r.err.rc if error_v2(r) else r for r in talk(port, scenario)]
    assert codes == [
        IMG.HASH_NOT_FOUND,
        IMG.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED,
        IMG.INVALID_HASH,
    ]


def test_erase(port: int, device: SimDevice) -> None:
    new = image("1.1.0")

    async def scenario(client: SMPClient) -> None:
        await upload(client, new)
        assert success(await client.request(ImageErase()))
        assert [s.slot for s in await states(client)] == [0]
        refused = await client.request(ImageErase(slot=0))
        assert error_v2(refused)
        assert refused.err.rc == IMG.NO_FREE_SLOT

        # on test, the secondary slot holds the image a revert needs: hands off
        await upload(client, new)
        await client.request(ImageStatesWrite(hash=digest(new)))
        await client.request(ResetWrite())
        refused = await client.request(ImageErase())
        assert error_v2(refused)
        assert refused.err.rc == IMG.NO_FREE_SLOT
        with pytest.raises(SMPUploadError) as failure:
            await upload(client, image("1.2.0"))
        assert failure.value.args[0].err.rc == IMG.NO_FREE_SLOT

    talk(port, scenario)
    assert not secondary_is_erased(device)


# --- OS group and what the client asks on connect --------------------------------------------------


def test_os_management(port: int) -> None:
    async def scenario(client: SMPClient) -> list[Any]:
        return [
            await client.request(MCUMgrParametersRead()),
            await client.request(EchoWrite(d="hello")),
            await client.request(OSApplicationInfoRead(format="a")),
            await client.request(BootloaderInformationRead()),
            await client.request(BootloaderInformationRead(query="mode")),
            await client.request(BootloaderInformationRead(query="colour")),
            await client.request(OSApplicationInfoRead(format="z")),
        ]

    params, echo, info, loader, mode, unknown, bad_format = talk(port, scenario)
    assert success(params)
    assert params.buf_size == UDP_BUF_SIZE
    assert success(echo)
    assert echo.r == "hello"
    assert success(info)
    assert "SMP-0001" in info.output
    assert "SIM_BOARD" in info.output
    assert "1.0.0" in info.output.split()
    assert success(loader)
    assert loader.bootloader == "MCUboot"
    assert success(mode)
    assert mode.response == {"mode": 1, "no-downgrade": True}
    assert error_v2(unknown)
    assert unknown.err.rc == 3
    assert error_v2(bad_format)
    assert bad_format.err.rc == 2


# --- unknown and malformed requests ----------------------------------------------------------------

_HEADER = struct.Struct("!BBHHBB")


def frame(
    op: int,
    group: int,
    command: int,
    body: bytes,
    *,
    seq: int = 7,
    version: int = 1,
    length: int | None = None,
) -> bytes:
    size = len(body) if length is None else length
    return _HEADER.pack((version << 3) | op, 0, size, group, seq, command) + body


class RawClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))

    def ask(self, data: bytes) -> tuple[tuple[int, ...], Any]:
        self.sock.send(data)
        reply = self.sock.recv(65536)
        header = _HEADER.unpack_from(reply)
        return header, cbor2.loads(reply[_HEADER.size :])

    def close(self) -> None:
        self.sock.close()


def test_unknown_commands_are_not_supported(port: int) -> None:
    response = talk(port, lambda client: client.request(ListOfGroups()))
    assert error_v1(response)
    assert response.rc == MGMT.ENOTSUP

    raw = RawClient(port)
    try:
        header, body = raw.ask(frame(2, 1, 9, cbor2.dumps({}), seq=42))  # image command 9
        assert body == {"rc": MGMT.ENOTSUP}
        assert header == ((1 << 3) | 3, 0, len(cbor2.dumps(body)), 1, 42, 9)
        assert raw.ask(frame(0, 77, 0, cbor2.dumps({})))[1] == {"rc": MGMT.ENOTSUP}
        assert raw.ask(frame(0, 1, 1, cbor2.dumps({})))[1] == {"rc": MGMT.ENOTSUP}  # read upload
    finally:
        raw.close()


def test_malformed_requests_get_an_error_or_silence_and_the_device_keeps_answering(
    port: int,
) -> None:
    echo = frame(2, 0, 0, cbor2.dumps({"d": "alive"}), seq=99)
    raw = RawClient(port)
    try:
        for bad in (
            frame(2, 0, 0, cbor2.dumps({"d": "x"}), length=200),  # longer than sent
            frame(2, 0, 0, b"\xff\xfe\x00"),  # not CBOR
            frame(2, 0, 0, cbor2.dumps([1, 2])),  # not a map
            frame(2, 1, 1, cbor2.dumps({"off": "zero", "data": 5})),  # wrong types
            frame(2, 1, 1, cbor2.dumps({"data": b""})),  # no offset
        ):
            assert raw.ask(bad)[1]["rc"] == MGMT.EINVAL, bad
        assert raw.ask(frame(2, 0, 0, cbor2.dumps({}), version=3))[1] == {
            "rc": MGMT.UNSUPPORTED_TOO_NEW
        }
        # no answer to what is not a request: the next answer is the echo's
        for silent in (b"\x02\x00", frame(3, 0, 0, cbor2.dumps({"r": "x"})), b"\x00" * 7):
            raw.sock.send(silent)
        header, body = raw.ask(echo)
        assert (header[4], body) == (99, {"r": "alive"})
    finally:
        raw.close()


# --- SMP over console framing, on a pseudo-terminal ------------------------------------------------


def test_console_framing_over_a_pty(device_loop: DeviceLoop, device: SimDevice) -> None:
    async def open_console(server: SmpServer) -> PtyConsole:
        return PtyConsole(server)

    async def close_console(console: PtyConsole) -> None:
        console.close()

    with sim_smp_server(device.dir) as server:
        console = device_loop.run(open_console(server))
        fd = os.open(console.path, os.O_RDWR | os.O_NOCTTY)
        try:

            def ask(request: Any) -> bytes:
                os.write(fd, b"console noise that is not SMP\n")
                for line in smppacket.encode(request.BYTES, line_length=64):  # several lines
                    os.write(fd, line)
                decoder = smppacket.decode()
                next(decoder)
                pending = b""
                while True:
                    ready, _, _ = select.select([fd], [], [], 10)
                    assert ready, "no answer on the console"
                    pending += os.read(fd, 4096)
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        try:
                            decoder.send(line + b"\n")
                        except StopIteration as done:
                            return bytes(done.value)

            params = ask(MCUMgrParametersRead())
            assert smpos.MCUMgrParametersReadResponse.loads(params).buf_size == UDP_BUF_SIZE
            images = smpimg.ImageStatesReadResponse.loads(ask(ImageStatesRead())).images
            assert [(s.slot, s.version) for s in images] == [(0, "1.0.0")]
        finally:
            os.close(fd)
            device_loop.run(close_console(console))


# --- the command -----------------------------------------------------------------------------------


def _lines(stream: Any, sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def test_serve_smp_command(device: SimDevice) -> None:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [str(BIN / "otakit"), "sim", "serve-smp", str(device.dir), "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    log: list[str] = []
    try:
        while True:
            line = lines.get(timeout=30)
            assert line is not None, f"serve-smp exited: {''.join(log)}"
            log.append(line)
            if line.startswith("listening on udp://"):
                break
        port = int(line.strip().rsplit(":", 1)[1])
        new = image("1.1.0")

        async def scenario(client: SMPClient) -> list[smpimg.ImageState]:
            await upload(client, new)
            await client.request(ImageStatesWrite(hash=digest(new)))
            await client.request(ResetWrite())
            return await states(client)

        after = talk(port, scenario)
        running = slot(after, 0)
        assert running is not None
        assert (running.version, running.active, running.confirmed) == ("1.1.0", True, False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    while (line := lines.get(timeout=30)) is not None:
        log.append(line)
    output = "".join(log)
    assert proc.returncode == 0, output
    assert "reset: image 0 upgrade-test, running 1.1.0+0" in output
    assert "stopped" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "nope"], "otakit: error [BADARG]: --port 'nope' is not a whole number"),
        (["--port", "70000"], "otakit: error [BADARG]: --port 70000 is not from 0 to 65535"),
    ],
)
def test_serve_smp_usage_errors(device: SimDevice, args: list[str], message: str) -> None:
    result = subprocess.run(
        [str(BIN / "otakit"), "sim", "serve-smp", str(device.dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == message


def test_serve_smp_needs_a_device(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "otakit"), "sim", "serve-smp", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("otakit: error [DEVICE]:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
