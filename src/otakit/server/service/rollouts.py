"""Rollouts: a deployment offered in phases, advanced by device health, paused or aborted by
failures, offered only inside a maintenance window.

A rollout belongs to one deployment. Its **phases** are ordered; each admits devices either by
**percentage** (cumulative: ``10%, 50%, 100%``) or by **group** (the ``deviceGroup`` tag). A
device's phase is the first one that admits it: for percentages a stable hash of (deployment id,
serial) gives it a bucket 0..9999, and phase *k* admits buckets below 100 x its percentage, so
devices that join later fall into a phase by themselves. A device is offered the update only
while the rollout runs (or has completed), its phase is open (the current one or an earlier
one), the start time has passed and the clock is inside the maintenance window. A device in the
middle of a download keeps its offer through a pause or outside the window, so it can resume.

States: ``scheduled`` → ``running`` (phase *k*) → ``completed``; ``paused`` and ``aborted`` from
either. A phase **advances** when its devices that applied the update and stayed healthy (for
``soak`` seconds) reach its success percentage of the phase's targeted devices, or, for a
**manual** phase, only when an operator approves. A phase that targets no device (a mistyped
group, a share too small for the fleet) is held until a device falls into it or an operator
approves it: it never passes by itself. A phase's **error threshold** (a count or a
percentage of its devices; exceeded means more than allowed) pauses or aborts the rollout; it
keeps counting for every opened phase, so a late revert in phase 1 still trips it. Resuming a
paused rollout acknowledges the failures seen so far. **Abort** is final: the deployment is
cancelled, so nothing offers it any more, and devices that were downloading are told to stop
at their next check-in.

**Health gate**: a device fails (counts against the error threshold) when it reports an error,
when it **reverts** (reports ``reverted: ...`` or checks in again with an older version after it
ran the new one: status ``reverted``), when it reported ``applying`` but does not check in with
the new version within ``confirm_timeout`` (``not confirmed in time``), or when its boot counter
(the optional ``boots`` field of check-ins and reports) climbs by more than ``max_boots`` within
``confirm_timeout`` of applying (``boot loop``).

Each device's phase and status in a rollout, and the per-phase counts, are rows kept up to date
by every report and check-in (phases.py), so deciding, viewing and the background round read a
few rows per rollout and never the devices.

The engine keeps nothing in memory that matters: it evaluates a rollout after every report that
changes a device's standing in it, and every ``rollout_interval`` seconds in the background (for
time-based rules: start time, confirm timeout, soak). Every transition is a compare-and-set on
``rollouts.revision`` made under ``SELECT ... FOR UPDATE`` (PostgreSQL; SQLite serialises
writers), and the ``rollout_events`` table refuses a second start/advance/complete/abort of one
phase, so several server processes on one database never apply a transition twice. An
operator's create, pause, resume, abort or approve, and the engine's own pauses and aborts, are
recorded in the audit log (audit.py) in the transaction that applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    CursorResult,
    Integer,
    Result,
    String,
    delete,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import object_session

from otakit.errors import ConflictError, NotFoundError, UsageError
from otakit.protocol.states import FAILED, empty_counts
from otakit.server.database import unavailable
from otakit.server.models import (
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    StatusReport,
    utcnow,
)
from otakit.server.service import audit, revision
from otakit.server.service import phases as phasing
from otakit.server.service.phases import (
    BUCKETS,
    DEFAULT_SUCCESS,
    MAX_PHASES,
    ON_ERROR,
    Phase,
    PhaseCount,
    bucket,
    check_phases,
    phase_of,
    phases_of,
)
from otakit.server.service.reports import DEFAULT_CONFIRM_TIMEOUT
from otakit.server.settings import ServerSettings
from otakit.server.targeting import device_tags, parse_condition, targets

__all__ = [  # the phase specs live in phases.py; their names are kept here for callers
    "BUCKETS",
    "DEFAULT_SUCCESS",
    "MAX_PHASES",
    "ON_ERROR",
    "Phase",
    "PhaseCount",
    "bucket",
    "check_phases",
    "phase_of",
    "phases_of",
]

log = logging.getLogger("otakit.rollout")

Clock = Callable[[], datetime]

# rollout states
SCHEDULED = "scheduled"
RUNNING = "running"
PAUSED = "paused"
ABORTED = "aborted"
COMPLETED = "completed"
STATES = (SCHEDULED, RUNNING, PAUSED, ABORTED, COMPLETED)
LIVE = (SCHEDULED, RUNNING, PAUSED)  # the engine still has work to do


# device statuses in a deployment (deployment_devices.status)
DOWNLOADING_STATES = ("downloading", "interrupted")
FAILED_STATES = FAILED
ABORTED_ERROR = "aborted"  # the error a download gets when its rollout is aborted
NOT_CONFIRMED = "not confirmed in time"

MAX_STEPS = MAX_PHASES + 8  # transitions one evaluation may make (several phases may be due)
ACT_ATTEMPTS = 10  # compare-and-set attempts of an operator's action


# --- maintenance windows -----------------------------------------------------------------------

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class Span:
    days: frozenset[int]  # 0 = Monday, as date.weekday()
    start: int  # minutes after midnight
    end: int  # exclusive; at or before start: the span ends on the next day


@dataclass(frozen=True)
class Window:
    """When devices may be offered an update: ``[DAYS] HH:MM-HH:MM`` spans joined by ``;``,
    then an optional IANA time zone (default UTC) for all of them.

    DAYS is ``*``/``daily`` or names and ranges (``mon-fri``, ``sat,sun``, ``fri-mon``); a span
    whose end is not after its start runs past midnight into the next day (``22:00-04:00``);
    ``24:00`` ends a day. Example: ``mon-fri 02:00-05:00; sat,sun 00:00-24:00 Europe/Berlin``.
    """

    text: str
    spans: tuple[Span, ...]
    zone: ZoneInfo

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        for span in self.spans:
            if span.start < span.end:
                if day in span.days and span.start <= minute < span.end:
                    return True
            elif (day in span.days and minute >= span.start) or (
                (day - 1) % 7 in span.days and minute < span.end
            ):
                return True
        return False

    def next_opening(self, now: datetime) -> datetime | None:
        """When the window opens next (None while it is open)."""
        if self.contains(now):
            return None
        local = now.astimezone(self.zone)
        best: datetime | None = None
        for ahead in range(8):
            day: date = local.date() + timedelta(days=ahead)
            for span in self.spans:
                if day.weekday() not in span.days:
                    continue
                at = datetime.combine(day, time(span.start // 60, span.start % 60), self.zone)
                if at > now and (best is None or at < best):
                    best = at
        return best.astimezone(UTC) if best is not None else None


def _days(text: str, window: str) -> frozenset[int]:
    if text in ("*", "daily"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise UsageError(
                f"window {window!r}: {part!r} is not a day or day range (mon..sun, e.g. mon-fri)",
                value=window,
            )
        a = DAYS.index(first)
        b = DAYS.index(last) if last else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _minutes(hours: str, minutes: str, window: str, *, end: bool) -> int:
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise UsageError(f"window {window!r}: {hours}:{minutes} is not a time of day", value=window)
    return h * 60 + m


@functools.lru_cache(maxsize=256)
def parse_window(text: str) -> Window:
    """Raise UsageError when ``text`` is not a window (see :class:`Window`)."""
    words = text.strip().replace(";", " ; ").split()
    zone = ZoneInfo("UTC")
    if len(words) >= 2 and _SPAN.match(words[-2]) and not _SPAN.match(words[-1]):
        name = words.pop()
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise UsageError(
                f"window {text!r}: unknown time zone {name!r} (use an IANA name such as "
                "Europe/Berlin)",
                value=text,
            ) from None
    spans: list[Span] = []
    for chunk in " ".join(words).split(";"):
        parts = chunk.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise UsageError(
                f"window {text!r}: expected '[DAYS] HH:MM-HH:MM' spans joined by ';' and an "
                "optional time zone, e.g. 'mon-fri 02:00-05:00 Europe/Berlin'",
                value=text,
            )
        days = _days(parts[0].lower(), text) if len(parts) == 2 else frozenset(range(7))
        found = _SPAN.match(parts[-1])
        if found is None:
            raise UsageError(
                f"window {text!r}: {parts[-1]!r} is not a time range HH:MM-HH:MM", value=text
            )
        start = _minutes(found.group(1), found.group(2), text, end=False)
        stop = _minutes(found.group(3), found.group(4), text, end=True)
        if start == stop:
            raise UsageError(f"window {text!r}: {parts[-1]} is empty", value=text)
        spans.append(Span(days, start, stop % (24 * 60)))  # 24:00 ends at midnight
    if not spans:
        raise UsageError(f"window {text!r} has no time range", value=text)
    return Window(text.strip(), tuple(spans), zone)


# --- who is offered ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """What the server knows about one device in the rollouts: its status in each deployment
    (``deployment_devices``), the rollouts that hold a row for it (for a frozen rollout: its
    snapshot) and its phase in each of them (rollout id -> phase)."""

    statuses: Mapping[int, tuple[str, str | None]] = field(default_factory=dict)
    members: frozenset[int] = frozenset()
    phases: Mapping[int, int] = field(default_factory=dict)


def _status(rollout: Rollout, standing: Standing | None) -> tuple[str | None, str | None]:
    if standing is None:
        return None, None
    return standing.statuses.get(rollout.deployment_id, (None, None))


def _phase_open(rollout: Rollout, device: Device, standing: Standing | None) -> bool:
    number = standing.phases.get(rollout.id) if standing is not None else None
    if number is None:
        if rollout.frozen and (standing is None or rollout.id not in standing.members):
            return False  # not in the snapshot
        tags = device_tags(device)
        number = phase_of(phases_of(rollout), rollout.deployment_id, device.serial, tags)
    return number is not None and (rollout.state == COMPLETED or number <= rollout.phase)


def joins(rollout: Rollout) -> bool:
    """Whether devices first seen now get a row in the rollout: it is not aborted and, if
    frozen, has not started (its snapshot is taken then)."""
    return rollout.state != ABORTED and not (rollout.frozen and phasing.started(rollout))


async def standing_of(
    db: AsyncSession,
    device: Device,
    candidates: Sequence[tuple[Deployment, Artifact, Rollout]],
    now: datetime,
) -> Standing:
    """The device's standing (one query), after giving it its row in each rollout of
    ``candidates`` (active phased deployments) that it joins now: a dynamic rollout that has
    started and whose deployment targets the device. A row of a dynamic rollout whose
    deployment no longer targets the device, which never reported about it, is removed (it no
    longer counts in the phase). Rows are written in the caller's transaction."""
    serial = device.serial
    found: Result[int, int, str | None, str | None, int | None] = await db.execute(
        union_all(
            select(
                literal(0).label("kind"),
                DeploymentDevice.deployment_id.label("id"),
                DeploymentDevice.status.label("status"),
                DeploymentDevice.error.label("error"),
                null().cast(Integer).label("phase"),
            ).where(DeploymentDevice.device_serial == serial),
            select(
                literal(1),
                RolloutDevice.rollout_id,
                null().cast(String),
                null().cast(String),
                RolloutDevice.phase,
            ).where(RolloutDevice.device_serial == serial),
        )
    )
    statuses: dict[int, tuple[str, str | None]] = {}
    rows: dict[int, int] = {}
    for kind, key, status, error, phase in found:
        if kind == 0 and status is not None:
            statuses[key] = (status, error)
        elif kind == 1 and phase is not None:
            rows[key] = phase
    for deployment, artifact, rollout in candidates:
        if not joins(rollout):
            continue
        targeted = targets(deployment, artifact, device, parse_condition(deployment.condition))
        if rollout.id in rows:
            if not targeted and deployment.id not in statuses:
                await phasing.forget(db, serial, rollout.id)
                del rows[rollout.id]
            continue
        if not targeted:
            continue
        phase = phase_of(phases_of(rollout), deployment.id, serial, device_tags(device))
        if phase is None:
            continue
        status = statuses.get(deployment.id, (None, None))[0]
        await phasing.place(db, rollout, serial, phase, now, status=status)
        rows[rollout.id] = phase
    return Standing(statuses, frozenset(rows), rows)


