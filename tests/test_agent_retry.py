"""The agent's retry policy end to end: a failing update is tried ``give_up_after`` times with
growing waits, then the device keeps checking but neither downloads nor reports it, also after a
restart, until a different update is offered. Against a real otakit server on loopback, through
a recording proxy that counts what reaches the server; time passes through poll's one wait."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from otakit.device.agent import RETRY_FILE, Agent, Outcome, Result, RetryState, poll
from otakit.device.config import AgentConfig, Timing
from otakit.device.journal import Journal
from otakit.device.service import AgentService
from otakit.device.storage import SlotStorage
from otakit.device.transports.base import Job
from otakit.device.transports.checkin import CHECKIN_PATH, STATUS_PATH
from otakit.device.transports.http import HttpSettings, HttpTransport
from otakit.image.keys import SigningKey
from otakit.sim.agent import device_token

from .faultproxy import Fault, FaultProxy
from .server_harness import Server
from .test_agent import BOARD, Setup, image, server  # noqa: F401 - the module-scoped server

OTHER = SigningKey.generate("ecdsa-p256")  # the server knows it, the device does not trust it


class Waits(threading.Event):
    """The wait of :func:`poll`: records each timeout and returns at once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.seen.append(float(timeout or 0))
        return False


def run_attempts(agent: Agent, count: int) -> tuple[list[Result], list[float]]:
    """``count`` attempts of ``agent`` as its thread runs them (:func:`poll`), without waiting:
    the results and the waits poll asked for."""
    stop, waits, results = threading.Event(), Waits(), []

    def attempt() -> Result:
        results.append(agent.run_once())
        if len(results) == count:
            stop.set()
        return results[-1]

    poll(attempt, timing=agent.timing, stop=stop, wake=waits, random=agent.retry.random)
    return results, waits.seen


@pytest.fixture
def setup(server: Server, tmp_path: Path) -> Setup:  # noqa: F811 - test_agent.server
    answer = server.admin_client().post("/api/v1/keys", content=OTHER.public_key.pem())
    assert answer.status_code in (201, 409), answer.text
    return Setup(server, tmp_path)


@pytest.fixture
def proxy(server: Server) -> Iterator[FaultProxy]:  # noqa: F811 - test_agent.server
    target = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    with FaultProxy(target) as recording:  # no faults: it only counts
        yield recording


