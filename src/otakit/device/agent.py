"""The OTA agent: checks for an update, downloads it resumably, verifies it, marks it pending,
reports the result and reboots the device, walking the states of the original middleware
(protocols.md §8) and telling the application about each one.

One update attempt (:func:`update_once`), job flow::

    START_UPDATE → JOB_CONNECT → JOB_DOWNLOAD → JOB_DISCONNECT → JOB_PARSE → [JOB_REDIRECT]
    → STORAGE_OPEN → DATA_CONNECT → DATA_DOWNLOAD / STORAGE_WRITE (percentage) → DATA_DISCONNECT
    → STORAGE_CLOSE → VERIFY → RESULT_CONNECT → RESULT_SEND → RESULT_DISCONNECT → OTA_COMPLETE

The direct flow starts at STORAGE_OPEN with the known file. A job whose ``Connection`` names
another transport than the one that fetched it (an MQTT job from an HTTP server, an HTTP job
from an MQTT publisher) is handed over (JOB_REDIRECT) to the agent's transport for it, from
``transports={"HTTP": ..., "MQTT": ...}``; without one it fails with TRANSPORT_UNSUPPORTED.

Any failure is reported as a FAILURE event with the original's error name, sent to the server
as a Failure result with the reason (the original never reports failures), and leaves storage
clean except for what can be resumed: a transfer that failed halfway keeps its durable bytes and
journal, so the next attempt continues from there. :class:`Agent` runs attempts on a background thread with the configured
timing.

Retries (device/core/retry.py): after a failed attempt :func:`poll` waits as the
:class:`RetryPolicy` of ``[timing]`` says (exponential from ``retry_interval``, with jitter,
capped). With a :class:`RetryState`, failures are counted per artifact (:attr:`Job.artifact`,
the exact update offered) and kept across restarts; a job whose artifact failed
``give_up_after`` times is skipped after the job fetch (an AGENT_WAITING event says so): it is
neither downloaded nor reported again until a different one is offered. A transfer that failed
after storing more bytes is not counted against its artifact: the link failed, and the next
attempt resumes.

Delta updates: with a :class:`~otakit.device.delta_storage.DeltaStorage` (``delta``), a job
that offers a patch for exactly the image that runs (:func:`~otakit.device.core.job.
choose_download`, decided before anything is downloaded) is downloaded as the patch, applied
into the secondary slot and verified as any image. A patch that does not apply (any
:class:`~otakit.errors.DeltaError`) or an offer for another base falls back to the full image
in the same attempt; the result report carries the reason (``delta_error``). A transfer error
on the patch is a link failure like any other: the patch stays, the next attempt resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random as _random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from otakit.device.config import AgentConfig, Timing
from otakit.device.core.job import check_job, choose_download
from otakit.device.core.retry import Backoff, RetryPolicy
from otakit.device.delta_storage import DeltaStorage
from otakit.device.events import Answer, Callback, Event, Reason, State
from otakit.device.storage import Storage
from otakit.device.transports.base import Job, Transport
from otakit.errors import (
    AgentError,
    DeltaError,
    OtakitError,
    RedirectError,
    StoppedByAppError,
    TransferError,
    TransportUnsupportedError,
)
from otakit.files import write_atomic

log = logging.getLogger("otakit.agent")


class Flow(StrEnum):
    JOB = "job"
    DIRECT = "direct"


class Outcome(StrEnum):
    UPDATED = "updated"  # downloaded, verified, pending: reboot into it
    NO_UPDATE = "no-update"
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    version: str | None = None
    error: str | None = None  # the original's error name
    message: str | None = None
    job: Job | None = None
    retry_after: float | None = None  # FAILED: seconds the retry policy asks to wait
    gave_up: bool = False  # the job's artifact failed give_up_after times: not tried (again)


RETRY_FILE = "agent-retry.json"
"""The retry state's file name, next to the agent's journal."""


class RetryState:
    """The agent's retry policy state: a :class:`Backoff` (failures per artifact) that
    ``load`` reads at the start and ``save`` writes after each change, so a restart does not
    forget how often an update failed. ``random`` gives the jitter, a number in ``[0, 1)``.

    Without ``load``/``save`` the state lives in memory only. A state that cannot be read or
    is damaged starts clean; one that cannot be written is logged and kept in memory: the retry
    state never stops an update.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        load: Callable[[], bytes | None] | None = None,
        save: Callable[[bytes], None] | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.policy = policy
        self.random = random
        self._save = save
        data: object = None
        if load is not None:
            try:
                raw = load()
                data = json.loads(raw) if raw else None
            except (OtakitError, OSError, ValueError, RecursionError) as exc:
                log.warning("retry state unreadable, starting clean: %s", exc)
        self.backoff = Backoff.from_dict(policy, data)

    @classmethod
    def in_file(
        cls,
        policy: RetryPolicy,
        path: str | os.PathLike[str],
        *,
        random: Callable[[], float] = _random.random,
    ) -> RetryState:
        """The state kept in the JSON file ``path`` (written atomically)."""
        file = Path(path)

        def load() -> bytes | None:
            try:
                return file.read_bytes()
            except FileNotFoundError:
                return None

        return cls(policy, load=load, save=lambda data: write_atomic(file, data), random=random)

    def gave_up(self, job: Job) -> bool:
        """True when ``job``'s artifact failed ``give_up_after`` times."""
        artifact = job.artifact
        return artifact is not None and self.backoff.gave_up(artifact)

    def failures(self, job: Job) -> int:
        artifact = job.artifact
        return 0 if artifact is None else self.backoff.failures(artifact)

    def failed(self, job: Job) -> float | None:
        """Count a failed attempt of ``job``; the seconds to wait (None: the job names no
        artifact, the caller's own backoff applies)."""
        artifact = job.artifact
        if artifact is None:
            return None
        wait = self.backoff.failed(artifact, random=self.random())
        self._store()
        return wait

    def succeeded(self, job: Job) -> None:
        artifact = job.artifact
        if artifact is not None and self.backoff.failures(artifact):
            self.backoff.succeeded(artifact)
            self._store()

    def _store(self) -> None:
        if self._save is None:
            return
        try:
            self._save(json.dumps(self.backoff.to_dict()).encode())
        except (OtakitError, OSError) as exc:
            log.warning("retry state not saved (kept in memory): %s", exc)