def admits(rollout: Rollout, device: Device, standing: Standing | None, now: datetime) -> bool:
    """Whether the rollout lets ``device`` be offered its deployment at ``now``.

    Without ``standing`` (what :func:`standing_of` loads), a frozen rollout admits nobody
    and a download in progress gets no special treatment."""
    status, error = _status(rollout, standing)
    if status == "reverted" or rollout.state == ABORTED:
        return False  # a device that ran this version and went back does not get it again
    if status in DOWNLOADING_STATES and error != ABORTED_ERROR:
        return True  # let it finish what it started, paused or outside the window
    if rollout.state not in (RUNNING, COMPLETED):
        return False
    if rollout.start_at is not None and now < rollout.start_at:
        return False
    if rollout.window and not parse_window(rollout.window).contains(now):
        return False
    return _phase_open(rollout, device, standing)


def may_download(rollout: Rollout, device: Device, standing: Standing | None) -> bool:
    """Whether ``device`` may fetch the deployment's file: it was (or could have been) offered
    it. Pauses and windows stop offers, not downloads under way; an abort stops both."""
    status, _error = _status(rollout, standing)
    if status == "reverted" or rollout.state == ABORTED:
        return False
    return status in DOWNLOADING_STATES or _phase_open(rollout, device, standing)


