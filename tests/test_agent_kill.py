"""Acceptance: the agent process is killed (SIGKILL) at random points of a download and the
flash loses power mid-download; every next run resumes from the journal, and at most the one
range in flight at each interruption is fetched twice.

The agent is the real ``otakit sim run`` command in a subprocess, talking to a real server on
loopback through a :class:`~tests.faultproxy.FaultProxy` that injects no fault: it only counts
the bytes (to kill the agent once the download has passed a threshold, without sleeping) and
records the requests (to see which byte ranges were asked for, and how often).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from otakit.sim.agent import JOURNAL_FILE
from otakit.sim.device import SimDevice

from .faultproxy import FaultProxy, ProxyStats, Request
from .server_harness import Server

# The fixtures and helpers of the agent's end-to-end tests: importing them runs none of its tests.
from .test_agent import Setup, image, server, setup

__all__ = ["server", "setup"]  # fixtures: used by name

OTAKIT = Path(sys.executable).parent / "otakit"
CHUNK = 4096  # the agent's default range size
IMAGE_SIZE = 360_000
SEED = 20240611
KILL = "kill"
CUT = "cut"
PLAN = (KILL, KILL, CUT, KILL)  # then one run to the end
WAIT = 30.0  # seconds; a run that needs this long has hung


@dataclass
class Interrupted:
    how: str  # KILL or CUT
    detail: str  # the threshold (kill) or the flash operations allowed (cut)
    requests: list[Request]  # the run's requests, in order
    durable: int  # the journal's durable bytes after the interruption


def journal(device_dir: Path) -> dict[str, Any]:
    path = device_dir / JOURNAL_FILE
    assert path.exists(), f"no journal in {device_dir}: the interruption did not land mid-download"
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def refetched(ranges: list[tuple[int, int]], size: int) -> list[int]:
    """For each range, the bytes of it some earlier range already fetched."""
    seen = bytearray(size)
    overlaps = []
    for first, last in ranges:
        end = min(last, size - 1) + 1
        overlaps.append(sum(seen[first:end]))
        seen[first:end] = b"\x01" * (end - first)
    return overlaps


def test_agent_resumes_after_sigkill_and_power_cut(
    setup: Setup, server: Server, tmp_path: Path, report: Callable[[str], None]
) -> None:
    data = image("2.0.0", IMAGE_SIZE)
    setup.deploy(data)
    device = setup.device()
    rng = random.Random(SEED)
    target = ("127.0.0.1", int(urlsplit(server.url).port or 0))
    runs: list[Interrupted] = []
    with FaultProxy(target, seed=SEED) as proxy:  # no fault: counts and records only

        def start(n: int, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
            token = ["--token", setup.enroll] if n == 0 else []  # then the device's own token
            log = tmp_path / f"run-{n}.log"
            argv = [str(OTAKIT), "sim", "run", str(device.dir), "--server", proxy.url, "--once"]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [*argv, "--chunk-size", str(CHUNK), *token, *extra],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            return proc, log

        for n, how in enumerate(PLAN):
            mark = len(proxy.requests())
            before = proxy.stats.bytes_down
            if how == KILL:
                # somewhere in the next 6 to 16 ranges of this run (job document included)
                threshold = before + rng.randint(6 * CHUNK, 16 * CHUNK)
                proc, log = start(n)

                def passed(
                    s: ProxyStats, t: int = threshold, p: subprocess.Popen[bytes] = proc
                ) -> bool:
                    return s.bytes_down >= t or p.poll() is not None

                reached = proxy.wait_until(passed, timeout=WAIT)
                proc.send_signal(signal.SIGKILL)  # nothing happens if it has already exited
                proc.wait(timeout=WAIT)
                assert reached, f"run {n}: {threshold - before} bytes not reached in {WAIT} s"
                assert proc.returncode == -signal.SIGKILL, (
                    f"run {n} ended by itself before the kill ({proc.returncode}):\n"
                    + log.read_text()
                )
                detail = f"killed after {threshold - before} bytes"
            else:
                # the flash loses power in the write of range 6 to 16 of this (resumed) run
                allowed = rng.randint(5, 15)
                proc, log = start(n, "--power-cut-after", str(allowed))
                proc.wait(timeout=WAIT)
                output = log.read_text()
                assert proc.returncode == 1, output
                assert "POWER_CUT" in output, output
                detail = f"power cut after {allowed} flash operations"
            assert proxy.wait_idle(timeout=WAIT)  # every byte it sent is recorded
            state = journal(device.dir)
            assert 0 < state["durable"] < len(data), state
            if how == CUT:
                # a resumed run does one flash operation per range (no erase): the cut tore the
                # write of range allowed + 1, and the journal kept the ranges before it
                assert state["durable"] == runs[-1].durable + allowed * CHUNK, state
            runs.append(Interrupted(how, detail, proxy.requests()[mark:], state["durable"]))

        mark = len(proxy.requests())
        proc, log = start(len(PLAN))
        assert proc.wait(timeout=WAIT) == 0, log.read_text()
        assert proxy.wait_idle(timeout=WAIT)
        final = proxy.requests()[mark:]

    # the device runs the new image, byte for byte, and the download is over
    assert "updated to 2.0.0" in log.read_text()
    assert SimDevice(device.dir).status()["slots"][0]["running"] == "2.0.0+0"
    with device.bootloader() as boot:
        assert boot.primary().read_at(0, len(data)) == data
    assert not (device.dir / JOURNAL_FILE).exists()

    # every range went to the image the journal named, through the proxy
    source = urlsplit(state["download"]["source"])
    assert (source.port, state["download"]["size"]) == (proxy.port, len(data))
    every_run = [*(r.requests for r in runs), final]
    ranged = [[q for q in requests if q.range is not None] for requests in every_run]
    assert all(q.path == source.path and q.method == "GET" for r in ranged for q in r)

    # each run after an interruption starts where the journal says, never from zero
    assert ranged[0][0].range == (0, CHUNK - 1)
    for n, run in enumerate(runs):
        resumed = ranged[n + 1][0].range
        assert resumed is not None
        assert resumed[0] == run.durable > 0, (n, run.detail)

    # bytes fetched twice: at most the one range in flight at each interruption
    ranges = [q.range for r in ranged for q in r if q.range is not None]
    overlaps = refetched(ranges, len(data))
    starts = [sum(len(r) for r in ranged[:n]) for n in range(len(ranged))]
    per_run = [sum(overlaps[s : s + len(r)]) for s, r in zip(starts, ranged, strict=True)]
    assert per_run[0] == 0
    assert all(twice <= CHUNK for twice in per_run), per_run
    assert sum(per_run) <= CHUNK * len(PLAN), per_run
    fetched = sum(min(last, len(data) - 1) - first + 1 for first, last in ranges)
    assert fetched - sum(overlaps) == len(data)  # the rest covers the image exactly once

    for n, run in enumerate(runs):
        report(
            f"agent kill: run {n} {run.detail}: durable {run.durable}; "
            f"next run fetched {per_run[n + 1]} bytes twice"
        )
    report(f"agent kill: {sum(per_run)} bytes fetched twice over {len(PLAN)} interruptions")
