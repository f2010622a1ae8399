"""The device side of delta updates: the agent downloads an offered patch with the resumable
ranged download, applies it from the primary slot into the secondary slot of the flash model
and verifies the result as any image; a patch for another base, a corrupt or a truncated one
falls back to the full image in the same attempt and the report says why; a power cut while
applying resumes from the stored patch without downloading it again; the new image boots
(bootloader model) and is confirmed.

The peers: an in-process transport over :class:`RangedDownload` (the core the HTTP transport
drives), a small loopback HTTP server speaking the check-in API for :class:`CheckinTransport`,
and the real ``otakit serve`` (tests/server_harness.py) end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from otakit.device.agent import Outcome, Result, update_once
from otakit.device.bootloader import Action, Bootloader, BootloaderConfig
from otakit.device.core.download import RangedDownload, content_range
from otakit.device.core.job import BASE_MISMATCH, choose_download
from otakit.device.delta_storage import DeltaStorage, delta_compressions
from otakit.device.events import Answer, Event, State
from otakit.device.flash import Flash, PowerCut
from otakit.device.flashmap import preset
from otakit.device.journal import Journal
from otakit.device.storage import Storage, UpdateStorage
from otakit.device.transports.base import DeltaJob, Job, Progress
from otakit.device.transports.checkin import CheckinTransport
from otakit.device.transports.http import HttpSettings
from otakit.errors import TransferError
from otakit.image.delta import DIGEST_OFFSET, HEADER, create_delta, image_digest
from otakit.image.header import ImageVersion
from otakit.image.sign import SignOptions, sign_image
from otakit.protocol.fwinfo import FwStatus, GatewayStatus
from otakit.server.database import create_engine, database_url
from otakit.server.models import DeploymentDevice
from otakit.sim.agent import run as sim_run
from otakit.sim.device import Identity, SimDevice
from otakit.sim.fleet import Fleet, FleetConfig

from .server_harness import Server, start_server
from .test_server import KEY  # the key the server tests register

LAYOUT = "sim-small"  # 20 KiB slots, swap-scratch, 4 KiB sectors
CHUNK = 1024
V110 = ImageVersion.parse("1.1.0")


def firmware(change: int = 0, seed: int = 7) -> bytes:
    """A payload like code; ``change`` bytes of one function replaced, the rest shifted."""
    rng = random.Random(seed)
    words = [rng.randrange(1 << 16) for _ in range(64)]
    payload = bytearray(b"".join(struct.pack("<H", rng.choice(words)) for _ in range(6000)))
    if change:
        payload[4000 : 4000 + change] = random.Random(change).randbytes(change)
        payload[8000:8000] = b"\x00\xbf" * 8
        del payload[-16:]
    return bytes(payload[:12_000])


def signed(version: str, payload: bytes) -> bytes:
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


BASE = signed("1.0.0", firmware())
OTHER = signed("1.0.0", firmware(seed=8))  # the same version, another build
NEW = signed("1.1.0", firmware(change=64))
PATCH = create_delta(BASE, NEW)
BASE_SHA = image_digest(BASE).sha256.hex()
NEW_SHA = image_digest(NEW).sha256.hex()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def offer(patch: bytes = PATCH, *, url: str = "/patch.bin", **changes: Any) -> DeltaJob:
    made = DeltaJob(url, len(patch), sha(patch), BASE_SHA, NEW_SHA, "lzma")
    return replace(made, **changes)


def full_job(delta: DeltaJob | None) -> Job:
    return Job(
        url="/new.bin",
        file="new.bin",
        version="1.1.0",
        sha256=sha(NEW).upper(),
        deployment="d1",
        delta=delta,
    )


def reseal(patch: bytes) -> bytes:
    """``patch`` with its own digest made right again (bad contents, a good digest)."""
    digest = hashlib.sha256(patch[:DIGEST_OFFSET] + patch[HEADER.size :]).digest()
    return patch[:DIGEST_OFFSET] + digest + patch[HEADER.size :]


# --- the device ----------------------------------------------------------------------------------


@dataclass
class Device:
    """The flash model with ``image`` running; its journal and patch files in ``dir``. Each
    :meth:`storages` call is what a new agent process opens."""

    flash: Flash
    dir: Path

    @classmethod
    def make(cls, tmp_path: Path, image: bytes = BASE) -> Device:
        fm = preset(LAYOUT)
        flash = Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align)
        device = cls(flash, tmp_path)
        device.bootloader().primary().write(0, image + b"\xff" * (-len(image) % fm.write_align))
        tmp_path.mkdir(parents=True, exist_ok=True)
        return device

    def bootloader(self) -> Bootloader:
        return Bootloader(self.flash, preset(LAYOUT), BootloaderConfig(keys=(KEY.public_key,)))

    def storages(self) -> tuple[UpdateStorage, DeltaStorage]:
        boot = self.bootloader()
        journal = self.dir / "agent-journal.json"
        storage = UpdateStorage(boot, Journal(journal), (KEY.public_key,), current_version="1.0.0")
        return storage, DeltaStorage.beside(storage, boot.primary(0), journal)

    def files(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())

    def boots_new_image(self) -> None:
        boot = self.bootloader()
        result = boot.boot().images[0]
        assert (result.action, result.version) == (Action.UPGRADE_TEST, V110), result
        assert boot.confirm(0)
        assert image_digest(boot.primary(0)).sha256.hex() == NEW_SHA
        again = self.bootloader().boot().images[0]
        assert (again.action, again.version) == (Action.NONE, V110), again  # confirmed


# --- an in-process peer --------------------------------------------------------------------------


@dataclass
class Peer:
    """Files by URL, the bytes served of each, the results reported; ``cut`` stops serving
    a URL after that many bytes (the link breaks: TransferError)."""

    files: dict[str, bytes]
    served: Counter[str] = field(default_factory=Counter)
    results: list[dict[str, Any]] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=dict)


class PeerTransport:
    """A Transport over :class:`RangedDownload`, as the HTTP transports drive it."""

    def __init__(self, peer: Peer, job: Job) -> None:
        self.peer = peer
        self.job = job

    def fetch_job(self) -> Job | None:
        return self.job

    def direct_job(self) -> Job:
        raise AssertionError("job flow only")

    def download(self, job: Job, storage: Storage, progress: Progress) -> int:
        data = self.peer.files[job.url]
        download = RangedDownload(
            storage, source=job.url, version=job.version, sha256=job.sha256, chunk_size=CHUNK
        )
        while (request := download.next_request()) is not None:
            limit = self.peer.cut.get(job.url)
            if limit is not None and self.peer.served[job.url] >= limit:
                del self.peer.cut[job.url]
                raise TransferError("the link broke", value=job.url)
            last = min(request.last, len(data) - 1)
            headers = {"content-range": f"bytes {request.first}-{last}/{len(data)}"}
            if download.response(206, headers):
                body = data[request.first : last + 1]
                self.peer.served[job.url] += len(body)
                download.body(body)
                assert download.total is not None
                progress(download.offset, download.total)
        return download.total or 0

    def send_result(
        self,
        job: Job,
        *,
        success: bool,
        error: str | None,
        message: str | None,
        delta_error: str | None = None,
    ) -> None:
        self.peer.results.append({"success": success, "error": error, "delta_error": delta_error})

    def close(self) -> None:
        pass


def attempt(device: Device, peer: Peer, job: Job, events: list[Event] | None = None) -> Result:
    storage, delta = device.storages()
    return update_once(
        PeerTransport(peer, job),
        storage,
        board="sim",
        version="1.0.0",
        delta=delta,
        callback=None if events is None else events.append,
    )


# --- the decision ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "running", "accepts", "single", "delta", "report"),
    [
        (offer(), BASE_SHA, ("lzma",), True, True, None),
        (offer(), BASE_SHA.upper(), ("lzma", "heatshrink"), True, True, None),
        (None, BASE_SHA, ("lzma",), True, False, None),
        (offer(), BASE_SHA, (), True, False, None),  # no detools: nothing asked, nothing said
        (offer(), BASE_SHA, ("lzma",), False, False, None),  # a gateway, a package
        (offer(), NEW_SHA, ("lzma",), True, False, BASE_MISMATCH),
        (offer(), None, ("lzma",), True, False, BASE_MISMATCH),
        (offer(compression="zstd"), BASE_SHA, ("lzma",), True, False, "UNSUPPORTED"),
    ],
)
def test_the_delta_is_chosen_only_for_the_exact_base_and_a_known_compression(
    offered: DeltaJob | None,
    running: str | None,
    accepts: tuple[str, ...],
    single: bool,
    delta: bool,
    report: str | None,
) -> None:
    choice = choose_download(offered, running_sha256=running, accepts=accepts, single_image=single)
    assert (choice.delta, choice.report) == (delta, report)
    assert (choice.reason is None) == delta


def test_this_agent_applies_what_image_delta_makes() -> None:
    assert delta_compressions() == ("lzma", "heatshrink", "none")


# --- the agent with a delta ------------------------------------------------------------------------


def test_a_delta_update_downloads_only_the_patch_and_the_new_image_boots(tmp_path: Path) -> None:
    device = Device.make(tmp_path)
    peer = Peer({"/new.bin": NEW, "/patch.bin": PATCH})
    result = attempt(device, peer, full_job(offer()))
    assert (result.outcome, result.version) == (Outcome.UPDATED, "1.1.0"), result
    assert peer.served == {"/patch.bin": len(PATCH)}
    assert len(PATCH) * 5 < len(NEW)
    assert peer.results == [{"success": True, "error": None, "delta_error": None}]
    assert device.files() == []  # patch, its journal and the slot journal gone
    device.boots_new_image()


def test_a_delta_for_another_base_is_not_downloaded_the_full_image_is(tmp_path: Path) -> None:
    device = Device.make(tmp_path, OTHER)  # runs another 1.0.0 build
    peer = Peer({"/new.bin": NEW, "/patch.bin": PATCH})
    result = attempt(device, peer, full_job(offer()))
    assert result.outcome is Outcome.UPDATED, result
    assert peer.served == {"/new.bin": len(NEW)}  # not one byte of the patch
    assert peer.results == [{"success": True, "error": None, "delta_error": BASE_MISMATCH}]
    device.boots_new_image()


def _flipped(patch: bytes) -> bytes:
    damaged = bytearray(patch)
    damaged[len(patch) // 2] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize(
    ("patch", "changes", "reason"),
    [
        (_flipped(PATCH), {}, "CORRUPT"),  # the digest inside says so
        (reseal(_flipped(PATCH)), {}, "CORRUPT"),  # the decoder or the result says so
        (PATCH[:-40], {}, "TRUNCATED"),
        (create_delta(OTHER, NEW), {}, "WRONG_BASE"),  # offered as BASE's
        (PATCH, {"sha256": sha(b"another patch")}, "CORRUPT"),  # not the offered file
        (PATCH, {"new_sha256": BASE_SHA}, "CORRUPT"),  # makes another image than offered
        (b"not a delta at all" * 10, {}, "NOT_A_DELTA"),
    ],
)
def test_a_patch_that_does_not_apply_falls_back_to_the_full_image_and_says_why(
    tmp_path: Path, patch: bytes, changes: dict[str, str], reason: str
) -> None:
    device = Device.make(tmp_path)
    peer = Peer({"/new.bin": NEW, "/patch.bin": patch})
    events: list[Event] = []
    result = attempt(device, peer, full_job(offer(patch, **changes)), events)
    assert (result.outcome, result.version) == (Outcome.UPDATED, "1.1.0"), result
    assert peer.served == {"/patch.bin": len(patch), "/new.bin": len(NEW)}
    assert peer.results == [{"success": True, "error": None, "delta_error": reason}]
    assert [e.error for e in events if e.error is not None] == [reason]
    assert device.files() == []
    device.boots_new_image()


def test_a_size_other_than_offered_falls_back_before_storing_anything(tmp_path: Path) -> None:
    device = Device.make(tmp_path)
    peer = Peer({"/new.bin": NEW, "/patch.bin": PATCH})
    result = attempt(device, peer, full_job(offer(size=len(PATCH) + 1)))
    assert result.outcome is Outcome.UPDATED, result
    assert peer.served == {"/patch.bin": min(CHUNK, len(PATCH)), "/new.bin": len(NEW)}
    assert peer.results[-1]["delta_error"] == "CORRUPT"


def test_a_broken_link_on_the_patch_resumes_it_and_reports_no_delta_error(tmp_path: Path) -> None:
    device = Device.make(tmp_path)
    patch = create_delta(BASE, NEW, compression="none")  # several ranges
    assert len(patch) > 3 * CHUNK
    peer = Peer({"/new.bin": NEW, "/patch.bin": patch}, cut={"/patch.bin": 2 * CHUNK})
    first = attempt(device, peer, full_job(offer(patch, compression="none")))
    assert (first.outcome, first.error) == (Outcome.FAILED, TransferError.agent_error), first
    assert peer.results[-1]["delta_error"] is None
    assert "agent-journal-delta.part" in device.files()
    second = attempt(device, peer, full_job(offer(patch, compression="none")))
    assert second.outcome is Outcome.UPDATED, second
    assert peer.served == {"/patch.bin": len(patch)}  # resumed, not fetched again
    device.boots_new_image()


def test_a_patch_of_an_earlier_offer_is_removed_when_the_full_image_comes(tmp_path: Path) -> None:
    device = Device.make(tmp_path)
    patch = create_delta(BASE, NEW, compression="none")
    peer = Peer({"/new.bin": NEW, "/patch.bin": patch}, cut={"/patch.bin": CHUNK})
    assert (
        attempt(device, peer, full_job(offer(patch, compression="none"))).outcome is Outcome.FAILED
    )
    assert "agent-journal-delta.json" in device.files()
    peer.served.clear()
    assert attempt(device, peer, full_job(None)).outcome is Outcome.UPDATED
    assert peer.served == {"/new.bin": len(NEW)}
    assert device.files() == []


def _operations(tmp_path: Path, patch: bytes) -> tuple[int, int]:
    """Flash operations of a delta update: all of them, and those before the bootloader
    request (the erases and blocks of the apply)."""
    device = Device.make(tmp_path)
    start = device.flash.operations
    peer = Peer({"/new.bin": NEW, "/patch.bin": patch})
    before: list[int] = []
    with pytest.MonkeyPatch.context() as patch_:
        pend = Bootloader.set_pending

        def set_pending(self: Bootloader, image: int = 0, *, permanent: bool = False) -> None:
            before.append(device.flash.operations - start)
            pend(self, image, permanent=permanent)

        patch_.setattr(Bootloader, "set_pending", set_pending)
        assert attempt(device, peer, full_job(offer(patch))).outcome is Outcome.UPDATED
    return device.flash.operations - start, before[0]


@pytest.mark.parametrize("tear", [False, True])
def test_power_cuts_while_applying_resume_without_downloading_the_patch_again(
    tmp_path: Path, tear: bool
) -> None:
    total, applying = _operations(tmp_path / "count", PATCH)
    assert total > applying > 4
    # erases and blocks of the apply, and (not torn: a torn request is a damaged trailer,
    # which the slot storage refuses for a full image as well) the bootloader request
    end = applying if tear else total
    cuts = sorted({0, 1, 2, end // 3, end // 2, end - 3, end - 2, end - 1})
    for cut in cuts:
        device = Device.make(tmp_path / f"cut{cut}")
        peer = Peer({"/new.bin": NEW, "/patch.bin": PATCH})
        device.flash.cut_after(cut, tear=tear, seed=cut)
        with pytest.raises(PowerCut):
            attempt(device, peer, full_job(offer()))
        device.flash.power_on()
        assert "agent-journal-delta.part" in device.files(), cut
        result = attempt(device, peer, full_job(offer()))  # a new process after the cut
        assert result.outcome is Outcome.UPDATED, (cut, result)
        assert peer.served == {"/patch.bin": len(PATCH)}, cut  # never again, no full image
        assert device.files() == [], cut
        device.boots_new_image()


# --- over HTTP: the check-in API on a loopback server -------------------------------------------


class CheckinPeer(ThreadingHTTPServer):
    """The check-in API's device side as the agent sees it: one job (with ``delta``), ranged
    files, and the bodies of check-ins and status reports."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes], job: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.job = job
        self.checkins: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        self.served: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: CheckinPeer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/api/v1/device/checkin":
            self.server.checkins.append(body)
            self._send(200, json.dumps({"job": self.server.job}).encode())
        else:
            self.server.reports.append(body)
            self._send(200, b"{}")

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        data = self.server.files[path]
        first, last = (int(x) for x in self.headers["range"].split("=")[1].split("-"))
        last = min(last, len(data) - 1)
        self.server.served[path] += last - first + 1
        headers = {"content-range": f"bytes {first}-{last}/{len(data)}", "etag": sha(data)}
        self._send(206, data[first : last + 1], headers)


