"""MQTT image delivery: otakit's publisher next to a stop-and-wait sender, same broker, same run.

Both senders run as their own processes on one Mosquitto started here, and answer the same
devices' "Request Update" (protocols.md §3) with the same 4 KiB chunks (32-byte header + data),
QoS 1, on each device's unique topic:

- **otakit**: ``otakit publisher -f IMAGE`` (asyncio, one connection, a window of 16 chunks per
  transfer not yet acknowledged, every device in parallel);
- **reference**: what the original ``publisher.py`` does, without its 0.1 s polling sleeps: a
  thread and a new connection per request, each chunk published only after the broker's PUBACK
  for the previous one (``paho`` ``wait_for_publish``). This script runs it as
  ``--reference-sender``.

Devices are paho clients in this process (one connection each, subscribed to their unique
topic beforehand). A cell's time runs from just before the devices send "Request Update" to
the moment every device holds every chunk; each device's image is checked byte for byte.
Cells, 1 MiB per device:

- ``nodelay``: a broker with ``set_tcp_nodelay true`` (what docs/mqtt.md recommends), senders on
  loopback; 1 device and 100 devices at once;
- ``rtt-10ms``: the same broker, but the senders reach it through a proxy (in this script) that
  delays every byte by 5 ms each way, as a publisher in another data centre; 1 and 10 devices;
- ``defaults``: Mosquitto's default settings (``set_tcp_nodelay false``), as most brokers run;
  1 and 100 devices.

Run: ``.venv/bin/python bench/mqtt_bench.py [--quick] [--results DIR]`` (about 2 minutes).
Prints a markdown table and writes ``bench/results/mqtt.json`` (``--quick``: one run per cell,
``nodelay`` only, ``mqtt-quick.json``). ``--smoke --results DIR`` is the smallest run that still
goes through every step (``--quick`` with 1 and 2 devices instead of 1 and 100), written as
``DIR/mqtt-quick.json``: ``make test`` runs it (tests/test_bench_smoke.py) to check that the
script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

BENCH = Path(__file__).parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))  # the test harness's Mosquitto (tests/mqtt_harness.py)

from tests.mqtt_harness import Broker, make_tls  # noqa: E402
from tests.server_harness import free_port  # noqa: E402

sys.path.insert(0, str(BENCH))
from server_bench import add_smoke_options, check_smoke  # noqa: E402

import otakit  # noqa: E402
from otakit.protocol import mqtt  # noqa: E402
from otakit.protocol.version import FirmwareVersion  # noqa: E402

IMAGE_SIZE = 1024 * 1024
VERSION = "2.0.0"
KIT = "CY8CPROTO_062_4343W"
WIRE_KIT = "APP_" + KIT
COMPANY = "OTAUpdate"
HEADER = struct.Struct("<8s5H2I3H")
WAIT_S = 300.0  # a cell that takes longer than this is a failure, not a number
REFERENCE_CLIENT_IDS = "ref"


class BenchError(Exception):
    """A step failed; the message says which."""


# --- the broker ---------------------------------------------------------------------------------


class TunedBroker(Broker):
    """The test harness's Mosquitto, optionally with TCP_NODELAY on its sockets."""

    nodelay: bool = False

    def config(self) -> Path:
        path = super().config()
        if self.nodelay:
            path.write_text("set_tcp_nodelay true\n" + path.read_text())
        return path


@contextmanager
def broker(nodelay: bool) -> Iterator[Broker]:
    # Mosquitto started as root drops to its own user: the folder must be readable by it.
    folder = Path(tempfile.mkdtemp(prefix="otakit-mqtt-bench-"))
    folder.chmod(0o755)
    running = TunedBroker(
        folder=folder,
        port=free_port(),
        tls_port=free_port(),
        mtls_port=free_port(),
        tls=make_tls(folder / "tls"),
    )
    running.nodelay = nodelay
    try:
        yield running.start()
    finally:
        running.stop()
        shutil.rmtree(folder, ignore_errors=True)