def test_a_failing_update_is_given_up_until_a_different_one_is_offered(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    setup.deploy(image("1.1.0", key=OTHER))  # the device refuses it: VERIFY fails
    device = setup.device()
    settings = HttpSettings(server=setup.server.url, token=setup.enroll)
    token = device_token(device, settings, "1.0.0")
    timing = Timing(
        initial_check=5,
        next_check=600,
        retry_interval=5,
        retries=3,
        retry_backoff=2,
        retry_jitter=0.2,
        give_up_after=3,
    )
    state = tmp_path / RETRY_FILE

    def counts() -> tuple[int, int, int]:
        """(job documents fetched, downloads started, results posted) as the server saw them."""
        requests = proxy.requests()
        jobs = sum(r.method == "GET" and r.path == settings.job_path for r in requests)
        starts = sum(r.range is not None and r.range[0] == 0 for r in requests)
        posts = sum(r.method == "POST" for r in requests)
        return jobs, starts, posts

    with device.bootloader() as boot:
        storage = SlotStorage(
            boot, Journal(device.dir / "journal.json"), device.keys, current_version="1.0.0"
        )

        def agent() -> Agent:  # a fresh start of the device's agent, as after a restart
            return Agent(
                HttpTransport(HttpSettings(server=proxy.url, token=token), board=BOARD),
                storage,
                board=BOARD,
                version="1.0.0",
                timing=timing,
                reboot_upon_completion=False,
                retry=RetryState.in_file(timing.retry_policy, state, random=lambda: 0.5),
            )

        first = agent()
        results, waits = run_attempts(first, 6)
        assert [(r.outcome, r.error, r.gave_up) for r in results] == [
            (Outcome.FAILED, "VERIFY", False),
            (Outcome.FAILED, "VERIFY", False),
            (Outcome.FAILED, "VERIFY", True),  # the third failure gives up
            (Outcome.NO_UPDATE, None, True),
            (Outcome.NO_UPDATE, None, True),
            (Outcome.NO_UPDATE, None, True),
        ]
        # initial_check, then 5 and 10 s (exponential, jitter at its middle), then next_check
        assert waits == [5, 5, 10, 600, 600, 600]
        # the device checked six times, downloaded and reported the failure three times
        assert counts() == (6, 3, 3)
        assert "failed 3 times" in (results[-1].message or "")
        first.stop()

        restarted = agent()  # the count survives a restart
        results, waits = run_attempts(restarted, 2)
        assert [r.outcome for r in results] == [Outcome.NO_UPDATE, Outcome.NO_UPDATE]
        assert all(r.gave_up for r in results)
        assert counts() == (8, 3, 3)  # checked again; no download, no report
        restarted.stop()

        setup.deploy(image("1.2.0"))  # a different artifact: tried at once
        again = agent()
        results, _ = run_attempts(again, 1)
        assert results[0].outcome is Outcome.UPDATED, results[0]
        assert counts() == (9, 4, 4)
        again.stop()


def test_a_damaged_retry_state_starts_clean(tmp_path: Path) -> None:
    state = tmp_path / RETRY_FILE
    state.write_bytes(b"\x00{not json")
    retry = RetryState.in_file(Timing(give_up_after=1).retry_policy, state, random=lambda: 0.5)
    job = Job(url="http://ota.example/app.img", file="/app.img", version="1.1.0")
    assert not retry.gave_up(job)
    assert retry.failed(job) == 5
    assert retry.gave_up(job)
    reread = RetryState.in_file(Timing(give_up_after=1).retry_policy, state)
    assert reread.gave_up(job)  # the damaged file was replaced by a good one


def test_a_retry_state_that_cannot_be_saved_is_kept_in_memory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / RETRY_FILE
    retry = RetryState.in_file(Timing(give_up_after=2).retry_policy, missing)
    job = Job(url="http://ota.example/app.img", file="/app.img", version="1.1.0")
    retry.failed(job)
    retry.failed(job)
    assert retry.gave_up(job)
    assert not missing.exists()


def test_the_artifact_is_the_exact_thing_offered() -> None:
    legacy = Job(url="https://ota.example:8443/fw/app.img", file="/fw/app.img", version="1.1.0")
    assert legacy.artifact == "file=/fw/app.img version=1.1.0 url=ota.example:8443/fw/app.img"
    newer = Job(url=legacy.url, file=legacy.file, version="1.2.0")
    assert newer.artifact != legacy.artifact
    signed = Job(
        url="https://cdn.example/a/app.img?X-Amz-Signature=1",
        file="app.img",
        version="1.1.0",
        sha256="ab" * 32,
        deployment="7",
    )
    resigned = Job(
        url="https://cdn.example/a/app.img?X-Amz-Signature=2",
        file="app.img",
        version="1.1.0",
        sha256="AB" * 32,
        deployment="7",
    )
    assert signed.artifact == resigned.artifact == "deployment=7 sha256=" + "AB" * 32
    redeployed = Job(url=signed.url, file="app.img", version="1.1.0", sha256="AB" * 32)
    assert redeployed.artifact != signed.artifact
    # the direct flow's known file says nothing about what it holds: never given up on
    assert Job(url="https://ota.example/ota-update.bin", file="/ota-update.bin").artifact is None


def test_poll_backs_off_exponentially_and_never_beyond_next_check() -> None:
    """Failures without an artifact (the job fetch failed): waits from the policy of timing."""
    outcomes = [Outcome.FAILED] * 5 + [Outcome.NO_UPDATE, Outcome.FAILED, Outcome.NO_UPDATE]
    stop, waits = threading.Event(), Waits()

    def attempt() -> Result:
        outcome = outcomes.pop(0)
        if not outcomes:
            stop.set()
        return Result(outcome)

    timing = Timing(
        initial_check=10,
        next_check=50,
        retry_interval=7,
        retries=4,
        retry_backoff=2,
        retry_jitter=0.5,
    )
    randoms = iter([0.5, 0.5, 0.5, 0.5, 0.0])
    poll(attempt, timing=timing, stop=stop, wake=waits, random=lambda: next(randoms))
    # 7, 14, 28, then 56 cut to next_check; after `retries` retries next_check; a success
    # resets the count: 7 again, here at the low end of its jitter band (random 0.0)
    assert waits.seen == [10, 7, 14, 28, 50, 50, 50, 3.5]


def test_a_gateway_gives_up_on_an_mcu_image_it_cannot_program(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    """§7 check-ins: a programmer that fails. Two attempts download and report, then the gateway
    only checks in; its retry state is kept in littlefs, so a restart does not try again."""
    setup.deploy(image("2.0.0", 30_000))
    fail = "raise SystemExit(3)"
    config = AgentConfig.from_dict(
        {
            "agent": {"server": proxy.url, "token": setup.enroll},
            "identity": {
                "serial": f"GW-{tmp_path.name[-8:]}",
                "board": BOARD,
                "product": setup.product,
                "version": "1.0.0",
            },
            "timing": {"give_up_after": 2},
            "storage": {
                "kind": "gateway",
                "path": str(tmp_path / "gw-flash.bin"),
                "fs_size": 524288,
                "program": [sys.executable, "-c", fail, "{file}"],
            },
        }
    )

    def counts() -> tuple[int, int, int]:
        """(check-ins, downloads started, status reports) as the server saw them."""
        requests = proxy.requests()
        checkins = sum(r.method == "POST" and r.path == CHECKIN_PATH for r in requests)
        starts = sum(r.range is not None and r.range[0] == 0 for r in requests)
        reports = sum(r.method == "POST" and r.path == STATUS_PATH for r in requests)
        return checkins, starts, reports

    service = AgentService(config)
    try:
        first, second, third = (service.attempt() for _ in range(3))
    finally:
        service.close()
    assert (first.outcome, first.gave_up) == (Outcome.FAILED, False)
    assert (second.outcome, second.gave_up) == (Outcome.FAILED, True)
    assert (third.outcome, third.gave_up) == (Outcome.NO_UPDATE, True)
    checkins, starts, reports = counts()
    assert (checkins, starts) == (3, 2)
    assert reports == 4  # "downloading" and the failure, once per attempt; none when skipped

    restarted = AgentService(config)
    try:
        assert restarted.attempt().gave_up
    finally:
        restarted.close()
    assert counts() == (4, 2, 4)


def test_a_download_that_progresses_before_the_link_fails_is_not_given_up(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    """give_up_after = 1, and the link drops twice mid-download: each attempt stores more, so
    neither counts against the update; the third attempt finishes it."""
    setup.deploy(image("1.3.0", 60_000))
    device = setup.device()
    token = device_token(device, HttpSettings(server=setup.server.url, token=setup.enroll), "1.0.0")
    timing = Timing(initial_check=5, retry_interval=5, retries=3, give_up_after=1)
    # each failed attempt uses two connections: its download, which breaks at 20 kB, and the
    # failure report, too short for the drop to fire
    proxy.force(Fault.DROP, count=4, at=20_000)
    with device.bootloader() as boot:
        storage = SlotStorage(
            boot, Journal(device.dir / "journal.json"), device.keys, current_version="1.0.0"
        )
        agent = Agent(
            HttpTransport(
                HttpSettings(server=proxy.url, token=token, download_tries=1), board=BOARD
            ),
            storage,
            board=BOARD,
            version="1.0.0",
            timing=timing,
            reboot_upon_completion=False,
            retry=RetryState.in_file(timing.retry_policy, tmp_path / RETRY_FILE),
        )
        results, _ = run_attempts(agent, 3)
        agent.stop()
    assert [(r.outcome, r.error, r.gave_up) for r in results] == [
        (Outcome.FAILED, "GET_DATA", False),
        (Outcome.FAILED, "GET_DATA", False),
        (Outcome.UPDATED, None, False),
    ]
    assert proxy.stats.faults[Fault.DROP] == 2
    starts = [first for first, _ in proxy.ranges()]
    assert starts.count(0) == 1  # resumed, never restarted
