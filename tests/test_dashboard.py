"""The dashboard, served by a real ``otakit serve``, in a real headless Chromium.

The browser test drives Debian's ``chromium`` through its ``chromedriver`` (selenium): sign in
with the admin token, create a phased deployment from the page, watch simulated devices (raw
check-ins and status reports over HTTP, as tests/test_rollout.py drives them) move the progress
bars, approve, pause, resume and abort from the page, see the counts change, filter the devices
and open one's history, list the artifacts. Further tests search and sort the devices and
open one's current job, page the audit log, upload an artifact with its progress bar and delete
it, check the targeted counts and a phase without devices, sign in as a viewer who sees no
control that changes anything, and open an image's deltas (issue 20). One server and one
Chromium serve the whole module; each test starts from a blank tab. It waits on what the page
shows, never on time.

Screenshots of every step are kept in ``test-artifacts/dashboard/`` at the repository root
(CI keeps that folder as the test's artifacts); their paths are printed in the run's summary.
Without chromium the browser test is skipped, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from otakit.image.header import ImageVersion
from otakit.image.sign import SignOptions, sign_image
from otakit.server.dashboard import SECURITY_HEADERS
from otakit.server.service.rollouts import bucket

from .server_harness import IN_CI, Server, start_server
from .test_server import KEY, image

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BOARD = "BOARD_A"
WAIT = 20  # seconds the page may take to show a change (it polls every 1.5 s)


@pytest.fixture(scope="module")
def dash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("dashboard"))
    yield server
    server.stop()


# --- without a browser -------------------------------------------------------------------------


def test_page_and_assets(dash_server: Server) -> None:
    http = dash_server.client()
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="/dashboard/app.js"' in page.text
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "script-src 'self'" in page.headers["content-security-policy"]

    script = http.get("/dashboard/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "sessionStorage" in script.text
    style = http.get("/dashboard/app.css")
    assert style.headers["content-type"] == "text/css; charset=utf-8"

    again = http.get("/dashboard/app.js", headers={"if-none-match": script.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""

    missing = http.get("/dashboard/secrets.txt")
    assert missing.status_code == 404
    assert missing.json()["error"] == "NOT_FOUND"
    assert http.get("/dashboard/index.html").status_code == 404  # the page is at / only


def test_dashboard_is_not_in_the_api_spec(dash_server: Server) -> None:
    paths = dash_server.client().get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/dashboard") or p == "/metrics"]


def test_page_has_no_inline_script_or_outside_resources() -> None:
    """The CSP allows only this server's own files: the page must not need anything else."""
    from importlib import resources

    static = resources.files("otakit.server.dashboard").joinpath("static")
    page = static.joinpath("index.html").read_text()
    for inline in ("<script>", "style=", "onclick"):
        assert inline not in page
    for name in ("index.html", "app.js", "app.css"):
        text = static.joinpath(name).read_text()
        assert "http://" not in text, name
        assert "https://" not in text, name
        assert "innerHTML" not in text, name


# --- in Chromium -------------------------------------------------------------------------------


def _chromium_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    problem = None
    if missing:
        problem = (
            f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
            "(scripts/ensure-services.sh does, or apt-get install chromium chromium-driver)"
        )
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            problem = "selenium is not installed (pip install -e '.[dev]')"
    if problem is not None:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the module (starting one takes a second or two)."""
    _chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1300",
        "--lang=en-GB",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Any]:
    """The module's Chromium, as a new one for each test: a blank page, nothing in the tab's
    sessionStorage (no one signed in), the console log read out."""
    chromium.get("about:blank")
    chromium.get_log("browser")
    yield chromium
    if chromium.current_url.startswith("http"):
        chromium.execute_script("sessionStorage.clear()")
    chromium.get("about:blank")


@dataclass
class Shots:
    """Screenshots of each step, numbered, in test-artifacts/dashboard/."""

    driver: Any
    report: Callable[[str], None]
    taken: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob("*.png"):
            old.unlink()

    def __call__(self, name: str) -> None:
        path = SHOTS / f"{len(self.taken) + 1:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot {path}"
        self.taken.append(path)
        print(f"screenshot: {path}")
        self.report(f"dashboard screenshot: {path.relative_to(REPO)}")


class Page:
    """The dashboard as the test sees it: elements by data-testid, waits on what it shows."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def find(self, testid: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, testid: str) -> str:
        return str(self.find(testid).text)

    def attr(self, testid: str, name: str) -> str:
        return str(self.find(testid).get_attribute(name))

    def visible(self, testid: str) -> bool:
        from selenium.common.exceptions import NoSuchElementException

        try:
            return bool(self.find(testid).is_displayed())
        except NoSuchElementException:
            return False

    def choose(self, testid: str, value: str) -> bool:
        """Choose ``value`` in a select list; True once chosen (a condition for :meth:`wait`)."""
        from selenium.webdriver.support.ui import Select

        Select(self.find(testid)).select_by_value(value)
        return True

    def wait(self, condition: Callable[[], object], what: str) -> Any:
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
            TimeoutException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(
                self.driver,
                WAIT,
                poll_frequency=0.1,
                ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
            ).until(lambda _driver: condition())
        except TimeoutException:
            banner = self.text("error-text") if self.visible("error") else "(no error shown)"
            raise AssertionError(
                f"the page did not show {what} within {WAIT} s; {banner}"
            ) from None

    def phase(self, rollout: int, number: int) -> dict[str, str]:
        bar = self.find(f"phase-{rollout}-{number}")
        names = ("status", "targeted", "succeeded", "failed", "in-progress")
        return {n: str(bar.get_attribute(f"data-{n}")) for n in names}

    def count(self, deployment: int, name: str) -> int:
        return int(self.attr(f"count-{deployment}-{name}", "data-count"))

    def click(self, testid: str) -> None:
        """Click, again if the page re-rendered the element between finding and clicking it
        (the dashboard refreshes on its own)."""

        def clicked() -> bool:
            self.find(testid).click()
            return True

        self.wait(clicked, f"{testid} to click")