# States in which a failure has not touched storage yet.
_BEFORE_STORAGE = frozenset(
    {
        State.START_UPDATE,
        State.JOB_CONNECT,
        State.JOB_DOWNLOAD,
        State.JOB_DISCONNECT,
        State.JOB_PARSE,
        State.JOB_REDIRECT,
    }
)


class _Attempt:
    """One update attempt and its events."""

    def __init__(self, callback: Callback | None) -> None:
        self.callback = callback

    def emit(self, event: Event) -> Answer:
        log.debug("%s %s %s", event.state, event.reason, event.message or "")
        answer = self.callback(event) if self.callback is not None else None
        return answer or Answer.CONTINUE

    def state(self, state: State, **extra: object) -> Answer:
        answer = self.emit(Event(state, Reason.STATE_CHANGE, **extra))  # type: ignore[arg-type]
        if answer is Answer.STOP:
            raise StoppedByAppError(f"the application stopped the update at {state}")
        if answer is Answer.APP_FAILED:
            raise AgentError(f"the application failed the step {state}")
        return answer


def update_once(
    transport: Transport,
    storage: Storage,
    *,
    board: str,
    version: str,
    flow: Flow = Flow.JOB,
    validate_after_reboot: bool = True,
    send_result: bool = True,
    callback: Callback | None = None,
    transports: Mapping[str, Transport] | None = None,
    retry: RetryState | None = None,
    delta: DeltaStorage | None = None,
) -> Result:
    """One update attempt. Never raises for a failed update: the Result says what happened.

    ``transport`` asks for the job (or gives the direct flow's). ``transports`` names the
    transport that downloads a job, by the job document's Connection: ``"HTTP"`` (also for
    HTTPS) and ``"MQTT"``; include ``transport`` itself. The default, ``{"HTTP": transport}``,
    is an HTTP-only agent. The result is reported through the transport that downloaded.

    With ``retry``, a failure of a job is counted against its artifact (the Result's
    ``retry_after`` is the wait the policy asks for), a success forgets it, and a job whose
    artifact failed ``give_up_after`` times is not started: NO_UPDATE with ``gave_up``, no
    download, no report. A transfer that failed after storing more of the download is not
    counted (the link failed, not the artifact; the next attempt resumes).

    With ``delta`` (wrapping ``storage``), a job's delta patch is used when
    :func:`~otakit.device.core.job.choose_download` says so; on a DeltaError the same attempt
    downloads the full image into ``storage`` and the report carries ``delta_error``.
    """
    attempt = _Attempt(callback)
    job: Job | None = None
    state = State.START_UPDATE
    stored: tuple[object, int] | None = None
    delta_error: str | None = None
    target = storage
    try:
        attempt.state(State.START_UPDATE)
        if flow is Flow.JOB:
            for state in (State.JOB_CONNECT, State.JOB_DOWNLOAD):
                attempt.state(state)
            job = transport.fetch_job()
            for state in (State.JOB_DISCONNECT, State.JOB_PARSE):
                attempt.state(state)
            if job is None:
                attempt.emit(Event(State.AGENT_WAITING, Reason.SUCCESS, message="no update"))
                return Result(Outcome.NO_UPDATE)
            if retry is not None and retry.gave_up(job):
                return _skipped(attempt, job, retry.failures(job))
            if job.document is not None:
                check_job(job.document, board=board, current_version=version)
                chosen = transport_for(job, transports or {"HTTP": transport})
                if chosen is not transport:
                    state = State.JOB_REDIRECT
                    attempt.state(state, message=f"{job.document.connection} job")
                    transport = chosen
        else:
            job = transport.direct_job()
        state = State.STORAGE_OPEN
        attempt.state(state)
        for state in (State.DATA_CONNECT, State.DATA_DOWNLOAD):
            attempt.state(state)

        def progress(done: int, total: int) -> None:
            attempt.state(
                State.STORAGE_WRITE,
                percentage=done * 100 // total if total else 100,
                bytes_done=done,
                total=total,
            )

        version = ""
        done = False
        if delta is not None:
            choice = choose_download(
                job.delta,
                running_sha256=delta.running_sha256() if job.delta is not None else None,
                accepts=delta.accepts,
                single_image=True,
            )
            delta_error = choice.report
            if choice.reason is not None and job.delta is not None:
                log.info("downloading the full image: %s", choice.reason)
            if choice.delta and job.delta is not None:
                target = delta
                delta.prepare(job.delta, version=job.version)
                state = State.DATA_DOWNLOAD
                stored = _stored(target)
                try:
                    if delta.ready():
                        log.info("the delta patch is stored whole: applying it again")
                    else:
                        transport.download(_patch_job(job), delta, progress)
                    for state in (State.DATA_DISCONNECT, State.STORAGE_CLOSE):
                        attempt.state(state)
                    delta.apply()  # into the secondary slot: a storage step, before VERIFY
                    state = State.VERIFY
                    if attempt.state(State.VERIFY) is not Answer.APP_SUCCESS:
                        version = delta.verify()
                    else:
                        version = job.version
                    done = True
                except DeltaError as exc:
                    delta_error = exc.reason
                    _fell_back(attempt, state, exc)
                    delta.abort()
                    target = storage
                    for state in (State.STORAGE_OPEN, State.DATA_CONNECT, State.DATA_DOWNLOAD):
                        attempt.state(state)
            elif delta.progress() is not None:
                delta.discard()  # a patch of an earlier offer: not resumed any more
        if not done:
            state = State.DATA_DOWNLOAD
            stored = _stored(storage)
            transport.download(job, storage, progress)
            for state in (State.DATA_DISCONNECT, State.STORAGE_CLOSE):
                attempt.state(state)
            state = State.VERIFY
            if attempt.state(State.VERIFY) is not Answer.APP_SUCCESS:
                version = storage.verify()
            else:
                version = job.version
        target.set_pending(permanent=not validate_after_reboot)
    except OtakitError as exc:
        result = _failed(
            attempt, transport, target, job, state, exc, send_result, delta_error=delta_error
        )
        if retry is None or job is None:
            return result
        if isinstance(exc, TransferError) and _progressed(stored, _stored(target)):
            # the link failed, not the artifact: the next attempt resumes; poll backs off
            log.info("the download made progress before it failed: not counted against it")
            return result
        wait = retry.failed(job)
        gave_up = retry.gave_up(job)
        if gave_up:
            log.warning(
                "giving up on %s %s: it failed %d times; waiting for a different update",
                job.file,
                job.version,
                retry.failures(job),
            )
        return dataclasses.replace(result, retry_after=wait, gave_up=gave_up)
    if retry is not None:
        retry.succeeded(job)
    result = Result(Outcome.UPDATED, version=version, job=job)
    if send_result:
        _report(
            attempt, transport, job, success=True, error=None, message=None, delta_error=delta_error
        )
    attempt.emit(Event(State.OTA_COMPLETE, Reason.SUCCESS, message=f"version {version} pending"))
    return result