def admits_anonymous(rollout: Rollout, now: datetime) -> bool:
    """Devices that do not identify themselves have no phase: they get a phased deployment
    once its rollout completed, inside its window."""
    return rollout.state == COMPLETED and (
        not rollout.window or parse_window(rollout.window).contains(now)
    )


async def forget_device(db: AsyncSession, serial: str) -> None:
    """A deleted device leaves every rollout's rows and counts (in the caller's transaction)."""
    await phasing.forget(db, serial)


# --- counting ----------------------------------------------------------------------------------


@dataclass
class Loaded:
    rollout: Rollout
    deployment: Deployment
    artifact: Artifact


async def _load(db: AsyncSession, rollout_id: int, *, lock: bool) -> Loaded | None:
    """The rollout with its deployment and artifact (one query; ``lock``: the rollout's row
    lock on PostgreSQL)."""
    query = (
        select(Rollout, Deployment, Artifact)
        .join(Deployment, Deployment.id == Rollout.deployment_id)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .where(Rollout.id == rollout_id)
    )
    if lock:
        query = query.with_for_update(of=Rollout)
    row = (await db.execute(query.execution_options(populate_existing=True))).one_or_none()
    if row is None:
        return None
    return Loaded(row[0], row[1], row[2])


async def tally(db: AsyncSession, loaded: Loaded, now: datetime) -> list[PhaseCount]:
    """Per phase: the devices it targets and where they stand (phases.tally: the counters,
    never the devices)."""
    return await phasing.tally(db, loaded.rollout, now)