@pytest.fixture
def checkin_peer(request: pytest.FixtureRequest) -> Iterator[CheckinPeer]:
    patch: bytes = request.param
    job = {
        "url": "/files/new.bin?sig=1",
        "name": "new.bin",
        "version": "1.1.0",
        "sha256": sha(NEW),
        "deployment_id": "d1",
        "delta": {
            "url": "/files/patch.bin?sig=2",
            "size": len(patch),
            "sha256": sha(patch),
            "base_sha256": BASE_SHA,
            "new_sha256": NEW_SHA,
            "compression": "lzma",
        },
    }
    server = CheckinPeer({"/files/new.bin": NEW, "/files/patch.bin": patch}, job)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def checkin_attempt(device: Device, server: str, *, accepts: bool = True) -> Result:
    storage, delta = device.storages()
    transport = CheckinTransport(
        HttpSettings(server=server, chunk_size=CHUNK),
        identity={"serial": "D-1", "board": "sim"},
        version=lambda: "1.0.0",
        reported=lambda: GatewayStatus(FwStatus.APPLYING),
        image_sha256=delta.running_sha256,
        delta=delta_compressions() if accepts else (),
    )
    try:
        return update_once(transport, storage, board="sim", version="1.0.0", delta=delta)
    finally:
        transport.close()