def _patch_job(job: Job) -> Job:
    """The job that downloads ``job``'s delta patch with the transport's ordinary download:
    its URL (HTTP) or file name (MQTT), its SHA-256, no delta."""
    assert job.delta is not None
    offer = job.delta
    return dataclasses.replace(
        job, url=offer.url, file=offer.url, sha256=offer.sha256.upper(), delta=None
    )


def _fell_back(attempt: _Attempt, state: State, exc: DeltaError) -> None:
    """Tell the application the patch was refused and the full image comes instead."""
    message = (
        f"the delta patch was refused ({exc.reason}: {exc.message}); downloading the full image"
    )
    log.warning("%s", message)
    attempt.emit(Event(state, Reason.STATE_CHANGE, error=exc.reason, message=message))


def _stored(storage: Storage) -> tuple[object, int] | None:
    """The download in progress and its durable bytes, or None (none, or unreadable)."""
    try:
        record = storage.progress()
    except OtakitError:
        return None
    return None if record is None else (record.download, record.durable)


def _progressed(before: tuple[object, int] | None, after: tuple[object, int] | None) -> bool:
    """True when ``after`` holds more durable bytes of its download than ``before`` did."""
    if after is None:
        return False
    start = before[1] if before is not None and before[0] == after[0] else 0
    return after[1] > start


