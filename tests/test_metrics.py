"""Prometheus metrics at /metrics: the exposition format, counters that follow the device traffic
(summed over several workers), gauges that match the management API, and who may scrape.

The servers are real ``otakit serve`` processes on loopback; the format is checked by a strict
parser written here from the 0.0.4 text format's grammar.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from otakit import __version__
from otakit.server import metrics
from otakit.server.metrics import Counters, Family, classify, render

from .server_harness import Server, start_server
from .test_server import KEY, image

BOARD = "BOARD_A"
SCRAPE_TOKEN = "scrape-" + uuid.uuid4().hex
Key = tuple[str, tuple[tuple[str, str], ...]]


# --- a strict parser of the text format ----------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"'
_SAMPLE = re.compile(
    rf"^(?P<name>{_NAME})(?:\{{(?P<labels>{_LABEL}(?:,{_LABEL})*)?\}})? "
    r"(?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$"
)
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Scrape:
    types: dict[str, str]
    helps: dict[str, str]
    samples: dict[Key, float]

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def family(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> Scrape:
    """Parse an exposition strictly: every line well-formed, TYPE before samples, no repeats."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: dict[Key, float] = {}
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name), where
            assert name not in helps, f"HELP repeated, {where}"
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge"), where
            assert name not in types, f"TYPE repeated, {where}"
            if kind == "counter":
                assert name.endswith("_total"), f"a counter's name ends in _total, {where}"
            types[name] = kind
        else:
            assert not line.startswith("#"), f"unexpected {where}"
            assert line.strip(), f"empty {where}"
            match = _SAMPLE.match(line)
            assert match, f"malformed sample, {where}"
            name = match["name"]
            assert name in types, f"sample before its TYPE, {where}"
            labels = tuple(
                sorted((k, _unescape(v)) for k, v in _PAIR.findall(match["labels"] or ""))
            )
            assert len({k for k, _ in labels}) == len(labels), f"a label repeated, {where}"
            key = (name, labels)
            assert key not in samples, f"sample repeated, {where}"
            value = float(match["value"].replace("Inf", "inf"))
            if types[name] == "counter":
                assert value >= 0, where
            samples[key] = value
    return Scrape(types, helps, samples)


# --- units ---------------------------------------------------------------------------------------


def test_render_is_the_text_format() -> None:
    family = Family("otakit_things_total", "counter", 'Things with "quotes"\nand a line feed.')
    family.add(3, route="signed", code="206")
    family.add(2.5, route='we"ird\\path\nx', code="200")
    gauge = Family("otakit_level", "gauge", "A level.")
    gauge.add(math.inf)
    gauge.add(float("nan"), kind="nan")
    text = render([family, gauge])
    assert text.splitlines()[:2] == [
        '# HELP otakit_things_total Things with "quotes"\\nand a line feed.',
        "# TYPE otakit_things_total counter",
    ]
    scrape = parse(text)
    assert scrape.get("otakit_things_total", route="signed", code="206") == 3
    assert scrape.get("otakit_things_total", route='we"ird\\path\nx', code="200") == 2.5
    assert scrape.get("otakit_level") == math.inf
    assert math.isnan(scrape.get("otakit_level", kind="nan"))
    assert 'otakit_things_total{code="206",route="signed"} 3\n' in text  # integers stay integers


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/api/v1/device/checkin", ("otakit_checkins_total", "json")),
        ("GET", "/ota_update.json", ("otakit_checkins_total", "original")),
        ("GET", "/devices/dev1/ota_update.json", ("otakit_checkins_total", "original")),
        ("POST", "/api/v1/device/status", ("otakit_status_reports_total", "json")),
        ("POST", "/devices/dev1/files/abc/app.img", ("otakit_status_reports_total", "original")),
        ("POST", "/files/abc/app.img", ("otakit_status_reports_total", "original")),
        ("POST", "/ota-update.bin", ("otakit_status_reports_total", "original")),
        ("GET", "/dl/abc/app.img", ("otakit_download_requests_total", "signed")),
        ("HEAD", "/dl/abc/app.img", ("otakit_download_requests_total", "signed")),
        ("GET", "/devices/dev1/files/abc/app.img", ("otakit_download_requests_total", "device")),
        ("GET", "/files/abc/app.img", ("otakit_download_requests_total", "anonymous")),
        ("GET", "/ota-update.bin", ("otakit_download_requests_total", "direct")),
        ("GET", "/api/v1/device/checkin", None),
        ("POST", "/dl/abc/app.img", None),
        ("GET", "/api/v1/deployments", None),
        ("GET", "/", None),
        ("GET", "/dl/abc", None),
        ("GET", "/devices/dev1/twin", None),
    ],
)
def test_classify(method: str, path: str, expected: tuple[str, str] | None) -> None:
    kind = classify(method, path)
    assert (None if kind is None else (kind.counter, kind.value)) == expected