@pytest.mark.parametrize("checkin_peer", [PATCH], indirect=True)
def test_the_checkin_says_what_runs_and_the_patch_comes_over_http(
    tmp_path: Path, checkin_peer: CheckinPeer
) -> None:
    device = Device.make(tmp_path)
    result = checkin_attempt(device, checkin_peer.url)
    assert result.outcome is Outcome.UPDATED, result
    assert result.job is not None
    assert result.job.delta is not None
    assert result.job.delta.url == checkin_peer.url + "/files/patch.bin?sig=2"
    sent = checkin_peer.checkins[0]
    assert (sent["image_sha256"], sent["delta"]) == (BASE_SHA, ["lzma", "heatshrink", "none"])
    assert checkin_peer.served == {"/files/patch.bin": len(PATCH)}
    assert all("delta_error" not in report for report in checkin_peer.reports)
    device.boots_new_image()


@pytest.mark.parametrize("checkin_peer", [reseal(_flipped(PATCH))], indirect=True)
def test_a_corrupt_patch_over_http_falls_back_and_the_status_says_corrupt(
    tmp_path: Path, checkin_peer: CheckinPeer
) -> None:
    device = Device.make(tmp_path)
    result = checkin_attempt(device, checkin_peer.url)
    assert result.outcome is Outcome.UPDATED, result
    assert checkin_peer.served == {"/files/patch.bin": len(PATCH), "/files/new.bin": len(NEW)}
    assert checkin_peer.reports[0] == {"extFwInfo": {"Status": "downloading", "Error": "None"}}
    assert checkin_peer.reports[-1] == {
        "status": "applying",
        "error": "None",
        "delta_error": "CORRUPT",
    }
    device.boots_new_image()


