"""Attacks on the device side (issue 13, items 5, 6, 11 and the SMP state-write decision).

- Trailer bytes that come with an image (``imgtool sign --pad --confirm``, or bytes a server or
  a man in the middle appends) must not turn the agent's TEST request into a permanent one: the
  device writes only the signed part of the image, never the slot's trailer area, and sets the
  request itself. Unsigned bytes after the TLVs are refused. Every path that writes a received
  image into a secondary slot is tried: HTTP download (``otakit sim run``), BLE push, SMP upload
  and ``otakit sim install``.
- The security counter (TLV 0x50) is enforced even when version downgrades are allowed, by the
  device before anything is pending and by the bootloader, unless separately turned off.
- A silent central on the loopback GATT link does not lock other centrals out.
- SMP: marking an incomplete or untrusted image pending is refused at the request, with nothing
  written to the trailer.

Everything runs on real parts: imgtool, an HTTP server on loopback, smpclient over UDP, sockets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from smp import error as smperr
from smp import image_management as smpimg
from smpclient import SMPClient
from smpclient.exceptions import SMPUploadError
from smpclient.generics import error_v1, error_v2, success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.image_management import ImageUploadWrite as Upload
from smpclient.requests.os_management import ResetWrite

from otakit import errors
from otakit.device.agent import Outcome
from otakit.device.boot_status import Flag, Magic
from otakit.device.bootloader import Action, Bootloader, BootloaderConfig
from otakit.device.flash import Flash
from otakit.device.flashmap import Strategy, preset
from otakit.device.journal import Download, Journal
from otakit.device.storage import SlotStorage
from otakit.device.transports.ble import LoopbackPeripheral
from otakit.device.transports.http import HttpSettings
from otakit.errors import PushVerifyError
from otakit.host.push import LoopbackLink, PushClient
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.layout import read_layout
from otakit.image.sign import SignOptions, sign_image
from otakit.image.source import BytesSource
from otakit.image.tlv import HASH_TLVS
from otakit.image.verify import verify_image
from otakit.protocol import ble_ota
from otakit.sim.agent import JOURNAL_FILE, run
from otakit.sim.device import Identity, SimDevice
from otakit.sim.push_cli import SimPushService
from otakit.sim.smp_cli import journal_for

from .conftest import DeviceLoop, Run
from .test_smp import served, talk

KEY = SigningKey.generate("ecdsa-p256")
UNTRUSTED = SigningKey.generate("ecdsa-p256")
BOARD = "CY8CPROTO_062_4343W"
PSOC6 = "psoc6-2m-swap"
SMALL = "sim-small"
IMG = smpimg.IMG_MGMT_ERR
MGMT = smperr.MGMT_ERR


def signed(
    version: str, *, size: int = 9000, key: SigningKey = KEY, counter: int | None = None
) -> bytes:
    payload = random.Random(f"{version}/{size}/{counter}").randbytes(size)
    options = SignOptions(ImageVersion.parse(version), pad_header=True, security_counter=counter)
    return sign_image(payload, key, options)


def imgtool_signed(
    imgtool: Callable[..., Run],
    tmp: Path,
    version: str,
    *flags: str,
    layout: str,
    size: int = 9000,
    erased: int | None = None,
) -> bytes:
    """``imgtool sign`` for ``layout``'s slot, with ``flags`` (e.g. ``--pad --confirm``), padded
    with ``erased`` (``--erased-val``; default: the layout's erased value, as Infineon's tools
    sign for PSoC 6 internal flash). imgtool's ``--align`` is at most 32: for swap-status (0x200
    rows) it is the build's BOOT_MAX_ALIGN, 8, the width of the trailer fields that the status
    partition holds."""
    fm = preset(layout)
    align = fm.max_align if fm.strategy == Strategy.SWAP_STATUS else fm.write_align
    erased = fm.erased_value if erased is None else erased
    key = tmp / "key.pem"
    key.write_bytes(KEY.to_pem())
    name = f"{version}-{'-'.join(f.strip('-') for f in flags) or 'plain'}-{erased:02x}"
    (tmp / f"{name}.bin").write_bytes(random.Random(name).randbytes(size))
    result = imgtool(
        "sign", "-k", key, "-v", version, "-H", "0x200", "--pad-header",
        "--align", str(align), "--max-sectors", str(fm.max_sectors),
        "--erased-val", "0" if erased == 0 else "0xff",
        "-S", hex(fm.primary(0).size), *flags, tmp / f"{name}.bin", tmp / f"{name}.img",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return (tmp / f"{name}.img").read_bytes()


def make_device(
    directory: Path,
    layout: str,
    *,
    running: bytes | None = None,
    allow_downgrade: bool = False,
) -> SimDevice:
    device = SimDevice.create(
        directory,
        running if running is not None else signed("1.0.0"),
        [KEY.public_key],
        layout=layout,
        identity=Identity(board=BOARD),
        allow_downgrade=allow_downgrade,
    )
    device.boot()
    return device


def secondary_trailer(device: SimDevice) -> tuple[bool, bool]:
    """(magic, image_ok) of the secondary slot's trailer, read where the layout's MCUboot reads
    them (``boot_read_swap_state``: the slot's end, or swap-status's status partition)."""
    with device.bootloader() as boot:
        mode = boot.mode(0, read_only=True)
        state = mode.store.read_swap_state(mode.ctx.secondary_ref)
    return state.magic is Magic.GOOD, state.image_ok is Flag.SET


def trailer_area_erased(device: SimDevice, *, except_magic: bool) -> bool:
    """The secondary slot's trailer area holds nothing but (optionally) the boot magic."""
    erased = device.map.erased_value
    with device.bootloader() as boot:
        slot = boot.secondary()
        start = device.map.max_image_size(0)
        area = bytearray(slot.read_at(start, slot.size - start))
    if except_magic:
        area[-16:] = bytes([erased]) * 16
    return bytes(area) == bytes([erased]) * len(area)