def test_counters_add_up_over_workers(tmp_path: Path) -> None:
    folder = tmp_path / metrics.FOLDER
    one, two = Counters(folder), Counters(folder)
    one.add("otakit_checkins_total", api="json", code="200")
    one.add("otakit_download_bytes_total", 4096, route="signed")
    two.add("otakit_checkins_total", api="json", code="200")
    two.add("otakit_checkins_total", api="json", code="200")
    assert two.total()[("otakit_checkins_total", (("api", "json"), ("code", "200")))] == 2
    one.flush()
    total = two.total()
    assert total[("otakit_checkins_total", (("api", "json"), ("code", "200")))] == 3
    assert total[("otakit_download_bytes_total", (("route", "signed"),))] == 4096
    (folder / "junk.json").write_text("{not json")  # a damaged file is skipped
    assert two.total() == total
    metrics.clear(tmp_path)  # what a server start does
    assert not list(folder.glob("*.json"))
    assert two.total() == two.local()
    lonely = Counters(None)
    lonely.add("otakit_checkins_total", api="json", code="200")
    lonely.flush()  # nowhere to write: a no-op
    assert lonely.total() == lonely.local()


def test_access_from_the_environment() -> None:
    assert metrics.Access.from_env({}) == metrics.Access(None, False)
    assert metrics.Access.from_env({metrics.OPEN_ENV: "1"}).open
    assert metrics.Access.from_env({metrics.TOKEN_ENV: "s"}).token == "s"


# --- a real server with two workers --------------------------------------------------------------


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("metrics"), workers=2, env={metrics.TOKEN_ENV: SCRAPE_TOKEN}
    )
    yield server
    server.stop()


def scrape(server: Server, token: str | None = None) -> Scrape:
    response = server.client(token or server.admin).get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)


def test_who_may_scrape(metered: Server) -> None:
    anonymous = metered.client().get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "UNAUTHORIZED"
    assert metered.client("otk_0000000000000000_nope").get("/metrics").status_code == 401
    assert metered.client("wrong-" + SCRAPE_TOKEN).get("/metrics").status_code == 401
    product = f"p-{uuid.uuid4().hex[:6]}"
    metered.admin_client().put(f"/api/v1/devices/{product}-d", json={"product": product})
    device = metered.token("device", "--device", f"{product}-d")
    forbidden = metered.client(device).get("/metrics")
    assert forbidden.status_code == 403
    assert forbidden.json()["error"] == "FORBIDDEN"
    assert scrape(metered).get("otakit_build_info", version=__version__) == 1
    assert scrape(metered, SCRAPE_TOKEN).types["otakit_checkins_total"] == "counter"
    # the scrape-only secret opens nothing else
    assert metered.client(SCRAPE_TOKEN).get("/api/v1/deployments").status_code == 401


