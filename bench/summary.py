"""One page of every benchmark's figures, each next to the reference measured in the same run.

Reads ``bench/results/*.json`` (``flash_wear``, ``agent``, ``agent_idle``, ``mqtt``, ``server``, ``fleet*``,
``scale*``) and writes ``bench/results/summary.md``: one markdown table per benchmark, the ratio
to the reference in its own column, and for each the file it came from, when that file was
written and the machine it names. Of ``server.json`` and ``server-quick.json`` (and of ``mqtt.json`` and
``mqtt-quick.json``) the newer one is shown; every fleet file is shown, one row each. A missing
file leaves its section out, with a line saying which command makes it.

Run: ``.venv/bin/python bench/summary.py [--results DIR]`` (``make bench`` runs it last): with
``--results``, reads ``DIR/*.json`` and writes ``DIR/summary.md`` instead (``make test`` does so
on the smoke runs' results, tests/test_bench_smoke.py). Prints the page too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


def _load(results: Path, name: str) -> tuple[Any, Path] | None:
    path = results / name
    if not path.exists():
        return None
    return json.loads(path.read_text()), path


def _newest(results: Path, *names: str) -> tuple[Any, Path] | None:
    found = [p for p in (results / n for n in names) if p.exists()]
    if not found:
        return None
    path = max(found, key=lambda p: p.stat().st_mtime)
    return json.loads(path.read_text()), path


def _when(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


def _source(path: Path, data: Any) -> str:
    machine = data.get("machine", {}) if isinstance(data, dict) else {}
    about = f"`{path.name}`, written {_when(path)}"
    if machine:
        about += f"; {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
    return about


def _x(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}x" if value is not None else "-"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // 1024} KiB"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


# --- sections ----------------------------------------------------------------------------------


def flash_wear(results: Path) -> list[str]:
    loaded = _load(results, "flash_wear.json")
    if loaded is None:
        return ["*No `flash_wear.json`: run `.venv/bin/python bench/flash_wear.py`.*"]
    rows_in, path = loaded
    reference = {(r["layout"], r["image_kib"]): r for r in rows_in if r["strategy"] == "overwrite"}
    rows = []
    for r in rows_in:
        ref = reference.get((r["layout"], r["image_kib"]))
        rows.append(
            [
                r["layout"],
                r["strategy"],
                r["scenario"],
                str(r["image_kib"]),
                str(r["erases"]),
                str(r["writes"]),
                str(r["max_erases_per_sector"]),
                str(ref["erases"]) if ref else "-",
                str(ref["writes"]) if ref else "-",
                _x(_ratio(r["erases"], ref["erases"] if ref else None)),
            ]
        )
    head = [
        "layout",
        "strategy",
        "scenario",
        "image KiB",
        "erases",
        "writes",
        "max erases/sector",
        "overwrite erases",
        "overwrite writes",
        "erases vs overwrite",
    ]
    return [
        f"Reference: an overwrite-only upgrade of the same image on the same layout. "
        f"From `{path.name}`, written {_when(path)}.",
        "",
        *_table(head, rows),
    ]


def agent(results: Path) -> list[str]:
    loaded = _load(results, "agent.json")
    if loaded is None:
        return ["*No `agent.json`: run `.venv/bin/python bench/agent_bench.py`.*"]
    data, path = loaded
    load = data.get("load_average") or {}
    rows = []
    for c in data["cells"]:
        a, r, vs = c["agent"], c["curl"], c["vs_curl"] or {}
        rows.append(
            [
                _size(c["image_bytes"]),
                _size(c["chunk_bytes"]),
                f"{1000 * a['cpu_s_per_mib']:.1f}",
                f"{1000 * r['cpu_s_per_mib']:.2f}" if r else "-",
                _x(vs.get("cpu"), 1),
                _x(vs.get("http_cpu"), 1),
                f"{a['tracemalloc_peak_mib']:.2f}",
                f"{a['tracemalloc_peak_mib_per_mib']:.3f}",
                f"{a['rss_growth_mib']:.1f}",
                str(a["mib_per_s"]),
                str(r["mib_per_s"]) if r else "-",
            ]
        )
    head = [
        "image",
        "chunk",
        "agent CPU ms/MiB",
        "curl CPU ms/MiB",
        "agent vs curl",
        "agent w/o storage+verify vs curl",
        "agent peak MiB",
        "peak per MiB",
        "RSS growth MiB",
        "agent MiB/s",
        "curl MiB/s",
    ]
    reference = (
        "curl fetching the same URL with the same ranges on one connection"
        if data["settings"].get("reference")
        else "none (curl was missing): absolute numbers only"
    )
    return [
        f"`update_once` (HttpTransport, SlotStorage on an in-memory flash) against `otakit "
        f"serve` (SQLite). Reference: {reference}. From {_source(path, data)}; load average "
        f"{load.get('before')} before, {load.get('after')} after.",
        "",
        *_table(head, rows),
    ]


def agent_idle(results: Path) -> list[str]:
    loaded = _load(results, "agent_idle.json")
    if loaded is None:
        return ["*No `agent_idle.json`: run `.venv/bin/python bench/agent_idle.py`.*"]
    data, path = loaded
    idle = data["agents"]["otakit-agent"]
    rows = []
    agents = {f"`{name}`, idle": m for name, m in data["agents"].items()}
    for name, m in {**agents, **data["references"]}.items():
        rows.append(
            [
                name,
                f"{m['rss'] / MIB:.1f}",
                f"{m['uss'] / MIB:.1f}",
                _x(_ratio(idle["rss"], m["rss"])),
                _x(_ratio(idle["uss"], m["uss"])),
            ]
        )
    head = ["process", "RSS MiB", "USS MiB", "otakit-agent RSS vs it", "USS vs it"]
    return [
        f"A gateway's agent after {data['checkins']} check-in(s) with nothing to update, "
        f"against `otakit serve` on loopback, from the install `{data.get('venv', '?')}` "
        f"({len(data.get('installed', []))} distributions). References: idle Python processes "
        f"of the same install. From {_source(path, data)}.",
        "",
        *_table(head, rows),
    ]


def mqtt(results: Path) -> list[str]:
    loaded = _newest(results, "mqtt.json", "mqtt-quick.json")
    if loaded is None:
        return ["*No `mqtt.json`: run `make bench-mqtt`.*"]
    data, path = loaded
    cells = data["cells"]
    reference = {(c["broker"], c["devices"]): c for c in cells if c["sender"] == "reference"}
    rows = []
    for c in cells:
        if c["sender"] != "otakit":
            continue
        ref = reference.get((c["broker"], c["devices"]))
        rows.append(
            [
                c["broker"],
                str(c["devices"]),
                f"{c['median_s']:.3f}",
                f"{c['mib_per_s']}",
                f"{ref['median_s']:.3f}" if ref else "-",
                f"{ref['mib_per_s']}" if ref else "-",
                _x(_ratio(ref["median_s"], c["median_s"]) if ref else None, 1),
            ]
        )
    head = [
        "broker",
        "devices",
        "otakit s",
        "otakit MiB/s",
        "wait-for-each-ack s",
        "wait-for-each-ack MiB/s",
        "speed-up",
    ]
    goals = data.get("goals", {})
    lines = [
        f"1 MiB to each device. Reference: a sender that waits for each PUBACK, same broker, "
        f"same run. From {_source(path, data)}.",
        "",
        *_table(head, rows),
    ]
    if goals:
        lines += [
            "",
            "Goals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()),
        ]
    return lines


def server(results: Path) -> list[str]:
    loaded = _newest(results, "server.json", "server-quick.json")
    if loaded is None:
        return ["*No `server.json`: run `make bench-server`.*"]
    data, path = loaded
    cells = data["cells"]
    nginx = {
        (c["workers"], c["workload"], c["range_bytes"]): c for c in cells if c["server"] == "nginx"
    }

    def order(c: dict[str, Any]) -> tuple[int, int, str]:
        return (c["range_bytes"] or 0, c["workers"], c["database"])

    otakit = sorted((c for c in cells if c["server"] == "otakit"), key=order)
    checkins, ranges = [], []
    for c in otakit:
        ref = nginx.get((c["workers"], c["workload"], c["range_bytes"]))
        errors = sum(c["errors"].values())
        if c["workload"] == "checkin":
            checkins.append(
                [
                    c["database"],
                    str(c["workers"]),
                    _num(c["req_per_s"]),
                    _num(ref["req_per_s"]) if ref else "-",
                    _x(_ratio(c["req_per_s"], ref["req_per_s"] if ref else None), 3),
                    f"{c['p50_ms']:.2f} / {ref['p50_ms']:.2f}" if ref else f"{c['p50_ms']:.2f}",
                    f"{c['p99_ms']:.2f} / {ref['p99_ms']:.2f}" if ref else f"{c['p99_ms']:.2f}",
                    str(errors),
                ]
            )
        else:
            mine = c["payload_bytes_per_s"] / MIB
            theirs = ref["payload_bytes_per_s"] / MIB if ref else None
            ranges.append(
                [
                    c["database"],
                    str(c["workers"]),
                    _size(c["range_bytes"]),
                    _num(mine, 1 if mine < 100 else 0),
                    _num(theirs, 1 if theirs < 100 else 0) if theirs is not None else "-",
                    _x(_ratio(mine, theirs), 3),
                    f"{c['p99_ms']:.2f} / {ref['p99_ms']:.2f}" if ref else f"{c['p99_ms']:.2f}",
                    str(errors),
                ]
            )
    settings = data.get("settings", {})
    return [
        f"otakit serve next to nginx with the same worker count, loaded by wrk "
        f"({settings.get('threads')} threads, {settings.get('connections')} connections, "
        f"{settings.get('duration_s')} s per cell). From {_source(path, data)}.",
        "",
        "Check-ins: otakit `POST /api/v1/device/checkin` (200 with a job) vs nginx serving the "
        "same job as a static file.",
        "",
        *_table(
            [
                "database",
                "workers",
                "otakit req/s",
                "nginx req/s",
                "ratio",
                "p50 ms otakit / nginx",
                "p99 ms otakit / nginx",
                "errors",
            ],
            checkins,
        ),
        "",
        "Image bytes: `Range` requests on the signed URL vs nginx serving the same file.",
        "",
        *_table(
            [
                "database",
                "workers",
                "range",
                "otakit MiB/s",
                "nginx MiB/s",
                "ratio",
                "p99 ms otakit / nginx",
                "errors",
            ],
            ranges,
        ),
    ]


def fleet(results: Path) -> list[str]:
    files = sorted(results.glob("fleet*.json"))
    if not files:
        return ["*No fleet results: run `make bench-fleet` (or `bench/fleet_bench.py --quick`).*"]
    rows = []
    for path in files:
        data = json.loads(path.read_text())
        s, u, i, r = data["settings"], data["update"], data["idle"], data.get("reference")
        c = data["capacity"]
        rows.append(
            [
                f"`{path.name}` ({_when(path)})",
                _num(s["devices"]),
                s["database"],
                f"{u['wall_s']}",
                f"{u['server_cpu_s']}",
                str(u["errors"] + len(u.get("failed", {}))),
                f"{i['server_cpu_ms_per_checkin']}",
                f"{r['server_cpu_ms_per_checkin']}" if r else "-",
                _x(
                    _ratio(
                        i["server_cpu_ms_per_checkin"],
                        r["server_cpu_ms_per_checkin"] if r else None,
                    ),
                    0,
                ),
                _num(c["devices_per_core_polling_every_30min"] or 0),
                _num(c["devices_per_core_each_updating_within_30min"] or 0),
            ]
        )
    head = [
        "run",
        "devices",
        "database",
        "full update wall s",
        "server CPU s",
        "errors",
        "otakit CPU ms/idle check-in",
        "nginx `return 204` ms/check-in",
        "ratio",
        "devices/core polling every 30 min",
        "devices/core each also updating",
    ]
    first = json.loads(files[0].read_text())
    return [
        f"Simulated devices each doing a full update of a "
        f"{first['settings']['image_bytes'] // 1024} KiB image against one `otakit serve`; "
        "then one idle check-in each, next to nginx answering the same URL with `return 204`. "
        "Devices per core: 1,800 CPU-seconds / server CPU per device.",
        "",
        *_table(head, rows),
    ]


SCALE_COLUMNS = (
    ("status_report", "report"),
    ("idle_checkin_waiting", "idle check-in (waiting)"),
    ("idle_checkin_current", "idle check-in (current)"),
    ("rollout_view", "`GET /rollouts/{id}`"),
    ("dashboard_refresh", "dashboard refresh"),
    ("dashboard_devices", "devices page"),
)


def _ms(value: float | None) -> str:
    return f"{value:,.2f}" if value is not None else "-"


def scale(results: Path) -> list[str]:
    files = sorted(results.glob("scale*.json"))
    if not files:
        return ["*No scale results: run `bench/scale_bench.py`.*"]
    lines = [
        "Server CPU (ms) per request of `otakit serve` (one worker) by registered devices "
        "(inserted in bulk) with a 3-phase rollout, and its CPU with no traffic; nginx "
        "answering the same check-ins with `return 204` in the same run. Aims: report and idle "
        "check-in flat within 1.5x, background < 2% of a core, rollout view and dashboard "
        "refresh < 20 ms, idle check-in <= 0.5 ms.",
    ]
    for path in files:
        data = json.loads(path.read_text())
        reference = data.get("reference")
        nginx = reference["server_cpu_ms_per_request"] if reference else None
        rows = []
        for database, sizes in data["databases"].items():
            for size in sorted(sizes.values(), key=lambda x: x["registered"]):
                rows.append(
                    [
                        database,
                        _num(size["registered"]),
                        *(_ms(size[key]["server_cpu_ms_per_request"]) for key, _ in SCALE_COLUMNS),
                        f"{size['background']['percent_of_core']:.2f}%",
                        _x(
                            _ratio(
                                size["idle_checkin_waiting"]["server_cpu_ms_per_request"], nginx
                            ),
                            0,
                        ),
                    ]
                )
        head = [
            "database",
            "registered",
            *(title for _, title in SCALE_COLUMNS),
            "background",
            "idle check-in vs nginx",
        ]
        lines += [
            "",
            f"{_source(path, data)}; otakit from `{data['machine'].get('otakit_from', '?')}`; "
            f"nginx `return 204`: {nginx if nginx is not None else '-'} ms per check-in.",
            "",
            *_table(head, rows),
        ]
        for database, sizes in data["databases"].items():
            for size in sizes.values():
                if "fleet" in size:
                    f = size["fleet"]
                    lines += [
                        "",
                        f"{database}, fleet simulator at {_num(size['registered'])} registered: "
                        f"{f['updated']} of {f['devices']} devices updated, "
                        f"{f['server_cpu_ms_per_device']} ms of server CPU per device, "
                        f"{f['errors']} errors{', timed out' if f['timed_out'] else ''}.",
                    ]
        for database, r in data.get("ratios", {}).items():
            missed = [aim for aim, met in r["aims"].items() if not met]
            lines += [
                "",
                f"{database}, {_num(r['largest'])} vs {_num(r['smallest'])} devices: report "
                f"{_x(r['status_report_largest_vs_smallest'])}, idle check-in "
                f"{_x(r['idle_checkin_waiting_largest_vs_smallest'])}; aims not met: "
                f"{', '.join(missed) if missed else 'none'}.",
            ]
    return lines


SECTIONS: list[tuple[str, Callable[[Path], list[str]]]] = [
    ("Flash wear per upgrade", flash_wear),
    ("Device agent: CPU and memory per MiB downloaded", agent),
    ("Device agent: memory while idle", agent_idle),
    ("MQTT: 1 MiB to 1 and to 100 devices", mqtt),
    ("Update server vs nginx", server),
    ("Fleet against one server", fleet),
    ("Registry scale: CPU per request at 1k-100k devices", scale),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder of the JSON files, and of summary.md (bench/results)",
    )
    results: Path = parser.parse_args().results
    where = "bench/results" if results == RESULTS else str(results)
    lines = [
        "# Benchmark summary",
        "",
        f"Made by `bench/summary.py` from `{where}/*.json` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Every figure is next to its reference, measured "
        "in the same run on the same machine; method: `bench/README.md`, reading: "
        "`docs/performance.md`.",
    ]
    for title, section in SECTIONS:
        lines += ["", f"## {title}", "", *section(results)]
    text = "\n".join(lines) + "\n"
    out = results / "summary.md"
    out.write_text(text)
    print(text)
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