class Devices:
    """Devices of one product checking in and reporting over HTTP, as the agent would."""

    def __init__(self, server: Server, product: str, enroll_token: str) -> None:
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.product = product
        self.enroll_token = enroll_token
        self.tokens: dict[str, str] = {}

    def enroll(self, serial: str) -> None:
        answer = self._checkin(serial, "1.0.0", self.enroll_token)
        assert answer is not None
        self.tokens[serial] = answer["device_token"]

    def _checkin(self, serial: str, version: str, token: str) -> dict[str, Any] | None:
        response = self.http.post(
            "/api/v1/device/checkin",
            json={"serial": serial, "board": BOARD, "version": version},
            headers={"authorization": f"Bearer {token}"},
        )
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else None

    def checkin(self, serial: str, version: str = "1.0.0") -> dict[str, Any] | None:
        return self._checkin(serial, version, self.tokens[serial])

    def report(self, serial: str, status: str) -> None:
        response = self.http.post(
            "/api/v1/device/status",
            json={"status": status},
            headers={"authorization": f"Bearer {self.tokens[serial]}"},
        )
        assert response.status_code == 204, response.text

    def download(self, serial: str) -> None:
        answer = self.checkin(serial)
        assert answer is not None
        assert answer["job"] is not None, answer
        assert answer["job"]["version"] == "1.1.0"
        part = self.http.get(answer["job"]["url"], headers={"range": "bytes=0-4095"})
        assert part.status_code == 206
        self.report(serial, "downloading")

    def apply(self, serial: str) -> None:
        self.report(serial, "applying")
        self.checkin(serial, "1.1.0")  # rebooted into the new version


def serials_in(deployment_id: int, count: int, low: int, high: int) -> list[str]:
    """Serials whose bucket in the deployment is in [low, high) (percentage phases)."""
    found: list[str] = []
    while len(found) < count:
        serial = f"dash-{uuid.uuid4().hex[:8]}"
        if low <= bucket(deployment_id, serial) < high:
            found.append(serial)
    return found