# --- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A transition: the new state and phase, and the event that records it."""

    state: str
    phase: int
    kind: str
    detail: str | None = None
    reason: str | None = None  # why it is paused or aborted (kept on the rollout)
    cancel: bool = False  # also cancel the deployment (abort)
    acknowledged: dict[str, int] | None = None  # resume: failures accepted per phase


def decide(loaded: Loaded, stats: Sequence[PhaseCount], now: datetime) -> Step | None:
    """The engine's next transition, or None."""
    rollout, deployment = loaded.rollout, loaded.deployment
    state, current = rollout.state, rollout.phase
    if state not in LIVE:
        return None
    if deployment.cancelled_at is not None or deployment.expires_at <= now:
        gone = "cancelled" if deployment.cancelled_at is not None else "expired"
        return Step(ABORTED, current, "aborted", f"deployment {gone}", f"deployment {gone}")
    if state == SCHEDULED:
        if rollout.start_at is None or now >= rollout.start_at:
            return Step(RUNNING, current, "started")
        return None
    phases = phases_of(rollout)
    for count in stats[:current]:
        phase = phases[count.number - 1]
        failed = count.failed - rollout.acknowledged.get(str(count.number), 0)
        if not phase.exceeded(failed, count.targeted):
            continue
        why = f"phase {count.number}: {failed} of {count.targeted} devices failed"
        if phase.on_error == "abort":
            return Step(ABORTED, current, "aborted", why, why, cancel=True)
        if state == RUNNING:
            return Step(PAUSED, current, "paused", why, why)
    if state != RUNNING:
        return None
    phase, count = phases[current - 1], stats[current - 1]
    if phase.manual or not phase.succeeded(count.succeeded, count.targeted):
        return None
    detail = f"{count.succeeded} of {count.targeted} devices applied"
    return _advance(current, len(phases), detail)


def _advance(current: int, last: int, detail: str) -> Step:
    if current >= last:
        return Step(COMPLETED, current, "completed", detail)
    return Step(RUNNING, current + 1, "advanced", detail)