@pytest.mark.parametrize("checkin_peer", [PATCH], indirect=True)
def test_an_agent_without_deltas_asks_for_none_and_takes_the_full_image(
    tmp_path: Path, checkin_peer: CheckinPeer
) -> None:
    device = Device.make(tmp_path)
    result = checkin_attempt(device, checkin_peer.url, accepts=False)
    assert result.outcome is Outcome.UPDATED, result
    assert result.job is not None
    assert result.job.delta is None
    assert "delta" not in checkin_peer.checkins[0]
    assert checkin_peer.checkins[0]["image_sha256"] == BASE_SHA
    assert checkin_peer.served == {"/files/new.bin": len(NEW)}
    device.boots_new_image()


@pytest.mark.parametrize("checkin_peer", [PATCH], indirect=True)
def test_a_malformed_delta_offer_is_ignored(tmp_path: Path, checkin_peer: CheckinPeer) -> None:
    checkin_peer.job["delta"] = {**checkin_peer.job["delta"], "base_sha256": "not hex"}
    device = Device.make(tmp_path)
    result = checkin_attempt(device, checkin_peer.url)
    assert result.outcome is Outcome.UPDATED, result
    assert result.job is not None
    assert result.job.delta is None
    assert checkin_peer.served == {"/files/new.bin": len(NEW)}