def running(device: SimDevice) -> str | None:
    value = SimDevice(device.dir).status()["slots"][0]["running"]
    return None if value is None else str(value)


# --- an update server on loopback (the original's job document and ranged downloads) ----------


@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    job: bytes = b""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        served = self.server.served
        path = urlsplit(self.path).path
        if path == "/ota_update.json":
            self._send(200, served.job, {"Content-Type": "application/json"})
            return
        data = served.files.get(path)
        if data is None:
            self._send(404, b"", {})
            return
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if match is None:
            self._send(200, data, {"ETag": etag})
            return
        first, last = int(match[1]), min(int(match[2]), len(data) - 1)
        self._send(
            206,
            data[first : last + 1],
            {"ETag": etag, "Content-Range": f"bytes {first}-{last}/{len(data)}"},
        )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(200, b'{"Message":"Result Received"}', {"Content-Type": "application/json"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    served: Served


@contextlib.contextmanager
def update_server(image: bytes, version: str = "1.1.0") -> Iterator[str]:
    """An HTTP server on loopback offering ``image`` as ``version``; its URL."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    doc = {
        "Message": "Update Available",
        "Manufacturer": "otakit",
        "ManufacturerId": "OTK",
        "Product": "otakit-sim",
        "SerialNumber": "SIM-0001",
        "Version": version,
        "Board": BOARD,
        "Connection": "HTTP",
        "Port": "",
        "Server": "",
        "File": "/app.img",
    }
    httpd.served = Served({"/app.img": image}, json.dumps(doc).encode())
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def download(device: SimDevice, url: str) -> Any:
    """One agent run over HTTP, as ``otakit sim run`` does it, without the reboot."""
    settings = HttpSettings(server=url, chunk_size=64 * 1024)
    return run(device.dir, settings, reboot=False, confirm=False)


# --- item 5: the trailer is the device's own ---------------------------------------------------


def test_a_padded_confirmed_image_downloaded_over_http_is_only_a_test(
    tmp_path: Path, imgtool: Callable[..., Run]
) -> None:
    """``--pad --confirm`` carries image_ok in the file: the device must ignore it."""
    device = make_device(tmp_path / "dev", PSOC6)
    padded = imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", "--confirm", layout=PSOC6)
    assert len(padded) == device.map.primary(0).size  # trailer area included
    with update_server(padded) as url:
        report = download(device, url)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert secondary_trailer(device) == (True, False)  # magic (TEST), image_ok not set
    assert trailer_area_erased(device, except_magic=True)
    assert SimDevice(device.dir).status()["slots"][0]["secondary"]["request"] == "test"
    assert not (device.dir / JOURNAL_FILE).exists()

    first = SimDevice(device.dir).boot().to_dict()["images"][0]
    assert (first["action"], first["version"]) == ("upgrade-test", "1.1.0+0")
    second = SimDevice(device.dir).boot().to_dict()["images"][0]  # never confirmed
    assert (second["action"], second["version"]) == ("revert", "1.0.0+0")


def test_sim_run_with_a_padded_confirmed_image_reverts_as_it_says(
    tmp_path: Path, imgtool: Callable[..., Run], otakit: Callable[..., Run]
) -> None:
    device = make_device(tmp_path / "dev", PSOC6)
    padded = imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", "--confirm", layout=PSOC6)
    with update_server(padded) as url:
        result = otakit(
            "sim", "run", device.dir, "--server", url, "--once", "--no-confirm",
            "--chunk-size", "65536",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "rebooted (upgrade-test)" in result.stderr
    assert "not confirmed: reverts at next boot" in result.stderr
    booted = otakit("sim", "boot", device.dir)
    assert booted.returncode == 0, booted.stderr
    assert json.loads(booted.stdout)["images"][0]["action"] == "revert"
    assert running(device) == "1.0.0+0"


@pytest.mark.parametrize("erased", [0x00, 0xFF], ids=["erased-val 0", "erased-val 0xff"])
def test_a_padded_test_image_is_still_accepted(
    tmp_path: Path, imgtool: Callable[..., Run], erased: int
) -> None:
    """Padded with PSoC 6's erased value 0 (as Infineon's tools sign) or imgtool's default."""
    device = make_device(tmp_path / "dev", PSOC6)
    padded = imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", layout=PSOC6, erased=erased)
    with update_server(padded) as url:
        report = download(device, url)
    assert report.result.outcome is Outcome.UPDATED, report.result
    assert secondary_trailer(device) == (True, False)


@pytest.mark.parametrize("where", ["after the TLVs", "in the padding of a --pad image"])
def test_unsigned_bytes_after_the_tlvs_are_refused(
    tmp_path: Path, imgtool: Callable[..., Run], where: str
) -> None:
    device = make_device(tmp_path / "dev", PSOC6)
    if where == "after the TLVs":
        bad = signed("1.1.0") + b"appended by a man in the middle"
    else:
        padded = bytearray(imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", layout=PSOC6))
        end = verify_image(bytes(padded)).layout.end
        padded[end + 100] = preset(PSOC6).erased_value ^ 0xFF  # a padding byte is not erased
        bad = bytes(padded)
    with update_server(bad) as url:
        report = download(device, url)
    assert report.result.outcome is Outcome.FAILED, report.result
    assert report.result.error == "VERIFY"
    assert "after the image's TLV" in (report.result.message or "")
    status = SimDevice(device.dir).status()["slots"][0]
    assert status["next_boot"] == "none"
    assert secondary_trailer(device) == (False, False)
    assert not (device.dir / JOURNAL_FILE).exists()


def test_trailing_data_error_is_named() -> None:
    assert errors.TrailingDataError.code == "TRAILING_DATA"
    assert errors.TrailingDataError.agent_error == "VERIFY"


def test_sim_install_takes_the_request_from_the_command_not_the_file(
    tmp_path: Path, imgtool: Callable[..., Run]
) -> None:
    device = make_device(tmp_path / "dev", SMALL)
    padded = imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", "--confirm", layout=SMALL)
    device.install(padded)  # a test, as asked
    assert secondary_trailer(device) == (True, False)
    assert device.boot().to_dict()["images"][0]["action"] == "upgrade-test"
    with pytest.raises(errors.TrailingDataError):
        device.install(signed("1.2.0") + b"junk")


@pytest.mark.parametrize("erased", [0x00, 0xFF], ids=["erased-val 0", "erased-val 0xff"])
def test_sim_install_on_psoc6_takes_imgtool_padding_of_either_erased_value(
    tmp_path: Path, imgtool: Callable[..., Run], erased: int
) -> None:
    """imgtool pads with its ``--erased-val``: 0 as Infineon's tools sign for PSoC 6 internal
    flash (erased to 0x00), 0xff by default (and ``otakit sign``). ``sim install`` writes none
    of the padding and takes either, but not a padding byte that is neither."""
    device = make_device(tmp_path / "dev", PSOC6)
    padded = imgtool_signed(
        imgtool, tmp_path, "1.1.0", "--pad", "--confirm", layout=PSOC6, erased=erased
    )
    end = verify_image(padded).layout.end
    assert padded[end : end + 100] == bytes([erased]) * 100
    tampered = bytearray(padded)
    tampered[end + 100] = erased ^ 0xFF
    with pytest.raises(errors.TrailingDataError):
        device.install(bytes(tampered))
    assert SimDevice(device.dir).status()["slots"][0]["next_boot"] == "none"
    device.install(padded)  # a test, as asked
    assert secondary_trailer(device) == (True, False)
    assert device.boot().to_dict()["images"][0]["action"] == "upgrade-test"


def test_storage_never_writes_the_trailer_area_and_resumes_before_it(
    tmp_path: Path, imgtool: Callable[..., Run]
) -> None:
    """What every transport (and the fleet simulator) writes through: the trailer-area bytes of
    the download are kept in memory for the file's SHA-256, never made durable, so a resumed
    download sends them again."""
    device = make_device(tmp_path / "dev", SMALL)
    padded = imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", "--confirm", layout=SMALL)
    data_end = device.map.max_image_size(0)
    download = Download(source="test", size=len(padded))
    with device.bootloader() as boot:
        storage = SlotStorage(
            boot, Journal(device.dir / JOURNAL_FILE), device.keys, current_version="1.0.0"
        )
        assert storage.open(download) == 0
        storage.write(0, padded)
        storage.commit(len(padded))
        assert trailer_area_erased(device, except_magic=False)
        assert storage.sha256(len(padded)) == hashlib.sha256(padded).digest()
        record = storage.progress()
        assert record is not None
        assert record.durable == data_end  # the trailer-area bytes are not durable
    with device.bootloader() as boot:  # a restart: the journal resumes at the trailer
        storage = SlotStorage(
            boot, Journal(device.dir / JOURNAL_FILE), device.keys, current_version="1.0.0"
        )
        assert storage.open(download) == data_end
        with pytest.raises(errors.HashMismatchError):
            storage.sha256(len(padded))  # the tail did not come again yet
        storage.write(data_end, padded[data_end:])
        assert storage.sha256(len(padded)) == hashlib.sha256(padded).digest()
        assert storage.verify() == "1.1.0"
        storage.set_pending(permanent=False)
    assert secondary_trailer(device) == (True, False)


# --- the BLE push --------------------------------------------------------------------------------


@contextlib.contextmanager
def push_server(device: SimDevice, **options: Any) -> Iterator[tuple[SimPushService, int]]:
    service = SimPushService(device.dir)
    with LoopbackPeripheral(**options) as peripheral:
        thread = threading.Thread(target=peripheral.serve, args=(service,), daemon=True)
        thread.start()
        try:
            yield service, peripheral.port
        finally:
            peripheral.close()
            thread.join(10)
    assert not thread.is_alive()


def push(port: int, data: bytes, timeout: float = 10) -> None:
    link = LoopbackLink("127.0.0.1", port, timeout=timeout)
    try:
        PushClient(link, timeout=timeout).push(data)
    finally:
        link.close()


def test_a_padded_confirmed_image_pushed_over_ble_is_only_a_test(
    tmp_path: Path, imgtool: Callable[..., Run]
) -> None:
    device = make_device(tmp_path / "dev", SMALL)
    padded = imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", "--confirm", layout=SMALL)
    with push_server(device) as (service, port):
        push(port, padded)
        assert service.sessions.get(timeout=10).updated
        with pytest.raises(PushVerifyError):
            push(port, signed("1.2.0") + b"junk")
        assert not service.sessions.get(timeout=10).updated
        push(port, padded)
        assert service.sessions.get(timeout=10).updated
    assert secondary_trailer(device) == (True, False)
    assert device.boot().to_dict()["images"][0]["action"] == "upgrade-test"
    assert device.boot().to_dict()["images"][0]["action"] == "revert"


# --- SMP -----------------------------------------------------------------------------------------


async def states(client: SMPClient) -> dict[int, smpimg.ImageState]:
    response = await client.request(ImageStatesRead())
    assert success(response), response
    return {s.slot: s for s in response.images}


def digest(data: bytes) -> bytes:
    """The hash MCUboot reports: the image's SHA-256 TLV (read, not checked)."""
    layout = read_layout(BytesSource(data))
    return next(t.value for t in layout.tlvs if t.kind in HASH_TLVS)


def test_a_padded_confirmed_image_uploaded_over_smp_is_not_pending_until_asked(
    tmp_path: Path, imgtool: Callable[..., Run], device_loop: DeviceLoop
) -> None:
    device = make_device(tmp_path / "dev", SMALL)
    padded = imgtool_signed(imgtool, tmp_path, "1.1.0", "--pad", "--confirm", layout=SMALL)

    async def scenario(client: SMPClient) -> None:
        offsets = [off async for off in client.upload(padded)]  # smpclient sends the SHA-256
        assert offsets[-1] == len(padded)
        uploaded = (await states(client))[1]
        assert (uploaded.pending, uploaded.permanent) == (False, False)
        marked = await client.request(ImageStatesWrite(hash=digest(padded)))  # a test
        assert success(marked), marked
        pending = {s.slot: s for s in marked.images}[1]
        assert (pending.pending, pending.permanent) == (True, False)
        await client.request(ResetWrite())
        active = (await states(client))[0]
        assert (active.version, active.confirmed) == ("1.1.0", False)
        await client.request(ResetWrite())  # not confirmed: swapped back
        assert (await states(client))[0].version == "1.0.0"

    with served(device_loop, device.dir) as port:
        talk(port, scenario)


def test_smp_upload_with_bytes_after_the_tlvs_is_refused(
    tmp_path: Path, device_loop: DeviceLoop
) -> None:
    device = make_device(tmp_path / "dev", SMALL)
    bad = signed("1.1.0") + b"appended"

    async def scenario(client: SMPClient) -> Any:
        with pytest.raises(SMPUploadError) as failure:
            [off async for off in client.upload(bad)]
        return failure.value.args[0]

    with served(device_loop, device.dir) as port:
        refusal = talk(port, scenario)
    assert error_v2(refusal), refusal
    assert refusal.err.rc == IMG.INVALID_LENGTH
    assert secondary_trailer(device) == (False, False)
    assert not journal_for(device.dir, 0).path.exists()


# --- item 6: the security counter is not a version --------------------------------------------


def test_allow_downgrade_keeps_the_security_counter_in_the_bootloader() -> None:
    fm = preset(SMALL)
    lower = signed("1.1.0", counter=4)
    for ignore, expected in ((False, Action.REJECTED), (True, Action.UPGRADE_PERMANENT)):
        flash = Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align)
        switch: dict[str, Any] = {"ignore_security_counter": True} if ignore else {}
        config = BootloaderConfig(keys=(KEY.public_key,), allow_downgrade=True, **switch)
        boot = Bootloader(flash, fm, config)
        boot.primary().write(0, _aligned(signed("1.0.0", counter=5)))
        boot.secondary().write(0, _aligned(lower))
        boot.set_pending(permanent=True)
        result = boot.boot().images[0]
        assert result.action is expected, result
        if expected is Action.REJECTED:
            assert result.error == "DOWNGRADE"
            assert "security counter" in (result.reason or "")


def test_allow_downgrade_still_allows_an_older_version_with_the_same_counter() -> None:
    fm = preset(SMALL)
    flash = Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align)
    boot = Bootloader(flash, fm, BootloaderConfig(keys=(KEY.public_key,), allow_downgrade=True))
    boot.primary().write(0, _aligned(signed("1.0.0", counter=5)))
    boot.secondary().write(0, _aligned(signed("0.9.0", counter=5)))
    boot.set_pending(permanent=True)
    result = boot.boot().images[0]
    assert (result.action, result.version) == (Action.UPGRADE_PERMANENT, ImageVersion(0, 9, 0))