def operator_step(
    loaded: Loaded,
    action: str,
    stats: Sequence[PhaseCount],
    now: datetime,
    *,
    phase: int | None = None,
    reason: str | None = None,
) -> Step | None:
    """The transition an operator asks for; None when it is already so; ConflictError when
    it cannot be done."""
    rollout = loaded.rollout
    state, current = rollout.state, rollout.phase
    if action == "pause":
        if state == PAUSED:
            return None
        if state in (ABORTED, COMPLETED):
            raise _conflict(rollout, "paused")
        why = reason or "paused by an operator"
        return Step(PAUSED, current, "paused", why, why)
    if action == "resume":
        if state in (RUNNING, SCHEDULED):
            return None
        if state in (ABORTED, COMPLETED):
            raise _conflict(rollout, "resumed")
        # paused before it started: scheduled again (the engine starts it, taking the snapshot)
        again = RUNNING if rollout.phase_started_at is not None else SCHEDULED
        acknowledged = dict(rollout.acknowledged)
        for count in stats[:current]:
            acknowledged[str(count.number)] = count.failed
        return Step(again, current, "resumed", reason, None, acknowledged=acknowledged)
    if action == "abort":
        if state == ABORTED:
            return None
        if state == COMPLETED:
            raise _conflict(rollout, "aborted")
        why = reason or "aborted by an operator"
        return Step(ABORTED, current, "aborted", why, why, cancel=True)
    if action == "approve":
        if state != RUNNING:
            raise ConflictError(f"rollout {rollout.id} is {state}; only a running rollout advances")
        if phase is not None and phase != current:
            raise ConflictError(
                f"rollout {rollout.id} is in phase {current}, not {phase} (already approved?)",
            )
        count = stats[current - 1]
        detail = f"approved: {count.succeeded} of {count.targeted} devices applied"
        return _advance(current, len(rollout.phases), detail)
    raise UsageError(f"unknown rollout action {action!r}", value=action)


def _audit_details(rollout: Rollout, step: Step, phase: int) -> dict[str, Any]:
    """What the audit log keeps of a transition: the deployment, the phase it was in, the
    state (and phase) it went to and why."""
    details: dict[str, Any] = {
        "deployment": rollout.deployment_id,
        "phase": phase,
        "state": step.state,
    }
    if step.phase != phase:
        details["to_phase"] = step.phase
    why = step.reason or step.detail
    if why:
        details["reason"] = why[:200]
    return details


_ENGINE_AUDITED = {"paused": "rollout.pause", "aborted": "rollout.abort"}


def _conflict(rollout: Rollout, what: str) -> ConflictError:
    return ConflictError(f"rollout {rollout.id} is {rollout.state} and cannot be {what}")


# --- the engine --------------------------------------------------------------------------------


