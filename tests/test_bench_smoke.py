"""Every benchmark script runs to its end: the smallest run of each, so none breaks unseen.

Not a benchmark: nothing here looks at a number. Each script runs as a subprocess with this
Python, on its smallest settings (``--smoke``; ``summary.py`` as it is, it takes seconds), and
writes into a temporary folder given with ``--results``, never into ``bench/results/`` (recorded runs, committed). A test asserts that the script exits 0
and writes its JSON, and that the reference it measures against ran (curl, nginx, the
stop-and-wait sender): a reference left out for a missing tool would hide exactly the code that
broke before (nginx in ``fleet_bench.py``). The last test runs ``summary.py`` on those files.

The scripts need curl, Mosquitto, nginx, wrk and PostgreSQL on 127.0.0.1:5432, which ``make
test`` installs and starts (scripts/ensure-services.sh). Without one a test is skipped, and fails
under CI=true.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .mcuboot_host import HARNESS
from .server_harness import IN_CI, postgres_database

BENCH = Path(__file__).resolve().parent.parent / "bench"
SMOKE = {  # script: its arguments besides --results, and the JSON files it writes
    "flash_wear.py": (["--smoke"], ["flash_wear.json"]),
    "agent_bench.py": (["--smoke"], ["agent.json"]),
    "agent_idle.py": (["--smoke"], ["agent_idle.json"]),
    "mqtt_bench.py": (["--smoke"], ["mqtt-quick.json"]),
    "server_bench.py": (["--smoke"], ["server-quick.json"]),
    "fleet_bench.py": (["--smoke"], ["fleet-quick.json"]),
    "scale_bench.py": (["--smoke"], ["scale-quick.json"]),
    "delta_bench.py": (["--smoke"], ["delta.json"]),
}
TOOLS = {
    "agent_bench.py": ["curl"],
    "mqtt_bench.py": ["mosquitto"],
    "server_bench.py": ["nginx", "wrk"],
    "fleet_bench.py": ["nginx"],
    "scale_bench.py": ["nginx"],
    "delta_bench.py": ["arm-none-eabi-gcc"],
}
NEEDS_POSTGRES = {"server_bench.py", "scale_bench.py"}


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def _require(script: str) -> None:
    """Skip (fail under CI=true) when a tool the script needs is missing: without them
    ``server_bench.py`` would apt-get install them, and the others would leave out their
    reference."""
    missing = [tool for tool in TOOLS.get(script, []) if _which(tool) is None]
    if missing:
        message = f"{script} needs {', '.join(missing)} (make test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    if script in NEEDS_POSTGRES:
        with postgres_database():  # skips, or fails under CI=true, without PostgreSQL
            pass


class Runs:
    """The smoke runs of this module, each run once, all writing into one folder."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.done: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        if script not in self.done:
            self.done[script] = subprocess.run(
                [sys.executable, str(BENCH / script), *args, "--results", str(self.results)],
                cwd=self.results,
                capture_output=True,
                text=True,
                timeout=100,
                check=False,
            )
        return self.done[script]

    def smoke(self, script: str) -> Any:
        """Run ``script`` on its smallest settings; check it exits 0 and writes its JSON. Returns
        the first result file as parsed (a list of rows or an object, depending on the script)."""
        _require(script)
        args, files = SMOKE[script]
        done = self.run(script, *args)
        assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
        loaded: dict[str, Any] = {}
        for name in files:
            path = self.results / name
            assert path.is_file(), f"{script} did not write {name}:\n{done.stderr[-3000:]}"
            loaded[name] = json.loads(path.read_text())
        return loaded[files[0]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("bench-results"))


def test_flash_wear(runs: Runs) -> None:
    rows = runs.smoke("flash_wear.py")
    assert {row["strategy"] for row in rows} == {
        "overwrite",
        "swap-scratch",
        "swap-move",
        "swap-offset",
        "swap-status",
    }
    # every row was measured against MCUboot's own code for the same update (the harness is
    # optional outside CI, as for the tests that use it)
    if IN_CI or (HARNESS / "host" / "build.sh").exists():
        assert all(row["mcuboot_ops"] for row in rows)


