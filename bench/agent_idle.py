"""The device agent's idle memory: between check-ins, with nothing to update.

A real ``otakit serve`` (SQLite, one worker) runs on loopback, started here; a product and an
enrollment token are made for it. The agent then runs as a Linux gateway would (``[storage]
kind = "gateway"``: a littlefs file system in a flash file, a programmer command that is never
called), twice, side by side: as ``otakit-agent`` (the agent alone, what
packaging/otakit-agent.service starts) and as ``otakit agent run`` (the same code under the
whole ``otakit`` command line: Typer and every command module). Each enrolls on its first
check-in and checks every 5 s (the shortest interval a configuration allows). After
``--checkins`` check-ins answered "no update" (read from its log, one ``AGENT_WAITING: no
update`` line per check-in), its memory is read from
``/proc/PID/smaps_rollup``: RSS (resident, shared libraries included), USS (private pages only:
what the process itself costs; Private_Clean + Private_Dirty) and PSS.

References, measured the same way in the same run, each an idle process waiting on its stdin:
``python`` with nothing imported (the interpreter's floor), and ``python`` with ``import httpx``
and one ``httpx.Client`` made (the HTTP client the agent is built on: the floor of any Python
agent that speaks HTTPS). The table gives the agent's figures and its ratio to each.

Caveats: RSS counts shared pages (libpython, libssl) in full; USS is the better figure for
"what one more agent costs". The agent's numbers include whatever its first check-ins allocated
(the enrollment, an HTTP connection, the littlefs mount).

A development venv holds packages a gateway would not have (the test tools bring trio, which
httpcore then imports at the first request): ``--venv DIR`` measures the agent of another
install, e.g. one made with ``python3 -m venv DIR && DIR/bin/pip install -e '.[agent]'``; the
server still runs from this one. The JSON lists the measured install's distributions.

Run: ``.venv/bin/python bench/agent_idle.py [--checkins N] [--venv DIR] [--results DIR]`` (about
40 s). Prints a markdown table and writes ``bench/results/agent_idle.json``. ``--smoke --results DIR``
waits for one check-in only (tests/test_bench_smoke.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from server_bench import (  # noqa: E402 - the same server start-up as the server benchmark
    BIN,
    BenchError,
    _ok,
    _stop,
    add_smoke_options,
    check_smoke,
    otakit_server,
)

import otakit  # noqa: E402

PRODUCT, GROUP, BOARD, SERIAL = "idle-product", "idle-group", "BOARD_IDLE", "GW-IDLE"
LEAN = "otakit-agent"
COMMANDS = {  # the two ways to run the agent, each measured
    LEAN: [LEAN],  # the agent alone (otakit.agent_command)
    "otakit agent run": ["otakit", "agent", "run"],  # the whole otakit command line
}
CHECKED = "AGENT_WAITING: no update"
KIB = 1024
REFERENCES = {
    "python (nothing imported)": "import sys; sys.stdin.read()",
    "python + httpx.Client": "import sys, httpx; c = httpx.Client(); sys.stdin.read()",
}


def memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS of ``pid`` in bytes, from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * KIB
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def reference(venv: Path, code: str) -> dict[str, int]:
    """Memory of ``python -c code`` once it waits on its stdin (it says so on stdout first)."""
    ready = code.replace("sys.stdin.read()", "print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen(
        [str(venv / "bin" / "python"), "-c", ready],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise BenchError(f"the reference {code!r} did not start")
        return memory(proc.pid)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        _stop(proc)


def agent_config(folder: Path, server: str, token: str, serial: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "agent.toml"
    path.write_text(
        f"""[agent]
server = "{server}"
token = "{token}"

[identity]
serial = "{serial}"
board = "{BOARD}"
product = "{PRODUCT}"
version = "1.0.0"

[timing]
initial_check = 5
next_check = 5

[logging]
level = "info"