def _aligned(data: bytes) -> bytes:
    return data + b"\xff" * (-len(data) % 8)


def test_a_download_with_a_lower_security_counter_is_refused_even_when_downgrades_are_allowed(
    tmp_path: Path,
) -> None:
    device = make_device(
        tmp_path / "dev", PSOC6, running=signed("1.0.0", counter=5), allow_downgrade=True
    )
    with update_server(signed("1.1.0", counter=4)) as url:
        report = download(device, url)
    assert report.result.outcome is Outcome.FAILED, report.result
    assert report.result.error == "INVALID_VERSION"
    assert "security counter" in (report.result.message or "")
    assert SimDevice(device.dir).status()["slots"][0]["next_boot"] == "none"
    assert secondary_trailer(device) == (False, False)


def test_an_smp_upload_with_a_lower_security_counter_is_refused(
    tmp_path: Path, device_loop: DeviceLoop
) -> None:
    device = make_device(
        tmp_path / "dev", SMALL, running=signed("1.0.0", counter=5), allow_downgrade=True
    )
    lower, older = signed("1.1.0", counter=4), signed("0.9.0", counter=5)

    async def scenario(client: SMPClient) -> Any:
        with pytest.raises(SMPUploadError) as failure:
            [off async for off in client.upload(lower)]
        # an older version with the same counter: downgrades themselves are still allowed
        assert [off async for off in client.upload(older)][-1] == len(older)
        return failure.value.args[0]

    with served(device_loop, device.dir) as port:
        refusal = talk(port, scenario)
    assert error_v2(refusal), refusal
    assert refusal.err.rc == IMG.CURRENT_VERSION_IS_NEWER