class RolloutEngine:
    """Evaluates rollouts and applies transitions; one per server process, all sharing the
    database. ``clock`` gives the time (tests replace it)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: ServerSettings,
        clock: Clock = utcnow,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._pruned: datetime | None = None

    def now(self) -> datetime:
        return self.clock()

    # --- background ---

    def start(self) -> None:
        if self.settings.rollout_interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="otakit-rollouts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            # a little jitter, so that several processes do not all evaluate at once
            await asyncio.sleep(self.settings.rollout_interval * random.uniform(0.8, 1.2))
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                down = unavailable(exc)
                if down is None:
                    log.exception("rollout evaluation failed")
                else:  # one line per tick while the database is away, not a traceback
                    log.warning("rollout evaluation failed: %s (%s)", down.message, down.value)

    async def tick(self) -> None:
        """One round: time-based health rules (confirm timeouts, soaks ending) and transitions
        of every live rollout, and the status history's retention. With no traffic it reads a
        few rows per live rollout, never its devices."""
        async with self.sessions() as db:
            ids = list(
                await db.scalars(
                    select(Rollout.id).where(Rollout.state.in_(LIVE)).order_by(Rollout.id)
                )
            )
        for rollout_id in ids:
            await self.sweep_unconfirmed(rollout_id)
            await self.evaluate(rollout_id)
        await self.prune_history()

    # --- evaluation ---

    async def evaluate(self, rollout_id: int) -> None:
        """Apply every transition that is due (start, pause/abort on errors, advance)."""
        for _ in range(MAX_STEPS):
            async with self.sessions() as db:
                now = self.now()
                loaded = await _load(db, rollout_id, lock=False)
                if loaded is None or loaded.rollout.state not in LIVE:
                    return
                if decide(loaded, await tally(db, loaded, now), now) is None:
                    if loaded.rollout.seeded_at is None:
                        await self._seed(db, loaded, now)  # a new rollout that waits
                    return
                await db.rollback()
                # something is due: look again under the row lock, then compare-and-set
                loaded = await _load(db, rollout_id, lock=True)
                if loaded is None:
                    return
                step = decide(loaded, await tally(db, loaded, now), now)
                if step is None:
                    await db.rollback()
                    return
                # the engine's own pauses and aborts (the error threshold) go in the audit log
                audited = _ENGINE_AUDITED.get(step.kind)
                await self._apply(db, loaded, step, audit.ENGINE, now, audited=audited)
        log.warning("rollout %s: more than %s transitions in one evaluation", rollout_id, MAX_STEPS)

    async def _seed(self, db: AsyncSession, loaded: Loaded, now: datetime) -> None:
        """Rows for the devices registered now, so that a scheduled rollout shows what its
        phases hold; the start adds the devices registered since (rows are made once,
        whoever makes them)."""
        rollout = loaded.rollout
        await phasing.seed(db, rollout, loaded.deployment, loaded.artifact, now)
        await db.execute(
            update(Rollout)
            .where(Rollout.id == rollout.id)
            .values(seeded_at=now)
            .execution_options(synchronize_session=False)
        )
        await db.commit()

    async def changed(self, deployment_ids: Iterable[int | None]) -> None:
        """Devices' standing changed in these deployments: evaluate their rollouts. Never
        raises (a device's report must not fail because of a rollout)."""
        wanted = {d for d in deployment_ids if d is not None}
        if not wanted:
            return
        try:
            async with self.sessions() as db:
                ids = list(
                    await db.scalars(
                        select(Rollout.id).where(
                            Rollout.deployment_id.in_(wanted), Rollout.state.in_(LIVE)
                        )
                    )
                )
            for rollout_id in ids:
                await self.evaluate(rollout_id)
        except Exception:
            log.exception("rollout evaluation after a device report failed")

    async def act(
        self,
        rollout_id: int,
        action: str,
        actor: str,
        *,
        phase: int | None = None,
        reason: str | None = None,
    ) -> None:
        """An operator's pause, resume, abort or approve. Raises NotFoundError, and
        ConflictError when it is impossible, or when it could not be applied after
        ``ACT_ATTEMPTS`` tries (other transitions kept winning, or the transition was
        already recorded): never a silent success."""
        for _ in range(ACT_ATTEMPTS):
            async with self.sessions() as db:
                now = self.now()
                loaded = await _load(db, rollout_id, lock=True)
                if loaded is None:
                    raise NotFoundError(f"rollout {rollout_id} not found")
                stats = await tally(db, loaded, now)
                step = operator_step(loaded, action, stats, now, phase=phase, reason=reason)
                if step is None or await self._apply(
                    db, loaded, step, actor, now, audited=f"rollout.{action}"
                ):
                    break
        else:
            raise ConflictError(
                f"rollout {rollout_id}: the {action} could not be applied after "
                f"{ACT_ATTEMPTS} attempts (another change kept getting there first); "
                "look at the rollout and try again"
            )
        await self.evaluate(rollout_id)

    async def _apply(
        self,
        db: AsyncSession,
        loaded: Loaded,
        step: Step,
        actor: str,
        now: datetime,
        *,
        audited: str | None = None,
    ) -> bool:
        """Compare-and-set the transition; False when another process got there first.
        ``audited``: the action to record in the audit log with it (same transaction)."""
        rollout = loaded.rollout
        rollout_id, phase = rollout.id, rollout.phase  # a rollback expires the row
        values: dict[str, Any] = {
            "state": step.state,
            "phase": step.phase,
            "revision": rollout.revision + 1,
            "updated_at": now,
            "reason": step.reason,
        }
        if step.phase != rollout.phase or step.kind == "started":
            values["phase_started_at"] = now
        if step.kind == "started":
            values["seeded_at"] = now
        if step.acknowledged is not None:
            values["acknowledged"] = step.acknowledged
        try:
            result = cast(
                "CursorResult[Any]",
                await db.execute(
                    update(Rollout)
                    .where(Rollout.id == rollout.id, Rollout.revision == rollout.revision)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                ),
            )
            if result.rowcount != 1:
                await db.rollback()
                return False
            db.add(
                RolloutEvent(
                    rollout_id=rollout.id,
                    at=now,
                    kind=step.kind,
                    phase=rollout.phase,
                    actor=actor[:64],
                    detail=(step.detail or None) and step.detail[:256],
                )
            )
            if audited is not None:
                audit.record(
                    db,
                    actor=actor,
                    action=audited,
                    target=f"rollout {rollout_id}",
                    details=_audit_details(rollout, step, phase),
                )
            if step.kind == "started":
                # the devices registered now get their rows (a frozen rollout's snapshot);
                # later ones join at their first check-in (phases.py)
                await phasing.seed(db, rollout, loaded.deployment, loaded.artifact, now)
            if step.cancel:
                await db.execute(
                    update(Deployment)
                    .where(
                        Deployment.id == rollout.deployment_id, Deployment.cancelled_at.is_(None)
                    )
                    .values(cancelled_at=now)
                    .execution_options(synchronize_session=False)
                )
            await revision.bump(db)  # offers cached by every process change with this
            await db.commit()
        except IntegrityError:
            # the unique (rollout, kind, phase) event: another process already did this
            await db.rollback()
            log.warning(
                "rollout %s: %s of phase %s was already recorded",
                rollout_id,
                step.kind,
                phase,
            )
            return False
        except OperationalError as exc:  # SQLite: another writer's snapshot won
            await db.rollback()
            log.info("rollout %s: transition retried after %s", rollout_id, exc.orig)
            return False
        log.info(
            "rollout %s: %s (phase %s -> %s, %s) by %s%s",
            rollout_id,
            step.kind,
            phase,
            step.phase,
            step.state,
            actor,
            f": {step.detail}" if step.detail else "",
        )
        return True

    # --- health ---

    async def sweep_unconfirmed(self, rollout_id: int) -> None:
        """Devices that reported ``applying`` longer than ``confirm_timeout`` ago and never
        checked in with the new version fail (``not confirmed in time``); applied devices
        whose soak has ended count as succeeded."""
        async with self.sessions() as db:
            rollout = await db.get(Rollout, rollout_id)
            if rollout is None:
                return
            now = self.now()
            if rollout.soak and await phasing.promote(db, rollout, now):
                await db.commit()
            if not rollout.confirm_timeout:
                return
            cutoff = now - timedelta(seconds=rollout.confirm_timeout)
            # the rollout's rows that went to applying before the cutoff (an index range:
            # the devices that are late, not all of them)
            late = list(
                await db.scalars(
                    select(RolloutDevice.device_serial).where(
                        RolloutDevice.rollout_id == rollout.id,
                        RolloutDevice.status == "applying",
                        RolloutDevice.updated_at < cutoff,
                    )
                )
            )
            for serial in late:
                result = cast(
                    "CursorResult[Any]",
                    await db.execute(
                        update(DeploymentDevice)
                        .where(
                            DeploymentDevice.deployment_id == rollout.deployment_id,
                            DeploymentDevice.device_serial == serial,
                            DeploymentDevice.status == "applying",
                            DeploymentDevice.updated_at < cutoff,
                        )
                        .values(status="error", error=NOT_CONFIRMED, updated_at=now)
                        .execution_options(synchronize_session=False)
                    ),
                )
                if result.rowcount == 1:
                    await phasing.note(db, rollout, serial, None, "error", None, now)
                    db.add(
                        StatusReport(
                            device_serial=serial,
                            deployment_id=rollout.deployment_id,
                            status="error",
                            error=NOT_CONFIRMED,
                            created_at=now,
                            source="server",
                        )
                    )
            await db.commit()

    async def prune_history(self) -> None:
        """Delete status reports older than ``history_days`` (at most every ten minutes)."""
        now = self.now()
        if self._pruned is not None and now - self._pruned < timedelta(minutes=10):
            return
        self._pruned = now
        cutoff = now - timedelta(days=self.settings.history_days)
        async with self.sessions() as db:
            await db.execute(delete(StatusReport).where(StatusReport.created_at < cutoff))
            await db.commit()


# --- views (management API) --------------------------------------------------------------------


@dataclass
class PhaseView:
    number: int
    percent: float | None
    group: str | None
    success: float
    manual: bool
    max_errors: int | None
    max_errors_percent: float | None
    on_error: str
    status: str  # done, current, waiting
    targeted: int
    succeeded: int
    failed: int
    acknowledged: int
    counts: dict[str, int]
    started_at: datetime | None
    completed_at: datetime | None


@dataclass
class RolloutView:
    id: int
    deployment_id: int
    artifact_id: str
    version: str
    condition: str
    state: str
    phase: int
    reason: str | None
    start_at: datetime | None
    window: str | None
    window_open: bool
    next_window: datetime | None
    frozen: bool
    confirm_timeout: int | None
    max_boots: int | None
    soak: int
    awaiting_approval: bool
    created_at: datetime
    updated_at: datetime
    phase_started_at: datetime | None
    targeted: int
    counts: dict[str, int]
    phases: list[PhaseView]


async def view(db: AsyncSession, rollout_id: int, now: datetime) -> RolloutView | None:
    loaded = await _load(db, rollout_id, lock=False)
    if loaded is None:
        return None
    rollout = loaded.rollout
    stats = await tally(db, loaded, now)
    events = list(
        await db.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == rollout.id)
            .order_by(RolloutEvent.id)
        )
    )
    started: dict[int, datetime] = {}
    completed: dict[int, datetime] = {}
    for event in events:
        if event.kind == "started":
            started[event.phase] = event.at
        elif event.kind in ("advanced", "completed"):
            completed[event.phase] = event.at
            started.setdefault(event.phase + 1, event.at)
    window = parse_window(rollout.window) if rollout.window else None
    phases = phases_of(rollout)
    views = []
    for number, (phase, count) in enumerate(zip(phases, stats, strict=True), 1):
        if rollout.state == COMPLETED or number < rollout.phase:
            status = "done"
        elif number == rollout.phase and rollout.state != SCHEDULED:
            status = "current"
        else:
            status = "waiting"
        views.append(
            PhaseView(
                number=number,
                percent=phase.percent,
                group=phase.group,
                success=phase.success,
                manual=phase.manual,
                max_errors=phase.max_errors,
                max_errors_percent=phase.max_errors_percent,
                on_error=phase.on_error,
                status=status,
                targeted=count.targeted,
                succeeded=count.succeeded,
                failed=count.failed,
                acknowledged=rollout.acknowledged.get(str(number), 0),
                counts=count.counts,
                started_at=started.get(number),
                completed_at=completed.get(number),
            )
        )
    return RolloutView(
        id=rollout.id,
        deployment_id=rollout.deployment_id,
        artifact_id=loaded.artifact.id,
        version=loaded.artifact.version,
        condition=loaded.deployment.condition,
        state=rollout.state,
        phase=rollout.phase,
        reason=rollout.reason,
        start_at=rollout.start_at,
        window=rollout.window,
        window_open=window is None or window.contains(now),
        next_window=window.next_opening(now) if window is not None else None,
        frozen=rollout.frozen,
        confirm_timeout=rollout.confirm_timeout,
        max_boots=rollout.max_boots,
        soak=rollout.soak,
        awaiting_approval=rollout.state == RUNNING
        and (phases[rollout.phase - 1].manual or stats[rollout.phase - 1].targeted == 0),
        created_at=rollout.created_at,
        updated_at=rollout.updated_at,
        phase_started_at=rollout.phase_started_at,
        targeted=sum(c.targeted for c in stats),
        counts=_summed(stats),
        phases=views,
    )