[storage]
kind = "gateway"
path = "{folder / "gateway-flash.bin"}"
fs_size = 1048576
program = ["true", "{{file}}"]
"""
    )
    return path


@contextmanager
def agent(
    venv: Path, command: list[str], config: Path
) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None]]]:
    """``command`` (``otakit-agent`` or ``otakit agent run``) of ``venv`` on ``config``; its
    stderr lines arrive on the queue."""
    proc = subprocess.Popen(
        [str(venv / "bin" / command[0]), *command[1:], "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        yield proc, lines
    finally:
        _stop(proc)


def wait_for_checkins(lines: queue.Queue[str | None], count: int, log: list[str]) -> None:
    deadline = time.monotonic() + 30 + 10 * count
    seen = 0
    while seen < count:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"the agent did not check in {count} times:\n{''.join(log)}") from None
        if line is None:
            raise BenchError(f"the agent exited:\n{''.join(log)}")
        log.append(line)
        if " ERROR " in line:
            raise BenchError(f"the agent logged an error:\n{''.join(log)}")
        if CHECKED in line:
            seen += 1


def measure(venv: Path, checkins: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="agent-idle-") as tmp:
        folder = Path(tmp)
        with otakit_server(folder / "server", None, 1) as server:
            admin = httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {server.admin}"}
            )
            _ok(admin.put(f"/api/v1/products/{PRODUCT}", json={"board": BOARD}), 200, 201)
            enroll = ["--role", "enroll", "--product", PRODUCT, "--group", GROUP]
            made = subprocess.run(
                [str(BIN / "otakit"), "token", "create", "--data", str(folder / "server"), *enroll],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            tokens = [w for w in made.stdout.split() if w.startswith("otk_")]
            if made.returncode != 0 or not tokens:
                raise BenchError(f"otakit token create failed: {made.stderr}")
            agents = {}
            serials = {name: f"{SERIAL}-{n}" for n, name in enumerate(COMMANDS)}
            with ExitStack() as running:  # both agents at once: their first check-in waits 5 s
                started = {
                    name: running.enter_context(
                        agent(
                            venv,
                            command,
                            agent_config(
                                folder / serials[name], server.url, tokens[0], serials[name]
                            ),
                        )
                    )
                    for name, command in COMMANDS.items()
                }
                for name, (proc, lines) in started.items():
                    wait_for_checkins(lines, checkins, [])
                    agents[name] = memory(proc.pid)
            for serial in serials.values():
                device = _ok(admin.get(f"/api/v1/devices/{serial}"), 200).json()
                if device.get("serial") != serial:
                    raise BenchError(f"the server does not know the agent's device: {device}")
    references = {name: reference(venv, code) for name, code in REFERENCES.items()}
    return {"checkins": checkins, "agents": agents, "references": references}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def installed(venv: Path) -> list[str]:
    """The distributions installed in ``venv`` (what the agent could have imported)."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return sorted(line for line in done.stdout.splitlines() if "==" in line)


def table(result: dict[str, Any]) -> str:
    agent_memory = result["agents"][LEAN]
    rows = [
        f"| process | RSS MiB | USS MiB | PSS MiB | {LEAN} RSS / it | {LEAN} USS / it |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    processes = {**{f"{n} (idle)": m for n, m in result["agents"].items()}, **result["references"]}
    for name, m in processes.items():
        rows.append(
            f"| {name} | {m['rss'] / 2**20:.1f} | {m['uss'] / 2**20:.1f} | {m['pss'] / 2**20:.1f}"
            f" | {agent_memory['rss'] / m['rss']:.2f}x | {agent_memory['uss'] / m['uss']:.2f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkins", type=int, default=3, help="check-ins before measuring (3)")
    parser.add_argument(
        "--venv",
        type=Path,
        default=BIN.parent,
        help="the install whose agent (and python, for the references) is measured, e.g. a "
        "venv with only `pip install 'otakit[agent]'` (default: this one; the server always "
        "runs from this one)",
    )
    add_smoke_options(
        parser, "one check-in, writes agent_idle.json", "folder for the JSON (bench/results)"
    )
    args = parser.parse_args(argv)
    check_smoke(parser, args)
    checkins = 1 if args.smoke else args.checkins
    if checkins < 1:
        parser.error("--checkins must be 1 or more")
    try:
        result = measure(args.venv.absolute(), checkins)
    except BenchError as exc:
        print(f"agent_idle: {exc}", file=sys.stderr)
        return 1
    result["otakit"] = otakit.__version__
    result["python"] = platform.python_version()
    result["venv"] = str(args.venv)
    result["installed"] = installed(args.venv)
    result["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "agent_idle.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"Agent idle memory after {checkins} check-in(s), Python {result['python']}, "
        f"{args.venv} ({len(result['installed'])} distributions)\n"
    )
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