# --- end to end: the agent against a real ``otakit serve`` ------------------------------------------

STALL = 30.0  # seconds the server may take to make a delta


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("delta-agent") / "data", extra=("--delta-workers", "1")
    )
    try:
        with srv.admin_client() as admin:
            response = admin.post(
                "/api/v1/keys",
                content=KEY.public_key.pem(),
                headers={"content-type": "application/x-pem-file"},
            )
            assert response.status_code in (201, 409), response.text
        yield srv
    finally:
        srv.stop()


@dataclass
class Rollout:
    """A product of its own with BASE and NEW uploaded and NEW deployed to its group (one for
    the module: every test's devices are new ones)."""

    server: Server
    product: str
    deployment: int
    enroll: str
    offered: dict[str, Any] | None = None

    def device(self) -> tuple[str, str]:
        """A new device, enrolled by a first check-in that says nothing of deltas."""
        serial = f"dev-{random.randbytes(4).hex()}"
        with self.server.client(self.enroll) as client:
            answer = client.post(
                CHECKIN, json={"serial": serial, "board": BOARD, "version": "1.0.0"}
            )
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["device_token"]
        return serial, token

    def check_in(self, token: str, serial: str, **extra: object) -> dict[str, Any]:
        body = {"serial": serial, "board": BOARD, "version": "1.0.0", **extra}
        with self.server.client(token) as client:
            answer = client.post(CHECKIN, json=body)
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()["job"]
        return job

    def delta_made(self) -> dict[str, Any]:
        """The delta from BASE, once the server offers it (the first check-in that names BASE
        queues it; the worker makes it in the background)."""
        if self.offered is not None:
            return self.offered
        serial, token = self.device()
        deadline = time.monotonic() + STALL
        while "delta" not in (
            job := self.check_in(token, serial, image_sha256=BASE_SHA, delta=["lzma"])
        ):
            assert time.monotonic() < deadline, "no delta offered"
            time.sleep(0.05)  # the worker's pace: a poll, bounded by the deadline
        self.offered = job["delta"]
        return self.offered

    def delta_error(self, serial: str) -> str | None:
        async def read() -> str | None:
            engine = create_engine(database_url(self.server.database_url, self.server.data))
            try:
                async with engine.connect() as conn:
                    row = await conn.execute(
                        select(DeploymentDevice.delta_error).where(
                            DeploymentDevice.device_serial == serial,
                            DeploymentDevice.deployment_id == self.deployment,
                        )
                    )
                    value: str | None = row.scalar_one()
                    return value
            finally:
                await engine.dispose()

        return asyncio.run(read())