def test_operator_runs_a_rollout_in_the_browser(
    dash_server: Server, browser: Any, report: Callable[[str], None]
) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    shot = Shots(browser, report)
    page = Page(browser)
    admin = dash_server.admin_client()
    product = f"sensor-{uuid.uuid4().hex[:6]}"
    assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
    assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
    old = admin.post("/api/v1/artifacts", params={"name": "app.img"}, content=image("1.0.0"))
    new = admin.post("/api/v1/artifacts", params={"name": "app.img"}, content=image("1.1.0"))
    assert old.status_code == new.status_code == 201, new.text
    artifact = new.json()
    enroll = dash_server.token("enroll", "--product", product, "--group", "field")
    devices = Devices(dash_server, product, enroll)
    lab = f"lab-{uuid.uuid4().hex[:6]}"  # a device of another group: filtered out later
    admin.put(
        f"/api/v1/devices/{lab}", json={"product": product, "group": "lab", "version": "1.0.0"}
    )

    # --- sign in: a wrong token is refused, the admin token is accepted
    browser.get(dash_server.url + "/")
    page.wait(lambda: page.visible("login-view"), "the sign-in form")
    shot("sign-in")
    page.find("token-input").send_keys("otk_0000000000000000_not-a-real-token")
    page.click("login-button")
    page.wait(lambda: "refused" in page.text("login-error"), "the refused token")
    assert "unknown or revoked token" in page.text("login-error")
    shot("token-refused")
    page.find("token-input").clear()
    page.find("token-input").send_keys(dash_server.admin + Keys.ENTER)
    page.wait(lambda: page.visible("nav-deployments"), "the signed-in views")
    assert not page.visible("login-view")
    assert dash_server.admin not in browser.current_url
    stored = browser.execute_script("return sessionStorage.getItem('otakit.adminToken')")
    assert stored == dash_server.admin
    assert page.find("token-input").get_attribute("value") == ""

    # --- create a phased deployment from the page: 20% then everyone, each phase approved
    page.click("create-toggle")
    page.wait(
        lambda: (
            artifact["id"]
            in [o.get_attribute("value") for o in Select(page.find("create-artifact")).options]
        ),
        "the artifact in the form",
    )
    # the list may be redrawn by a refresh between finding and choosing: retried as a whole
    page.wait(lambda: page.choose("create-artifact", artifact["id"]), "the artifact chosen")
    page.find("create-product").send_keys(product)
    page.find("create-group").send_keys("field")
    page.find("create-phases").send_keys("20%, 100%")
    page.find("create-success").clear()
    page.find("create-success").send_keys("100")
    page.click("create-manual")
    shot("create-form")
    page.click("create-submit")
    page.wait(lambda: "created with rollout" in page.text("notice"), "the new rollout")
    card = page.wait(
        lambda: next(iter(page.all("#deployment-list article[data-rollout-id]")), None), "its card"
    )
    deployment_id = int(card.get_attribute("data-deployment-id"))
    rollout_id = int(card.get_attribute("data-rollout-id"))
    created = admin.get(f"/api/v1/rollouts/{rollout_id}").json()
    assert created["deployment_id"] == deployment_id
    assert [(p["percent"], p["manual"], p["success"]) for p in created["phases"]] == [
        (20.0, True, 100.0),
        (100.0, True, 100.0),
    ]
    page.wait(lambda: page.text(f"state-{deployment_id}") == "running", "the rollout running")
    shot("rollout-created")

    # --- devices join: two in phase 1, four in phase 2; phase 1 downloads
    first = serials_in(deployment_id, 2, 0, 2000)
    second = serials_in(deployment_id, 4, 2000, 10000)
    for serial in first + second:
        devices.enroll(serial)
    for serial in first:
        devices.download(serial)
    page.wait(
        lambda: (
            page.phase(rollout_id, 1)
            == {
                "status": "current",
                "targeted": "2",
                "succeeded": "0",
                "failed": "0",
                "in-progress": "2",
            }
        ),
        "phase 1 downloading",
    )
    assert page.phase(rollout_id, 2)["targeted"] == "4"
    assert page.count(deployment_id, "Downloading") == 2
    shot("phase-1-downloading")

    # --- phase 1 applies; being manual, it waits for approval
    for serial in first:
        devices.apply(serial)
    page.wait(lambda: page.phase(rollout_id, 1)["succeeded"] == "2", "phase 1 applied")
    page.wait(lambda: page.text(f"approval-{deployment_id}") == "ready for approval", "approval")
    assert page.count(deployment_id, "Applied") == 2
    assert devices.checkin(second[0]) is None  # phase 2 is not open yet
    shot("phase-1-applied")

    page.click(f"approve-{rollout_id}")
    page.wait(lambda: page.phase(rollout_id, 2)["status"] == "current", "phase 2 open")
    assert page.phase(rollout_id, 1)["status"] == "done"
    assert page.text(f"phase-of-{deployment_id}") == "phase 2 of 2"
    shot("approved")

    # --- pause: no new offers; resume
    page.click(f"pause-{rollout_id}")
    page.wait(lambda: page.text(f"state-{deployment_id}") == "paused", "the rollout paused")
    assert "paused by an operator" in page.text(f"reason-{deployment_id}")
    assert devices.checkin(second[0]) is None
    shot("paused")
    page.click(f"resume-{rollout_id}")
    page.wait(lambda: page.text(f"state-{deployment_id}") == "running", "the rollout resumed")

    # --- phase 2: two apply, one is downloading, one has not asked yet
    for serial in second[:3]:
        devices.download(serial)
    for serial in second[:2]:
        devices.apply(serial)
    page.wait(
        lambda: (
            page.phase(rollout_id, 2)
            == {
                "status": "current",
                "targeted": "4",
                "succeeded": "2",
                "failed": "0",
                "in-progress": "1",
            }
        ),
        "phase 2 moving",
    )
    assert page.count(deployment_id, "Applied") == 4
    assert page.count(deployment_id, "Downloading") == 1
    shot("phase-2-progress")

    # --- abort from the page, with a reason
    page.click(f"abort-{rollout_id}")
    page.find(f"abort-reason-{rollout_id}").send_keys("bad build")
    shot("abort-confirm")
    page.click(f"abort-confirm-{rollout_id}")
    page.wait(lambda: page.text(f"state-{deployment_id}") == "aborted", "the rollout aborted")
    assert page.text(f"reason-{deployment_id}") == "Reason: bad build"
    assert not page.all(f'[data-testid="pause-{rollout_id}"], [data-testid="abort-{rollout_id}"]')
    assert admin.get(f"/api/v1/rollouts/{rollout_id}").json()["state"] == "aborted"
    shot("aborted")

    # the device that was downloading is told to stop: the counts change on the page
    answer = devices.checkin(second[2])
    assert answer is not None
    assert answer["abort"]["deployment_id"] == deployment_id
    assert answer["abort"]["reason"] == "bad build"
    assert devices.checkin(second[3]) is None  # never offered now
    page.wait(lambda: page.count(deployment_id, "Interrupted") == 1, "the download stopped")
    assert page.count(deployment_id, "Downloading") == 0
    assert page.count(deployment_id, "Applied") == 4
    assert page.phase(rollout_id, 2)["in-progress"] == "1"  # interrupted still in progress
    shot("counts-after-abort")

    # --- devices: filters and a device's history
    page.click("nav-devices")
    page.wait(lambda: page.visible(f"device-row-{first[0]}"), "the devices table")
    Select(page.find("filter-product")).select_by_value(product)
    page.wait(lambda: len(page.all("#device-rows tr")) == 7, "the product's devices")
    page.find("filter-group").send_keys("lab")
    page.wait(lambda: len(page.all("#device-rows tr")) == 1, "the lab group")
    assert page.visible(f"device-row-{lab}")
    page.find("filter-group").clear()
    page.find("filter-group").send_keys("field")
    Select(page.find("filter-status")).select_by_value("applied")
    page.wait(lambda: len(page.all("#device-rows tr")) == 4, "the applied devices")
    page.find("filter-version").send_keys("1.1")
    page.wait(lambda: page.text("device-summary") == "4 matching devices (of 6).", "the summary")
    rows = {r.get_attribute("data-testid") for r in page.all("#device-rows tr")}
    assert rows == {f"device-row-{s}" for s in first + second[:2]}
    shot("devices-filtered")

    page.click(f"device-{first[0]}")
    page.wait(lambda: len(page.all("#history-rows tr")) == 3, "the device's history")
    history = [
        (r.get_attribute("data-status"), r.get_attribute("data-source"))
        for r in page.all("#history-rows tr")
    ]
    assert history == [("applied", "checkin"), ("applying", "device"), ("downloading", "device")]
    assert page.text("drawer-title") == f"Device {first[0]}"
    assert "1.1.0" in page.text("drawer-device")
    shot("device-history")
    page.find("drawer-close").send_keys(Keys.ESCAPE)
    page.wait(lambda: not page.visible("history-drawer"), "the drawer closed")

    # --- artifacts
    page.click("nav-artifacts")
    page.wait(lambda: page.visible(f"artifact-{artifact['id']}"), "the artifact list")
    assert len(page.all("#artifact-rows tr")) == 2
    assert "1.1.0" in page.text(f"artifact-{artifact['id']}")
    assert "valid" in page.text(f"artifact-{artifact['id']}")
    shot("artifacts")

    # --- nothing went wrong in the page: only the refused sign-in was an error
    problems = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "401" not in entry["message"]
    ]
    assert not problems, problems

    # --- signing out forgets the token
    page.click("sign-out")
    page.wait(lambda: page.visible("login-view"), "the sign-in form again")
    assert browser.execute_script("return sessionStorage.getItem('otakit.adminToken')") is None
    assert len(shot.taken) >= 12
    assert all(p.stat().st_size > 0 for p in shot.taken)
    report(f"dashboard screenshots: {SHOTS.relative_to(REPO)}/ ({len(shot.taken)} files)")