class DelayProxy:
    """A TCP proxy on loopback that delays every byte by ``delay`` seconds in each direction,
    without limiting bandwidth (bytes queue with their due time, in order)."""

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay = target, delay
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise BenchError("the delay proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await pending.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(256 * 1024):
                pending.put_nowait((loop.time() + self.delay, data))
        finally:
            pending.put_nowait(None)
            await delivering

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# --- devices ------------------------------------------------------------------------------------


class Device:
    """A device on the wire: its unique topic, and the chunks it receives (by index)."""

    def __init__(self, port: int, number: int) -> None:
        self.unique = f"{COMPANY}/{WIRE_KIT}/OTAImage/{number}"
        self.chunks: dict[int, bytes] = {}
        self.total: int | None = None
        self.done = threading.Event()
        self._subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:12]}")
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.connect("127.0.0.1", port, keepalive=60)
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        client.subscribe(self.unique, qos=1)
        if not self._subscribed.wait(30):
            raise BenchError(f"device {number} could not subscribe")
        self.client = client

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        fields = HEADER.unpack_from(message.payload)
        if fields[0] != b"OTAImage":
            return
        self.total = fields[9]
        self.chunks[fields[10]] = bytes(message.payload[fields[1] :])
        if len(self.chunks) == self.total:
            self.done.set()

    def reset(self) -> None:
        self.chunks, self.total = {}, None
        self.done.clear()

    def request(self) -> None:
        text = (
            '{"Message": "Request Update", "Manufacturer": "Bench", "ManufacturerID": "B", '
            f'"ProductID": "bench", "SerialNumber": "{self.unique.rsplit("/", 1)[1]}", '
            f'"BoardName": "{WIRE_KIT}", "Version": "1.0.0", "UniqueTopicName": "{self.unique}"'
            "}"
        )
        self.client.publish(f"{COMPANY}/{WIRE_KIT}/{mqtt.NOTIFY}", text, qos=1)

    def image(self) -> bytes:
        assert self.total is not None
        return b"".join(self.chunks[i] for i in range(self.total))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def close_all(devices: list[Device]) -> None:
    for device in devices:
        device.close()


# --- the two senders ----------------------------------------------------------------------------