# --- SMP: marking an image pending is checked at the request ----------------------------------


def _refusal_reason(response: Any) -> str:
    assert error_v1(response), response  # MGMT_ERR, with the reason
    assert response.rc == MGMT.EBADSTATE, response
    return str(response.rsn)


@pytest.mark.parametrize("confirm", [False, True], ids=["test", "confirm"])
def test_smp_refuses_to_mark_an_incomplete_upload(
    tmp_path: Path, device_loop: DeviceLoop, confirm: bool
) -> None:
    """The upload announced more bytes than came: the TLVs are in the slot, the hash is
    findable, but the upload is not finished (and survives a restart of the server)."""
    device = make_device(tmp_path / "dev", SMALL)
    new = signed("1.1.0")
    size = len(new) + 1000

    async def start(client: SMPClient) -> None:
        step = 512
        for off in range(0, len(new), step):
            extra: dict[str, Any] = {"len": size} if off == 0 else {}
            answer = await client.request(Upload(off=off, data=new[off : off + step], **extra))
            assert success(answer), answer

    async def mark(client: SMPClient) -> Any:
        return await client.request(ImageStatesWrite(hash=digest(new), confirm=confirm))

    with served(device_loop, device.dir) as port:
        talk(port, start)
        assert "upload" in _refusal_reason(talk(port, mark))
    assert secondary_trailer(device) == (False, False)
    with served(device_loop, device.dir) as port:  # a restarted device: the journal says
        assert "upload" in _refusal_reason(talk(port, mark))
    assert secondary_trailer(device) == (False, False)