def _skipped(attempt: _Attempt, job: Job, failures: int) -> Result:
    """The job's artifact failed ``give_up_after`` times: no download, no report."""
    message = (
        f"skipping {job.file} {job.version or ''}".rstrip()
        + f": it failed {failures} times; waiting for a different update"
    )
    log.info("%s", message)
    attempt.emit(Event(State.AGENT_WAITING, Reason.SUCCESS, message=message))
    return Result(Outcome.NO_UPDATE, message=message, job=job, gave_up=True)


def transport_for(job: Job, transports: Mapping[str, Transport]) -> Transport:
    """The transport for the job document's Connection (``"HTTP"`` serves HTTPS too).

    Raises TransportUnsupportedError when the agent has none for it.
    """
    connection = job.document.connection if job.document is not None else "HTTP"
    kind = "MQTT" if connection == "MQTT" else "HTTP"
    chosen = transports.get(kind)
    if chosen is None:
        raise TransportUnsupportedError(
            f"the job is for the {kind} transport, which this agent was not given",
            value=connection,
        )
    return chosen


def _failed(
    attempt: _Attempt,
    transport: Transport,
    storage: Storage,
    job: Job | None,
    state: State,
    exc: OtakitError,
    send_result: bool,
    *,
    delta_error: str | None = None,
) -> Result:
    error = exc.agent_error
    # a URL refused (RedirectError) is refused before storage is touched: a download of the
    # configured server's that is under way stays resumable
    untouched = isinstance(exc, TransferError | StoppedByAppError | RedirectError)
    if untouched or state in _BEFORE_STORAGE:
        pass  # storage untouched, or durable bytes the next attempt resumes
    else:
        try:
            storage.abort()  # a bad image or job: leave the slot clean
        except OtakitError:
            log.exception("cleaning storage after a failure")
    attempt.emit(Event(state, Reason.FAILURE, error=error, message=exc.message))
    if job is not None and send_result:
        _report(
            attempt,
            transport,
            job,
            success=False,
            error=error,
            message=exc.message,
            delta_error=delta_error,
        )
    return Result(Outcome.FAILED, error=error, message=exc.message, job=job)


def _report(
    attempt: _Attempt,
    transport: Transport,
    job: Job,
    *,
    success: bool,
    error: str | None,
    message: str | None,
    delta_error: str | None = None,
) -> None:
    for state in (State.RESULT_CONNECT, State.RESULT_SEND):
        attempt.emit(Event(state, Reason.STATE_CHANGE))
    if delta_error is None:  # transports (and fakes) that know nothing of deltas
        transport.send_result(job, success=success, error=error, message=message)
    else:
        transport.send_result(
            job, success=success, error=error, message=message, delta_error=delta_error
        )
    attempt.emit(Event(State.RESULT_DISCONNECT, Reason.STATE_CHANGE))


def poll(
    attempt: Callable[[], Result],
    *,
    timing: Timing,
    stop: threading.Event,
    wake: threading.Event | None = None,
    until: Callable[[Result], bool] = lambda result: False,
    random: Callable[[], float] = _random.random,
) -> Result | None:
    """Run ``attempt`` first after ``timing.initial_check`` seconds, then every
    ``timing.next_check`` seconds; after a failure, up to ``timing.retries`` more attempts
    before falling back to ``next_check``, each after the wait of ``timing.retry_policy``
    (``retry_interval``, growing by ``retry_backoff`` with each failure in a row, capped, spread
    by ``retry_jitter`` drawn from ``random``) or the Result's ``retry_after`` (the artifact's
    own count, :class:`RetryState`), never longer than ``next_check``. A failure that gave up
    on its artifact waits ``next_check``. Runs until ``stop`` is set or ``until(result)``;
    setting ``wake`` runs the next attempt at once (``wake.wait`` is the only wait, so a test
    drives time through it). Returns the last result."""
    wake = wake if wake is not None else threading.Event()
    policy = timing.retry_policy
    wait, last, failures = timing.initial_check, None, 0
    while not stop.is_set():
        wake.wait(wait)
        wake.clear()
        if stop.is_set():
            break
        last = attempt()
        if until(last):
            break
        failures = failures + 1 if last.outcome is Outcome.FAILED else 0
        if 0 < failures <= timing.retries and not last.gave_up:
            backoff = last.retry_after
            if backoff is None:
                backoff = policy.delay(failures, random=random())
            wait = min(backoff, timing.next_check)
        else:
            wait, failures = timing.next_check, 0
    return last