def _summed(stats: Sequence[PhaseCount]) -> dict[str, int]:
    total = empty_counts()
    for count in stats:
        for label, n in count.counts.items():
            total[label] += n
    return total


def new_rollout(
    db: AsyncSession,
    deployment: Deployment,
    phases: Sequence[Phase],
    *,
    actor: str,
    now: datetime,
    start_at: datetime | None = None,
    window: str | None = None,
    frozen: bool = False,
    confirm_timeout: int | None = DEFAULT_CONFIRM_TIMEOUT,
    max_boots: int | None = None,
    soak: int = 0,
) -> Rollout:
    """Add a scheduled rollout (and its ``created`` event) to the session; the caller commits
    and then has the engine evaluate it, which starts it when its time has come."""
    check_phases(phases)
    if window is not None:
        window = parse_window(window).text
    rollout = Rollout(
        deployment_id=deployment.id,
        state=SCHEDULED,
        phase=1,
        phases=[p.to_json() for p in phases],
        start_at=start_at,
        window=window,
        frozen=frozen,
        confirm_timeout=confirm_timeout or None,
        max_boots=max_boots,
        soak=soak,
        acknowledged={},
        revision=0,
        created_at=now,
        updated_at=now,
    )
    db.add(rollout)
    return rollout


def created_event(rollout: Rollout, actor: str, now: datetime) -> RolloutEvent:
    """The ``created`` event of a rollout just flushed (it has its id). Also adds the
    ``rollout.create`` record of the audit log to the rollout's session, so that the caller's
    commit keeps both."""
    plan = ", ".join(Phase.from_json(p).label for p in rollout.phases)
    session = object_session(rollout)
    if session is not None:
        details = {"deployment": rollout.deployment_id, "phases": plan, "frozen": rollout.frozen}
        if rollout.start_at is not None:
            details["start_at"] = rollout.start_at.isoformat()
        if rollout.window:
            details["window"] = rollout.window
        audit.record(
            session,
            actor=actor,
            action="rollout.create",
            target=f"rollout {rollout.id}",
            details=details,
        )
    return RolloutEvent(
        rollout_id=rollout.id, at=now, kind="created", phase=1, actor=actor[:64], detail=plan
    )