@pytest.mark.parametrize(
    ("name", "build", "code"),
    [
        ("untrusted key", lambda: signed("1.1.0", key=UNTRUSTED), "KEY_MISMATCH"),
        ("tampered", lambda: _tampered(signed("1.1.0")), "HASH_MISMATCH"),
        ("older version", lambda: signed("0.9.0", counter=5), "DOWNGRADE"),
        ("lower security counter", lambda: signed("1.1.0", counter=4), "DOWNGRADE"),
    ],
)
@pytest.mark.parametrize("confirm", [False, True], ids=["test", "confirm"])
def test_smp_refuses_to_mark_an_image_that_does_not_verify(
    tmp_path: Path,
    device_loop: DeviceLoop,
    name: str,
    build: Callable[[], bytes],
    code: str,
    confirm: bool,
) -> None:
    """An image that reached the secondary slot some other way (a programmer, another writer)
    is checked when it is marked, as it would be after an upload."""
    device = make_device(tmp_path / "dev", SMALL, running=signed("1.0.0", counter=5))
    candidate = build()
    with device.bootloader() as boot:
        boot.secondary().erase_all()
        boot.secondary().write(0, _aligned(candidate))

    async def mark(client: SMPClient) -> Any:
        return await client.request(ImageStatesWrite(hash=digest(candidate), confirm=confirm))

    with served(device_loop, device.dir) as port:
        reason = _refusal_reason(talk(port, mark))
    assert f"[{code}]" in reason, reason
    assert secondary_trailer(device) == (False, False)
    assert SimDevice(device.dir).status()["slots"][0]["next_boot"] == "none"