def sign_in(page: Page, server: Server, token: str) -> None:
    page.driver.get(server.url + "/")
    page.wait(lambda: page.visible("login-view"), "the sign-in form")
    page.find("token-input").send_keys(token)
    page.click("login-button")
    page.wait(lambda: page.visible("nav-deployments"), "the signed-in views")


def test_errors_are_shown_and_a_plain_deployment_is_cancelled(
    dash_server: Server, browser: Any
) -> None:
    from selenium.webdriver.support.ui import Select

    page = Page(browser)
    admin = dash_server.admin_client()
    product = f"plain-{uuid.uuid4().hex[:6]}"
    admin.post("/api/v1/keys", content=KEY.public_key.pem())
    admin.put(f"/api/v1/products/{product}", json={"board": BOARD})
    artifact = admin.post(
        "/api/v1/artifacts", params={"name": "plain.img"}, content=image("4.0.0")
    ).json()
    sign_in(page, dash_server, dash_server.admin)
    page.click("create-toggle")
    page.wait(
        lambda: (
            artifact["id"]
            in [o.get_attribute("value") for o in Select(page.find("create-artifact")).options]
        ),
        "the artifact in the form",
    )
    # refused in the page: a phase that is not a share or a group
    page.click("create-submit")
    page.wait(lambda: page.text("create-error") == "choose an artifact", "a missing artifact")
    # the list may be redrawn by a refresh between finding and choosing: retried as a whole
    page.wait(lambda: page.choose("create-artifact", artifact["id"]), "the artifact chosen")
    page.find("create-product").send_keys(product)
    page.find("create-phases").send_keys("10%, half")
    page.click("create-submit")
    page.wait(lambda: "expected N% or group:NAME" in page.text("create-error"), "a bad phase")
    # refused by the server: its error code and sentence are shown
    page.find("create-phases").clear()
    page.find("create-phases").send_keys("50%, 10%")
    page.click("create-submit")
    page.wait(lambda: "POST /api/v1/rollouts: 400" in page.text("create-error"), "the refusal")
    assert "percentages are cumulative and must grow" in page.text("create-error")
    assert not [
        d for d in admin.get("/api/v1/deployments").json() if d["artifact_id"] == artifact["id"]
    ]

    # no phases: a plain deployment, offered to everyone at once; then cancelled from the page
    page.find("create-phases").clear()
    page.click("create-submit")
    page.wait(lambda: "created." in page.text("notice"), "the new deployment")
    (deployment,) = [
        d for d in admin.get("/api/v1/deployments").json() if d["artifact_id"] == artifact["id"]
    ]
    assert deployment["rollout_id"] is None
    assert deployment["condition"] == f"tags.productType='{product}'"
    page.wait(lambda: page.text(f"state-{deployment['id']}") == "active", "the deployment")
    page.click(f"cancel-{deployment['id']}")
    page.click(f"abort-confirm-d{deployment['id']}")
    page.wait(lambda: page.text(f"state-{deployment['id']}") == "cancelled", "it cancelled")
    assert not page.visible(f"cancel-{deployment['id']}")
    assert admin.get(f"/api/v1/deployments/{deployment['id']}").json()["active"] is False
    # hiding finished deployments hides it
    page.click("show-finished")
    page.wait(lambda: not page.visible(f"deployment-{deployment['id']}"), "it hidden")