CHECKIN = "/api/v1/device/checkin"
BOARD = "BOARD_D"


@pytest.fixture(scope="module")
def rollout(server: Server) -> Rollout:
    product = f"delta-{random.randbytes(4).hex()}"
    with server.admin_client() as admin:
        assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
        ids = []
        for name, data in (("base.img", BASE), ("new.img", NEW)):
            answer = admin.post(
                "/api/v1/artifacts",
                params={"name": name},
                content=data,
                headers={"content-type": "application/octet-stream"},
            )
            assert answer.status_code in (200, 201), answer.text
            ids.append(answer.json()["id"])
        answer = admin.post(
            "/api/v1/deployments", json={"artifact_id": ids[1], "product": product, "group": "g"}
        )
        assert answer.status_code == 201, answer.text
        deployment = answer.json()["id"]
    enroll = server.token("enroll", "--product", product, "--group", "g")
    return Rollout(server, product, deployment, enroll)


class CountingCheckin(CheckinTransport):
    """The agent's check-in transport, counting the body bytes of every ranged answer by the
    path it came from (what the server sent)."""

    served: Counter[str]

    def _new_client(self, *, credentials: bool) -> httpx.Client:
        client = super()._new_client(credentials=credentials)

        def count(response: httpx.Response) -> None:
            span = content_range(response.headers)
            if response.status_code == 206 and span is not None:
                kind = "delta" if "/deltas/" in response.request.url.path else "full"
                self.served[kind] += span[1] - span[0] + 1

        client.event_hooks["response"].append(count)
        return client