def _tampered(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[1000] ^= 0xFF
    return bytes(flipped)


# --- item 11: a silent central does not lock the push server ----------------------------------


def _mtu_exchange(sock: socket.socket) -> None:
    sock.sendall(ble_ota.mtu_request(247).pack())
    header = _recv_exactly(sock, ble_ota.FRAME_HEADER_SIZE)
    assert header[0] == 0x03  # MTU_RSP: this central is the one being served
    _recv_exactly(sock, int.from_bytes(header[17:19], "little"))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the device closed the connection"
        data += chunk
    return data


@pytest.mark.parametrize("silence", ["after the MTU exchange", "in the middle of a frame"])
def test_a_silent_central_does_not_lock_out_the_next_one(tmp_path: Path, silence: str) -> None:
    device = make_device(tmp_path / "dev", SMALL)
    new = signed("1.1.0")
    with push_server(device, idle_timeout=0.5) as (service, port):
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        with silent:
            _mtu_exchange(silent)  # served first: the next central waits behind it
            if silence == "in the middle of a frame":
                silent.sendall(ble_ota.mtu_request(247).pack()[:7])
            # the bound: each answer within 10 s, the MTU exchange included
            push(port, new, timeout=10)
            assert silent.recv(1) == b""  # the silent one was disconnected
        sessions = [service.sessions.get(timeout=10), service.sessions.get(timeout=10)]
    assert [s.updated for s in sessions] == [False, True]
    assert SimDevice(device.dir).status()["slots"][0]["next_boot"] == "test"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_serve_push_refuses_a_bad_idle_timeout(
    tmp_path: Path, otakit: Callable[..., Run], value: str
) -> None:
    device = make_device(tmp_path / "dev", SMALL)
    bad = otakit("sim", "serve-push", device.dir, "--idle-timeout", value)
    assert bad.returncode == 2
    assert bad.stderr.startswith("otakit: error [BADARG]: --idle-timeout"), bad.stderr