def test_agent_bench(runs: Runs) -> None:
    result = runs.smoke("agent_bench.py")
    assert result["settings"]["smoke"] is True
    assert [cell["curl"] is not None for cell in result["cells"]] == [True]


def test_agent_idle(runs: Runs) -> None:
    """Both ways to run the agent checked in, and both references (bare python, httpx) were
    measured."""
    result = runs.smoke("agent_idle.py")
    assert result["checkins"] == 1
    assert set(result["references"]) == {"python (nothing imported)", "python + httpx.Client"}
    assert set(result["agents"]) == {"otakit-agent", "otakit agent run"}
    assert all(m["uss"] > 0 for m in [*result["agents"].values(), *result["references"].values()])


def test_mqtt_bench(runs: Runs) -> None:
    result = runs.smoke("mqtt_bench.py")
    assert {cell["sender"] for cell in result["cells"]} == {"otakit", "reference"}


def test_server_bench(runs: Runs) -> None:
    result = runs.smoke("server_bench.py")
    assert {(cell["server"], cell["database"]) for cell in result["cells"]} == {
        ("nginx", "-"),
        ("otakit", "sqlite"),
        ("otakit", "postgresql"),
    }


def test_fleet_bench(runs: Runs) -> None:
    result = runs.smoke("fleet_bench.py")
    assert result["settings"]["smoke"] is True
    assert result["reference"] is not None, result.get("reference_missing")  # nginx ran


def test_scale_bench(runs: Runs) -> None:
    """Both databases at both registry sizes, every window answered as expected, the
    background measured and nginx's reference run."""
    result = runs.smoke("scale_bench.py")
    assert result["settings"]["smoke"] is True
    assert result["reference"] is not None, result.get("reference_missing")  # nginx ran
    assert result["reference"]["errors"] == 0
    assert set(result["databases"]) == {"sqlite", "postgresql"}
    for sizes in result["databases"].values():
        assert [s["registered"] for s in sizes.values()] == result["settings"]["scales"]
        for size in sizes.values():
            for key in ("status_report", "idle_checkin_waiting", "rollout_view"):
                assert size[key]["requests"] > 0, size[key]
                assert size[key]["errors"] == 0, size[key]
            assert size["background"]["wall_s"] > 0
        largest = sizes[str(max(result["settings"]["scales"]))]
        assert largest["fleet"]["updated"] == largest["fleet"]["devices"] == 3, largest["fleet"]
    assert set(result["ratios"]) == {"sqlite", "postgresql"}


def test_delta_bench(runs: Runs) -> None:
    """Two builds of one Cortex-M program, each change in each compression: the patch applied
    and timed next to the full image, and a compressed patch smaller than the image."""
    result = runs.smoke("delta_bench.py")
    rows = result["rows"]
    assert {row["change"] for row in rows} == {"same-size", "grows"}
    for row in rows:
        assert row["full_bytes"] > 0, row
        assert row["delta_bytes"] > 0, row
        assert row["delta_install_cpu_ms"] > 0, row
    compressed = [row for row in rows if row["compression"] != "none"]
    assert compressed
    assert all(row["delta_bytes"] < row["full_bytes"] for row in compressed), compressed


def test_summary(runs: Runs) -> None:
    """summary.py on the smoke runs' files (running those not run yet): every section filled."""
    for script in SMOKE:
        runs.smoke(script)
    done = runs.run("summary.py")
    assert done.returncode == 0, f"summary.py exited {done.returncode}:\n{done.stderr[-3000:]}"
    page = (runs.results / "summary.md").read_text()
    assert "*No " not in page, page  # a section without its file says "*No `x.json`: ...*"
    for title in ("Flash wear", "Device agent", "MQTT", "Update server", "Fleet", "Registry"):
        assert f"## {title}" in page


def test_smoke_needs_a_results_folder() -> None:
    """A smoke run's numbers mean nothing: without --results (bench/results/, the recorded
    runs) the script stops before doing anything."""
    scripts = ["agent_bench.py", "agent_idle.py", "mqtt_bench.py", "server_bench.py"]
    scripts += ["fleet_bench.py"]
    for script in (*scripts, "scale_bench.py"):
        done = subprocess.run(
            [sys.executable, str(BENCH / script), "--smoke"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, f"{script}: {done.stderr}"
        assert "--smoke needs --results" in done.stderr