class Agent:
    """Runs update attempts on a background thread with the configured timing (:func:`poll`);
    ``check_now()`` wakes it at once. After an update it calls ``reboot`` when
    ``reboot_upon_completion``, and stops: the device restarts into the new image.

    ``retry`` counts failures per artifact and gives up on one (:class:`RetryState`); by
    default it lives in memory with the policy of ``timing``: pass
    ``RetryState.in_file(timing.retry_policy, path)`` to keep it across restarts. ``wake`` is
    the event the agent waits on between attempts (its ``wait`` is the only wait; a test can
    give one that returns at once)."""

    def __init__(
        self,
        transport: Transport,
        storage: Storage,
        *,
        board: str,
        version: str,
        flow: Flow = Flow.JOB,
        timing: Timing | None = None,
        validate_after_reboot: bool = True,
        reboot_upon_completion: bool = True,
        send_result: bool = True,
        callback: Callback | None = None,
        reboot: Callable[[], None] | None = None,
        transports: Mapping[str, Transport] | None = None,
        retry: RetryState | None = None,
        wake: threading.Event | None = None,
        delta: DeltaStorage | None = None,
    ) -> None:
        self.transport = transport
        self.delta = delta
        self.transports = transports
        self.storage = storage
        self.board = board
        self.version = version
        self.flow = flow
        self.timing = timing if timing is not None else Timing()
        self.validate_after_reboot = validate_after_reboot
        self.reboot_upon_completion = reboot_upon_completion
        self.send_result = send_result
        self.callback = callback
        self.reboot = reboot
        self.retry = retry if retry is not None else RetryState(self.timing.retry_policy)
        self.last: Result | None = None
        self._wake = wake if wake is not None else threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls,
        config: AgentConfig,
        transport: Transport,
        storage: Storage,
        *,
        callback: Callback | None = None,
        reboot: Callable[[], None] | None = None,
        transports: Mapping[str, Transport] | None = None,
        retry_file: str | os.PathLike[str] | None = None,
    ) -> Agent:
        """An agent with the identity, flow, timing and behaviour of ``config``;
        ``transports`` as :func:`update_once` takes them; the retry state kept in
        ``retry_file`` (JSON; in memory without one)."""
        policy = config.timing.retry_policy
        return cls(
            transport,
            storage,
            board=config.identity.board,
            version=config.identity.version,
            flow=Flow(config.flow),
            timing=config.timing,
            validate_after_reboot=config.behaviour.validate_after_reboot,
            reboot_upon_completion=config.behaviour.reboot_upon_completion,
            send_result=not config.behaviour.do_not_send_result,
            callback=callback,
            reboot=reboot,
            transports=transports,
            retry=RetryState(policy)
            if retry_file is None
            else RetryState.in_file(policy, retry_file),
        )

    def run_once(self) -> Result:
        result = update_once(
            self.transport,
            self.storage,
            board=self.board,
            version=self.version,
            flow=self.flow,
            validate_after_reboot=self.validate_after_reboot,
            send_result=self.send_result,
            callback=self.callback,
            transports=self.transports,
            retry=self.retry,
            delta=self.delta,
        )
        self.last = result
        if result.outcome is Outcome.UPDATED and self.reboot_upon_completion and self.reboot:
            self.reboot()
        return result

    def start(self) -> None:
        if self._thread is not None:
            raise AgentError("the agent is already started", value="ALREADY_STARTED")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="otakit-agent", daemon=True)
        self._thread.start()

    def check_now(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = 30) -> None:
        """End the background thread (after the attempt under way, if any)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        closed: list[Transport] = []
        for transport in (self.transport, *(self.transports or {}).values()):
            if not any(transport is done for done in closed):
                transport.close()
                closed.append(transport)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        poll(
            self.run_once,
            timing=self.timing,
            stop=self._stopping,
            wake=self._wake,
            until=lambda r: r.outcome is Outcome.UPDATED and self.reboot_upon_completion,
            random=self.retry.random,
        )
