"""``otakit demo``: the whole update path on this machine, with nothing to set up.

In a temporary folder: an update server on the embedded defaults (SQLite and a data folder), a
signing key, v1.0.0 and v1.1.0 of a sample application, a fleet of simulated devices running
v1.0.0 (flash, MCUboot-compatible bootloader and agent each; one of them broken: its new image
never confirms, so it reverts), and v1.1.0 deployed as a two-phase rollout. Live progress shows
each device's download and each phase; the summary table gives every device's version and
outcome. With ``--mqtt`` (and a Mosquitto binary) the devices take their jobs and images from
``otakit publisher`` over MQTT instead of HTTP.

With ``--package`` the demo shows a multi-image update instead (:func:`run_package_demo`): a
TAR package (protocols.md §6) of application v1.1.0 (image 0, which depends on the secure image
at 2.1.0) and secure image v2.1.0 (image 1), deployed with ``otakit deploy`` to a few simulated
devices on the ``two-image`` flash map, each running the agent's code (``otakit sim run``): one
loses power in the middle of the download and resumes, one never confirms and both of its
images go back together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
from rich.table import Table

from otakit.errors import OtakitError, UsageError
from otakit.extras import require
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.tlv import Dependency

PRODUCT = "demo-sensor"
GROUP = "field"
BOARD = "CY8CPROTO_062_4343W"
APP_SIZE = 192 * 1024  # the sample application's payload
LINK_BYTES_PER_S = 160 * 1024  # each simulated device's link: a download takes about a second
PHASES = [
    {"percent": 25, "success": 70, "max_errors": 2},
    {"percent": 100, "success": 70, "max_errors": 2},
]
WAIT_S = 30.0  # for a process to say it is ready

err = Console(stderr=True, highlight=False)


class DemoError(OtakitError):
    """The demo could not set up its server, broker or publisher."""

    code = "DEMO"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _otakit(*args: str) -> list[str]:
    return [sys.executable, "-m", "otakit", *args]


@dataclass
class _Process:
    """A child process whose output is read on a thread (a full pipe would stall it)."""

    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, name: str, args: list[str]) -> _Process:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )
        running = cls(name, proc)
        threading.Thread(target=running._pump, daemon=True).start()
        return running

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str) -> str:
        """The first line containing ``text``; DemoError if the process ends or stays silent."""
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                tail = "".join(self.lines[-5:]).strip()
                raise DemoError(f"{self.name} did not start: {tail or 'no output'}")
            if text in line:
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class _Setup:
    url: str
    admin: str
    enroll: str
    key: SigningKey
    v1: bytes
    rollout: dict[str, Any]


def _sample_app(
    version: str,
    key: SigningKey,
    *,
    size: int = APP_SIZE,
    what: str = "application",
    depends: tuple[Dependency, ...] = (),
) -> bytes:
    """The sample application (or secure image): the same code in every version but for a
    version string."""
    code = random.Random(20261121).randbytes(size - 64)
    banner = f"otakit demo {what} {version}".encode().ljust(64, b"\0")
    options = SignOptions(ImageVersion.parse(version), pad_header=True, dependencies=depends)
    return sign_image(code + banner, key, options)


def _set_up(work: Path, server: _Process, port: int, admin: str) -> _Setup:
    url = f"http://127.0.0.1:{port}"
    key = SigningKey.generate("ecdsa-p256")
    (work / "keys").mkdir()
    key.save(work / "keys" / "demo-key.pem")
    v1, v2 = _sample_app("1.0.0", key), _sample_app("1.1.0", key)
    (work / "app-1.0.0.img").write_bytes(v1)
    (work / "app-1.1.0.img").write_bytes(v2)
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}) as api:

        def call(method: str, path: str, **kwargs: Any) -> Any:
            response = api.request(method, path, **kwargs)
            if response.status_code >= 300:
                raise DemoError(f"{method} {path}: {response.status_code} {response.text[:200]}")
            return response.json() if response.content else None

        call("POST", "/api/v1/keys", content=key.public_key.pem())
        call("PUT", f"/api/v1/products/{PRODUCT}", json={"board": BOARD})
        artifact = call("POST", "/api/v1/artifacts", params={"name": "app.img"}, content=v2)
        deployment = {"artifact_id": artifact["id"], "product": PRODUCT, "group": GROUP}
        rollout = call(
            "POST", "/api/v1/rollouts", json={"deployment": deployment, "phases": PHASES}
        )
    enroll = subprocess.run(
        _otakit(
            "token",
            "create",
            "--role",
            "enroll",
            "--product",
            PRODUCT,
            "--group",
            GROUP,
            "--data",
            str(work / "server"),
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if enroll.returncode != 0:
        raise DemoError(f"cannot create an enrollment token: {enroll.stderr.strip()}")
    return _Setup(url, admin, enroll.stdout.strip(), key, v1, rollout)


@contextlib.contextmanager
def _broker(work: Path) -> Iterator[int]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        raise UsageError("--mqtt needs Mosquitto (Debian: apt-get install mosquitto)")
    port = _free_port()
    config = work / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\nmax_queued_messages 100000\nlog_dest stderr\n"
        "log_type information\n"
    )
    broker = _Process.start("mosquitto", [mosquitto, "-c", str(config)])
    try:
        broker.wait_for(" running")
        yield port
    finally:
        broker.stop()


class _Display:
    """Live progress: one bar per phase (devices applied) and one per device (bytes)."""

    SHOWN = 24  # devices with their own bar; more are summed up in one

    def __init__(self, fleet: Any, phases: int) -> None:
        self.fleet = fleet
        self.phases = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} applied"),
        )
        self.devices = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[state]}"),
        )
        self.phase_tasks = [self.phases.add_task(f"phase {n + 1}", total=1) for n in range(phases)]
        self.state: dict[str, str] = {}
        shown = fleet.devices[: self.SHOWN]
        self.device_tasks: dict[str, TaskID] = {
            d.serial: self.devices.add_task(d.serial, total=1, state="waiting") for d in shown
        }
        self.rest: TaskID | None = None
        if len(fleet.devices) > self.SHOWN:
            others = len(fleet.devices) - self.SHOWN
            self.rest = self.devices.add_task(f"{others} more devices", total=others, state="")

    def renderable(self) -> Group:
        return Group(self.phases, self.devices)

    def on_event(self, event: dict[str, Any]) -> None:
        words = {
            "job": "downloading",
            "drop": "link dropped",
            "power-cut": "power cut",
            "resume": "resuming",
            "pending": "rebooting",
            "updated": "[green]confirmed",
            "crashed": "[red]not confirmed",
            "reverted": "[red]reverted",
            "failed": f"[red]{event.get('error', 'failed')}",
        }
        if event["event"] in words:
            self.state[event["device"]] = words[event["event"]]

    def refresh(self, rollout: dict[str, Any] | None) -> None:
        for device in self.fleet.devices:
            task = self.device_tasks.get(device.serial)
            if task is None:
                continue
            record = device.journal.load()
            state = self.state.get(device.serial, "waiting")
            if record is not None:
                self.devices.update(
                    task, total=record.download.size, completed=record.durable, state=state
                )
            elif state != "downloading":
                task_total = self.devices.tasks[task].total or 1
                done = task_total if state not in ("waiting",) else 0
                self.devices.update(task, completed=done, state=state)
        if self.rest is not None:
            updated = sum(d.updates > 0 or d.reverted for d in self.fleet.devices[self.SHOWN :])
            self.devices.update(self.rest, completed=updated, state="settled")
        for number, phase in enumerate((rollout or {}).get("phases", [])):
            if number < len(self.phase_tasks):
                counts = phase.get("counts", {})
                self.phases.update(
                    self.phase_tasks[number],
                    description=f"phase {number + 1} ({phase.get('status', '')})",
                    total=max(1, phase.get("targeted", 1)),
                    completed=counts.get("Applied", 0),
                )


async def _run_fleet(setup: _Setup, devices: int, mqtt_port: int | None) -> tuple[Any, Any, Any]:
    from otakit.sim.fleet import Fleet, FleetConfig, MqttBroker

    config = FleetConfig(
        server=setup.url,
        token=setup.enroll,
        product=PRODUCT,
        group=GROUP,
        board=BOARD,
        devices=devices,
        keys=(setup.key.public_key,),
        factory=setup.v1,
        poll=0.5,
        jitter=0.3,
        bandwidth=LINK_BYTES_PER_S,
        chunk_size=16 * 1024,
        broken=1 / devices,
        until_updated="1.1.0",
        timeout=120,
        serial_prefix="DEMO",
        mqtt=MqttBroker("127.0.0.1", mqtt_port) if mqtt_port is not None else None,
        seed=7,
    )
    display: _Display | None = None

    def on_event(event: dict[str, Any]) -> None:
        if display is not None:
            display.on_event(event)

    fleet = Fleet(config, on_event=on_event)
    display = _Display(fleet, len(PHASES))
    rollout_id = setup.rollout["id"]
    headers = {"authorization": f"Bearer {setup.admin}"}
    async with httpx.AsyncClient(base_url=setup.url, headers=headers, timeout=10) as api:
        with Live(display.renderable(), console=err, refresh_per_second=8, transient=False):
            run = asyncio.create_task(fleet.run())
            rollout: dict[str, Any] | None = None
            while not run.done():
                with contextlib.suppress(httpx.HTTPError):
                    rollout = (await api.get(f"/api/v1/rollouts/{rollout_id}")).json()
                    await _approve_if_empty(api, rollout, devices)
                display.refresh(rollout)
                await asyncio.wait({run}, timeout=0.25)
            report = run.result()
            await asyncio.sleep(0)  # the last reports reach the server's counts
            rollout = (await api.get(f"/api/v1/rollouts/{rollout_id}")).json()
            display.refresh(rollout)
    return fleet, report, rollout


async def _approve_if_empty(api: httpx.AsyncClient, rollout: dict[str, Any], devices: int) -> None:
    """With few devices a 25 % phase may hold none; the server then holds it for an operator
    (a phase never passes empty). Once every device has enrolled, the demo is that operator."""
    current = rollout.get("phase", 1)
    phases = rollout.get("phases", [])
    if (
        rollout.get("awaiting_approval")
        and rollout.get("targeted") == devices
        and 0 < current <= len(phases)
        and phases[current - 1].get("targeted") == 0
    ):
        err.print(f"phase {current} holds no device: approving it")
        await api.post(f"/api/v1/rollouts/{rollout['id']}/approve", json={"phase": current})


def _summary(fleet: Any, report: Any, rollout: dict[str, Any], elapsed: float) -> Table:
    table = Table(title=f"{report.devices} devices, {elapsed:.1f} s", title_justify="left")
    for column in ("device", "running", "outcome", "resumes"):
        table.add_column(column, overflow="fold")
    for device in fleet.devices:
        if device.reverted:
            outcome = "[red]reverted (never confirmed)"
        elif device.updates:
            outcome = "[green]updated, confirmed"
        else:
            outcome = f"[yellow]{device.last_error or 'not updated'}"
        table.add_row(device.serial, str(device.version), outcome, str(device.resumes))
    counts = ", ".join(f"{k} {v}" for k, v in rollout.get("counts", {}).items() if v)
    table.caption = f"rollout {rollout.get('id')}: {rollout.get('state')}; {counts}"
    return table


def run_demo(devices: int = 20, *, keep: bool = False, mqtt: bool = False) -> int:
    """The demo; returns the exit status (0: every device ended as expected)."""
    require("server", "otakit demo")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otakit-demo-"))
    port = _free_port()
    err.print(f"[bold]otakit demo[/]: {devices} simulated devices, working in {work}")
    server = _Process.start(
        "otakit serve",
        _otakit(
            "serve", "--data", str(work / "server"), "--port", str(port), "--rollout-interval", "1"
        ),
    )
    stack = contextlib.ExitStack()
    try:
        server.wait_for("First start")
        admin = server.wait_for("otk_").strip()
        server.wait_for("Application startup complete")
        setup = _set_up(work, server, port, admin)
        err.print(
            f"server {setup.url}  ·  dashboard [link={setup.url}/]{setup.url}/[/link] "
            f"(admin token in {work / 'admin-token'})"
        )
        (work / "admin-token").write_text(admin + "\n")
        (work / "admin-token").chmod(0o600)
        mqtt_port = None
        if mqtt:
            mqtt_port = stack.enter_context(_broker(work))
            publisher = _Process.start(
                "otakit publisher",
                _otakit("publisher", "--data", str(work / "server"), "--port", str(mqtt_port)),
            )
            stack.callback(publisher.stop)
            publisher.wait_for("listening on")
            err.print(f"devices take their updates over MQTT (broker 127.0.0.1:{mqtt_port})")
        err.print("deployed v1.1.0 as a rollout: 25 % of the devices, then all of them")
        fleet, report, rollout = asyncio.run(_run_fleet(setup, devices, mqtt_port))
        err.print()
        err.print(_summary(fleet, report, rollout, time.monotonic() - started))
        expected = report.updated == devices - 1 and report.reverted == 1 and not report.timed_out
        if keep:
            err.print(f"server still running on {setup.url}/ (Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                server.proc.wait()
        return 0 if expected else 1
    finally:
        stack.close()
        server.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


# --- otakit demo --package -------------------------------------------------------------------

SECURE_SIZE = 48 * 1024  # the sample secure image's payload
PACKAGE_CUT_AFTER = 130  # flash operations: the erase of image 0's slot (96 sectors), then writes


@dataclass
class _PackageRow:
    serial: str
    running: list[str]
    outcome: str
    ok: bool


def _package_device(
    work: Path, url: str, enroll: str, serial: str, key: SigningKey, app1: bytes, sec1: bytes,
    role: str,
) -> _PackageRow:  # fmt: skip
    """One simulated two-image device through the update, as ``otakit sim run`` runs it."""
    from otakit.device.journal import Journal
    from otakit.sim.agent import JOURNAL_FILE, run
    from otakit.sim.device import Identity, SimDevice

    device = SimDevice.create(
        work / "devices" / serial,
        app1,
        [key.public_key],
        layout="two-image",
        identity=Identity(board=BOARD, product=PRODUCT, serial=serial),
        images={1: sec1},
    )
    device.boot()
    token: str | None = enroll
    notes = []
    if role == "power-cut":
        report = run(device.dir, url, token=token, power_cut_after=PACKAGE_CUT_AFTER)
        token = None
        record = Journal(device.dir / JOURNAL_FILE).load()
        durable = record.durable if record is not None else 0
        notes.append(
            f"power cut in the download ({report.result.error}), resumed at byte {durable}"
        )
    report = run(device.dir, url, token=token, confirm=role != "never-confirms")
    running = [str(s["running"]) for s in device.status()["slots"]]
    if report.result.error is not None:
        return _PackageRow(serial, running, f"[red]{report.result.error}", False)
    if role == "never-confirms":
        device.boot()  # the next reset: nothing confirmed the new pair
        running = [str(s["running"]) for s in device.status()["slots"]]
        ok = running == ["1.0.0+0", "2.0.0+0"]
        return _PackageRow(serial, running, "[red]not confirmed: both images reverted", ok)
    ok = running == ["1.1.0+0", "2.1.0+0"] and report.confirmed
    notes.append("both images updated, confirmed")
    return _PackageRow(serial, running, "[green]" + "; ".join(notes), ok)


def run_package_demo(devices: int = 3, *, keep: bool = False) -> int:
    """``otakit demo --package``; returns the exit status (0: every device ended as expected).
    ``devices`` is at least 2: the first loses power mid-download, the last never confirms."""
    require("server", "otakit demo")
    from otakit.image.package import build_package

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otakit-demo-"))
    port = _free_port()
    err.print(f"[bold]otakit demo --package[/]: {devices} two-image devices, working in {work}")
    server = _Process.start(
        "otakit serve", _otakit("serve", "--data", str(work / "server"), "--port", str(port))
    )
    try:
        server.wait_for("First start")
        admin = server.wait_for("otk_").strip()
        server.wait_for("Application startup complete")
        url = f"http://127.0.0.1:{port}"
        key = SigningKey.generate("ecdsa-p256")
        app1 = _sample_app("1.0.0", key)
        sec1 = _sample_app("2.0.0", key, size=SECURE_SIZE, what="secure image")
        needs = (Dependency(1, ImageVersion.parse("2.1.0")),)
        app2 = _sample_app("1.1.0", key, depends=needs)
        sec2 = _sample_app("2.1.0", key, size=SECURE_SIZE, what="secure image")
        package = build_package([("app.bin", "NSPE", app2), ("spe.bin", "SPE", sec2)], "1.1.0")
        (work / "update.tar").write_bytes(package)
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}) as api:
            for method, path, kwargs in (
                ("POST", "/api/v1/keys", {"content": key.public_key.pem()}),
                ("PUT", f"/api/v1/products/{PRODUCT}", {"json": {"board": BOARD}}),
            ):
                response = api.request(method, path, **kwargs)
                if response.status_code >= 300:
                    raise DemoError(
                        f"{method} {path}: {response.status_code} {response.text[:200]}"
                    )
        enroll = _command(
            "token", "create", "--role", "enroll", "--product", PRODUCT, "--group", GROUP,
            "--data", str(work / "server"),
        )  # fmt: skip
        deployment = _command(
            "deploy", str(work / "update.tar"), "1.1.0", PRODUCT, GROUP,
            "--server", url, "--token", admin,
        )  # fmt: skip
        err.print(
            f"deployed update.tar ({len(package)} bytes: app.bin NSPE 1.1.0 -> image 0, "
            f"spe.bin SPE 2.1.0 -> image 1) as deployment {deployment}"
        )
        rows = []
        for number in range(devices):
            role = "power-cut" if number == 0 else "plain"
            if number == devices - 1:
                role = "never-confirms"
            serial = f"DEMO-PKG-{number + 1:02d}"
            rows.append(_package_device(work, url, enroll, serial, key, app1, sec1, role))
            err.print(f"{serial}: {rows[-1].outcome}")
        table = Table(
            title=f"{devices} devices, {time.monotonic() - started:.1f} s", title_justify="left"
        )
        for column in ("device", "image 0", "image 1", "outcome"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(row.serial, *row.running, row.outcome)
        err.print()
        err.print(table)
        if keep:
            err.print(f"server still running on {url}/ (Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                server.proc.wait()
        return 0 if all(row.ok for row in rows) else 1
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _command(*args: str) -> str:
    """Run an otakit command; its output, or DemoError with its message."""
    done = subprocess.run(_otakit(*args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DemoError(f"otakit {args[0]} failed: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()