class Sender:
    """A sender process; ready once it printed its "listening" line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.log: list[str] = []
        ready: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if "listening on" in line:
                    ready.put(line)
            ready.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = ready.get(timeout=60)
        except queue.Empty:
            line = None
        if line is None:
            self.stop()
            raise BenchError(f"{argv[0]} did not start:\n{''.join(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def otakit_sender(port: int, image: Path) -> Sender:
    return Sender(
        [str(BIN / "otakit"), "publisher", "-f", str(image), "--version", VERSION, "-k", KIT,
         "--port", str(port)]
    )  # fmt: skip


def reference_sender(port: int, image: Path) -> Sender:
    return Sender(
        [sys.executable, __file__, "--reference-sender", "--port", str(port), "--image", str(image)]
    )


def run_reference_sender(port: int, image: Path) -> int:
    """Stop-and-wait, a thread and a connection per request, like the original publisher."""
    data = image.read_bytes()
    version = FirmwareVersion.parse(VERSION)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def send(topic: str) -> None:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{REFERENCE_CLIENT_IDS}-{uuid.uuid4().hex[:12]}",
        )
        client.connect("127.0.0.1", port, keepalive=60)
        client.loop_start()
        try:
            for chunk in mqtt.range_chunks(data, version, 0, -1):
                client.publish(topic, chunk, qos=1).wait_for_publish(60)
        finally:
            client.disconnect()
            client.loop_stop()

    def on_message(_client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        request = json.loads(message.payload)
        if request.get("Message") == mqtt.REQUEST_UPDATE:
            threading.Thread(target=send, args=(request["UniqueTopicName"],), daemon=True).start()

    subscribed = threading.Event()
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{REFERENCE_CLIENT_IDS}-listen")
    listener.on_message = on_message
    listener.on_subscribe = lambda *_: subscribed.set()
    listener.connect("127.0.0.1", port, keepalive=60)
    listener.loop_start()
    listener.subscribe(mqtt.notify_filter(COMPANY), qos=1)
    subscribed.wait(30)
    print("reference sender listening on", port, file=sys.stderr, flush=True)
    stop.wait()
    listener.disconnect()
    listener.loop_stop()
    return 0


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Cell:
    broker: str  # "nodelay" or "defaults"
    devices: int
    sender: str  # "otakit" or "reference"
    runs: list[float]
    median_s: float = 0.0
    mib_per_s: float = 0.0  # all devices' bytes together
    vs_reference: float | None = None  # reference time / otakit time (how many times faster)


def measure(fleet: list[Device], data: bytes) -> float:
    for device in fleet:
        device.reset()
    started = time.perf_counter()
    for device in fleet:
        device.request()
    deadline = started + WAIT_S
    for device in fleet:
        if not device.done.wait(max(0.0, deadline - time.perf_counter())):
            raise BenchError(f"{device.unique} got {len(device.chunks)} of {device.total} chunks")
    elapsed = time.perf_counter() - started
    for device in fleet:
        if device.image() != data:
            raise BenchError(f"{device.unique} reassembled a different image")
    return elapsed


def run_cells(
    name: str,
    image: Path,
    data: bytes,
    counts: tuple[int, ...],
    repeats: dict[str, int],
    *,
    nodelay: bool = True,
    delay: float = 0.0,
) -> list[Cell]:
    cells: list[Cell] = []
    with broker(nodelay) as running, ExitStack() as stack:
        sender_port = running.port
        if delay:
            proxy = DelayProxy(running.port, delay)
            stack.callback(proxy.close)
            sender_port = proxy.port
        fleets: dict[int, list[Device]] = {}
        numbers = iter(range(1, 1_000_000))
        for count in counts:
            fleets[count] = [Device(running.port, next(numbers)) for _ in range(count)]
            stack.callback(close_all, fleets[count])
        for sender_name, start in (("otakit", otakit_sender), ("reference", reference_sender)):
            sender = start(sender_port, image)
            try:
                for count in counts:
                    runs = []
                    for _ in range(repeats[sender_name]):
                        runs.append(measure(fleets[count], data))
                        print(
                            f"  {name:9} {sender_name:9} {count:3} device(s): {runs[-1]:.3f} s",
                            file=sys.stderr,
                        )
                    median = statistics.median(runs)
                    cells.append(
                        Cell(
                            name,
                            count,
                            sender_name,
                            [round(r, 4) for r in runs],
                            round(median, 4),
                            round(count * len(data) / 2**20 / median, 1),
                        )
                    )
            finally:
                sender.stop()
    for cell in cells:
        if cell.sender == "otakit":
            ref = next(c for c in cells if c.sender == "reference" and c.devices == cell.devices)
            cell.vs_reference = round(ref.median_s / cell.median_s, 1)
    return cells


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    mosquitto = subprocess.run(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "otakit": otakit.__version__,
        "paho-mqtt": version("paho-mqtt"),
        "aiomqtt": version("aiomqtt"),
        "mosquitto": (mosquitto.stdout.splitlines() or ["unknown"])[0].removeprefix(
            "mosquitto version "
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="One run per cell, tuned broker only.")
    add_smoke_options(
        parser, "--quick with 1 and 2 devices", "Folder for the JSON (bench/results)."
    )
    parser.add_argument("--reference-sender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_sender:
        return run_reference_sender(args.port, args.image)
    check_smoke(parser, args)
    quick = args.quick or args.smoke
    many = 2 if args.smoke else 100  # devices at once in the nodelay cells
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2

    data = os.urandom(IMAGE_SIZE)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="otakit-mqtt-image-") as folder:
        image = Path(folder) / "ota-update.bin"
        image.write_bytes(data)
        Path(folder).chmod(0o755)
        print("broker with set_tcp_nodelay true:", file=sys.stderr)
        repeats = {"otakit": 1, "reference": 1} if quick else {"otakit": 5, "reference": 3}
        cells += run_cells("nodelay", image, data, (1, many), repeats)
        if not quick:
            print("senders 10 ms (round trip) away from the broker:", file=sys.stderr)
            cells += run_cells("rtt-10ms", image, data, (1, 10), repeats, delay=0.005)
            print("broker with Mosquitto's defaults:", file=sys.stderr)
            once = {"otakit": 3, "reference": 1}
            cells += run_cells("defaults", image, data, (1, 100), once, nodelay=False)

    print(
        "| broker | devices | otakit s | reference s | otakit MiB/s | reference MiB/s | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for cell in cells:
        if cell.sender != "otakit":
            continue
        ref = next(
            c
            for c in cells
            if (c.sender, c.broker, c.devices) == ("reference", cell.broker, cell.devices)
        )
        print(
            f"| {cell.broker} | {cell.devices} x 1 MiB | {cell.median_s:.3f} | "
            f"{ref.median_s:.3f} | {cell.mib_per_s} | {ref.mib_per_s} | {cell.vs_reference}x |"
        )
    nodelay = {
        c.devices: c.median_s for c in cells if (c.sender, c.broker) == ("otakit", "nodelay")
    }
    goals = {}  # the goals of the cells this run measured (--smoke has no 100-device cell)
    if 1 in nodelay:
        goals["1 MiB to one device under 0.5 s"] = nodelay[1] < 0.5
    if 100 in nodelay:
        goals["1 MiB to each of 100 devices under 10 s"] = nodelay[100] < 10
    for goal, met in goals.items():
        print(f"{goal}: {'met' if met else 'NOT met'}")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / ("mqtt-quick.json" if quick else "mqtt.json")
    report = {
        "machine": machine(),
        "settings": {
            "smoke": args.smoke,
            "image_bytes": IMAGE_SIZE,
            "chunk_bytes": mqtt.CHUNK_SIZE,
            "window": 16,
            "qos": mqtt.QOS,
            "repeats": "otakit 1 / reference 1"
            if quick
            else "otakit 5 / reference 3 (defaults broker: 3 / 1); median reported",
            "rtt-10ms": "senders behind a proxy delaying each direction by 5 ms",
        },
        "goals": goals,
        "cells": [asdict(c) for c in cells],
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