def test_a_revoked_token_signs_out(dash_server: Server, browser: Any) -> None:
    """A session whose token is revoked goes back to sign-in and says why."""
    page = Page(browser)
    token = dash_server.token("admin", "--label", "short-lived")
    sign_in(page, dash_server, token)
    token_id = token.split("_")[1]
    revoked = dash_server.otakit("token", "revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    page.wait(lambda: page.visible("login-view"), "the sign-in form after revoking")
    assert "no longer accepts this token" in page.text("login-error")


def test_devices_are_paged_by_the_server(dash_server: Server, browser: Any) -> None:
    """A product with more devices than a page: the table shows one page of 100, the summary
    the server's counts, and Next/Previous walk the pages (each a request of one page)."""
    from selenium.webdriver.support.ui import Select

    product = f"pager-{uuid.uuid4().hex[:6]}"
    admin = dash_server.admin_client()
    serials = [f"{product}-{n:03d}" for n in range(230)]
    for serial in serials:
        put = admin.put(f"/api/v1/devices/{serial}", json={"product": product, "group": "g"})
        assert put.status_code == 200, put.text
    admin.put(f"/api/v1/products/{product}", json={}).raise_for_status()
    page = Page(browser)
    sign_in(page, dash_server, dash_server.admin)
    page.click("nav-devices")
    page.wait(lambda: product in page.text("filter-product"), "the new product to filter on")
    Select(page.find("filter-product")).select_by_value(product)

    def shown() -> list[str]:
        return [str(r.get_attribute("data-testid")) for r in page.all("#device-rows tr")]

    def rows(low: int, high: int) -> list[str]:
        return [f"device-row-{s}" for s in serials[low:high]]

    page.wait(lambda: shown() == rows(0, 100), "the first page")
    page.wait(
        lambda: page.text("device-summary") == "230 matching devices. Showing 1\u2013100.",
        "the first page's summary",
    )
    assert not page.visible("devices-prev")
    assert page.visible("devices-next")
    page.click("devices-next")
    page.wait(lambda: shown() == rows(100, 200), "the second page")
    page.click("devices-next")
    page.wait(lambda: shown() == rows(200, 230), "the last page")
    page.wait(lambda: not page.visible("devices-next"), "no page after the last")
    assert "Showing 201\u2013230." in page.text("device-summary")
    page.click("devices-prev")
    page.wait(lambda: shown() == rows(100, 200), "the second page again")
    # a filter starts again from the first page; the serial filter matches from the start
    page.find("filter-serial").send_keys(f"{product}-21")
    page.wait(lambda: shown() == rows(210, 220), "the serials starting with -21")
    assert page.text("device-summary") == "10 matching devices."
    assert not page.visible("devices-prev")
    assert not page.visible("devices-next")


# --- issue 18: devices, the audit log, uploads, the viewer role, targeted counts ---------------


def mint(server: Server, role: str, **spec: str) -> str:
    """A new token, made over the API (POST /api/v1/tokens: faster than the CLI)."""
    made = server.admin_client().post("/api/v1/tokens", json={"role": role, **spec})
    assert made.status_code == 201, made.text
    return str(made.json()["token"])


def new_product(server: Server, version: str) -> tuple[str, dict[str, Any]]:
    """A product (board BOARD_A) with one uploaded image of ``version``."""
    admin = server.admin_client()
    product = f"p18-{uuid.uuid4().hex[:6]}"
    admin.post("/api/v1/keys", content=KEY.public_key.pem())
    assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
    upload = admin.post(
        "/api/v1/artifacts", params={"name": "app.img", "product": product}, content=image(version)
    )
    assert upload.status_code == 201, upload.text
    return product, upload.json()


def test_devices_are_searched_sorted_and_show_their_job(dash_server: Server, browser: Any) -> None:
    """Search by serial prefix, sort both ways, a device's history and the job it is offered
    now; a gateway's ``"Error": "None"`` shows no error ("applied None" was shown)."""
    admin = dash_server.admin_client()
    product, artifact = new_product(dash_server, "7.0.0")
    enroll = mint(dash_server, "enroll", product=product, group="g")
    devices = Devices(dash_server, product, enroll)
    serials = [f"{product}-{n}" for n in ("a", "b", "c")]
    for serial in serials:
        devices.enroll(serial)
    deployed = admin.post(
        "/api/v1/deployments", json={"artifact_id": artifact["id"], "product": product}
    )
    assert deployed.status_code == 201, deployed.text
    # the last device reports as a gateway does: applied, "Error": "None"
    gateway = devices.http.post(
        "/api/v1/device/status",
        json={"extFwInfo": {"Status": "applied", "Error": "None", "Version": "7.0.0"}},
        headers={"authorization": f"Bearer {devices.tokens[serials[2]]}"},
    )
    assert gateway.status_code == 204, gateway.text
    assert admin.get(f"/api/v1/devices/{serials[2]}").json()["error"] is None

    page = Page(browser)
    sign_in(page, dash_server, dash_server.admin)
    page.click("nav-devices")
    page.find("filter-serial").send_keys(product)

    def shown() -> list[str]:
        return [str(r.get_attribute("data-testid")) for r in page.all("#device-rows tr")]

    rows = [f"device-row-{s}" for s in serials]
    page.wait(lambda: shown() == rows, "the product's devices, by serial")
    page.wait(lambda: page.choose("filter-sort", "-serial"), "the sort chosen")
    page.wait(lambda: shown() == rows[::-1], "the devices in reverse order")
    assert "None" not in page.text(f"device-row-{serials[2]}")
    assert "applied" in page.text(f"device-row-{serials[2]}")
    page.find("filter-serial").send_keys("-b")
    page.wait(lambda: shown() == [rows[1]], "the one device whose serial starts so")

    page.click(f"device-{serials[1]}")
    page.wait(lambda: "Offered now: version 7.0.0" in page.text("drawer-offer"), "its job")
    assert artifact["id"][:12] in page.text("drawer-offer")
    assert page.text("drawer-title") == f"Device {serials[1]}"
    page.click("drawer-close")
    page.wait(lambda: not page.visible("history-drawer"), "the drawer closed")

    page.find("filter-serial").clear()
    page.find("filter-serial").send_keys(serials[2])
    page.wait(lambda: shown() == [rows[2]], "the device that applied")
    page.click(f"device-{serials[2]}")
    page.wait(lambda: "Nothing is offered" in page.text("drawer-offer"), "no job: it applied")
    page.wait(lambda: len(page.all("#history-rows tr")) == 1, "its history")
    assert page.all("#history-rows tr")[0].get_attribute("data-status") == "applied"
    assert "None" not in page.text("history-drawer")


def test_the_audit_log_shows_who_did_what(dash_server: Server, browser: Any) -> None:
    token = mint(dash_server, "admin", label="ops-bob")
    actor = f"ops-bob ({token.split('_')[1]})"
    ops = dash_server.client(token)
    product, artifact = new_product(dash_server, "8.0.0")
    deployment = {"artifact_id": artifact["id"], "product": product}
    created = ops.post(
        "/api/v1/rollouts", json={"deployment": deployment, "phases": [{"percent": 100}]}
    )
    assert created.status_code == 201, created.text
    rollout = created.json()["id"]
    for action in ["pause", "resume"] * 26:  # 52 records: more than a page of 50
        assert ops.post(f"/api/v1/rollouts/{rollout}/{action}").status_code == 200
    aborted = ops.post(f"/api/v1/rollouts/{rollout}/abort", json={"reason": "wrong build"})
    assert aborted.status_code == 200

    page = Page(browser)
    sign_in(page, dash_server, dash_server.admin)
    page.click("nav-audit")
    page.wait(lambda: page.visible("audit-table"), "the audit log")
    page.find("audit-actor").send_keys(actor)

    def records() -> list[tuple[str, str]]:
        return [
            (str(r.get_attribute("data-action")), str(r.get_attribute("data-actor")))
            for r in page.all("#audit-rows tr")
        ]

    page.wait(lambda: len(records()) == 50, "a page of ops-bob's actions")
    assert records()[0] == ("rollout.abort", actor)
    assert {a for a, _ in records()} == {"rollout.abort", "rollout.pause", "rollout.resume"}
    newest = page.all("#audit-rows tr")[0]
    assert f"rollout {rollout}" in newest.text
    assert "reason=wrong build" in newest.text
    everything = ops.get("/api/v1/audit", params={"actor": actor, "limit": 1000}).json()
    assert len(everything) > 50
    page.click("audit-next")
    page.wait(lambda: len(records()) == len(everything) - 50, "the older page")
    assert records()[-1] == (everything[-1]["action"], actor)
    assert ("rollout.create", actor) in records()
    assert not page.visible("audit-next")
    page.click("audit-prev")
    page.wait(lambda: len(records()) == 50, "the newest page again")

    page.wait(lambda: page.choose("audit-action", "rollout.abort"), "the action chosen")
    page.wait(lambda: records() == [("rollout.abort", actor)], "only the abort")


def test_artifacts_are_uploaded_with_progress_and_deleted(
    dash_server: Server, browser: Any, tmp_path: Path
) -> None:
    admin = dash_server.admin_client()
    product, _artifact = new_product(dash_server, "9.0.0")
    data = image("9.1.0", size=600_000)
    file = tmp_path / "firmware 9.1.0.img"
    file.write_bytes(data)

    page = Page(browser)
    sign_in(page, dash_server, dash_server.admin)
    page.click("nav-artifacts")
    page.click("upload-toggle")
    page.find("upload-file").send_keys(str(file))
    page.find("upload-product").send_keys(product)
    page.find("upload-version").send_keys("9.2.0")  # not what the image says: refused
    page.click("upload-submit")
    page.wait(lambda: "VERSION_MISMATCH" in page.text("upload-error"), "the wrong version")
    listed = admin.get("/api/v1/artifacts", params={"product": product}).json()
    assert [a["version"] for a in listed] == ["9.0.0"]

    page.find("upload-version").clear()
    page.find("upload-version").send_keys("9.1.0")
    page.click("upload-submit")
    page.wait(lambda: page.text("upload-status").startswith("Uploaded "), "the upload done")
    assert not page.visible("upload-error")
    # the bar followed the browser's upload progress events to the whole file
    assert page.attr("upload-progress", "data-loaded") == str(len(data))
    assert page.attr("upload-progress", "value") == page.attr("upload-progress", "max")
    (new,) = [
        a
        for a in admin.get("/api/v1/artifacts", params={"product": product}).json()
        if a["version"] == "9.1.0"
    ]
    assert new["name"] == "firmware_9.1.0.img"
    assert new["size"] == len(data)
    assert new["id"][:12] in page.text("upload-status")
    page.wait(lambda: page.visible(f"artifact-{new['id']}"), "the new artifact listed")

    # delete: asks first; "Keep it" keeps it
    page.click(f"delete-{new['id']}")
    page.wait(lambda: page.visible(f"delete-confirm-{new['id']}"), "the confirmation")
    assert "for good" in page.text(f"artifact-{new['id']}")
    page.click(f"delete-cancel-{new['id']}")
    page.wait(lambda: page.visible(f"delete-{new['id']}"), "the row as it was")
    assert admin.get(f"/api/v1/artifacts/{new['id']}").status_code == 200
    page.click(f"delete-{new['id']}")
    page.click(f"delete-confirm-{new['id']}")
    page.wait(lambda: not page.visible(f"artifact-{new['id']}"), "the artifact gone")
    assert "deleted" in page.text("notice")
    assert admin.get(f"/api/v1/artifacts/{new['id']}").status_code == 404


def test_plain_deployments_count_targets_and_an_empty_phase_is_not_passed(
    dash_server: Server, browser: Any
) -> None:
    """A plain deployment says how many devices it targets (not "0 of 0 reporting"); a rollout
    phase that holds no device yet shows none updated and waits for devices (it showed
    "0/0 updated (100%)" and "ready for approval")."""
    admin = dash_server.admin_client()
    product, artifact = new_product(dash_server, "10.0.0")
    for n in range(3):
        registered = admin.put(
            f"/api/v1/devices/{product}-{n}", json={"product": product, "board": BOARD}
        )
        assert registered.status_code == 200, registered.text
    plain = admin.post(
        "/api/v1/deployments", json={"artifact_id": artifact["id"], "product": product}
    )
    assert plain.status_code == 201, plain.text
    plain_id = plain.json()["id"]
    other, artifact2 = new_product(dash_server, "10.1.0")
    phased = admin.post(
        "/api/v1/rollouts",
        json={
            "deployment": {"artifact_id": artifact2["id"], "product": other},
            "phases": [{"percent": 10}, {"percent": 100}],
        },
    )
    assert phased.status_code == 201, phased.text
    rollout, deployment = phased.json()["id"], phased.json()["deployment_id"]

    page = Page(browser)
    sign_in(page, dash_server, dash_server.admin)
    page.wait(lambda: page.visible(f"summary-{plain_id}"), "the plain deployment")
    assert page.text(f"summary-{plain_id}") == "3 devices targeted · 0 applied"
    page.wait(lambda: page.visible(f"phase-text-{rollout}-1"), "the rollout's phases")
    assert page.text(f"phase-text-{rollout}-1") == "no devices yet"
    assert page.text(f"approval-{deployment}") == "waiting for devices"
    assert page.phase(rollout, 1)["status"] == "current"
    assert "(100%)" not in page.text(f"phases-{rollout}")


def test_a_viewer_sees_everything_and_changes_nothing(dash_server: Server, browser: Any) -> None:
    admin = dash_server.admin_client()
    product, artifact = new_product(dash_server, "11.0.0")
    serial = f"{product}-1"
    admin.put(f"/api/v1/devices/{serial}", json={"product": product, "board": BOARD})
    created = admin.post(
        "/api/v1/rollouts",
        json={
            "deployment": {"artifact_id": artifact["id"], "product": product},
            "phases": [{"percent": 100, "manual": True}],
        },
    )
    assert created.status_code == 201, created.text
    rollout, deployment = created.json()["id"], created.json()["deployment_id"]
    viewer = mint(dash_server, "viewer", label="auditor")

    page = Page(browser)
    sign_in(page, dash_server, viewer)
    assert page.text("role") == "viewer · read-only"
    page.wait(lambda: page.phase(rollout, 1)["targeted"] == "1", "the rollout")
    assert page.text(f"state-{deployment}") == "running"
    read_only = {"sign-out", "error-close", "deployments-more", "drawer-close", "history-more"}
    read_only |= {
        f"{view}-{way}" for view in ("devices", "artifacts", "audit") for way in ("prev", "next")
    }

    def controls() -> set[str]:
        """The data-testid of every button shown, but the pagers, the serials' links and the
        images' deltas (read in one script: the page redraws rows while it polls)."""
        shown = browser.execute_script(
            "return [...document.querySelectorAll('button')]"
            ".filter((b) => b.getClientRects().length > 0)"
            ".map((b) => b.dataset.testid || b.textContent)"
        )
        return {t for t in shown if t not in read_only and not t.startswith(("device-", "deltas-"))}

    assert controls() == set()
    assert not page.visible("create")
    page.click("nav-devices")
    page.wait(lambda: page.choose("filter-product", product), "the product chosen")
    page.wait(lambda: page.visible(f"device-row-{serial}"), "the device")
    page.click(f"device-{serial}")
    page.wait(lambda: "Offered now" in page.text("drawer-offer"), "the device's job")
    assert controls() == set()
    page.click("drawer-close")
    page.click("nav-artifacts")
    page.wait(lambda: page.visible(f"artifact-{artifact['id']}"), "the artifacts")
    assert not page.visible("upload")
    assert controls() == set()
    page.click("nav-audit")
    page.wait(lambda: len(page.all("#audit-rows tr")) > 0, "the audit log")
    assert controls() == set()
    # what the page does not offer, the server refuses
    refused = dash_server.client(viewer).post(f"/api/v1/rollouts/{rollout}/pause")
    assert refused.status_code == 403


# --- issue 20: an image's deltas ---------------------------------------------------------------


def wait_delta_made(admin: httpx.Client, artifact_id: str, timeout: float = 20) -> Any:
    """The artifact's one delta once the server's worker made it (ready, not-smaller or
    failed). The deadline moves on whenever its state or progress changes: a slow machine
    waits, a stuck worker fails (as tests/test_delta_plan.py waits)."""
    deadline = time.monotonic() + timeout
    seen: tuple[str, int] | None = None
    while True:
        found = admin.get(f"/api/v1/artifacts/{artifact_id}").json()["deltas"]
        assert len(found) == 1, found
        if found[0]["state"] in ("ready", "not-smaller", "failed"):
            return found[0]
        now = (found[0]["state"], found[0]["progress"])
        if now != seen:
            seen, deadline = now, time.monotonic() + timeout
        assert time.monotonic() < deadline, f"the delta stayed {seen}"
        time.sleep(0.05)


def test_an_images_deltas_are_listed(dash_server: Server, browser: Any) -> None:
    """Deploying v2 makes a delta from v1 in the background: the artifacts view opens v2's
    deltas (read from GET /api/v1/artifacts/{id}) and shows the base, the compression, the
    state as it moves to ready, the size and the ratio; v1 has none."""
    admin = dash_server.admin_client()
    product = f"p20-{uuid.uuid4().hex[:6]}"
    admin.post("/api/v1/keys", content=KEY.public_key.pem())
    assert admin.put(f"/api/v1/products/{product}", json={"board": BOARD}).status_code == 200
    payload = bytearray(random.Random(product).randbytes(200_000))
    images = []
    for version in ("1.0.0", "2.0.0"):  # v2 changes 300 bytes of v1 (and the version)
        if version == "2.0.0":
            payload[5000:5300] = random.Random(version).randbytes(300)
        signed = sign_image(
            bytes(payload), KEY, SignOptions(ImageVersion.parse(version), pad_header=True)
        )
        upload = admin.post(
            "/api/v1/artifacts", params={"name": "app.img", "product": product}, content=signed
        )
        assert upload.status_code == 201, upload.text
        images.append(upload.json())
    old, new = images

    page = Page(browser)
    sign_in(page, dash_server, dash_server.admin)
    page.click("nav-artifacts")
    page.wait(lambda: page.visible(f"artifact-{new['id']}"), "the artifacts")
    page.click(f"deltas-toggle-{old['id']}")
    page.wait(lambda: page.visible(f"deltas-none-{old['id']}"), "no delta to v1")
    assert page.attr(f"deltas-toggle-{old['id']}", "aria-expanded") == "true"
    page.click(f"deltas-toggle-{old['id']}")
    page.wait(lambda: not page.visible(f"deltas-{old['id']}"), "v1's deltas closed")

    deployed = admin.post(
        "/api/v1/deployments", json={"artifact_id": new["id"], "product": product}
    )
    assert deployed.status_code == 201, deployed.text
    page.click(f"deltas-toggle-{new['id']}")  # queued, being made or made: it follows
    made = wait_delta_made(admin, new["id"])
    assert made["state"] == "ready", made
    assert made["base_artifact_id"] == old["id"]
    row = f"delta-{new['id']}-{old['image_sha256'][:12]}-lzma"
    page.wait(lambda: page.attr(row, "data-state") == "ready", "the delta ready")
    cells = [c.text for c in page.find(row).find_elements("css selector", "td")]
    assert cells[0] == f"{old['id'][:12]}\u2026 app.img 1.0.0"
    assert cells[1:3] == ["lzma", "ready"]
    assert cells[4] == f"{made['ratio']:g}x"
    assert page.attr(row, "data-size") == str(made["size"])
    size = page.find(row).find_elements("css selector", "td")[3]
    assert size.get_attribute("title") == f"{made['size']} bytes"
    assert cells[3].endswith((" B", " KiB"))
    assert made["size"] * 20 < new["size"]
    page.click(f"deltas-toggle-{new['id']}")
    page.wait(lambda: not page.visible(f"deltas-{new['id']}"), "v2's deltas closed")
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