def agent_attempt(
    device: Device,
    server: Server,
    token: str,
    serial: str,
    served: Counter[str],
    *,
    claims: str | None = None,
) -> Result:
    """One attempt of the agent over the check-in API; ``claims`` is what its check-in says it
    runs (by default what it does run)."""
    storage, delta = device.storages()
    CountingCheckin.served = served
    transport = CountingCheckin(
        HttpSettings(server=server.url, token=token, chunk_size=CHUNK),
        identity={"serial": serial, "board": BOARD},
        version=lambda: "1.0.0",
        reported=lambda: GatewayStatus(FwStatus.APPLYING),
        image_sha256=(lambda: claims) if claims else delta.running_sha256,
        delta=delta_compressions(),
    )
    try:
        return update_once(transport, storage, board=BOARD, version="1.0.0", delta=delta)
    finally:
        transport.close()


def test_end_to_end_the_exact_base_gets_the_delta_and_the_new_image_boots(
    tmp_path: Path, rollout: Rollout
) -> None:
    offered = rollout.delta_made()
    assert (offered["base_sha256"], offered["new_sha256"]) == (BASE_SHA, NEW_SHA)
    serial, token = rollout.device()
    # another image than BASE is not offered the delta
    assert "delta" not in rollout.check_in(token, serial, image_sha256=NEW_SHA, delta=["lzma"])
    device = Device.make(tmp_path)
    served: Counter[str] = Counter()
    result = agent_attempt(device, rollout.server, token, serial, served)
    assert (result.outcome, result.version) == (Outcome.UPDATED, "1.1.0"), result
    assert served == {"delta": offered["size"]}, served
    assert offered["size"] * 5 < len(NEW)
    assert rollout.delta_error(serial) is None
    device.boots_new_image()


def test_end_to_end_a_device_that_runs_another_base_falls_back_and_it_is_recorded(
    tmp_path: Path, rollout: Rollout
) -> None:
    rollout.delta_made()
    serial, token = rollout.device()
    device = Device.make(tmp_path, OTHER)  # its check-in claims BASE: the offer is BASE's
    served: Counter[str] = Counter()
    result = agent_attempt(device, rollout.server, token, serial, served, claims=BASE_SHA)
    assert result.outcome is Outcome.UPDATED, result
    assert served == {"full": len(NEW)}, served  # not one byte of the patch
    assert rollout.delta_error(serial) == BASE_MISMATCH
    # from then on this device is offered the full image only
    assert "delta" not in rollout.check_in(token, serial, image_sha256=BASE_SHA, delta=["lzma"])
    device.boots_new_image()


def test_end_to_end_a_corrupt_patch_falls_back_and_corrupt_is_recorded(
    tmp_path: Path, rollout: Rollout
) -> None:
    offered = rollout.delta_made()
    blobs = [p for p in rollout.server.data.rglob(offered["sha256"]) if p.is_file()]
    assert blobs, "the patch's blob"
    for blob in blobs:  # damaged on the server's disk: served as it is
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    try:
        serial, token = rollout.device()
        device = Device.make(tmp_path)
        served: Counter[str] = Counter()
        result = agent_attempt(device, rollout.server, token, serial, served)
        assert result.outcome is Outcome.UPDATED, result
        assert served == {"delta": offered["size"], "full": len(NEW)}, served
        assert rollout.delta_error(serial) == "CORRUPT"
        device.boots_new_image()
    finally:
        for blob in blobs:
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))