class Traffic:
    """Device traffic of one product, tallying what the counters should show."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.admin = server.admin_client()
        self.expected: defaultdict[Key, float] = defaultdict(float)

    def expect(self, name: str, value: float = 1, **labels: str) -> None:
        self.expected[(name, tuple(sorted(labels.items())))] += value

    def checkin(self, token: str, serial: str, version: str) -> httpx.Response:
        response = self.http.post(
            "/api/v1/device/checkin",
            json={"serial": serial, "board": BOARD, "version": version},
            headers={"authorization": f"Bearer {token}"},
        )
        self.expect("otakit_checkins_total", api="json", code=str(response.status_code))
        return response

    def report(self, token: str, status: str, **fields: Any) -> None:
        response = self.http.post(
            "/api/v1/device/status",
            json={"status": status, **fields},
            headers={"authorization": f"Bearer {token}"},
        )
        assert response.status_code == 204, response.text
        self.expect("otakit_status_reports_total", api="json", code="204")

    def download(
        self, url: str, route: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> httpx.Response:
        response = self.http.request(method, url, headers=headers or {})
        self.expect("otakit_download_requests_total", route=route, code=str(response.status_code))
        if response.status_code in (200, 206) and response.content:
            self.expect("otakit_download_bytes_total", len(response.content), route=route)
        return response


def wait_for_counts(server: Server, traffic: Traffic, before: Scrape) -> Scrape:
    """Scrape until every counter moved by what the traffic expects (the other worker writes
    its counts about once a second)."""
    deadline = time.monotonic() + 15
    while True:
        now = scrape(server)
        moved = {
            key: now.samples.get(key, 0.0) - before.samples.get(key, 0.0)
            for key in traffic.expected
        }
        if moved == dict(traffic.expected):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"counters moved by {moved}, expected {dict(traffic.expected)}")
        time.sleep(0.2)


def test_counters_follow_the_traffic(metered: Server) -> None:
    before = scrape(metered)
    traffic = Traffic(metered)
    admin = traffic.admin
    product = f"p-{uuid.uuid4().hex[:6]}"
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code in (200, 201)
    assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
    data = image("2.0.0")
    artifact = admin.post("/api/v1/artifacts", params={"name": "app.img"}, content=data).json()
    deployment = admin.post(
        "/api/v1/deployments",
        json={"artifact_id": artifact["id"], "product": product, "group": "g"},
    ).json()
    enroll = metered.token("enroll", "--product", product, "--group", "g")

    # JSON devices: enroll (with the job in the answer), download in ranges, report, confirm
    for n in range(3):
        serial = f"{product}-{n}"
        answer = traffic.checkin(enroll, serial, "1.0.0")
        assert answer.status_code == 200, answer.text
        token, job = answer.json()["device_token"], answer.json()["job"]
        assert job["deployment_id"] == deployment["id"]
        assert traffic.checkin(token, serial, "1.0.0").status_code == 200
        first = traffic.download(job["url"], "signed", {"range": "bytes=0-4095"})
        assert first.status_code == 206
        assert len(first.content) == 4096
        rest = traffic.download(job["url"], "signed", {"range": "bytes=4096-"})
        assert first.content + rest.content == data
        traffic.report(token, "downloading")
        if n == 2:
            traffic.report(token, "error", error="VERIFY")
            continue
        traffic.report(token, "applying")
        assert traffic.checkin(token, serial, "2.0.0").status_code == 204
    whole = traffic.download(job["url"], "signed")
    assert whole.content == data
    assert traffic.download(job["url"], "signed", method="HEAD").status_code == 200
    assert traffic.download(job["url"].replace("sig=", "sig=0"), "signed").status_code == 403
    assert traffic.checkin("otk_0000000000000000_nope", "x", "1.0.0").status_code == 401

    # an original device: job document, 4 KiB ranges from its own file path, result POST
    original = f"{product}-orig"
    admin.put(
        f"/api/v1/devices/{original}",
        json={"product": product, "group": "g", "version": "1.0.0", "board": BOARD},
    )
    token = metered.token("device", "--device", original)
    device = httpx.Client(
        base_url=metered.url, headers={"authorization": f"Bearer {token}"}, timeout=30
    )
    doc = device.get(f"/devices/{original}/ota_update.json")
    assert doc.status_code == 200
    traffic.expect("otakit_checkins_total", api="original", code="200")
    path = f"/devices/{original}/files/{artifact['id']}/app.img"
    for start in range(0, len(data), 4096):
        end = min(start + 4095, len(data) - 1)
        response = device.get(path, headers={"range": f"bytes={start}-{end}"})
        assert response.status_code == 206
        traffic.expect("otakit_download_requests_total", route="device", code="206")
        traffic.expect("otakit_download_bytes_total", len(response.content), route="device")
    assert device.post(path).status_code == 200
    traffic.expect("otakit_status_reports_total", api="original", code="200")

    after = wait_for_counts(metered, traffic, before)
    bytes_signed = after.get("otakit_download_bytes_total", route="signed") - before.get(
        "otakit_download_bytes_total", route="signed"
    )
    assert bytes_signed == 3 * len(data) + len(data)  # three devices in two ranges, one whole
    errors = after.get("otakit_http_responses_total", code_class="4xx") - before.get(
        "otakit_http_responses_total", code_class="4xx"
    )
    assert errors >= 2  # the forged URL and the unknown token
    assert after.get("otakit_http_responses_total", code_class="5xx") == 0
    # both workers write their counts
    files = list((metered.data / metrics.FOLDER).glob("*.json"))
    assert len(files) == 2, files


def test_gauges_match_the_api(metered: Server) -> None:
    admin = metered.admin_client()
    product = f"p-{uuid.uuid4().hex[:6]}"
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code in (200, 201)
    assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
    artifact = admin.post(
        "/api/v1/artifacts", params={"name": "gauge.img"}, content=image("3.0.0")
    ).json()
    target = {"artifact_id": artifact["id"], "product": product, "group": "g"}
    plain = admin.post("/api/v1/deployments", json=target)
    assert plain.status_code == 201, plain.text
    later = {"phases": [{"percent": 100}], "start_at": "2999-01-01T00:00:00Z"}
    for group in ("h", "i"):
        response = admin.post(
            "/api/v1/rollouts", json={"deployment": {**target, "group": group}, **later}
        )
        assert response.status_code == 201, response.text
        assert response.json()["state"] == "scheduled"
    aborted = response.json()
    assert admin.post(f"/api/v1/rollouts/{aborted['id']}/abort").status_code == 200
    enroll = metered.token("enroll", "--product", product, "--group", "g")
    http = httpx.Client(base_url=metered.url, timeout=30)
    for n, status in enumerate(("downloading", "applying", "error", None)):
        answer = http.post(
            "/api/v1/device/checkin",
            json={"serial": f"{product}-{n}", "board": BOARD, "version": "1.0.0"},
            headers={"authorization": f"Bearer {enroll}"},
        ).json()
        if status:
            headers = {"authorization": f"Bearer {answer['device_token']}"}
            response = http.post("/api/v1/device/status", json={"status": status}, headers=headers)
            assert response.status_code == 204

    seen = scrape(metered)
    deployments = admin.get("/api/v1/deployments").json()
    active = [d for d in deployments if d["active"]]
    cancelled = [d for d in deployments if d["cancelled_at"]]
    assert seen.get("otakit_deployments", state="active") == len(active)
    assert seen.get("otakit_deployments", state="cancelled") == len(cancelled)
    assert seen.get("otakit_deployments", state="expired") == len(deployments) - len(active) - len(
        cancelled
    )
    for d in active:
        shown = {
            status: seen.get("otakit_deployment_devices", deployment_id=str(d["id"]), status=status)
            for status in d["counts"]
        }
        assert shown == {k: float(v) for k, v in d["counts"].items()}, d["id"]
    mine = plain.json()["id"]
    assert seen.get("otakit_deployment_devices", deployment_id=str(mine), status="Error") == 1
    assert not seen.family("otakit_deployment_devices") or all(
        dict(labels)["deployment_id"] != str(aborted["deployment_id"])
        for labels in seen.family("otakit_deployment_devices")
    )

    devices = admin.get("/api/v1/devices").json()
    by_status = Counter(d["status"] or "none" for d in devices)
    assert {dict(k)["status"]: v for k, v in seen.family("otakit_devices").items() if v} == {
        k: float(v) for k, v in by_status.items()
    }
    rollouts = admin.get("/api/v1/rollouts").json()
    by_state = Counter(r["state"] for r in rollouts)
    for state in ("scheduled", "running", "paused", "aborted", "completed"):
        assert seen.get("otakit_rollouts", state=state) == by_state[state], state
    assert by_state["aborted"] >= 1
    assert seen.get("otakit_artifacts") == len(admin.get("/api/v1/artifacts").json())


def test_open_metrics_and_counters_reset_at_start(tmp_path: Path) -> None:
    """OTAKIT_METRICS_OPEN=1 needs no token; a restarted server counts from zero."""
    data = tmp_path / "data"
    first = start_server(data)
    try:
        for _ in range(5):
            first.client().get("/api/v1/device/twin")  # 401 each
        assert scrape(first).get("otakit_http_responses_total", code_class="4xx") == 5
    finally:
        first.stop()
    assert list((data / metrics.FOLDER).glob("*.json"))  # the last counts were written at exit
    again = start_server(data, env={metrics.OPEN_ENV: "1"})
    try:
        response = again.client().get("/metrics")
        assert response.status_code == 200
        assert parse(response.text).get("otakit_http_responses_total", code_class="4xx") == 0
    finally:
        again.stop()