def test_end_to_end_power_cuts_while_applying_never_download_the_patch_again(
    tmp_path: Path, rollout: Rollout
) -> None:
    offered = rollout.delta_made()
    total, applying = _operations(tmp_path / "count", PATCH)
    for cut in sorted({1, applying // 2, applying - 1, total - 1}):
        serial, token = rollout.device()
        device = Device.make(tmp_path / f"cut{cut}")
        served: Counter[str] = Counter()
        device.flash.cut_after(cut, tear=cut < applying, seed=cut)
        with pytest.raises(PowerCut):
            agent_attempt(device, rollout.server, token, serial, served)
        device.flash.power_on()
        result = agent_attempt(device, rollout.server, token, serial, served)
        assert result.outcome is Outcome.UPDATED, (cut, result)
        assert served == {"delta": offered["size"]}, (cut, served)
        device.boots_new_image()


def test_end_to_end_a_simulated_device_updates_with_the_delta_and_confirms(
    tmp_path: Path, rollout: Rollout
) -> None:
    offered = rollout.delta_made()
    folder = tmp_path / "sim"
    SimDevice.create(
        folder,
        BASE,
        [KEY.public_key],
        layout=LAYOUT,
        identity=Identity(board=BOARD, serial=f"sim-{random.randbytes(4).hex()}"),
    )
    device = SimDevice(folder)
    device.boot()
    assert device.image_sha256() == BASE_SHA
    report = sim_run(
        folder, rollout.server.url, token=rollout.enroll, fetch_with="checkin", chunk_size=CHUNK
    )
    assert (report.result.outcome, report.running, report.confirmed) == (
        Outcome.UPDATED,
        "1.1.0+0",
        True,
    ), report
    job = report.result.job
    assert job is not None
    assert job.delta is not None
    assert job.delta.sha256 == offered["sha256"]
    assert SimDevice(folder).image_sha256() == NEW_SHA
    assert sorted(p.name for p in folder.glob("agent-journal*")) == []  # patch removed
    assert rollout.delta_error(device.state.identity.serial) is None


def test_an_application_that_verifies_itself_still_gets_the_patch_applied(tmp_path: Path) -> None:
    device = Device.make(tmp_path)
    peer = Peer({"/new.bin": NEW, "/patch.bin": PATCH})
    storage, delta = device.storages()
    result = update_once(
        PeerTransport(peer, full_job(offer())),
        storage,
        board="sim",
        version="1.0.0",
        delta=delta,
        callback=lambda e: Answer.APP_SUCCESS if e.state is State.VERIFY else None,
    )
    assert (result.outcome, result.version) == (Outcome.UPDATED, "1.1.0"), result
    device.boots_new_image()


def test_end_to_end_a_fleet_updates_with_the_delta(rollout: Rollout) -> None:
    offered = rollout.delta_made()
    config = FleetConfig(
        server=rollout.server.url,
        token=rollout.enroll,
        product=rollout.product,
        group="g",
        board=BOARD,
        devices=6,
        keys=(KEY.public_key,),
        factory=BASE,
        deltas=True,
        poll=0.02,
        timeout=60,
        chunk_size=CHUNK,
        slot_size=20 * 1024,
        serial_prefix=f"{rollout.product}-fleet",
        until_updated="1.1.0",
    )
    events: list[dict[str, Any]] = []
    fleet = Fleet(config, on_event=events.append)
    report = asyncio.run(fleet.run())
    assert (report.settled, report.updated) == (6, 6), report
    assert [e["event"] for e in events].count("delta") == 6
    assert sum(device.bytes for device in fleet.devices) == 6 * offered["size"]
    for device in fleet.devices:
        assert image_digest(Bootloader(device.flash, fleet.map, fleet.boot_config).primary(0)) == (
            image_digest(NEW)
        )
